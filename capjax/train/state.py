"""The train state: one pytree with the step, params, optimizer and BN statistics."""
from __future__ import annotations

from typing import Any

import flax
import jax
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """flax's TrainState plus `batch_stats` ({} for models without BatchNorm)."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


def create(model, tx: optax.GradientTransformation, rng: jax.Array, *sample_inputs,
           mesh_shardings=None) -> TrainState:
  """Initialises params on device, laid out as `mesh_shardings` says.

  Running `init` under `jit` with `out_shardings` creates each array directly
  where it lives (replicated today, sharded later) instead of on one device first.
  """

  def init(rng):
    variables = model.init(rng, *sample_inputs)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats', {}))

  if mesh_shardings is None:
    return jax.jit(init)(rng)
  abstract = jax.eval_shape(init, rng)
  return jax.jit(init, out_shardings=mesh_shardings(abstract))(rng)


def variables(state: TrainState, params=None) -> dict:
  """The model variables of `state` for `apply`: its params (or `params`, the ones being
  differentiated), plus the BatchNorm statistics of models that have them."""
  params = state.params if params is None else params
  if state.batch_stats:
    return {'params': params, 'batch_stats': state.batch_stats}
  return {'params': params}


def num_params(state: TrainState) -> int:
  return sum(x.size for x in jax.tree.leaves(state.params))
