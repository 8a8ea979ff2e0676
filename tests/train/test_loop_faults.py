"""The training loop under faults: damaged checkpoints, NaN/Inf steps, cut-off log lines.

A one-layer regression model keeps each run under a second, so every fault is tried on the
real loop (`loop.train`) and real orbax checkpoints rather than on mocks.
"""
import errno
import gc
import glob
import logging
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import runs as rh
from helpers.pause import pause_after
from capjax.errors import UserError
from capjax.train import checkpoint, guard, logs, loop
from capjax.train import state as state_lib

BATCH, STEPS = 4, 10


class Linear(nn.Module):
  features: int = 1

  @nn.compact
  def __call__(self, x_BxD):
    return nn.Dense(self.features)(x_BxD).sum(-1)


def regression_step(state, batch, rng):
  del rng
  def loss_fn(params):
    return jnp.mean((state.apply_fn({'params': params}, batch['x']) - batch['y']) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {'loss': loss}


class Source:
  """Example i is fixed by i; examples in `poison` carry a NaN input."""

  def __init__(self, poison=()):
    self.poison = set(poison)

  def __len__(self):
    return 64

  def __getitem__(self, i):
    x = np.random.default_rng(i).normal(size=3).astype(np.float32)
    if i in self.poison:
      x[0] = np.nan
    return {'x': x, 'y': np.float32(x.sum())}


def job(poison_step=None, features=1):
  """A Job whose batch of step `poison_step` (1-based) holds a NaN; no shuffle, so it is known."""
  poison = range((poison_step - 1) * BATCH, poison_step * BATCH) if poison_step else ()
  data = grain.MapDataset.source(Source(poison)).repeat(None).batch(BATCH, drop_remainder=True)
  return loop.Job(model=Linear(features), sample_inputs=(jnp.zeros((1, 3)),), train_data=data,
                  train_step=regression_step, total_steps=STEPS)


def config(**train):
  train = dict(dict(batch_size=BATCH, log_every=1, eval_every=0, checkpoint_every=5,
                    keep_checkpoints=5, nan_policy='stop'), **train)
  return ml_collections.ConfigDict(dict(
      seed=0, data=dict(num_threads=0), train=train,
      optim=dict(name='adamw', learning_rate=0.05, warmup_steps=0, final_lr_fraction=1.0,
                 weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=0.0)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 10-step run with checkpoints at 5 and 10."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'base')
  loop.train(job(), config(), workdir)
  assert rh.checkpoint_steps(workdir) == [5, 10]
  return workdir


def _truncate_arrays(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True):
    with open(f, 'r+b') as fh:
      fh.truncate(7)


def _delete_manifests(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'state', '**', 'manifest.ocdbt'), recursive=True):
    os.remove(f)


def _garble_data_state(step_dir):
  with open(os.path.join(step_dir, 'data', 'metadata'), 'w') as f:
    f.write('{"iterator": ')


def _empty_folder(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


@pytest.mark.parametrize('damage', [_truncate_arrays, _delete_manifests, _garble_data_state,
                                    _empty_folder], ids=lambda f: f.__name__.strip('_'))
def test_damaged_latest_checkpoint_falls_back_in_one_line_sets_it_aside_and_resumes_exactly(
    trained, tmp_path, caplog, damage):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  expected = rh.read_state(workdir, 10)
  damage(os.path.join(workdir, 'checkpoints', '10'))
  # A save killed half-way leaves an orbax temporary folder: ignored, then cleaned up.
  os.makedirs(os.path.join(workdir, 'checkpoints', '15.orbax-checkpoint-tmp-1700000000', 'x'))
  with caplog.at_level(logging.WARNING):
    outcome = loop.train(job(), config(), workdir)
  # One line for each fault; orbax's own complaints about the files it tripped over are muted.
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and (
      'checkpoint' in r.getMessage().lower() or '/orbax/' in r.pathname)]
  assert len(warnings) == 2 and not any('\n' in w for w in warnings), warnings
  assert warnings[0].startswith('The write of checkpoint 15 did not finish')
  assert 'Checkpoint 10' in warnings[1] and 'using step 5 instead' in warnings[1]
  assert outcome.step == STEPS and not outcome.interrupted
  # The damaged checkpoint is kept aside (never deleted), and step 10 was saved afresh.
  assert os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR)) == ['10']
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['5', '10']
  rh.assert_trees_bit_identical(rh.read_state(workdir, 10), expected)


@pytest.mark.parametrize('fault', ['truncated', 'wrong_shape'])
def test_failed_reads_are_silenced_only_while_restore_latest_runs(trained, tmp_path,
                                                                  monkeypatch, fault):
  """No checkpoint reads (truncated arrays, or a model of another shape): what the failed
  reads leave behind -- late 'Event loop is closed' reports, read tasks and coroutines asyncio
  and the collector report -- all comes inside restore_latest, which then puts
  sys.unraisablehook and the asyncio logger back as they were."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  if fault == 'truncated':
    for step in ('5', '10'):
      _truncate_arrays(os.path.join(workdir, 'checkpoints', step))
  leaked = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: leaked.append(repr(u.exc_value)))
  asyncio_logger = logging.getLogger('asyncio')
  recorder = logging.Handler()
  recorder.emit = lambda record: leaked.append(record.getMessage())
  asyncio_logger.addHandler(recorder)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      with pytest.raises(UserError, match='None of the 2 checkpoints'):
        loop.train(job(features=1 if fault == 'truncated' else 2), config(), workdir)
      time.sleep(0.2)  # Any report still to come, and any task left to collect.
      gc.collect()
  finally:
    asyncio_logger.removeHandler(recorder)
  assert leaked == [] and not [w for w in caught if 'never awaited' in str(w.message)]
  assert sys.unraisablehook.__name__ == '<lambda>'  # Ours again, not the restore's.
  assert checkpoint._drop_orphaned_read_tasks not in asyncio_logger.filters


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_at_that_step_and_a_restart_finishes_exactly(
    trained, tmp_path, signum):
  workdir = str(tmp_path / 'run')

  def signal_when_paused():  # Step 6's metrics are written once step 7 is under way.
    while 6 not in rh.train_rows(workdir):
      time.sleep(0.05)
    os.kill(os.getpid(), signum)

  threading.Thread(target=signal_when_paused, daemon=True).start()
  outcome = loop.train(job(), config(), workdir, hooks=[pause_after(7)])  # Waits there.
  assert outcome.interrupted and outcome.step == 7
  assert rh.checkpoint_steps(workdir) == [5, 7]
  outcome = loop.train(job(), config(), workdir)
  assert not outcome.interrupted and outcome.step == STEPS
  rh.assert_trees_bit_identical(rh.read_state(workdir, 10), rh.read_state(trained, 10))


def test_checkpoints_that_do_not_fit_the_model_are_an_error_and_are_left_in_place(
    trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  with pytest.raises(UserError, match='None of the 2 checkpoints .* can be read.*new --workdir'):
    loop.train(job(features=2), config(), workdir)  # The model changed shape.
  assert rh.checkpoint_steps(workdir) == [5, 10]
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED_DIR))


def test_nan_under_stop_names_the_step_saves_nothing_after_it_and_keeps_the_last_checkpoint(
    tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(guard.TrainingDiverged, match=r'NaN/Inf at step 7, .*\(step 5\) is intact'):
    loop.train(job(poison_step=7), config(), workdir)
  assert rh.checkpoint_steps(workdir) == [5]
  saved = rh.read_state(workdir, 5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved['params']))
  rows = rh.train_rows(workdir)
  assert np.isnan(rows[7]['loss']) and max(rows) <= 8  # Stopped one step after (read late).


def test_nan_under_skip_leaves_the_state_unchanged_for_that_step_and_counts_it(tmp_path):
  workdir = str(tmp_path / 'run')
  outcome = loop.train(job(poison_step=3), config(nan_policy='skip'), workdir)
  assert outcome.step == STEPS
  assert int(outcome.state.step) == STEPS - 1  # One update was skipped.
  rows = rh.train_rows(workdir)
  assert [rows[s]['skipped_steps'] for s in (2, 3, STEPS)] == [0, 1, 1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(outcome.state.params))
  assert rh.checkpoint_steps(workdir) == [5, 10]


def test_guarded_step_selects_the_old_state_inside_jit_when_the_update_is_not_finite():
  model = Linear()
  tx = loop.make_optimizer(config().optim, 10)
  state = state_lib.create(model, tx, jax.random.key(0), jnp.zeros((1, 3)))
  health = {'step': jnp.int32(0), 'nonfinite': jnp.int32(0), 'first_bad': jnp.int32(-1)}
  step = jax.jit(lambda s, h, b: guard.guarded_step(regression_step, s, h, b, None,
                                                   nan_policy='skip'))
  good = {'x': jnp.ones((BATCH, 3)), 'y': jnp.ones((BATCH,))}
  bad = {'x': good['x'].at[0, 0].set(jnp.inf), 'y': good['y']}
  after_bad, health, _ = step(state, health, bad)
  rh.assert_trees_bit_identical(after_bad.params, state.params)
  assert jax.device_get(health) == {'step': 1, 'nonfinite': 1, 'first_bad': 1}
  after_good, health, metrics = step(after_bad, health, good)
  assert int(after_good.step) == 1 and float(metrics['skipped_steps']) == 1.0
  assert jax.device_get(health)['step'] == 2


def test_a_metrics_line_cut_short_by_a_kill_does_not_swallow_the_next_row(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
  writer = logs.MetricWriter(str(tmp_path))
  writer.write_scalars(2, {'train/loss': 2.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in logs.read_metrics(str(tmp_path))] == [(1, 1.0),
                                                                                (2, 2.0)]


def _raised_in_orbax():
  """exc_info of an error raised in a frame of orbax's code, as a failed read's is."""
  try:
    exec(compile('raise ValueError("Requested shape: (2,)")',  # pylint: disable=exec-used
                 '/site-packages/orbax/checkpoint/_src/x.py', 'exec'))
  except ValueError:
    return sys.exc_info()


@pytest.mark.parametrize('text,in_orbax,dropped', [
    ('Task exception was never retrieved\nfuture: <Task ... in deserialize(...)>', False, True),
    ('Future exception was never retrieved\nfuture: <Future finished exception=ValueError('
     '\'NOT_FOUND: Error opening "zarr" driver ... [tensorstore_spec=...]\')>', False, True),
    ('_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished '
     'exception=ValueError(\'Requested shape: (2,)\')>', True, True),
    ('Future exception was never retrieved\nfuture: <Future finished exception=KeyError(1)>',
     False, False),
    ('Task was destroyed but it is pending! deserialize', False, False),
])
def test_only_orphaned_checkpoint_reads_are_dropped_from_asyncio_logs(text, in_orbax, dropped):
  record = logging.LogRecord('asyncio', logging.ERROR, __file__, 1, text, None,
                             _raised_in_orbax() if in_orbax else None)
  assert checkpoint._drop_orphaned_read_tasks(record) is not dropped


def test_a_full_disk_while_closing_the_tensorboard_file_warns_and_leaves_nothing_for_atexit(
    tmp_path):
  """tensorboardX keeps a writer whose last flush failed open, and its atexit hook would flush
  again and its worker thread die at exit, each printing a traceback after the run's one error
  line (seen on a full disk)."""
  writer = logs.MetricWriter(str(tmp_path))
  writer.write_scalars(1, {'train/loss': 1.0})
  event_writer = writer._tb.file_writer.event_writer  # pylint: disable=protected-access

  def full_disk():
    raise OSError(errno.ENOSPC, 'No space left on device')

  event_writer._ev_writer.flush = full_disk  # pylint: disable=protected-access
  writer.close()  # Warns instead of raising.
  # pylint: disable=protected-access
  assert event_writer._closed and not event_writer._worker.is_alive()
  event_writer.close()  # What the atexit hook calls: now nothing.
  assert open(tmp_path / 'metrics.jsonl').read().count('"loss": 1.0') == 1
