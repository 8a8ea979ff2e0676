"""Data parallelism: one mesh axis 'data'; batches split over it, state replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from capjax.errors import UserError


def make_mesh(devices=None) -> Mesh:
  """All devices of all processes (or `devices`) on one 'data' axis."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), ('data',))


def replicated(mesh: Mesh):
  """A function mapping a pytree to a matching tree of replicated shardings."""
  sharding = NamedSharding(mesh, P())
  return lambda tree: jax.tree.map(lambda _: sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's slice of the batch into one global sharded array."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  if batch_size % mesh.size:
    raise UserError(f'{field}={batch_size} must be a multiple of the number of '
                     f'devices ({mesh.size}); change it or run on fewer devices.')
