"""A Job followed by a Phase (as captioning's self-critical training follows cross-entropy):
the step counter runs on, each phase ends in a checkpoint, the next phase starts with its own
data and a fresh optimizer state, and a run stopped anywhere resumes bit-identical.

The one-layer regression model of test_loop_faults keeps each run under a second.
"""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import runs as rh
from capjax.train import loop
from test_loop_faults import BATCH, Linear, Source, config, regression_step

FIRST, SECOND = 6, 4


def doubled_target_step(state, batch, rng):
  """Another objective: regress onto the target `prepare` computed on the host."""
  del rng
  def loss_fn(params):
    return jnp.mean((state.apply_fn({'params': params}, batch['x']) - batch['target']) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {'second_loss': loss}


def prepare(state, batch, rng, step):
  """Host work between device programs, as SCST's decode and reward are."""
  del state, rng
  y = np.asarray(jax.device_get(batch['y']))
  target = jax.make_array_from_callback(y.shape, batch['y'].sharding, lambda i: 2 * y[i])
  return {'x': batch['x'], 'target': target}, {'steps_before': float(step)}


def job(with_second_phase=True, learning_rate=0.01):
  data = lambda offset: (grain.MapDataset.source(Source()).slice(slice(offset, None))
                         .repeat(None).batch(BATCH, drop_remainder=True))
  second = loop.Phase('second', SECOND, data(32), doubled_target_step,
                      optimizer=optax.adamw(optax.constant_schedule(learning_rate)),
                      prepare=prepare)
  return loop.Job(model=Linear(), sample_inputs=(jnp.zeros((1, 3)),), train_data=data(0),
                  train_step=regression_step, total_steps=FIRST, name='first',
                  then=(second,) if with_second_phase else (),
                  checkpoint_extras={'tag': 'kept'})


def cfg():
  return config(checkpoint_every=100)  # Only the phase ends (and stops) are checkpointed.


def stop_after(step):
  def hook(trainer):
    if trainer.step == step:
      trainer.stop.raised = 'SIGTERM'
  return hook


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('phases') / 'ref')
  outcome = loop.train(job(), cfg(), workdir)
  assert outcome.step == FIRST + SECOND and not outcome.interrupted
  return workdir


def _adam_counts(state_tree) -> set:
  counts = set()
  jax.tree_util.tree_map_with_path(
      lambda path, x: counts.add(int(x)) if 'count' in jax.tree_util.keystr(path) else None,
      state_tree['opt_state'])
  return counts


def test_phases_share_the_step_counter_and_each_ends_in_a_checkpoint(uninterrupted):
  assert rh.checkpoint_steps(uninterrupted) == [FIRST, FIRST + SECOND]
  rows = rh.train_rows(uninterrupted)
  assert sorted(rows) == list(range(1, FIRST + SECOND + 1))
  assert all('loss' in rows[s] and 'second_loss' not in rows[s] for s in range(1, FIRST + 1))
  # The host's metrics join the step's: `prepare` saw the steps done before each step.
  assert all(rows[s]['steps_before'] == s - 1 and 'loss' not in rows[s]
             for s in range(FIRST + 1, FIRST + SECOND + 1))


def test_the_second_phase_starts_with_a_fresh_optimizer_state(uninterrupted):
  assert _adam_counts(rh.read_state(uninterrupted, FIRST)) == {FIRST}
  assert _adam_counts(rh.read_state(uninterrupted, FIRST + SECOND)) == {SECOND}


def test_checkpoints_record_their_phase_and_the_jobs_extras(uninterrupted):
  from capjax.train import checkpoint
  step, data_state = checkpoint.newest_data_state(uninterrupted)
  assert step == FIRST + SECOND and data_state['phase'] == 'second'
  assert data_state['tag'] == 'kept'


def test_a_run_stopped_inside_the_second_phase_resumes_bit_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  outcome = loop.train(job(), cfg(), workdir, hooks=[stop_after(FIRST + 2)])
  assert outcome.interrupted and rh.checkpoint_steps(workdir) == [FIRST, FIRST + 2]
  outcome = loop.train(job(), cfg(), workdir)
  assert outcome.step == FIRST + SECOND and not outcome.interrupted
  rh.assert_trees_bit_identical(rh.read_state(workdir, FIRST + SECOND),
                                rh.read_state(uninterrupted, FIRST + SECOND))


def test_a_phase_added_to_a_finished_run_starts_from_its_last_checkpoint(uninterrupted,
                                                                         tmp_path):
  workdir = str(tmp_path / 'run')
  assert loop.train(job(with_second_phase=False), cfg(), workdir).step == FIRST
  outcome = loop.train(job(), cfg(), workdir)  # The same workdir, now with the second phase.
  assert outcome.step == FIRST + SECOND
  rh.assert_trees_bit_identical(rh.read_state(workdir, FIRST + SECOND),
                                rh.read_state(uninterrupted, FIRST + SECOND))


def test_a_phase_optimizer_laid_out_unlike_the_jobs_is_refused(tmp_path):
  bad = job()
  bad.then = (loop.Phase('second', SECOND, bad.train_data, doubled_target_step,
                         optimizer=optax.sgd(0.1, momentum=0.9)),)
  with pytest.raises(ValueError, match="Phase 'second' has an optimizer"):
    loop.train(bad, cfg(), str(tmp_path / 'run'))
