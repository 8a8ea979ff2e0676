"""The training loop shared by every task: jit, shard, checkpoint, log, resume.

Startup order: the newest readable checkpoint in workdir, else a fresh init.

`train` runs a `Trainer` through its steps -- restore, compile, then per step: dispatch,
report, validate, hooks, save -- each a method of its own. A hook (`hooks=` or the
process-wide `HOOKS`) is a callable `hook(trainer)` run after every step, before the stop check
and the checkpoint save: the place for something a run must do around its steps (a profiler,
a test's pause before it kills the run) without editing the loop.

Phases: a Job's own steps may be followed by `Job.then`, phases with an objective, data and
optimizer of their own (captioning's self-critical training after cross-entropy). The step
counter runs on across them; the last step of every phase is checkpointed, and each checkpoint
records the phase that wrote it, so a run resumes inside a phase (its data position and
optimizer state restored) or at the start of the next one (its data from the start, a fresh
state of its optimizer: moments of another objective's gradients do not carry over).

What makes a run safe to kill and restart:
  * Exact resume. A checkpoint holds the train state and the data iterator's position; the
    batches are a pure function of (seed, position) and dropout of (seed, state.step), so a
    run restarted from step N computes exactly the steps N+1... it would have computed.
  * SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and returns
    `Outcome(interrupted=True)`. With several processes they agree on the step to stop at.
  * Non-finite guard (capjax/train/guard.py). A NaN/Inf loss, gradient or new state leaves
    the state unchanged inside the jitted step; config.train.nan_policy 'stop' ends the run
    naming the step, without saving; 'skip' goes on. No non-finite state is ever saved.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from capjax.data import loading
from capjax.runtime import distributed
from capjax.train import checkpoint, guard, logs, sharding
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

# Hooks every run in this process calls after its own (see `train`); tests install theirs here.
HOOKS: list[Callable[['Trainer'], None]] = []


@dataclasses.dataclass
class Phase:
  """Steps after a Job's own (or another Phase's), with their own objective and optimizer.

  `prepare(state, batch, rng, step) -> (batch, metrics)` runs on the host between device
  programs, before each step: it turns the data's batch into the step's (captioning's
  self-critical phase decodes with the current params and scores the captions there) and
  returns metrics of its own to log with the step's. `step` is the number of steps done.
  """
  name: str
  steps: int
  train_data: grain.MapDataset             # Read from its start when the phase starts.
  train_step: Callable                     # (state, batch, rng) -> (state, metrics)
  optimizer: Optional[optax.GradientTransformation] = None  # None: keep the state's.
  prepare: Optional[Callable] = None


@dataclasses.dataclass
class Job:
  """What a task hands the loop."""
  model: Any
  sample_inputs: tuple                     # Arguments of model.init after the rng.
  train_data: grain.MapDataset             # Endless, batched, this process's slice.
  train_step: Callable                     # (state, batch, rng) -> (state, metrics)
  validate: Optional[Callable] = None      # (state) -> {name: value}
  total_steps: int = 0                     # The Job's own steps (its optimizer's schedule).
  name: str = 'train'                      # The phase of its own steps, in checkpoints.
  then: Sequence[Phase] = ()               # Phases after its own steps, in order.
  checkpoint_extras: dict = dataclasses.field(default_factory=dict)  # Saved with each one.


@dataclasses.dataclass(frozen=True)
class _Stretch:
  """A phase placed on the step counter: it runs steps start + 1 ... end."""
  phase: Phase
  start: int
  end: int


def _stretches(job: Job) -> list[_Stretch]:
  first = Phase(job.name, job.total_steps, job.train_data, job.train_step)
  out, start = [], 0
  for phase in (first, *job.then):
    out.append(_Stretch(phase, start, start + int(phase.steps)))
    start += int(phase.steps)
  return out


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


def _replicated_scalars(values: dict, mesh) -> dict:
  """Host ints -> int32 scalars replicated over the mesh (valid with several processes)."""
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {k: jax.make_array_from_callback((), sh, lambda _, v=v: np.int32(v))
          for k, v in values.items()}


class Trainer:
  """One run of a Job: its state and everything the loop's steps read and change."""

  def __init__(self, job: Job, config, workdir: str):
    self.job, self.cfg, self.workdir = job, config.train, workdir
    self.nan_policy = self.cfg.get('nan_policy', 'stop')
    self.stretches = _stretches(job)
    self.total_steps = self.stretches[-1].end
    self.num_threads = config.data.num_threads
    self.mesh = sharding.make_mesh()
    sharding.check_batch_size(self.cfg.batch_size, self.mesh, 'config.train.batch_size')
    init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
    self.state = self._fresh_state(make_optimizer(config.optim, job.total_steps), init_rng)
    self._check_optimizers()
    self.checkpoints = checkpoint.manager(workdir, keep=self.cfg.keep_checkpoints,
                                          cleanup_tmp=True)
    try:  # `close` is `train`'s from here on; until then a failure closes the manager here.
      self.step, self.train_time, nonfinite, data_state = self._restore()
      self.health = _replicated_scalars(
          {'step': self.step, 'nonfinite': nonfinite, 'first_bad': -1}, self.mesh)
      self.stretch = None
      self._enter(self._stretch_after(self.step), data_state)
      self.writer = logs.MetricWriter(workdir)
    except BaseException:
      self.checkpoints.close()
      raise
    self.progress = logs.Progress(self.step, self.total_steps)
    self.pending = None  # (step, metrics, health) of a log step, read one step later.
    self.stop: Optional[_StopFlag] = None
    self._t0 = time.perf_counter()

  def _fresh_state(self, tx, rng):
    state = state_lib.create(self.job.model, tx, rng, *self.job.sample_inputs,
                             mesh_shardings=sharding.replicated(self.mesh))
    # A fresh state's step is a weakly typed 0, a restored one is strongly typed; making them
    # alike gives a resumed run the very program of a fresh one (and its compilation cache hit).
    state = state.replace(step=jnp.asarray(state.step, jnp.int32))
    logging.info('Model has %s parameters on %d device(s) in %d process(es).',
                 f'{state_lib.num_params(state):,}', self.mesh.size, jax.process_count())
    return state

  def _restore(self) -> tuple[int, float, int, Optional[dict]]:
    """Resumes the state from the newest readable checkpoint, if any: (step, train time,
    non-finite steps so far, its data state or None)."""
    restored = checkpoint.restore_latest(self.checkpoints, self.state, set_aside=True)
    data_state = {} if restored is None else restored[1]
    self.guard = guard.Health(self.nan_policy, int(data_state.get('nonfinite_steps', 0)),
                              self.checkpoints.directory)
    if restored is None:
      return 0, 0.0, self.guard.reported, None
    self.state, _, step = restored
    if data_state.get('process_count', jax.process_count()) != jax.process_count():
      logging.warning('The checkpoint was written by %d processes and this run has %d: '
                      'each process now reads a different slice, so the data order differs '
                      'from an uninterrupted run.', data_state['process_count'],
                      jax.process_count())
    logging.info('Resumed from the checkpoint at step %d in %s.', step, self.workdir)
    self.guard.latest_good = step
    return step, float(data_state.get('train_time_s', 0.0)), self.guard.reported, data_state

  def _check_optimizers(self) -> None:
    """A phase's optimizer must keep the state's layout: every checkpoint, whatever phase
    wrote it, is restored into the one template of the Job's optimizer."""
    layout = lambda tx: jax.tree.structure(jax.eval_shape(tx.init, self.state.params))
    for stretch in self.stretches[1:]:
      tx = stretch.phase.optimizer
      if tx is not None and layout(tx) != layout(self.state.tx):
        raise ValueError(f'Phase {stretch.phase.name!r} has an optimizer whose state is laid '
                         f'out unlike the Job\'s; build it the same way (e.g. make_optimizer '
                         f'with another learning rate).')

  def _stretch_after(self, step: int) -> _Stretch:
    """The phase that runs step `step` + 1 (the last one once every step has run)."""
    return next((s for s in self.stretches if s.start <= step < s.end), self.stretches[-1])

  def _enter(self, stretch: _Stretch, data_state: Optional[dict] = None) -> None:
    """Makes `stretch` the current phase: its data iterator (restored from `data_state` when
    the checkpoint was written inside this phase), its optimizer and its compiled step."""
    phase = stretch.phase
    self.iterator = loading.iterate(phase.train_data, num_threads=self.num_threads)
    inside = data_state is not None and data_state.get(
        'phase', self.stretches[0].phase.name) == phase.name
    if inside:
      self.iterator.set_state(data_state['iterator'])
    if phase.optimizer is not None:
      opt_state = self.state.opt_state
      if not inside:
        init = jax.jit(phase.optimizer.init,
                       out_shardings=sharding.replicated(self.mesh)(
                           jax.eval_shape(phase.optimizer.init, self.state.params)))
        opt_state = init(self.state.params)
      self.state = self.state.replace(tx=phase.optimizer, opt_state=opt_state)
    if stretch is not self.stretches[0] and not inside and self.step < self.total_steps:
      logging.info('Phase %s starts at step %d (%d steps).', phase.name, self.step,
                   stretch.end - stretch.start)
    self.stretch = stretch
    self.step_fn = self._compile(phase.train_step, prepared=phase.prepare is not None)

  def _compile(self, train_step: Callable, prepared: bool) -> Callable:
    state_sh = sharding.replicated(self.mesh)(self.state)
    health_sh = sharding.replicated(self.mesh)(self.health)
    # A prepared batch holds device arrays `prepare` made, each already placed as the step
    # needs (self-critical training's vjp residuals are not all batch-major): keep theirs.
    batch_sh = None if prepared else sharding.batch_sharding(self.mesh)
    return jax.jit(functools.partial(guard.guarded_step, train_step,
                                     nan_policy=self.nan_policy),
                   in_shardings=(state_sh, health_sh, batch_sh, None),
                   out_shardings=(state_sh, health_sh, None),
                   donate_argnums=0)  # Not `health`: the pending report still reads it.

  def dispatch(self) -> None:
    """Queues one train step; then reports the previous log step, whose metrics are ready
    by now, so the device never waits for the host (unless the phase's `prepare` needs the
    current params on the host, as self-critical training does)."""
    if self.step >= self.stretch.end:
      self._enter(self._stretch_after(self.step))
    batch = sharding.put_batch(next(self.iterator), self.mesh)
    prepare = self.stretch.phase.prepare
    host_metrics = {}
    if prepare is not None:
      batch, host_metrics = prepare(self.state, batch, self.step_rng, self.step)
    self.state, self.health, metrics = self.step_fn(self.state, self.health, batch,
                                                    self.step_rng)
    metrics = {**metrics, **host_metrics}
    self.step += 1
    self.report_pending()
    if self.step % self.cfg.log_every == 0 or self.phase_ends():
      self.pending = (self.step, metrics, self.health)

  def phase_ends(self) -> bool:
    """Whether the step just run is the last of a phase (the run's last included)."""
    return self.step == self.stretch.end

  def report_pending(self) -> None:
    if self.pending is None:
      return
    step, metrics, health = self.pending
    self.pending = None
    if distributed.is_main():
      logs.log_progress(self.progress, step, metrics)
    self.writer.write_scalars(step, logs.tagged('train', metrics))
    self.guard.check(health)

  def validate_if_due(self) -> None:
    every = self.cfg.eval_every
    if self.job.validate is None or not every or (self.step % every and not self.phase_ends()):
      return
    self.guard.check(self.health)
    self.writer.write_scalars(self.step, logs.tagged('validation', self.job.validate(self.state)))

  def stopping(self) -> bool:
    """Whether a stop signal arrived. Processes must agree on stopping (saving is collective);
    with several of them the flags are combined only at log steps, which costs one tiny
    all-gather there."""
    if jax.process_count() == 1:
      return self.stop.raised is not None
    return self.step % self.cfg.log_every == 0 and distributed.any_process(
        self.stop.raised is not None)

  def checkpoint_due(self) -> bool:
    # Every phase's last step too: the next phase (or a later run adding one) starts from it.
    return self.step % self.cfg.checkpoint_every == 0 or self.phase_ends()

  def save(self) -> None:
    self.guard.check(self.health)  # Never save a state from after a non-finite step ('stop').
    self.tally_time()
    checkpoint.save(self.checkpoints, self.step, self.state, {
        **self.job.checkpoint_extras,
        'iterator': self.iterator.get_state(), 'train_time_s': self.train_time,
        'nonfinite_steps': int(jax.device_get(self.health['nonfinite'])),
        'process_count': jax.process_count(), 'phase': self.stretch.phase.name})
    self.guard.latest_good = self.step

  def tally_time(self) -> None:
    """Adds the time since the last call to the run's training time."""
    now = time.perf_counter()
    self.train_time += now - self._t0
    self._t0 = now

  def close(self) -> None:
    # Also on errors: let a save in flight complete rather than leave it half-written; the
    # metric writer is closed even when that save fails (a full disk).
    try:
      self.checkpoints.wait_until_finished()
      self.checkpoints.close()
    finally:
      self.writer.close()


def train(job: Job, config, workdir: str, hooks: Sequence[Callable[[Trainer], None]] = ()
          ) -> Outcome:
  """Trains `job.model` for `job.total_steps`, resuming from `workdir` if it can; calls each
  of `hooks` (then `HOOKS`) with the Trainer after every step."""
  trainer = Trainer(job, config, workdir)
  hooks = (*hooks, *HOOKS)
  interrupted = False
  try:
    with _StopFlag() as stop:
      trainer.stop = stop
      while trainer.step < trainer.total_steps:
        trainer.dispatch()
        trainer.validate_if_due()
        for hook in hooks:
          hook(trainer)
        stopping = trainer.stopping()
        if trainer.checkpoint_due() or stopping:
          trainer.save()
        if stopping:
          logging.warning('Got %s at step %d: checkpoint saved; re-run the same command '
                          'to resume.', stop.raised or 'a stop signal on another process',
                          trainer.step)
          interrupted = True
          break
      trainer.report_pending()
      trainer.tally_time()
  finally:
    trainer.close()
  return Outcome(trainer.state, trainer.step, trainer.train_time, interrupted)


def total_steps(config, train_size: int) -> int:
  """The run's length in steps: config.train.steps, or epochs converted once here (the
  config rules make sure one of them is > 0)."""
  if config.train.get('epochs'):
    return max(1, int(config.train.epochs * train_size // config.train.batch_size))
  return int(config.train.steps)
