"""Step-throughput benchmarks: compile once, warm up, time steps with results forced.

Tasks mirror ../shared/bench (the PyTorch peer) at its exact shapes, with capjax's real
models and steps. Each prints one JSON line with throughput, XLA's FLOP count of the
compiled step and the MFU against a peak measured here with a large f32 matmul.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capjax.errors import UserError
from capjax.flops import model_flops
from capjax.train import state as state_lib

TASKS = ('classify', 'caption', 'encode', 'greedy')
# Timing settings when a task config (configs/caption.py, ...) is benchmarked; configs/bench.py
# sets its own.
BENCH_DEFAULTS = dict(steps=10, warmup=3, peak_flops=0.0, pipeline_batches=50)


def measure_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved f32 FLOP/s of an n x n matmul on the default device: the MFU yardstick."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


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


def _classify(cfg):
  from capjax.models import classifier
  from capjax.train import classify_steps
  b = cfg.batch_size or 128
  model = classifier.SimpleCNN(num_classes=30, conv=_conv(cfg))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(b, 64, 64, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 30, b), jnp.int32)}
  state = state_lib.create(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                           batch['image'][:1])
  step = jax.jit(classify_steps.classify_train_step, donate_argnums=0)
  return step, (state, batch, jax.random.key(1)), True, b, {}


def _caption_model(cfg, vocab=5000):
  from capjax.models import decoder
  from capjax.models.captioner import Captioner
  # Features are precomputed (cached) 2048-d vectors: the encoder is the identity.
  return Captioner(_Identity(), decoder.InjectDecoder(vocab, embed_dim=256, hidden=512,
                                                      dtype=jnp.dtype(cfg.dtype)))


def _caption(cfg):
  from capjax.train import steps
  b, t, v = cfg.batch_size or 64, 20, 5000
  model = _caption_model(cfg, v)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(b, 2048)), jnp.float32),
           'tokens': jnp.asarray(rng.integers(1, v, (b, t + 1)), jnp.int32)}
  state = state_lib.create(model, optax.adam(1e-3), jax.random.key(0), batch['image'][:1],
                           batch['tokens'][:1])
  step = jax.jit(steps.caption_train_step, donate_argnums=0)
  return step, (state, batch, jax.random.key(1)), True, b, {'tokens_per_example': t}


def _encode(cfg):
  from capjax.models import resnet
  b = cfg.batch_size or 32
  model = resnet.ResNet50(pooled=True, conv=_conv(cfg), dtype=jnp.dtype(cfg.dtype))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 224, 224, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return fwd, (variables, x), False, b, {}


def _greedy(cfg):
  from capjax import decoding
  b, v = cfg.batch_size or 256, 5000
  model = _caption_model(cfg, v)
  features = jnp.asarray(np.random.default_rng(0).normal(size=(b, 2048)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), features[:1],
                                  jnp.zeros((1, 21), jnp.int32))
  run = jax.jit(lambda v, f: decoding.greedy(model.apply, v, f, max_len=20, end_id=-1))
  return run, (variables, features), False, b, {}


class _Identity:
  """An 'encoder' for precomputed features (keeps Captioner's interface)."""

  def __new__(cls):
    import flax.linen as nn

    class Identity(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False):
        del train
        return x

    return Identity()


def _conv(cfg):
  if cfg.conv == 'flax':
    import flax.linen as nn
    return nn.Conv
  from capjax.models import layers
  return layers.Conv


def run_task(task: str, cfg, peak: float) -> dict:
  """Benchmarks one task; returns the JSON-able result row."""
  builders = {'classify': _classify, 'caption': _caption, 'encode': _encode,
              'greedy': _greedy}
  if task not in builders:
    raise UserError(f'config.bench.task={task!r} is unknown; use one of {TASKS}.')
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
  return {'task': task, 'impl': 'capjax', 'examples_per_s': batch_size / median,
          'step_ms': 1000 * median, 'batch_size': batch_size, 'n_devices': jax.device_count(),
          'device_kind': jax.devices()[0].device_kind,
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'flops_per_step': flops,
          'xla_flops_per_step': xla_flops, 'peak_flops': peak,
          'mfu': flops / median / peak if peak else None}


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
  from capjax.data import pipeline  # pylint: disable=import-outside-toplevel
  from capjax.train import sharding  # pylint: disable=import-outside-toplevel
  from capjax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  if config.task == 'caption':
    from capjax import caption_task as task  # pylint: disable=import-outside-toplevel
  else:
    from capjax import classify_task as task  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    job, _ = task.training_job(config, workdir)
    iterator = pipeline.iterate(job.train_data, num_threads=config.data.num_threads)
    batches_per_s = time_pipeline(iterator, cfg.pipeline_batches)
    batch = sharding.put_batch(next(iterator), sharding.make_mesh())
    state = state_lib.create(job.model, make_optimizer(config.optim, job.total_steps),
                             jax.random.key(0), *job.sample_inputs)
  step = jax.jit(job.train_step, donate_argnums=0)
  b = config.train.batch_size
  step_row = timed_row(f'{config.task}_train_step', step, (state, batch, jax.random.key(1)),
                       b, cfg, peak, donate=True)
  median = step_row['step_ms'] / 1000
  if 'tokens' in batch:
    step_row['tokens_per_s'] = step_row['examples_per_s'] * (batch['tokens'].shape[-1] - 1)
  pipe_row = {'task': f'{config.task}_input_pipeline', 'impl': 'capjax',
              'batches_per_s': batches_per_s, 'examples_per_s': batches_per_s * b,
              'batch_size': b, 'num_threads': config.data.num_threads,
              # > 1: the loader outruns the step it feeds (the goal is >= 3).
              'batches_per_step_time': batches_per_s * median}
  return [step_row, pipe_row]


def main(config) -> list[dict]:
  """One JSON line per task: configs/bench.py's peer tasks (config.bench.task, 'all' for
  every one), or the train step and input pipeline of any task config."""
  cfg = config.get('bench') or ml_collections.ConfigDict(BENCH_DEFAULTS)
  peak = cfg.peak_flops or measure_peak_flops()
  if config.task != 'bench':
    rows = config_rows(config, cfg, peak)
  else:
    tasks = TASKS if cfg.task == 'all' else tuple(cfg.task.split('+'))
    rows = [run_task(task, cfg, peak) for task in tasks]
  for row in rows:
    print(json.dumps(row), flush=True)
  return rows
