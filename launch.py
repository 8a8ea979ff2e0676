"""capjax's entry point: flags only, then one call into the library.

  python launch.py --config=configs/caption.py --workdir=/tmp/cap
  python launch.py --config=configs/caption.py:runlocal --workdir=/tmp/cap --config.train.steps=50
  python launch.py --mode=predict --workdir=/tmp/cap --images=a.jpg,b.png
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file[:args].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and results go.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files to caption/classify (--mode=predict).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  from capjax import run  # After flag parsing: keeps --help fast.
  try:
    run.main(_CONFIG.value, _WORKDIR.value, _MODE.value, images=_IMAGES.value)
  except run.UserError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
