"""Step-throughput benchmarks: compile once, warm up, time steps with results forced.

Tasks mirror ../shared/bench (the PyTorch peer) at its exact shapes, with capjax's real
models and steps. Each prints one JSON line with throughput, XLA's FLOP count of the
compiled step, what it ran on (backend, CPU model and ISA features, versions, XLA flags) and
the MFU against this machine's best measured f32 GEMM (see measure_peak).
"""
from __future__ import annotations

from importlib import metadata
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from capjax import tasks
from capjax.errors import UserError
from capjax.runtime import machine, xla_flags
from capjax.tools.flops import model_flops
from capjax.train import state as state_lib

TASKS = ('classify', 'caption', 'encode', 'greedy')
# Timing settings when a task config (configs/caption.py, ...) is benchmarked; configs/bench.py
# sets its own.
BENCH_DEFAULTS = dict(steps=10, warmup=3, peak_flops=0.0, pipeline_batches=50, dtype='float32')


# Dense peak FLOP/s of known accelerators, from their vendors' data sheets: (device_kind
# substring, bf16, f32). f32 is what JAX's default matmul precision reaches (TF32 on NVIDIA
# GPUs from Ampere on, bf16 passes on TPUs). A device not listed is measured instead.
DEVICE_PEAKS = (
    ('H200', 989e12, 494e12), ('H100', 989e12, 494e12), ('A100', 312e12, 156e12),
    ('L4', 121e12, 60e12), ('TPU v6 lite', 918e12, 918e12), ('TPU v5 lite', 197e12, 197e12),
    ('TPU v5', 459e12, 459e12), ('TPU v4', 275e12, 275e12),
)


def known_device_peak(device_kind: str, dtype: str) -> float | None:
  """The data-sheet dense peak of a device kind for `dtype`, or None when it is not listed."""
  for name, bf16, f32 in DEVICE_PEAKS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def _best_rate(fn, n: int, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def xla_gemm_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Achieved FLOP/s of an n x n matmul through XLA on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  return _best_rate(lambda: mm(a).block_until_ready(), n, repeats)


def numpy_gemm_flops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved FLOP/s of an n x n f32 matmul through numpy's BLAS (OpenBLAS in numpy's wheels)."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  return _best_rate(lambda: a @ a, n, repeats)


def measure_peak(dtype: str = 'float32') -> dict:
  """The MFU yardstick and how it was found, as result-row fields.

  On a CPU: the best f32 GEMM this machine does, measured now both through XLA and through
  numpy's BLAS (a library XLA may not match, so MFU against XLA's own matmul alone would flatter
  capjax); 'peak_flops' is the higher of the two. On a GPU/TPU: the device's dense peak for the
  benchmark's dtype, from DEVICE_PEAKS, or a large XLA matmul where the device is not listed.
  """
  if jax.default_backend() == 'cpu':
    xla, blas = xla_gemm_flops(), numpy_gemm_flops()
    return {'peak_flops': max(xla, blas), 'peak_source': 'xla' if xla >= blas else 'numpy',
            'peak_xla_flops': xla, 'peak_numpy_flops': blas}
  kind = jax.devices()[0].device_kind
  known = known_device_peak(kind, dtype)
  if known is not None:
    return {'peak_flops': known, 'peak_source': 'data sheet'}
  measured = xla_gemm_flops(8192, dtype=jnp.dtype(dtype))
  return {'peak_flops': measured, 'peak_source': 'measured', 'peak_xla_flops': measured}


def environment() -> dict:
  """What a benchmark ran on: backend, device, CPU model and ISA features, versions, flags."""
  return {'backend': jax.default_backend(), 'n_devices': jax.device_count(),
          'device_kind': jax.devices()[0].device_kind, **machine.cpu().as_dict(),
          'jax': jax.__version__, 'jaxlib': jaxlib_version(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'capjax_xla_settings': [f'--{r.flag}={r.value}' for r in xla_flags.chosen()]}


def jaxlib_version() -> str:
  try:
    return metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return 'unknown'


def compiled_flops(jitted, *args) -> float:
  """FLOPs of one call, from XLA's cost analysis of the compiled program (a loop's body is
  counted once: see capjax.flops)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def time_steps(fn, args, steps: int, warmup: int, donate_first: bool):
  """Median and all step times; with `donate_first`, the output state feeds the next call."""
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t)
    if donate_first:
      args = (out[0],) + tuple(args[1:])
  return statistics.median(times), times


def peer_builders() -> dict:
  """Peer-benchmark name -> builder, from every task's BENCH table."""
  return {name: build for task in tasks.NAMES for name, build in tasks.get(task).BENCH.items()}


def run_task(task: str, cfg, peak: float) -> dict:
  """Benchmarks one task; returns the JSON-able result row."""
  builders = peer_builders()
  if task not in builders:
    raise UserError(f'--config.bench.task={task!r} is unknown; use one of {TASKS}.')
  fn, args, donate, batch_size, extra = builders[task](cfg)
  row = timed_row(task, fn, args, batch_size, cfg, peak, donate)
  if 'tokens_per_example' in extra:
    row['tokens_per_s'] = row['examples_per_s'] * extra['tokens_per_example']
  return row


def timed_row(task: str, fn, args, batch_size: int, cfg, peak: float, donate: bool) -> dict:
  """Times `fn(*args)` and returns its result row; MFU counts its matmuls and convolutions
  (capjax.flops), XLA's own count is kept alongside."""
  flops = model_flops(fn, *args)  # Before timing: a donated state is gone afterwards.
  xla_flops = compiled_flops(fn, *args)
  median, _ = time_steps(fn, args, cfg.steps, cfg.warmup, donate)
  row = {'task': task, 'impl': 'capjax', 'examples_per_s': batch_size / median,
         'step_ms': 1000 * median, 'batch_size': batch_size, 'dtype': cfg.get('dtype', 'float32'),
         **environment(), 'flops_per_step': flops, 'xla_flops_per_step': xla_flops}
  return {**row, **mfu_fields(flops / median, peak)}


def mfu_fields(flops_per_s: float, peak) -> dict:
  """MFU against `peak` (FLOP/s, or measure_peak's fields); with both GEMM figures, MFU against
  XLA's own matmul is kept as 'mfu_vs_xla_gemm'."""
  peak = peak if isinstance(peak, dict) else {'peak_flops': peak, 'peak_source': 'given'}
  best = peak['peak_flops']
  fields = {**peak, 'mfu': flops_per_s / best if best else None}
  if peak.get('peak_xla_flops'):
    fields['mfu_vs_xla_gemm'] = flops_per_s / peak['peak_xla_flops']
  return fields


def time_pipeline(iterator, batches: int, warmup: int = 5) -> float:
  """Batches/s that a data iterator delivers on its own (no model running)."""
  for _ in range(warmup):
    next(iterator)
  t = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches / (time.perf_counter() - t)


def config_rows(config, cfg, peak: float) -> list[dict]:
  """The real train step and input pipeline of a task config (configs/caption.py, ...).

  Builds the run's own Job (data prepared as for training, in a throw-away workdir), times
  the grain pipeline alone, then the jitted train step on one of its batches.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  from capjax.data import loading  # pylint: disable=import-outside-toplevel
  from capjax.train import sharding  # pylint: disable=import-outside-toplevel
  from capjax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  task = tasks.get(config.task)
  with tempfile.TemporaryDirectory() as workdir:
    job, _ = task.training_job(config, workdir, task.load_splits(config))
    iterator = loading.iterate(job.train_data, num_threads=config.data.num_threads)
    batches_per_s = time_pipeline(iterator, cfg.pipeline_batches)
    batch = sharding.put_batch(next(iterator), sharding.make_mesh())
    state = state_lib.create(job.model, make_optimizer(config.optim, job.total_steps),
                             jax.random.key(0), *job.sample_inputs)
  step = jax.jit(job.train_step, donate_argnums=0)
  b = config.train.batch_size
  step_row = timed_row(f'{config.task}_train_step', step, (state, batch, jax.random.key(1)),
                       b, cfg, peak, donate=True)
  step_row['dtype'] = config.model.dtype
  median = step_row['step_ms'] / 1000
  if 'tokens' in batch:
    step_row['tokens_per_s'] = step_row['examples_per_s'] * (batch['tokens'].shape[-1] - 1)
  pipe_row = {'task': f'{config.task}_input_pipeline', 'impl': 'capjax',
              'batches_per_s': batches_per_s, 'examples_per_s': batches_per_s * b,
              'batch_size': b, 'num_threads': config.data.num_threads,
              # > 1: the loader outruns the step it feeds (the goal is >= 3).
              'batches_per_step_time': batches_per_s * median, **environment()}
  return [step_row, pipe_row]


def main(config) -> list[dict]:
  """One JSON line per task: configs/bench.py's peer tasks (config.bench.task, 'all' for
  every one), or the train step and input pipeline of any task config."""
  cfg = config.get('bench') or ml_collections.ConfigDict(BENCH_DEFAULTS)
  peak = cfg.peak_flops or measure_peak(cfg.get('dtype', 'float32'))
  if config.task in tasks.NAMES:
    rows = config_rows(config, cfg, peak)
  else:  # configs/bench.py: bench.task names peer benchmarks, 'a+b' or 'all'.
    requested = cfg.task
    names = TASKS if requested == 'all' else tuple(requested.split('+'))
    rows = [run_task(name, cfg, peak) for name in names]
  for row in rows:
    print(json.dumps(row), flush=True)
  return rows
