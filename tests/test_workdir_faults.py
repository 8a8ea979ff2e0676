"""Operator mistakes and full disks, tried on real launch.py runs: the same command started
twice, a disk that fills up during a checkpoint, a workdir that cannot be written, and a
SIGKILL in the middle of a checkpoint write. Each ends in one `error:` line (exit 2) or
resumes bit-identical to a run that was never disturbed.

The disk faults need a small tmpfs, which needs root (CI runs as root); elsewhere they skip.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import runs as rh

STEPS, ARGS = rh.RESUME_STEPS, rh.RESUME_ARGS


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """The shapes data, the compilation cache and one undisturbed reference run."""
  tmp = tmp_path_factory.mktemp('workdir_faults')
  rh.prepare_shapes(str(tmp / 'tfds'))
  rh.finish(rh.launch(args(tmp, tmp / 'ref'), env(tmp), str(tmp / 'ref.log')),
            str(tmp / 'ref.log'))
  return tmp


def args(tmp, workdir) -> list[str]:
  return ARGS + [f'--workdir={workdir}', f'--config.tfds_dir={tmp / "tfds"}']


def env(tmp) -> dict:
  return rh.env(str(tmp / 'jax_cache'))


def launch_and_wait(tmp, workdir, log: str, extra=()) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(rh.ROOT, 'launch.py'),
                         *args(tmp, workdir), *extra], cwd=rh.ROOT, env=env(tmp),
                        capture_output=True, text=True, timeout=400)


def error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith('error:')]


def assert_resumes_bit_identical(tmp, workdir, name: str, *, from_step: int) -> str:
  log = str(tmp / f'{name}.log')
  text = rh.finish(rh.launch(args(tmp, workdir), env(tmp), log), log)
  assert f'Resumed from the checkpoint at step {from_step}' in text
  rh.assert_trees_bit_identical(rh.read_state(workdir, STEPS), rh.read_state(tmp / 'ref', STEPS))
  ref_rows, rows = rh.train_rows(tmp / 'ref'), rh.train_rows(workdir)
  assert all(rows[s]['loss'] == ref_rows[s]['loss'] for s in ref_rows)
  return text


@pytest.fixture
def tmpfs(tmp_path):
  """mount(size, read_only=False) -> a fresh tmpfs folder; unmounted afterwards."""
  if os.geteuid() != 0 or not shutil.which('mount'):
    pytest.skip('mounting a tmpfs needs root')
  mounted = []

  def mount(size: str, read_only: bool = False) -> str:
    point = str(tmp_path / f'disk{len(mounted)}')
    os.makedirs(point)
    options = f'size={size}' + (',ro' if read_only else '')
    out = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', point],
                         capture_output=True, text=True)
    if out.returncode:
      pytest.skip(f'cannot mount a tmpfs here: {out.stderr.strip()}')
    mounted.append(point)
    return point

  yield mount
  for point in mounted:
    subprocess.run(['umount', '-l', point], check=False)


def test_a_second_run_on_a_busy_workdir_stops_naming_the_holder_and_eval_predict_still_work(
    data):
  tmp = data
  workdir = tmp / 'busy'
  log = str(tmp / 'busy.log')
  first = rh.launch(args(tmp, workdir), env(tmp), log, pause_after=6)  # Checkpoint 5 saved.
  rh.wait_for_line(first, log, 'Paused after step 6')
  before = sorted(os.listdir(workdir)), open(workdir / 'metrics.jsonl').read()

  second = launch_and_wait(tmp, workdir, 'second')
  assert second.returncode == 2, second.stderr[-2000:]
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and 'is in use by another training run' in lines[0], lines
  assert f'pid {first.pid}' in lines[0]
  assert (sorted(os.listdir(workdir)), open(workdir / 'metrics.jsonl').read()) == before

  # Reading while it trains: predict uses the newest finished checkpoint, without the lock.
  image = str(tmp / 'image.png')
  from PIL import Image
  Image.new('RGB', (32, 32), (200, 40, 40)).save(image)
  predict = subprocess.run([sys.executable, os.path.join(rh.ROOT, 'launch.py'),
                            '--mode=predict', f'--workdir={workdir}', f'--images={image}'],
                           cwd=rh.ROOT, env=env(tmp), capture_output=True, text=True,
                           timeout=300)
  assert predict.returncode == 0 and predict.stdout.startswith(image + '\t'), predict.stderr

  # Killed without releasing: the next run takes the lock over, says so, resumes exactly.
  first.send_signal(signal.SIGKILL)
  first.wait(60)
  text = assert_resumes_bit_identical(tmp, workdir, 'busy_resume', from_step=5)
  assert f'pid {first.pid}' in text and 'Took over the lock' in text
  assert open(workdir / 'train.lock').read() == ''  # Released at the end: nothing to take over.


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_same_command_resumes_exactly(
    data, tmpfs):
  tmp = data
  workdir = os.path.join(tmpfs('4m'), 'run')
  go = str(tmp / 'fill_done')
  log = str(tmp / 'full.log')
  # Paused after step 7 (checkpoint 5 written) until the disk is full; checkpoint 10 then fails.
  run = rh.launch(args(tmp, workdir), env(tmp), log, pause_after=7, until=go)
  rh.wait_for_line(run, log, 'Paused after step 7')
  filler = os.path.join(os.path.dirname(workdir), 'filler')
  subprocess.run(['dd', 'if=/dev/zero', f'of={filler}', 'bs=64k'], capture_output=True)
  assert shutil.disk_usage(workdir).free < 64 * 1024
  open(go, 'w').close()
  assert run.wait(300) == 2
  text = open(log).read()
  lines = error_lines(text)
  assert len(lines) == 1 and 'No space left on the device to write' in lines[0], text[-3000:]
  assert 'the checkpoint at step 5 is complete' in lines[0] and 'MiB free' in lines[0]
  assert 'Traceback' not in text, text[-3000:]
  assert rh.checkpoint_steps(workdir) == [5]  # Step 10's half-written folder is not listed.

  os.remove(filler)
  assert_resumes_bit_identical(tmp, workdir, 'full_resume', from_step=5)


def test_an_unwritable_workdir_is_one_line_before_any_data_is_read(data, tmpfs):
  tmp = data
  read_only = tmpfs('1m', read_only=True)
  tfds_dir = tmp / 'never_prepared'
  out = subprocess.run([sys.executable, os.path.join(rh.ROOT, 'launch.py'),
                        '--config=configs/caption.py:runlocal', f'--workdir={read_only}/run',
                        f'--config.tfds_dir={tfds_dir}'], cwd=rh.ROOT, env=env(tmp),
                       capture_output=True, text=True, timeout=300)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and 'cannot be written' in lines[0], lines
  assert not tfds_dir.exists()


def test_sigkill_during_a_checkpoint_write_falls_back_to_the_previous_one_and_says_so(data):
  tmp = data
  workdir = tmp / 'killed_saving'
  log = str(tmp / 'killed_saving.log')
  run = rh.launch(args(tmp, workdir), env(tmp), log, hold_save=10)
  rh.wait_for_line(run, log, 'Holding the write of checkpoint 10 open')
  run.send_signal(signal.SIGKILL)
  run.wait(60)
  assert rh.checkpoint_steps(workdir) == [5]
  assert [n for n in os.listdir(workdir / 'checkpoints') if n.startswith('10.')]  # Unfinished.

  text = assert_resumes_bit_identical(tmp, workdir, 'killed_saving_resume', from_step=5)
  assert 'The write of checkpoint 10 did not finish' in text
  assert not [n for n in os.listdir(workdir / 'checkpoints') if 'tmp' in n]


def test_the_lock_admits_one_holder_names_it_and_is_free_again_once_released(tmp_path):
  from capjax.errors import UserError
  from capjax.runtime import lock
  workdir = str(tmp_path / 'new' / 'run')
  fd = lock.acquire(workdir)  # Creates the folder.
  with pytest.raises(UserError, match=rf'in use by another training run \(host .*, pid '
                                      rf'{os.getpid()}, since '):
    lock.acquire(workdir)  # A second open file: flock refuses it, even in this process.
  lock.release(fd)
  assert open(os.path.join(workdir, lock.LOCK_FILE)).read() == ''
  lock.release(lock.acquire(workdir))


def test_a_metrics_write_on_a_full_device_is_one_line_naming_metrics_jsonl(tmp_path):
  from capjax.errors import UserError
  from capjax.train import disk_full
  from capjax.train import logs
  os.symlink('/dev/full', tmp_path / 'metrics.jsonl')  # Every write: ENOSPC.
  writer = logs.MetricWriter(str(tmp_path))
  with pytest.raises(UserError, match=rf'No space left on the device to write '
                                      rf'{tmp_path}/metrics.jsonl \(.* free there\); no '
                                      rf'checkpoint had been completed yet'):
    with disk_full.reported(str(tmp_path)):
      writer.write_scalars(1, {'train/loss': 1.0})
  writer.close()
