"""What this process runs on, read without starting JAX.

Two questions, each answered by a pure function of text or names (tested on fake inputs) and a
small wrapper that reads this machine:
* `cpu()`: the CPU's model and the ISA features capjax's CPU settings and benchmarks depend on
  (/proc/cpuinfo, the same fields `lscpu` prints as "Model name" and "Flags").
* `expected_platform()`: the backend JAX is going to pick ('cpu', 'gpu' or 'tpu'), decided
  before JAX starts, since XLA reads XLA_FLAGS once, when its first backend starts. Once JAX runs,
  `jax.default_backend()` is the truth and `on_cpu()` asks it.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import os
import platform

# The features that change what is fastest on a CPU: AVX2 (every x86 CPU capjax is measured on),
# AVX-512 (wider vectors; oneDNN's f32 kernels), AVX-512 BF16 and AMX (bf16 dot products in
# hardware), and their Arm counterparts.
FEATURES = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile', 'amx_bf16', 'asimd',
            'sve', 'bf16')
_MODEL_KEYS = ('model name', 'Model name', 'cpu model', 'Hardware', 'CPU part')
_FLAG_KEYS = ('flags', 'Flags', 'Features')


@dataclasses.dataclass(frozen=True)
class Cpu:
  model: str
  features: tuple[str, ...]  # The members of FEATURES this CPU has, in FEATURES' order.

  def has(self, feature: str) -> bool:
    return feature in self.features

  def as_dict(self) -> dict:
    return {'cpu_model': self.model, 'cpu_features': list(self.features)}


def parse_cpu(text: str) -> Cpu:
  """The Cpu described by /proc/cpuinfo or `lscpu` output (their 'key: value' lines; the first
  processor's entry counts)."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    key, sep, value = line.partition(':')
    if sep:
      fields.setdefault(key.strip(), value.strip())
  model = next((fields[k] for k in _MODEL_KEYS if fields.get(k)), '')
  flags = set(next((fields[k] for k in _FLAG_KEYS if fields.get(k)), '').split())
  return Cpu(model or platform.processor() or 'unknown', tuple(f for f in FEATURES if f in flags))


@functools.cache
def cpu() -> Cpu:
  """This machine's Cpu (model 'unknown' and no features where /proc/cpuinfo is missing)."""
  try:
    with open('/proc/cpuinfo') as f:
      return parse_cpu(f.read())
  except OSError:
    return parse_cpu('')


def expected_platform(jax_platforms: str, plugins: list[str], has_libtpu: bool,
                      device_files: list[str]) -> str:
  """'cpu', 'gpu' or 'tpu': the backend JAX will start, judged before it starts.

  Args:
    jax_platforms: $JAX_PLATFORMS; when set, its first entry is what JAX tries first.
    plugins: names of installed PJRT plugins (entry points of group 'jax_plugins', such as
      'xla_cuda13'); JAX prefers a plugin's device over the CPU when one is there.
    has_libtpu: whether the libtpu package is installed.
    device_files: the accelerator device nodes present (/dev/nvidia0, /dev/accel0, ...): a
      plugin with no device falls back to the CPU.
  """
  first = jax_platforms.split(',')[0].strip().lower() if jax_platforms.strip() else ''
  if first:
    return {'cuda': 'gpu', 'rocm': 'gpu', 'gpu': 'gpu', 'tpu': 'tpu'}.get(first, 'cpu')
  nodes = [os.path.basename(f) for f in device_files]
  gpu_plugin = any('cuda' in p or 'rocm' in p for p in plugins)
  if gpu_plugin and any(n.startswith(('nvidia', 'kfd')) for n in nodes):
    return 'gpu'
  if has_libtpu and any(n.startswith(('accel', 'vfio')) for n in nodes):
    return 'tpu'
  return 'cpu'


def _installed_plugins() -> list[str]:
  names = [e.name for e in importlib.metadata.entry_points(group='jax_plugins')]
  try:  # Plugins may also be modules of the `jax_plugins` namespace package.
    spec = importlib.util.find_spec('jax_plugins')
  except (ImportError, ValueError):
    spec = None
  for path in (spec.submodule_search_locations or []) if spec else []:
    names += sorted(os.listdir(path))
  return names


def _has_libtpu() -> bool:
  try:
    return importlib.util.find_spec('libtpu') is not None
  except (ImportError, ValueError):
    return False


@functools.cache
def this_platform() -> str:
  """expected_platform() for this process (before JAX starts; after, prefer on_cpu())."""
  return expected_platform(os.environ.get('JAX_PLATFORMS', ''), _installed_plugins(),
                           _has_libtpu(),
                           glob.glob('/dev/nvidia[0-9]*') + glob.glob('/dev/kfd')
                           + glob.glob('/dev/accel[0-9]*') + glob.glob('/dev/vfio/[0-9]*'))


def on_cpu() -> bool:
  """Whether JAX's default backend is the CPU (starts JAX's backends if they have not)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == 'cpu'
