"""XLA:CPU settings chosen by the CPU capjax runs on; applied before JAX starts its backend.

Each rule names the CPU features it needs and what it was measured on. A CPU that no rule was
measured on keeps XLA's defaults: what is fastest moved between the machines measured so far, so a
setting is never guessed for a CPU it was not tried on. None of this applies where JAX is going to
run on a GPU or TPU (`machine.this_platform()`), and a flag the user puts in XLA_FLAGS always wins.

YNNPACK convolutions off. jaxlib (0.10.2) hands each convolution on the CPU to YNNPACK
("individual_convolution" YNN fusions), which was slower than XLA's own convolutions on every x86
CPU measured, above all for weight gradients:
* 2-core AVX2-only CPU (2026-12-02): up to 2x slower forward and 5-8x for weight gradients;
  SimpleCNN's train step at batch 128 went from 3.41-3.45 s to 2.65-2.82 s with them off, and
  ResNet50's forward at batch 32 from 4.9 s to 3.3 s.
* 2-core Xeon with AVX-512, AVX-512-BF16 and AMX (2026-12-02): classify 30.8 img/s with them on,
  50.7 off.
* 2-core AMD EPYC with AVX-512 and AVX-512-BF16, no AMX (2026-12-03, jax 0.10.2, one
  alternating pair on a loaded machine): classify 42.5 img/s off, 22.4 on; ResNet50 inference
  6.9 img/s off, 3.9 on.
Dots and other fusions are unchanged. No Arm CPU has been measured, so there it stays on.

oneDNN (`--xla_cpu_use_onednn=true`) is not set anywhere yet: a 2048² f32 matmul alone ran
faster with it on the AMX Xeon (169 vs 127 GFLOP/s), but no whole step has been measured there,
and on the AVX-512 EPYC the whole steps did not move beyond the noise (two alternating pairs on
the idle machine: classify 64.9 / 62.9 img/s with it, 56.9 / 64.6 without; caption 216.5 /
188.5 captions/s with it, 195.6 / 212.4 without; one loaded pair had classify 25.6 vs 42.5).
"""
from __future__ import annotations

import dataclasses
from importlib import metadata
import os

from capjax.runtime import machine

_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'


@dataclasses.dataclass(frozen=True)
class Rule:
  """One XLA flag, set on CPUs that have every feature in `needs`."""
  flag: str
  value: str
  needs: tuple[str, ...]
  why: str


RULES = (
    Rule(_YNN_FUSION_TYPE, '-individual_convolution', ('avx2',),
         'YNNPACK convolutions were slower than XLA\'s own on every x86 CPU measured (AVX2; '
         'AVX-512 with and without AMX); see capjax/runtime/xla_flags.py'),
)
# The first jaxlib that knows these flags (an unknown flag in XLA_FLAGS aborts JAX).
_MIN_JAXLIB = (0, 9)


def _flag_values(xla_flags: str) -> dict[str, str]:
  """{name: value} of an XLA_FLAGS string; a repeated flag keeps its last value, as XLA does."""
  return dict(f.lstrip('-').partition('=')[::2] for f in xla_flags.split())


def cpu_settings(cpu: machine.Cpu, platform: str = 'cpu') -> tuple[Rule, ...]:
  """The rules that apply to `cpu` when JAX runs on `platform` (none off the CPU)."""
  if platform != 'cpu':
    return ()
  return tuple(r for r in RULES if all(cpu.has(f) for f in r.needs))


def with_settings(xla_flags: str, rules: tuple[Rule, ...]) -> str:
  """`xla_flags` plus every rule's flag that it does not already set."""
  given = _flag_values(xla_flags)
  added = [f'--{r.flag}={r.value}' for r in rules if r.flag not in given]
  return ' '.join([xla_flags.strip()] + added).strip()


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0,)


def chosen() -> tuple[Rule, ...]:
  """The rules for this machine and the platform JAX is expected to start."""
  if _jaxlib_version() < _MIN_JAXLIB:
    return ()
  return cpu_settings(machine.cpu(), machine.this_platform())


def apply() -> None:
  """Adds this machine's settings to $XLA_FLAGS. Call before JAX's first computation; it has
  no effect on a backend that has already started."""
  rules = chosen()
  if rules:
    os.environ['XLA_FLAGS'] = with_settings(os.environ.get('XLA_FLAGS', ''), rules)


def ynn_convolutions_enabled(xla_flags: str | None = None) -> bool:
  """Whether XLA_FLAGS (default: the environment's) leave YNNPACK convolutions on, as jaxlib's
  default does. capjax.models.layers picks its CPU convolution's weight gradient by this."""
  if xla_flags is None:
    xla_flags = os.environ.get('XLA_FLAGS', '')
  value = _flag_values(xla_flags).get(_YNN_FUSION_TYPE)
  if value is None:
    return True
  items = [t for t in value.split(',') if t]
  if any(t[0] in '+-' for t in items):
    return '-individual_convolution' not in items
  return 'individual_convolution' in items
