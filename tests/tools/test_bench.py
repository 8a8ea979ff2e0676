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
from capjax.runtime import host_memory, xla_flags
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


def test_cpu_flag_defaults_are_added_but_never_override_the_users():
  name, value = xla_flags.CPU_DEFAULTS[0]
  assert xla_flags.with_cpu_defaults('') == f'--{name}={value}'
  assert xla_flags.with_cpu_defaults('--xla_dump_to=/tmp/d') == f'--xla_dump_to=/tmp/d --{name}={value}'
  assert xla_flags.with_cpu_defaults(f'--{name}=individual_dot') == f'--{name}=individual_dot'


@pytest.mark.parametrize('flags,enabled', [
    ('', True), ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution', False),
    ('--xla_cpu_experimental_ynn_fusion_type=+dot', True),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot', False),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution', True)])
def test_ynn_convolutions_enabled_reads_the_fusion_type_flag(flags, enabled):
  assert xla_flags.ynn_convolutions_enabled(flags) is enabled


def test_huge_page_environment_adds_the_tunable_once_and_only_where_it_helps():
  glibc, tunable = (2, 36), 'glibc.malloc.hugetlb=1'
  assert host_memory.huge_page_environment({'A': 'b'}, glibc, 'madvise') == {
      'A': 'b', 'GLIBC_TUNABLES': tunable}
  assert host_memory.huge_page_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, glibc, 'madvise') == {
          'GLIBC_TUNABLES': f'glibc.malloc.arena_max=2:{tunable}'}
  # The user's own choice, or a process that has restarted already.
  assert host_memory.huge_page_environment(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, glibc, 'madvise') is None
  assert host_memory.huge_page_environment({'GLIBC_TUNABLES': tunable}, glibc, 'madvise') is None
  # Nothing to gain: huge pages already everywhere, or nowhere, or a glibc without the tunable.
  for glibc_, mode in [(glibc, 'always'), (glibc, 'never'), (glibc, None), ((2, 34), 'madvise'),
                       (None, 'madvise')]:
    assert host_memory.huge_page_environment({}, glibc_, mode) is None


def test_selected_mode_reads_the_bracketed_sysfs_choice():
  assert host_memory.selected_mode('always [madvise] never\n') == 'madvise'
  assert host_memory.selected_mode('[always] madvise never') == 'always'
  assert host_memory.selected_mode('') is None


_RESTARTS = """
import os, sys
print('start', ' '.join(sys.argv[1:]), flush=True)
from capjax.runtime import host_memory
host_memory.restart_with_huge_pages()
print('tunables', os.environ.get('GLIBC_TUNABLES'))
"""


def _huge_page_env_or_skip():
  env = host_memory.huge_page_environment(
      {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'},
      host_memory.glibc_version(), host_memory.transparent_huge_page_mode())
  if env is None:
    pytest.skip('glibc.malloc.hugetlb changes nothing here (needs glibc >= 2.35 and THP madvise)')
  return env


def test_restart_with_huge_pages_runs_the_program_again_once_with_its_arguments(tmp_path):
  env = _huge_page_env_or_skip()
  del env['GLIBC_TUNABLES']
  script = tmp_path / 'prog.py'
  script.write_text(_RESTARTS)
  out = subprocess.run([sys.executable, str(script), '--a=1', 'b'], env=env, capture_output=True,
                       text=True, check=True, timeout=120).stdout.splitlines()
  assert out == ['start --a=1 b', 'start --a=1 b', 'tunables glibc.malloc.hugetlb=1'], out


_FAULTS_PER_CALL = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((16 * 2 ** 20,), jnp.float32)  # 64 MB: 16,384 pages, 32 huge pages.
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_under_the_tunable_a_large_buffer_faults_per_huge_page_not_per_page():
  """Without it, glibc maps each 64 MB output afresh and every call faults on its 16,384 pages.
  With it, 32 faults, plus up to 511 small pages at each end where the kernel did not align the
  mapping to 2 MB."""
  env = _huge_page_env_or_skip()
  out = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL], env=env, capture_output=True,
                       text=True, check=True, timeout=300)
  faults = [int(line) for line in out.stdout.split()]
  assert len(faults) == 20 and max(faults[3:]) < 0.1 * 16384, faults
