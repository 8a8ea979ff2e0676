"""The benchmark mode: FLOP counting, result rows, and the launch.py wiring."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from helpers import runs as rh
from capjax.runtime import xla_flags
from capjax.tools import bench
from capjax.tools.flops import model_flops


def test_model_flops_counts_every_scan_iteration():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))

  def f(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=7)[0]

  assert model_flops(jax.jit(f), x, w) == 7 * 2 * 8 * 16 * 16
  # XLA's cost analysis sees the loop body once: the reason capjax.flops exists.
  assert bench.compiled_flops(jax.jit(f), x, w) < 2 * 2 * 8 * 16 * 16


def test_model_flops_of_a_strided_conv_and_its_weight_gradient():
  conv = nn.Conv(32, (3, 3), strides=2)
  x = jnp.ones((4, 16, 16, 8))
  v = conv.init(jax.random.key(0), x)
  forward = 2 * 4 * 8 * 8 * 32 * (3 * 3 * 8)  # 2 x outputs x kernel taps.
  assert model_flops(conv.apply, v, x) == forward
  # d/dkernel is one more convolution of the same size (no input gradient is needed).
  grad = jax.grad(lambda v, x: conv.apply(v, x).sum())
  assert model_flops(grad, v, x) == 2 * forward


def test_model_flops_agree_with_xla_on_a_loop_free_mlp():
  mlp = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
  x = jnp.ones((32, 48))
  v = mlp.init(jax.random.key(0), x)
  ours = model_flops(mlp.apply, v, x)
  assert ours == 2 * 32 * (48 * 64 + 64 * 10)
  xla = bench.compiled_flops(jax.jit(mlp.apply), v, x)
  assert abs(xla - ours) / ours < 0.05  # XLA adds the bias and ReLU elementwise work.


def _tiny_bench(**kw):
  return ml_collections.ConfigDict({**dict(conv='layers', batch_size=4, steps=2, warmup=1,
                                          dtype='float32', pipeline_batches=3), **kw})


def test_greedy_row_counts_all_twenty_decoding_steps():
  row = bench.run_task('greedy', _tiny_bench(), peak=1e11)
  out_layer = 2 * 4 * 512 * 5000  # hidden -> vocab, once per generated token.
  assert row['flops_per_step'] >= 20 * out_layer
  assert row['flops_per_step'] < 20 * out_layer * 3  # The LSTM costs less than the output.
  assert row['examples_per_s'] == pytest.approx(4 / (row['step_ms'] / 1000))
  assert row['mfu'] == pytest.approx(row['flops_per_step'] / (row['step_ms'] / 1000) / 1e11)


@pytest.mark.parametrize('task,conv', [('classify', 'layers'), ('caption', 'flax'),
                                       ('encode', 'layers')])
def test_every_peer_benchmark_runs_with_either_convolution(task, conv):
  """The peer's tasks at its shapes (batch 2), with each value configs/bench.py's conv takes."""
  row = bench.run_task(task, _tiny_bench(batch_size=2, conv=conv), peak=1e11)
  assert row['task'] == task and row['batch_size'] == 2
  assert row['examples_per_s'] > 0 and row['flops_per_step'] > 0


def test_a_task_config_benchmarks_its_train_step_and_input_pipeline(tmp_path):
  config = rh.load_config('caption', 'runlocal')
  config.tfds_dir = str(tmp_path / 'tfds')
  config.unlock()
  config.bench = _tiny_bench(peak_flops=1e11)
  step, pipe = bench.main(config)
  assert step['task'] == 'caption_train_step' and step['batch_size'] == 16
  assert step['flops_per_step'] > 0 and step['tokens_per_s'] > step['examples_per_s']
  assert pipe['task'] == 'caption_input_pipeline' and pipe['batches_per_s'] > 0
  assert pipe['batches_per_step_time'] == pytest.approx(
      pipe['batches_per_s'] * step['step_ms'] / 1000)


def test_launch_bench_mode_prints_one_json_line_per_task(tmp_path):
  out = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/bench.py:task=greedy+caption',
       '--mode=bench', f'--workdir={tmp_path}', '--config.bench.batch_size=4',
       '--config.bench.steps=2', '--config.bench.warmup=1', '--config.bench.peak_flops=1e11'],
      cwd=rh.ROOT, capture_output=True, text=True, timeout=300, check=True,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})  # launch.py sets them.
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  assert [r['task'] for r in rows] == ['greedy', 'caption']
  if xla_flags._jaxlib_version() >= xla_flags._MIN_JAXLIB:  # launch.py set the CPU defaults.
    assert 'ynn_fusion_type=-individual_convolution' in rows[0]['xla_flags']
  with open(tmp_path / 'bench.jsonl') as f:
    assert [json.loads(line)['task'] for line in f] == ['greedy', 'caption']


def test_rows_say_what_they_ran_on():
  row = bench.run_task('greedy', _tiny_bench(), peak=1e11)
  for field in ('backend', 'device_kind', 'cpu_model', 'cpu_features', 'jax', 'jaxlib',
                'xla_flags', 'capjax_xla_settings', 'dtype'):
    assert field in row, field
  assert row['backend'] == 'cpu' and row['cpu_model']


def test_the_cpu_peak_is_the_better_of_xla_and_numpy_gemms():
  peak = bench.measure_peak()
  assert peak['peak_xla_flops'] > 0 and peak['peak_numpy_flops'] > 0
  assert peak['peak_flops'] == max(peak['peak_xla_flops'], peak['peak_numpy_flops'])
  assert peak['peak_source'] == ('xla' if peak['peak_xla_flops'] >= peak['peak_numpy_flops']
                                 else 'numpy')
  fields = bench.mfu_fields(0.5 * peak['peak_flops'], peak)
  assert fields['mfu'] == pytest.approx(0.5)
  assert fields['mfu_vs_xla_gemm'] == pytest.approx(0.5 * peak['peak_flops'] / peak['peak_xla_flops'])


def test_accelerator_peaks_come_from_the_data_sheet_table():
  assert bench.known_device_peak('NVIDIA H200', 'bfloat16') == 989e12
  assert bench.known_device_peak('NVIDIA H100 80GB HBM3', 'float32') == 494e12
  assert bench.known_device_peak('TPU v5 lite', 'bfloat16') == 197e12
  assert bench.known_device_peak('TPU v5', 'bfloat16') == 459e12  # Not v5 lite's figure.
  assert bench.known_device_peak('Some New Chip', 'bfloat16') is None
