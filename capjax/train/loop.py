"""The training loop shared by every task: jit, shard, checkpoint, log, resume.

Startup order: the newest readable checkpoint in workdir, else a fresh init.

What makes a run safe to kill and restart:
  * Exact resume. A checkpoint holds the train state and the data iterator's position; the
    batches are a pure function of (seed, position) and dropout of (seed, state.step), so a
    run restarted from step N computes exactly the steps N+1... it would have computed.
  * SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and returns
    `Outcome(interrupted=True)`. With several processes they agree on the step to stop at.
  * Non-finite guard. Inside the jitted step a NaN/Inf loss, gradient or new state leaves the
    state unchanged and is counted; the host sees it when it reads metrics (one step late, so
    the device never waits) and before every checkpoint or validation. config.train.nan_policy
    'stop' ends the run with `TrainingDiverged` naming the step, without saving; 'skip' goes on
    and logs the count as the metric `skipped_steps`. No non-finite state is ever saved.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax.runtime import distributed
from capjax.data import loading
from capjax.errors import UserError
from capjax.train import checkpoint, logs, sharding
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

NAN_POLICIES = ('stop', 'skip')
# Fault-injection hook for the kill/resume tests: with CAPJAX_PAUSE_AT_STEP=N set, the loop
# waits after dispatching step N (with every save finished) until a signal arrives, so a test
# can SIGKILL or SIGTERM the run at a step of its choosing instead of racing a fast loop.
PAUSE_ENV = 'CAPJAX_PAUSE_AT_STEP'


class TrainingDiverged(UserError):
  """The loss or gradients became NaN/Inf and config.train.nan_policy is 'stop'."""


@dataclasses.dataclass
class Job:
  """What a task hands the loop."""
  model: Any
  sample_inputs: tuple                     # Arguments of model.init after the rng.
  train_data: grain.MapDataset             # Endless, batched, this process's slice.
  train_step: Callable                     # (state, batch, rng) -> (state, metrics)
  validate: Optional[Callable] = None      # (state) -> {name: value}
  total_steps: int = 0


@dataclasses.dataclass
class Outcome:
  state: Any
  step: int
  train_time_s: float
  interrupted: bool


class _StopFlag:
  """Turns SIGINT/SIGTERM into a flag, so the loop stops between steps and saves."""

  def __init__(self):
    self.raised = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. some test runners): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.raised is not None:  # Second Ctrl-C: the user insists.
      raise KeyboardInterrupt
    self.raised = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _all_finite(tree) -> jax.Array:
  """One boolean: every float in `tree` is finite."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.asarray(True)


def guarded_step(train_step: Callable, state, health: dict, batch, rng, *,
                 nan_policy: str = 'stop'):
  """`train_step` that never lets a NaN/Inf into the state; runs inside the same jit.

  `health` is {'step': steps run, 'nonfinite': steps whose loss, gradients or new state were
  not finite, 'first_bad': the first such step or -1}, carried on device so that checking it
  costs the host nothing until it reads it. A non-finite step leaves the state unchanged; under
  'stop' every later step does too, so the state the host finds is the last good one.
  """
  new_state, metrics = train_step(state, batch, rng)
  step = health['step'] + 1
  finite = _all_finite(metrics) & _all_finite(new_state)
  first_bad = jnp.where((health['first_bad'] < 0) & ~finite, step, health['first_bad'])
  apply = finite if nan_policy == 'skip' else first_bad < 0
  # A select, not lax.cond: both branches are already computed, and it keeps one program.
  state = jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, state)
  health = {'step': step, 'nonfinite': health['nonfinite'] + (~finite).astype(jnp.int32),
            'first_bad': first_bad}
  if nan_policy == 'skip':
    metrics = {**metrics, 'skipped_steps': health['nonfinite'].astype(jnp.float32)}
  return state, health, metrics


class _Health:
  """The host's side of the non-finite guard: reads `health` and acts on it."""

  def __init__(self, policy: str, nonfinite: int, directory: str):
    self.policy, self.reported, self.directory = policy, nonfinite, directory
    self.latest_good = None

  def check(self, health) -> None:
    h = {k: int(v) for k, v in jax.device_get(health).items()}
    if h['first_bad'] < 0:
      return
    if self.policy == 'stop':
      kept = (f'the newest checkpoint in {self.directory} (step {self.latest_good}) is intact'
              if self.latest_good is not None else 'no checkpoint had been saved yet')
      raise TrainingDiverged(
          f"The loss or gradients became NaN/Inf at step {h['first_bad']}, so training "
          f"stopped without saving and {kept}; lower config.optim.learning_rate or set "
          f"config.optim.grad_clip_norm, or set config.train.nan_policy=skip to skip such "
          f"steps.")
    if h['nonfinite'] > self.reported:
      logging.warning('Skipped %d step(s) with a NaN/Inf loss or gradients so far (the first '
                      'at step %d); the state was left unchanged by each.', h['nonfinite'],
                      h['first_bad'])
      self.reported = h['nonfinite']


def _replicated_scalars(values: dict, mesh) -> dict:
  """Host ints -> int32 scalars replicated over the mesh (valid with several processes)."""
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {k: jax.make_array_from_callback((), sh, lambda _, v=v: np.int32(v))
          for k, v in values.items()}


def _pause_for_tests(step: int, stop: _StopFlag, mngr) -> None:
  if os.environ.get(PAUSE_ENV) != str(step):
    return
  mngr.wait_until_finished()
  logging.warning('Paused after step %d because %s is set; waiting for a signal.', step,
                  PAUSE_ENV)
  while stop.raised is None:
    time.sleep(0.05)


def train(job: Job, config, workdir: str) -> Outcome:
  """Trains `job.model` for `job.total_steps`, resuming from `workdir` if it can."""
  cfg = config.train
  nan_policy = cfg.get('nan_policy', 'stop')
  if nan_policy not in NAN_POLICIES:
    raise UserError(f'config.train.nan_policy={nan_policy!r} is unknown; use one of '
                    f'{", ".join(NAN_POLICIES)}.')
  mesh = sharding.make_mesh()
  sharding.check_batch_size(cfg.batch_size, mesh, 'config.train.batch_size')
  tx = make_optimizer(config.optim, job.total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = state_lib.create(job.model, tx, init_rng, *job.sample_inputs,
                           mesh_shardings=sharding.replicated(mesh))
  # A fresh state's step is a weakly typed 0, a restored one is strongly typed; making them
  # alike gives a resumed run the very program of a fresh one (and its compilation cache hit).
  state = state.replace(step=jnp.asarray(state.step, jnp.int32))
  logging.info('Model has %s parameters on %d device(s) in %d process(es).',
               f'{state_lib.num_params(state):,}', mesh.size, jax.process_count())

  mngr = checkpoint.manager(workdir, keep=cfg.keep_checkpoints, cleanup_tmp=True)
  iterator = loading.iterate(job.train_data, num_threads=config.data.num_threads)
  start_step, train_time, data_state = 0, 0.0, {}
  restored = checkpoint.restore_latest(mngr, state, set_aside=True)
  if restored is not None:
    state, data_state, start_step = restored
    iterator.set_state(data_state['iterator'])
    train_time = float(data_state.get('train_time_s', 0.0))
    if data_state.get('process_count', jax.process_count()) != jax.process_count():
      logging.warning('The checkpoint was written by %d processes and this run has %d: '
                      'each process now reads a different slice, so the data order differs '
                      'from an uninterrupted run.', data_state['process_count'],
                      jax.process_count())
    logging.info('Resumed from the checkpoint at step %d in %s.', start_step, workdir)
  guard = _Health(nan_policy, int(data_state.get('nonfinite_steps', 0)), mngr.directory)
  guard.latest_good = start_step if restored is not None else None

  state_sh = sharding.replicated(mesh)(state)
  health = _replicated_scalars(
      {'step': start_step, 'nonfinite': guard.reported, 'first_bad': -1}, mesh)
  health_sh = sharding.replicated(mesh)(health)
  step_fn = jax.jit(functools.partial(guarded_step, job.train_step, nan_policy=nan_policy),
                    in_shardings=(state_sh, health_sh, sharding.batch_sharding(mesh), None),
                    out_shardings=(state_sh, health_sh, None),
                    donate_argnums=0)  # Not `health`: the pending report still reads it.
  writer = logs.MetricWriter(workdir)
  progress = logs.Progress(start_step, job.total_steps)

  def report(step, metrics, health):
    if distributed.is_main():
      logs.log_progress(progress, step, metrics)
    writer.write(step, 'train', metrics)
    guard.check(health)

  def save(step, health):
    nonlocal train_time, t0
    guard.check(health)  # Never save a state from after a non-finite step under 'stop'.
    train_time += time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoint.save(mngr, step, state, {
        'iterator': iterator.get_state(), 'train_time_s': train_time,
        'nonfinite_steps': int(jax.device_get(health['nonfinite'])),
        'process_count': jax.process_count()})
    guard.latest_good = step

  step, pending, interrupted = start_step, None, False
  t0 = time.perf_counter()
  try:
    with _StopFlag() as stop:
      while step < job.total_steps:
        batch = sharding.put_batch(next(iterator), mesh)
        state, health, metrics = step_fn(state, health, batch, step_rng)
        step += 1
        # Read the previous step's metrics only now that this step is queued, so
        # the device never waits for the host.
        if pending is not None:
          report(*pending)
          pending = None
        if step % cfg.log_every == 0 or step == job.total_steps:
          pending = (step, metrics, health)
        if job.validate is not None and cfg.eval_every and (
            step % cfg.eval_every == 0 or step == job.total_steps):
          guard.check(health)
          writer.write(step, 'validation', job.validate(state))
        _pause_for_tests(step, stop, mngr)
        # Processes must agree on stopping (saving is collective); with several of them the
        # flags are combined only at log steps, which costs one tiny all-gather there.
        stopping = (stop.raised is not None if jax.process_count() == 1 else
                    step % cfg.log_every == 0 and distributed.any_process(
                        stop.raised is not None))
        if step % cfg.checkpoint_every == 0 or step == job.total_steps or stopping:
          save(step, health)
        if stopping:
          logging.warning('Got %s at step %d: checkpoint saved; re-run the same command '
                          'to resume.', stop.raised or 'a stop signal on another process',
                          step)
          interrupted = True
          break
      if pending is not None:
        report(*pending)
      train_time += time.perf_counter() - t0
  finally:
    # Also on errors: let a save in flight complete rather than leave it half-written.
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  return Outcome(state, step, train_time, interrupted)


def total_steps(config, train_size: int) -> int:
  """The run's length in steps: config.train.steps, or epochs converted once here."""
  if config.train.get('epochs'):
    return max(1, int(config.train.epochs * train_size // config.train.batch_size))
  if config.train.steps <= 0:
    raise UserError(f'config.train.steps={config.train.steps} must be positive.')
  return int(config.train.steps)
