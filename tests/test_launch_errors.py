"""launch.py ends every mistake a user can make with one line `error: ...` and exit status 2:
no traceback, and no workdir created for a run that never started."""
import concurrent.futures
import os
import subprocess
import sys

from helpers import runs as rh

CAPTION = '--config=configs/caption.py:runlocal'

# (extra arguments, what the error line must say); {tmp} is the test's folder.
CASES = [
    ([CAPTION, '--config.train.foo=1'], '--config.train.foo is not a field of the config'),
    ([CAPTION, '--config.trian.steps=1'], '--config.trian.steps is not a field of the config'),
    ([CAPTION, '--config.train.steps=abc'], "--config.train.steps=abc: invalid literal"),
    (['--config=configs/nope.py'], '--config file configs/nope.py does not exist'),
    (['--config=configs/caption.py:bogus=1'], "Unknown config argument 'bogus'"),
    ([CAPTION, '--config.train.batch_size=0'], 'config.train.batch_size=0 is not allowed'),
    ([CAPTION, '--config.train.steps=0'], 'config.train.steps=0 must be > 0'),
    ([CAPTION, '--config.optim.learning_rate=-0.1'], 'config.optim.learning_rate=-0.1'),
    ([CAPTION, '--config.eval.decoding=sample'], "config.eval.decoding='sample'"),
    ([CAPTION, '--config.eval.beam_size=0'], 'config.eval.beam_size=0'),
    ([CAPTION, '--config.shapes.image_size=30'],
     'config.shapes.image_size=30 must be a multiple of 4'),
    ([CAPTION, '--config.train.nan_policy=ignore'], "config.train.nan_policy='ignore'"),
    ([CAPTION, '--config.model.widths=abc'], 'config.model.widths'),
    ([CAPTION, '--config.model.score=foo'], "config.model.score='foo'"),
    ([CAPTION, '--config.tfds_dir={tmp}/a_file'], 'config.tfds_dir='),
    ([CAPTION, '--workdir={tmp}/a_file'], '--workdir={tmp}/a_file is a file'),
    ([CAPTION, '--mode=eval'], 'holds no checkpoints'),
    (['--mode=predict', '--images=x.jpg'], 'config.json is missing'),
    (['--mode=predict'], '--images is empty'),
    ([CAPTION, 'stray'], 'unexpected arguments'),
    ([CAPTION, '--num_processes=2'], '--coordinator_address and --process_id are missing'),
    ([CAPTION, '--num_processes=2', '--process_id=2', '--coordinator_address=127.0.0.1:1'],
     '--process_id=2 must be in 0..1'),
]


def _run(args, tmp, timeout=600):
  args = [a.replace('{tmp}', str(tmp)) for a in args]
  if not any(a.startswith('--workdir') for a in args):
    args.append(f'--workdir={tmp}/work')
  return subprocess.run([sys.executable, os.path.join(rh.ROOT, 'launch.py'), *args],
                        cwd=rh.ROOT, env=rh.env(), capture_output=True, text=True,
                        timeout=timeout)


def test_every_user_mistake_is_one_error_line_exit_2_and_no_workdir(tmp_path):
  (tmp_path / 'a_file').write_text('not a folder')
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outs = list(pool.map(lambda case: _run(case[0], tmp_path), CASES))
  for (args, says), out in zip(CASES, outs):
    says = says.replace('{tmp}', str(tmp_path))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], (args,
                                                                                      lines)
  assert not (tmp_path / 'work').exists()


def test_divergence_is_one_error_line_and_predict_reports_bad_files_and_a_damaged_checkpoint(
    tmp_path):
  """Both slower runs side by side: a run whose huge learning rate makes the loss NaN, and
  predict on a mix of readable and broken images, from a workdir whose newest checkpoint is
  damaged."""
  rh.prepare_shapes(str(tmp_path / 'tfds'))
  nan_args = [CAPTION, f'--config.tfds_dir={tmp_path / "tfds"}', '--config.train.steps=8',
              '--config.train.checkpoint_every=1', '--config.optim.learning_rate=1e30',
              '--config.optim.warmup_steps=0', '--config.optim.grad_clip_norm=0',
              f'--workdir={tmp_path / "nan"}']
  rh.make_predict_workdir(str(tmp_path / 'predict'), damaged_latest=True)
  images = rh.write_bad_images(str(tmp_path / 'images'))
  paths = [p for p, _, _ in images if ',' not in p]
  predict_args = ['--mode=predict', f'--workdir={tmp_path / "predict"}',
                  '--images=' + ','.join(paths)]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    nan, pred = pool.map(lambda a: _run(a, tmp_path), [nan_args, predict_args])

  last = nan.stderr.strip().splitlines()[-1]
  assert nan.returncode == 2 and 'Traceback' not in nan.stderr, nan.stderr[-3000:]
  assert last.startswith('error: The loss or gradients became NaN/Inf at step '), last
  bad_step = int(last.split('at step ')[1].split(',')[0])
  saved = rh.checkpoint_steps(str(tmp_path / 'nan'))
  assert all(s < bad_step for s in saved), (saved, bad_step)
  if saved:
    assert f'(step {saved[-1]}) is intact' in last

  # The damaged step-2 checkpoint is one warning line (no tensorstore tracebacks after it),
  # and no library prints anything else.
  assert pred.returncode == 0, pred.stderr[-3000:]
  lines = pred.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Checkpoint 2 in' in lines[0], pred.stderr[-3000:]
  assert 'cannot be read' in lines[0] and 'using step 1 instead' in lines[0]
  out = pred.stdout.strip().splitlines()
  assert len(out) == len(paths) + 1
  for (path, readable, says), line in zip(images, out):
    assert line.startswith(path + '\t') and (('error:' in line) != readable), line
