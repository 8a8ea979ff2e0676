"""The training loop shared by every task: jit, shard, checkpoint, log, resume.

Startup order: the latest readable checkpoint in workdir, else a fresh init.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any, Callable, Optional

import grain
import jax
from absl import logging

from capjax.data import pipeline
from capjax.train import checkpoint, logs, sharding
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer
from capjax.errors import UserError


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


def train(job: Job, config, workdir: str) -> Outcome:
  """Trains `job.model` for `job.total_steps`, resuming from `workdir` if it can."""
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh, 'config.train.batch_size')
  tx = make_optimizer(config.optim, job.total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = state_lib.create(job.model, tx, init_rng, *job.sample_inputs,
                           mesh_shardings=sharding.replicated(mesh))
  logging.info('Model has %s parameters on %d device(s).',
               f'{state_lib.num_params(state):,}', mesh.size)

  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
  iterator = pipeline.iterate(job.train_data, num_threads=config.data.num_threads)
  start_step, train_time = 0, 0.0
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state, data_state, start_step = restored
    iterator.set_state(data_state['iterator'])
    train_time = float(data_state.get('train_time_s', 0.0))
    logging.info('Resumed from the checkpoint at step %d in %s.', start_step, workdir)

  state_sh = sharding.replicated(mesh)(state)
  step_fn = jax.jit(job.train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
                    out_shardings=(state_sh, None), donate_argnums=0)
  writer = logs.MetricWriter(workdir)
  progress = logs.Progress(start_step, job.total_steps)
  cfg = config.train

  def data_state():
    return {'iterator': iterator.get_state(), 'train_time_s': train_time}

  step, pending, interrupted = start_step, None, False
  with _StopFlag() as stop:
    t0 = time.perf_counter()
    while step < job.total_steps:
      batch = sharding.put_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch, step_rng)
      step += 1
      # Read the previous step's metrics only now that this step is queued, so
      # the device never waits for the host.
      if pending is not None:
        logs.log_progress(progress, *pending)
        writer.write(pending[0], 'train', pending[1])
        pending = None
      if step % cfg.log_every == 0 or step == job.total_steps:
        pending = (step, metrics)
      if job.validate is not None and cfg.eval_every and (
          step % cfg.eval_every == 0 or step == job.total_steps):
        writer.write(step, 'validation', job.validate(state))
      if step % cfg.checkpoint_every == 0 or step == job.total_steps or stop.raised:
        train_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint.save(mngr, step, state, data_state())
      if stop.raised:
        logging.warning('Got %s at step %d: checkpoint saved; re-run the same command '
                        'to resume.', stop.raised, step)
        interrupted = True
        break
    if pending is not None:
      logs.log_progress(progress, *pending)
      writer.write(pending[0], 'train', pending[1])
    train_time += time.perf_counter() - t0
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
