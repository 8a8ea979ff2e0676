"""Fast, reference-equal building blocks for XLA:CPU: `Conv` and `max_pool` (the sequence LSTM
is in `capjax.models.lstm`).

`Conv` is a drop-in for `flax.linen.Conv` on NHWC inputs (same fields that matter, same param names
and shapes, so params load either way). What is fastest depends on who runs the convolution
(measured on the 2-core AVX2 CPU with jax 0.10.2, SimpleCNN's layers at batch 128):
* jaxlib's default hands convolutions to YNNPACK, whose *weight* gradient (a convolution whose
  window is the whole output image) is slow: 1.2-1.5 s vs 0.34 s at 64x64x32->32 and 0.64 s vs
  0.17 s at 32x32x64->64 for im2col matmuls over chunks of the batch (the patches then stay in
  cache). There `impl='auto'` is 'hybrid': XLA's forward and input gradient, and that weight
  gradient in a custom VJP.
* With YNNPACK convolutions off (capjax.xla_flags, which launch.py applies), XLA's own
  convolutions are 1.5-2x faster forward and its weight gradients about as fast as the chunked
  matmuls, and the whole SimpleCNN step was 10-20% faster with them alone (2.65-2.82 s vs
  3.09-3.59 s per step). There `impl='auto'` is 'lax'.
Grouped convolutions always use XLA's convolution.

`max_pool` is `nn.max_pool` for non-overlapping windows, written as strided slices so that it and
its gradient fuse (XLA's reduce_window / select_and_scatter loops are ~10x slower here).
"""
from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
from jax import lax
import jax.numpy as jnp

from capjax.runtime import machine, xla_flags

Array = jax.Array
Initializer = Callable[..., Array]
_NHWC = ('NHWC', 'HWIO', 'NHWC')


# ----------------------------------------------------------------------------------------- conv


def _pairs(padding, kernel_size, strides, in_hw) -> tuple[tuple[int, int], ...]:
  """Explicit (lo, hi) pads for the two spatial dims, as `lax.conv_general_dilated` would use."""
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"Conv padding {padding!r} is not supported; use 'SAME', 'VALID' or ints.")
    return tuple(lax.padtype_to_pads(in_hw, kernel_size, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f'Conv padding {padding!r} must be a str, an int, or 2 ints/pairs.')
  return pads


def _lax_conv(x, kernel, strides, pads, groups=1):
  return lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=_NHWC, feature_group_count=groups)


def _im2col(x_BxHxWxC, kernel_size, strides, pads):
  """Patches (B, Ho, Wo, kh*kw*C), ordered (kh, kw, C) like an HWIO kernel reshaped to 2-D."""
  (kh, kw), (sh, sw) = kernel_size, strides
  xp = jnp.pad(x_BxHxWxC, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  taps = [
      lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1,
                                   xp.shape[3]), (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _im2col_conv(x, kernel, strides, pads):
  cols = _im2col(x, kernel.shape[:2], strides, pads)
  return jnp.dot(cols, kernel.reshape(-1, kernel.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid_conv(x, kernel, strides, pads):
  """Convolution whose weight gradient is an im2col matmul instead of XLA's windowed conv."""
  return _lax_conv(x, kernel, strides, pads)


def _hybrid_fwd(x, kernel, strides, pads):
  # Keep x, not the 9x larger patches: rebuilding them in the backward pass is cheaper than
  # holding them (and faulting in their pages) across the whole network.
  return _lax_conv(x, kernel, strides, pads), (x, kernel)


def _hybrid_bwd(strides, pads, res, g):
  x, kernel = res
  # Input gradient: XLA's transposed convolution (fast on CPU); unused ones are removed by DCE.
  # linear_transpose, unlike vjp, does not trace a (dead) second forward convolution.
  (dx,) = jax.linear_transpose(lambda x_: _lax_conv(x_, kernel, strides, pads), x)(g)
  return dx, _weight_grad(x, g, kernel.shape, strides, pads).astype(kernel.dtype)


def _weight_grad(x, g, kernel_shape, strides, pads, images_per_chunk=None):
  """d(loss)/d(kernel) of a convolution: sum over the batch of im2col(x)^T @ g, chunk by chunk.

  One matmul over the whole batch would contract ~10^5-10^6 rows of a 9x patch array that
  lives in main memory (600 MB for a 64x64x32 layer at batch 128); a scan over chunks of
  `images_per_chunk` (default 2, or 1 for odd batches) builds each chunk's patches in cache
  and accumulates. Measured at batch 128 on the 2-core CPU (2026-12-02): 3.7x faster at
  64x64x32->32, 2-3x at 32x32 and 16x16, ~1.5x at 8x8.
  """
  b = x.shape[0]
  n = images_per_chunk or (2 if b % 2 == 0 else 1)
  if b % n:
    raise ValueError(f'batch {b} must divide into chunks of {n} images.')
  acc_dtype = jnp.promote_types(jnp.result_type(x, g), jnp.float32)

  def add_chunk(acc, x_and_g):
    x_chunk, g_chunk = x_and_g
    cols = _im2col(x_chunk, kernel_shape[:2], strides, pads)
    # g^T @ cols (rows on the contracting side of both) was the fastest layout measured.
    return acc + lax.dot_general(
        g_chunk.reshape(-1, g_chunk.shape[-1]), cols.reshape(-1, cols.shape[-1]),
        (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype), None

  chunks = lambda a: a.reshape(b // n, n, *a.shape[1:])
  acc = jnp.zeros((g.shape[-1], math.prod(kernel_shape[:3])), acc_dtype)
  acc, _ = lax.scan(add_chunk, acc, (chunks(x), chunks(g)))
  return acc.T.reshape(kernel_shape)


_hybrid_conv.defvjp(_hybrid_fwd, _hybrid_bwd)


def conv2d(x_BxHxWxC, kernel, strides=(1, 1), padding='SAME', feature_group_count=1,
           impl='auto'):
  """2-D NHWC convolution with an HWIO kernel, equal to `lax.conv_general_dilated`.

  Args:
    x_BxHxWxC: input images.
    kernel: (kh, kw, C // feature_group_count, F).
    strides: two ints.
    padding: 'SAME', 'VALID', an int, or two ints / (lo, hi) pairs.
    feature_group_count: groups (grouped / depthwise convolutions use XLA's convolution).
    impl: 'auto' (the fastest measured under the XLA flags in effect; see the module doc),
      'lax', 'im2col' (autodiff of patches + one matmul) or 'hybrid' (XLA forward and input
      gradient, chunked matmul weight gradient).

  Returns:
    (B, Ho, Wo, F).
  """
  kernel_size = tuple(kernel.shape[:2])
  strides = tuple(strides)
  pads = _pairs(padding, kernel_size, strides, x_BxHxWxC.shape[1:3])
  if impl == 'auto':
    # The chunked weight gradient only beats YNNPACK's on the CPU; elsewhere XLA's is the one.
    impl = 'hybrid' if machine.on_cpu() and xla_flags.ynn_convolutions_enabled() else 'lax'
  if impl == 'lax' or feature_group_count != 1:
    return _lax_conv(x_BxHxWxC, kernel, strides, pads, feature_group_count)
  if impl == 'im2col':
    return _im2col_conv(x_BxHxWxC, kernel, strides, pads)
  if impl == 'hybrid':
    return _hybrid_conv(x_BxHxWxC, kernel, strides, pads)
  raise ValueError(f"conv2d impl {impl!r} is unknown; use 'auto', 'lax', 'im2col' or 'hybrid'.")


class Conv(nn.Module):
  """Drop-in for `flax.linen.Conv` (2-D, NHWC): same fields, param names and shapes.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw); an int is refused because nn.Conv would make it a 1-D kernel.
    strides: int or (sh, sw).
    padding: 'SAME', 'VALID', an int, or two ints / (lo, hi) pairs.
    feature_group_count: groups; >1 (e.g. depthwise) falls back to XLA's convolution.
    use_bias: add a per-channel bias.
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: dtype of the params.
    kernel_init, bias_init: initializers (defaults as in `nn.Conv`).
    impl: see `conv2d`.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str | int | Sequence[Any] = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x_BxHxWxC: Array) -> Array:
    """Convolves a (B, H, W, C) batch; returns (B, Ho, Wo, features)."""
    if isinstance(self.kernel_size, int):
      raise ValueError('Conv kernel_size must be a pair like (3, 3): nn.Conv reads an int as 1-D.')
    ks = tuple(self.kernel_size)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    if len(ks) != 2 or len(strides) != 2 or x_BxHxWxC.ndim != 4:
      raise ValueError(f'Conv supports 2-D NHWC only; got kernel {ks}, input {x_BxHxWxC.shape}.')
    cin = x_BxHxWxC.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f'Conv input channels {cin} must divide by {self.feature_group_count}.')
    kernel = self.param('kernel', self.kernel_init,
                        ks + (cin // self.feature_group_count, self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x_BxHxWxC, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides, self.padding, self.feature_group_count, self.impl)
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)


def conv_by_name(name: str, field: str = 'model.conv'):
  """The convolution module a config names: 'flax' (`nn.Conv`) or 'layers' (this file's `Conv`);
  `field` is where the name came from, for the error."""
  if name == 'flax':
    return nn.Conv
  if name == 'layers':
    return Conv
  from capjax.errors import UserError  # pylint: disable=import-outside-toplevel
  raise UserError(f"--config.{field}={name} is unknown; use flax or layers.")


def _pool_taps(x, window):
  kh, kw = window
  return [x[:, i::kh, j::kw] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, window):
  return functools.reduce(jnp.maximum, _pool_taps(x, window))


def _max_pool_fwd(x, window):
  y = _max_pool(x, window)
  return y, (x, y)


def _max_pool_bwd(window, res, g):
  x, y = res
  # The first maximum of each window in row-major order takes the gradient, as XLA's
  # select_and_scatter (the gradient of nn.max_pool) does; everything here fuses elementwise.
  taken, parts = None, []
  for tap in _pool_taps(x, window):
    hit = tap == y if taken is None else (tap == y) & ~taken
    taken = hit if taken is None else taken | hit
    parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
  b, ho, wo, c = g.shape
  dx = jnp.stack(parts).reshape(*window, b, ho, wo, c).transpose(2, 3, 0, 4, 1, 5)
  return (dx.reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x_BxHxWxC, window=(2, 2)):
  """Non-overlapping max pool (strides = window, 'VALID'), equal to `nn.max_pool` incl. gradient.

  XLA:CPU runs `nn.max_pool`'s reduce_window and its select_and_scatter gradient as slow generic
  loops; strided slices and elementwise maxima fuse into single passes (~10x faster measured).
  """
  kh, kw = window
  _, h, w, _ = x_BxHxWxC.shape
  return _max_pool(x_BxHxWxC[:, :h // kh * kh, :w // kw * kw], (kh, kw))
