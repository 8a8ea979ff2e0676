"""The CPU and backend capjax reads before JAX starts, and the XLA settings chosen from them."""
import os
import subprocess
import sys

import pytest

from helpers import runs as rh
from capjax.runtime import host_memory, machine, xla_flags

LSCPU_EPYC = """Architecture:                            x86_64
CPU(s):                                  2
Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC
Flags:                                   fpu sse2 avx f16c avx2 avx512f avx512dq avx512_bf16 avx512_vnni
"""
CPUINFO_AMX_XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
CPUINFO_AVX2 = "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16\nCPU part\t: 0xd40\n"
YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


@pytest.mark.parametrize('text,model,features', [
    (LSCPU_EPYC, 'AMD EPYC', ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni')),
    (CPUINFO_AMX_XEON, 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz',
     ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16')),
    (CPUINFO_AVX2, 'Intel(R) Xeon(R) CPU @ 2.20GHz', ('avx2',)),
    (CPUINFO_ARM, '0xd40', ('asimd', 'sve', 'bf16')),
])
def test_parse_cpu_reads_lscpu_and_cpuinfo(text, model, features):
  cpu = machine.parse_cpu(text)
  assert (cpu.model, cpu.features) == (model, features)
  assert cpu.as_dict() == {'cpu_model': model, 'cpu_features': list(features)}


def test_this_machine_has_a_model_name():
  assert machine.cpu().model and machine.cpu().model != 'unknown'


@pytest.mark.parametrize('env,plugins,libtpu,nodes,expected', [
    ('', [], False, [], 'cpu'),
    ('cpu', ['xla_cuda13'], False, ['/dev/nvidia0'], 'cpu'),       # The user asked for the CPU.
    ('cuda,cpu', [], False, [], 'gpu'),
    ('tpu', [], False, [], 'tpu'),
    ('', ['xla_cuda13'], False, ['/dev/nvidia0'], 'gpu'),
    ('', ['xla_cuda13'], False, [], 'cpu'),                       # A plugin with no GPU.
    ('', ['xla_rocm'], False, ['/dev/kfd'], 'gpu'),
    ('', [], True, ['/dev/accel0'], 'tpu'),
    ('', [], True, [], 'cpu'),
])
def test_expected_platform(env, plugins, libtpu, nodes, expected):
  assert machine.expected_platform(env, plugins, libtpu, nodes) == expected


@pytest.mark.parametrize('text,flags', [
    (CPUINFO_AVX2, [YNN_OFF]),
    (LSCPU_EPYC, [YNN_OFF]),
    (CPUINFO_AMX_XEON, [YNN_OFF]),
    (CPUINFO_ARM, []),  # Never measured on Arm: XLA's defaults stay.
    ('', []),
])
def test_cpu_settings_follow_the_features_they_were_measured_on(text, flags):
  rules = xla_flags.cpu_settings(machine.parse_cpu(text))
  assert [f'--{r.flag}={r.value}' for r in rules] == flags
  assert all(r.why for r in rules)


@pytest.mark.parametrize('platform', ['gpu', 'tpu'])
def test_no_cpu_setting_applies_on_an_accelerator(platform):
  for text in (CPUINFO_AVX2, LSCPU_EPYC, CPUINFO_AMX_XEON):
    assert xla_flags.cpu_settings(machine.parse_cpu(text), platform) == ()


def test_settings_are_added_but_never_override_the_users():
  rules = xla_flags.cpu_settings(machine.parse_cpu(CPUINFO_AVX2))
  name = rules[0].flag
  assert xla_flags.with_settings('', rules) == YNN_OFF
  assert xla_flags.with_settings('--xla_dump_to=/tmp/d', rules) == f'--xla_dump_to=/tmp/d {YNN_OFF}'
  assert xla_flags.with_settings(f'--{name}=individual_dot', rules) == f'--{name}=individual_dot'


def _launch_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'GLIBC_TUNABLES')}
  return {**env, **extra}


_PROBE = ('import os; from capjax.runtime import xla_flags, host_memory; xla_flags.apply(); '
          'host_memory.restart_with_huge_pages(); '
          'print(repr(os.environ.get("XLA_FLAGS", "")), repr(os.environ.get("GLIBC_TUNABLES", "")))')


def test_on_an_expected_gpu_neither_flags_nor_the_huge_page_restart_apply():
  """JAX_PLATFORMS=cuda makes the platform 'gpu' before JAX starts (no GPU is needed to see it)."""
  out = subprocess.run([sys.executable, '-c', _PROBE], env=_launch_env(JAX_PLATFORMS='cuda'),
                       cwd=rh.ROOT, capture_output=True, text=True, check=True, timeout=60)
  assert out.stdout.split() == ["''", "''"]


def test_on_the_cpu_the_measured_settings_apply():
  out = subprocess.run([sys.executable, '-c', _PROBE], env=_launch_env(JAX_PLATFORMS='cpu'),
                       cwd=rh.ROOT, capture_output=True, text=True, check=True, timeout=60)
  xla = out.stdout.split()[0]
  expected = [f'--{r.flag}={r.value}' for r in xla_flags.chosen()]
  assert all(f in xla for f in expected)
  if machine.cpu().has('avx2') and xla_flags._jaxlib_version() >= xla_flags._MIN_JAXLIB:
    assert YNN_OFF in xla


def test_layers_conv_uses_xla_convolution_off_the_cpu(monkeypatch):
  """On a GPU/TPU the chunked weight gradient (a CPU fix for YNNPACK) never applies."""
  import jax
  import jax.numpy as jnp
  from capjax.models import layers
  monkeypatch.setenv('XLA_FLAGS', '')  # YNNPACK convolutions "on", as jaxlib's default.
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  jaxpr = lambda: str(jax.make_jaxpr(lambda k: layers.conv2d(x, k))(k))
  assert 'custom_vjp_call' in jaxpr()  # CPU: the hybrid convolution.
  monkeypatch.setattr(machine, 'on_cpu', lambda: False)
  assert 'custom_vjp_call' not in jaxpr() and 'conv_general_dilated' in jaxpr()


@pytest.mark.parametrize('flags,enabled', [
    ('', True), (YNN_OFF, False),
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
