"""capjax's entry point: flags only, then one call into the library.

  python launch.py --config=configs/caption.py --workdir=/tmp/cap
  python launch.py --config=configs/caption.py:runlocal --workdir=/tmp/cap --config.train.steps=50
  python launch.py --mode=predict --workdir=/tmp/cap --images=a.jpg,b.png
  python launch.py --config=configs/bench.py:task=classify --mode=bench

Several processes (one per host or GPU; see docs/distributed.md), each with its own id:
  python launch.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

A mistake a user can fix (a flag, a config field or value, a path, a bad file) ends the run
with one line `error: <what is wrong and what to do>` on stderr and exit status 2.
"""
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from capjax.runtime import host_memory, xla_flags

if __name__ == '__main__':  # Only as the program: the restart replaces the whole process.
  host_memory.restart_with_huge_pages()
xla_flags.apply()  # Before anything starts JAX's backend.

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:args].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'bench'],
                          'What to do (bench: time the train step and input pipeline).')
_IMAGES = flags.DEFINE_list('images', [], 'Image files to caption/classify (--mode=predict).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs '
    '(default: $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'How many processes run this job (default: $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1 (default: $JAX_PROCESS_ID).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Start jax.distributed with JAX\'s own detection (TPU pods, SLURM, '
    'Open MPI) when the three flags above are not given.')

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
  """Prints one `error:` line and exits: no traceback for mistakes a user can fix."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _innermost(message: str) -> str:
  """The last 'SomeError: text' line of a message that embeds a traceback (ml_collections
  wraps errors raised inside a config file's get_config that way)."""
  lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
  for line in reversed(lines):
    m = re.match(r'^[\w.]*(Error|Exception): (.+)$', line)
    if m:
      return m.group(2)
  return lines[0] if lines else str(message)


def _parse_flags(argv):
  """absl's parsing, with each failure turned into one `error:` line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections raises a bare KeyError/AttributeError for --config.<unknown field>.
    key = str(e.__context__ or e).strip('"\'')
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')
           and key in a.split('=')[0].split('.')]
    _fail(f'{bad[0] if bad else "--config." + key} is not a field of the config; check the '
          f'spelling against the config file (fields cannot be added from the command line).')
  except flags.Error as e:
    text = str(e)
    if 'Error whilst parsing config file' in text or 'Traceback' in text:
      text = _innermost(text)
    _fail(text)
  except (OSError, SyntaxError, ImportError) as e:  # The --config file itself.
    _fail(f'cannot load the --config file ({type(e).__name__}: {_innermost(str(e))}); pass '
          f'a configs/*.py file.')


def _config():
  """The parsed config, or None; a --config file that failed to load is one error line."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.get('task')  # ml_collections defers a load error to the first field read.
    return config
  except (OSError, SyntaxError, ImportError) as e:
    path = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
    if not os.path.isfile(path):
      _fail(f'--config file {path} does not exist; pass a configs/*.py file.')
    _fail(f'cannot load the --config file {path} ({_innermost(str(e.__cause__ or e))}).')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; every option is a --flag=value.')
  if not _WORKDIR.value and _MODE.value != 'bench':
    _fail('--workdir is required (the folder for checkpoints, metrics and results).')
  from capjax import run  # After flag parsing: keeps --help fast.
  from capjax.runtime import distributed
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value)
    run.main(_config(), _WORKDIR.value, _MODE.value, images=_IMAGES.value)
  except run.UserError as e:
    _fail(str(e))
  except KeyboardInterrupt:  # A second Ctrl-C while stopping: the user insists.
    print('error: interrupted.', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
