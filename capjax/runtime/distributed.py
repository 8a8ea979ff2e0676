"""Multi-process (multi-host) data parallelism: start-up and the few cross-process helpers.

One process per host (or per GPU) runs the same command; `initialize` connects them with
`jax.distributed`, after which `jax.devices()` lists every device of every process and the
training loop's mesh spans them all. Each process reads only its slice of the data
(`pipeline.py` slices `ds[process_index::process_count]`); process 0 writes metrics and run
files; checkpoints are written by all processes together (orbax). See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np

from capjax.errors import UserError

# The environment variables read when the matching flag is not given. JAX itself reads only
# JAX_COORDINATOR_ADDRESS; the other two follow the same naming so one launcher script can
# export all three.
ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES', 'process_id': 'JAX_PROCESS_ID'}


def _from_env(name: str, value):
  if value not in (None, ''):
    return value
  return os.environ.get(ENV_VARS[name]) or None


def _as_int(name: str, value) -> Optional[int]:
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f'--{name} (or ${ENV_VARS[name]}) is {value!r}; it must be a whole '
                    f'number.') from None


def initialize(coordinator_address: Optional[str] = None, num_processes=None, process_id=None,
               auto: bool = False) -> bool:
  """Starts jax.distributed when asked to; returns whether it did.

  Asked to means: any of the three settings is given (as an argument or through its
  environment variable in ENV_VARS), or `auto` (TPU pods, SLURM and Open MPI, where JAX
  detects all three itself). Must run before anything touches a JAX device.
  """
  address = _from_env('coordinator_address', coordinator_address)
  count = _as_int('num_processes', _from_env('num_processes', num_processes))
  index = _as_int('process_id', _from_env('process_id', process_id))
  given = {'coordinator_address': address, 'num_processes': count, 'process_id': index}
  if not auto and all(v is None for v in given.values()):
    return False
  missing = [k for k, v in given.items() if v is None]
  if missing and not auto:
    raise UserError(f'Multi-process runs need --coordinator_address, --num_processes and '
                    f'--process_id (or ${", $".join(ENV_VARS.values())}); '
                    f'{" and ".join("--" + k for k in missing)} '
                    f'{"is" if len(missing) == 1 else "are"} missing (or pass '
                    f'--distributed to let JAX detect a TPU pod, SLURM or Open MPI job).')
  if count is not None and count < 1:
    raise UserError(f'--num_processes={count} must be at least 1.')
  if count is not None and index is not None and not 0 <= index < count:
    raise UserError(f'--process_id={index} must be in 0..{count - 1} for '
                    f'--num_processes={count}.')
  import jax  # Only now: launch.py reports config mistakes without paying for JAX's import.
  # CPU processes need a collectives backend for cross-process all-reduces; gloo runs over
  # TCP (127.0.0.1 for tests). The flag only affects the CPU client, so GPU/TPU runs ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  except (RuntimeError, ValueError, TypeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f'Could not start jax.distributed with coordinator {address}, '
                    f'{count} processes, process id {index} ({reason}); check that every '
                    f'process uses the same coordinator address and that it is reachable.'
                    ) from e
  return True


def is_main() -> bool:
  """True on the one process that writes metrics, run files and logs progress."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True if `flag` is True on any process; every process must call it at the same point."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


@contextlib.contextmanager
def main_process_first(name: str):
  """Process 0 runs the body before the others (e.g. preparing a data set into a shared
  folder, which the others then only read)."""
  if not is_main():
    barrier(name)
  try:
    yield
  finally:
    # Also when the body fails on process 0: the others then run it and fail the same way
    # (a wrong path, a bad file) with the same message, instead of waiting here forever.
    if is_main():
      barrier(name)


def to_host(x) -> np.ndarray:
  """An array as one numpy array on every process, gathering rows held by other processes.

  For a batch-sharded result (e.g. decoded token ids) each process holds only its rows; they
  are gathered everywhere in global batch order, so arrays built with the same sharding (ids,
  example indices) stay aligned row for row. One process: plain `device_get`.
  """
  import jax
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
