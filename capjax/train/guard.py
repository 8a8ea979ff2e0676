"""The non-finite guard of the training loop: a NaN/Inf never reaches the state.

Inside the jitted step (`guarded_step`) a NaN/Inf loss, gradient or new state leaves the state
unchanged and is counted in `health`, carried on device; the host (`Health`) reads it one step
late, so the device never waits, and before every checkpoint or validation.
config.train.nan_policy 'stop' ends the run with `TrainingDiverged` naming the step; 'skip'
goes on and logs the count as the metric `skipped_steps`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging

from capjax.errors import UserError


class TrainingDiverged(UserError):
  """The loss or gradients became NaN/Inf and config.train.nan_policy is 'stop'."""


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


class Health:
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
