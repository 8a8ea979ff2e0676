"""Starting runs and reading them back: launch.py in a subprocess (optionally paused at a
step), the runlocal shapes data, a predict workdir, and a workdir's checkpoints and metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAUSED_LAUNCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paused_launch.py')


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), loaded from the file as launch.py does."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(f'{name}_cfg',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# The runlocal shapes data set; prepared once per test module so runs started side by side
# do not all generate it into the same folder at once.
SHAPES = dict(image_size=32, num_train=256, num_validation=32, num_test=32, seed=0)


# The kill and fault tests' run: runlocal captioning for 14 steps, checkpoints at 5 and 10, a
# metrics row every step, dropout on (so an exact resume covers the dropout draws too).
RESUME_STEPS = 14
RESUME_ARGS = ['--config=configs/caption.py:runlocal', f'--config.train.steps={RESUME_STEPS}',
               '--config.train.checkpoint_every=5', '--config.train.log_every=1',
               '--config.train.eval_every=0', '--config.model.dropout=0.3']


def prepare_shapes(tfds_dir: str) -> None:
  from capjax.data import shapes_tfds
  shapes_tfds.prepare(tfds_dir, **SHAPES)


def env(cache_dir: str | None = None, **extra) -> dict:
  """A CPU-only environment; `cache_dir` shares compiled programs between the runs of a test
  (the same program compiles once; results are unchanged, it is the same executable)."""
  out = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  out.pop('XLA_FLAGS', None)
  if cache_dir:
    out.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  out.update({k: str(v) for k, v in extra.items()})
  return out


def launch(args, env_vars: dict, log_path: str, pause_after: int | None = None,
           **hooks) -> subprocess.Popen:
  """Starts `python launch.py *args` with stdout+stderr going to `log_path`; with
  `pause_after`, its loop waits after that step for a signal, and `hooks` (until=FILE,
  hold_save=STEP) are the other options of helpers/paused_launch.py."""
  log = open(log_path, 'w')
  if pause_after is not None:
    hooks['pause'] = pause_after
  program = ([PAUSED_LAUNCH, *[f'+{k}={v}' for k, v in hooks.items()]] if hooks else
             [os.path.join(ROOT, 'launch.py')])
  return subprocess.Popen([sys.executable, *program, *args], cwd=ROOT, env=env_vars,
                          stdout=log, stderr=subprocess.STDOUT)


def wait_for_line(proc: subprocess.Popen, log_path: str, text: str, timeout: float = 300
                  ) -> None:
  """Waits until `text` appears in the log; fails if the process exits or time runs out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    with open(log_path) as f:
      if text in f.read():
        return
    if proc.poll() is not None:
      raise AssertionError(f'exited ({proc.returncode}) before {text!r}:\n' + tail(log_path))
    time.sleep(0.1)
  proc.kill()
  raise AssertionError(f'timed out waiting for {text!r}:\n' + tail(log_path))


def finish(proc: subprocess.Popen, log_path: str, timeout: float = 400) -> str:
  """Waits for the process; returns its log; fails (with the log's tail) on a non-zero exit."""
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError('timed out:\n' + tail(log_path)) from None
  text = open(log_path).read()
  assert proc.returncode == 0, f'exit {proc.returncode}:\n' + tail(log_path)
  return text


def tail(path: str, n: int = 4000) -> str:
  return open(path).read()[-n:]


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def read_state(workdir: str, step: int) -> dict:
  """The saved train state of `step` as a tree of numpy arrays (params, opt_state, step)."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path)


def train_rows(workdir: str) -> dict[int, dict]:
  from capjax.train import logs
  return {r['step']: r for r in logs.read_metrics(workdir) if r['split'] == 'train'}


def assert_trees_bit_identical(a, b) -> None:
  import jax
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), f'{jax.tree_util.keystr(path)} differs'


def metrics_json(workdir: str, name: str) -> dict:
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


def write_bad_images(folder: str) -> list[tuple[str, bool, str]]:
  """Every kind of awkward image file a user's folder holds, written under `folder`.

  Returns (path, readable, what the error must say) per file: readable files (grey, CMYK,
  RGBA, 16-bit, palette, a non-ASCII name) must decode to RGB; the others must raise one
  DataError naming the file.
  """
  import io
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8))

  def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()

  jpeg, png = encoded(rgb, 'JPEG'), encoded(rgb, 'PNG')
  files = {
      'grey.png': (encoded(rgb.convert('L'), 'PNG'), True, ''),
      'cmyk.jpg': (encoded(rgb.convert('CMYK'), 'JPEG'), True, ''),
      'rgba.png': (encoded(rgb.convert('RGBA'), 'PNG'), True, ''),
      'deep16.png': (encoded(Image.fromarray(
          rng.integers(0, 65536, (20, 30)).astype(np.uint16)), 'PNG'), True, ''),
      'palette.gif': (encoded(rgb.convert('P'), 'GIF'), True, ''),
      'naïve ünïcode.jpg': (jpeg, True, ''),
      'zero_bytes.jpg': (b'', False, 'empty'),
      'truncated.jpg': (jpeg[:len(jpeg) // 2], False, 'corrupt or truncated'),
      'truncated.png': (png[:len(png) // 2], False, 'corrupt or truncated'),
      'notes.jpg': (b'these are my holiday notes, not a picture\n', False, 'not an image'),
      'download_error.png': (b'<html><body>403 Forbidden</body></html>', False, 'not an image'),
      'bad_header.jpg': (b'\xff\xd8\xff' + bytes(rng.integers(0, 256, 500, np.uint8)), False,
                         'JPEG'),
      # 11000 x 10000 = 110 MP bilevel: a few kB on disk, over the 100 MP limit.
      'huge.png': (encoded(Image.new('1', (11000, 10000)), 'PNG'), False, 'MP'),
  }
  out = []
  for name, (data, readable, says) in files.items():
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
      f.write(data)
    out.append((path, readable, says))
  os.makedirs(os.path.join(folder, 'folder.jpg'), exist_ok=True)
  out.append((os.path.join(folder, 'folder.jpg'), False, 'folder'))
  out.append((os.path.join(folder, 'missing.jpg'), False, 'does not exist'))
  return out


def make_predict_workdir(workdir: str, damaged_latest: bool = False) -> None:
  """A workdir predict can use, without training: config, vocabulary, a step-1 checkpoint
  of a freshly initialised runlocal captioner (and a step-2 one with truncated arrays)."""
  import jax
  from capjax.caption import task as caption_task
  from capjax.runtime import workdir as run_files
  from capjax.data.tokenizer import Vocabulary
  from capjax.train import checkpoint
  from capjax.train import state as state_lib
  from capjax.train.optim import make_optimizer
  config = load_config('caption', 'runlocal')
  os.makedirs(workdir, exist_ok=True)
  run_files.save_config(config, workdir)
  vocab = Vocabulary(['a', 'red', 'blue', 'circle', 'square'])
  vocab.save(os.path.join(workdir, 'vocab.json'))
  model = caption_task.build_model(config, len(vocab))
  state = state_lib.create(model, make_optimizer(config.optim, 1), jax.random.key(0),
                           *caption_task.sample_inputs(config))
  mngr = checkpoint.manager(workdir, keep=2, async_save=False)
  checkpoint.save(mngr, 1, state, {'iterator': {}})
  if damaged_latest:
    checkpoint.save(mngr, 2, state, {'iterator': {}})
  mngr.close()
  if damaged_latest:
    import glob
    for path in glob.glob(os.path.join(workdir, 'checkpoints', '2', 'state', '**', 'd', '*'),
                          recursive=True):
      with open(path, 'r+b') as f:
        f.truncate(7)
