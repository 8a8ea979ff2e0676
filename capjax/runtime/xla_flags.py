"""XLA:CPU settings measured to make capjax faster; applied before JAX starts its backend.

jaxlib (0.10.2 here) hands each convolution on the CPU to YNNPACK ("individual_convolution" YNN
fusions). On the 2-core AVX2 CPU this project is measured on, those were up to 2x slower than
XLA's own convolutions forward, and 5-8x slower for weight gradients. Turning them off
(2026-12-02, jax 0.10.2): SimpleCNN's train step at batch 128 went from 3.41-3.45 s (with
capjax.models.layers' chunked weight gradient; 4.54 s without it) to 2.65-2.82 s, and
ResNet50's forward at batch 32 from 4.9 s to 3.3 s. Dots and other fusions are unchanged.
"""
from importlib import metadata
import os

# (flag name, value). A flag the user already sets in XLA_FLAGS is left as the user set it.
CPU_DEFAULTS = (('xla_cpu_experimental_ynn_fusion_type', '-individual_convolution'),)
# The first jaxlib that knows these flags (an unknown flag in XLA_FLAGS aborts JAX).
_MIN_JAXLIB = (0, 9)


_YNN_FUSION_TYPE = CPU_DEFAULTS[0][0]


def _flag_values(xla_flags: str) -> dict[str, str]:
  """{name: value} of an XLA_FLAGS string; a repeated flag keeps its last value, as XLA does."""
  return dict(f.lstrip('-').partition('=')[::2] for f in xla_flags.split())


def with_cpu_defaults(xla_flags: str) -> str:
  """`xla_flags` plus every CPU_DEFAULTS flag that it does not already set."""
  given = _flag_values(xla_flags)
  added = [f'--{name}={value}' for name, value in CPU_DEFAULTS if name not in given]
  return ' '.join([xla_flags.strip()] + added).strip()


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return (0,)


def apply() -> None:
  """Adds the CPU defaults to $XLA_FLAGS. Call before JAX's first computation; it has no
  effect on a backend that has already started."""
  if _jaxlib_version() >= _MIN_JAXLIB:
    os.environ['XLA_FLAGS'] = with_cpu_defaults(os.environ.get('XLA_FLAGS', ''))


def ynn_convolutions_enabled(xla_flags: str | None = None) -> bool:
  """Whether XLA_FLAGS (default: the environment's) leave YNNPACK convolutions on, as jaxlib's
  default does. capjax.models.layers picks its convolution's weight gradient by this."""
  if xla_flags is None:
    xla_flags = os.environ.get('XLA_FLAGS', '')
  value = _flag_values(xla_flags).get(_YNN_FUSION_TYPE)
  if value is None:
    return True
  items = [t for t in value.split(',') if t]
  if any(t[0] in '+-' for t in items):
    return '-individual_convolution' not in items
  return 'individual_convolution' in items
