"""A sequence LSTM that is fast on XLA:CPU and equal to `flax.linen.OptimizedLSTMCell`.

`LSTM` runs a whole sequence with the math of `flax.linen.OptimizedLSTMCell`: the input projection
of all steps is one matmul outside the scan, the four gates share one (H, 4H) recurrent matmul, and
a hand-written backward pass keeps only the (B, H) x (H, 4H) product inside the reverse scan (the
weight gradients become single matmuls over all steps). Param layout, gates in the order i, f, g, o
along the last axis:

  input_kernel      (D, 4H)   = concat of OptimizedLSTMCell's ii, if, ig, io kernels
  recurrent_kernel  (H, 4H)   = concat of hi, hf, hg, ho kernels
  bias              (4H,)     = concat of hi, hf, hg, ho biases

`lstm_params_from_cell` converts OptimizedLSTMCell params to this layout.

Mixed precision (`dtype=jnp.bfloat16`): the matmuls run in bf16; the gates and the cell state c
in float32, from the matmuls' bf16 pre-activations. c is a running sum over the sequence
(c' = f * c + i * g), and bf16 has 8 bits of mantissa: a forget gate of 0.9975 (a memory of ~400
steps) is either 0.9961 or 1.0 in bf16, and an update smaller than c / 512 is lost, so the errors
compound over the steps (tests/models/test_mixed_precision.py measures it). This elementwise work
costs no matmul time. h = o * tanh(c) only feeds matmuls and is bounded, so it goes back to bf16 at
each step. Recurrent codebases do the same: RecurrentGemma's scan carries its state in float32 and
emits the compute dtype.
"""
from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]


def _gates(z_Bx4H, c_BxH):
  """OptimizedLSTMCell's update from pre-activations z = x Wi + h Wh + b; returns (c, h, acts).

  The gates are computed in c's dtype (float32 under bf16 compute; see the module docstring)."""
  zi, zf, zg, zo = jnp.split(z_Bx4H.astype(c_BxH.dtype), 4, axis=-1)
  i, f, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jax.nn.sigmoid(zo)
  g = jnp.tanh(zg)
  c = f * c_BxH + i * g
  return c, o * jnp.tanh(c), (i, f, g, o)


def lstm_step(params, carry, x_BxD):
  """One LSTM step: `((c, h), x) -> ((c', h'), h')`, the math of `nn.OptimizedLSTMCell`."""
  c, h = carry
  # One matmul of [x, h] against the stacked kernels instead of two: at decoding's batch
  # sizes the two small matmuls ran concurrently and each at a fraction of the matmul peak.
  w = jnp.concatenate([params['input_kernel'], params['recurrent_kernel']], axis=0)
  z = jnp.concatenate([x_BxD, h.astype(x_BxD.dtype)], axis=-1) @ w + params['bias'][None]
  c, h, _ = _gates(z, c)
  h = h.astype(x_BxD.dtype)  # c keeps its (float32) dtype; h goes back to the compute dtype.
  return (c, h), h


def _scan_forward(wh, b, xw_TxBx4H, c0, h0, unroll):
  def body(carry, xw):
    c, h = carry
    # The bias is added here, where it fuses with the gates, not broadcast over all T steps.
    c, h, acts = _gates(xw + h @ wh + b[None], c)
    h = h.astype(xw.dtype)  # c keeps its (float32) dtype; h goes back to the compute dtype.
    return (c, h), (h, c, jnp.concatenate(acts, axis=-1))
  return lax.scan(body, (c0, h0), xw_TxBx4H, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lstm_seq(wi, wh, b, c0, h0, x_TxBxD, unroll):
  (c, h), (hs, _, _) = _scan_forward(wh, b, x_TxBxD @ wi, c0, h0, unroll)
  return (c, h), hs


def _lstm_seq_fwd(wi, wh, b, c0, h0, x_TxBxD, unroll):
  (c, h), (hs, cs, acts) = _scan_forward(wh, b, x_TxBxD @ wi, c0, h0, unroll)
  return ((c, h), hs), (wi, wh, c0, h0, x_TxBxD, hs, cs, acts)


def _lstm_seq_bwd(unroll, res, cts):
  wi, wh, c0, h0, x, hs, cs, acts = res
  (dc_T, dh_T), dhs = cts
  c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
  h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)

  def body(carry, inp):
    dc, dh = carry
    dh_out, c, cp, a = inp
    i, f, g, o = jnp.split(a, 4, axis=-1)
    dh = dh + dh_out
    tc = jnp.tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    # dc (like c) is float32 under bf16 compute, so dz is too: it goes to the matmuls' dtype.
    dz = jnp.concatenate(
        [dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)],
        axis=-1).astype(wh.dtype)
    # Only this product is sequential; weight gradients are formed after the scan.
    return (dc * f, dz @ wh_t), dz

  wh_t = wh.T  # transposed once, outside the loop
  (dc0, dh0), dz = lax.scan(body, (dc_T, dh_T), (dhs, cs, c_prev, acts), reverse=True,
                            unroll=unroll)
  # One (D + H, T*B) x (T*B, 4H) product for both weight gradients: fewer, larger matmuls.
  # Sums over all T*B terms accumulate in float32 whatever the compute dtype; each gradient is
  # returned in its input's dtype, as custom_vjp requires.
  dw = jnp.einsum('tbk,tbg->kg', jnp.concatenate([x, h_prev], axis=-1), dz,
                  preferred_element_type=jnp.float32).astype(wi.dtype)
  d = x.shape[-1]
  db = dz.sum(axis=(0, 1), dtype=jnp.float32).astype(dz.dtype)
  return dw[:d], dw[d:], db, dc0, dh0, dz @ wi.T


_lstm_seq.defvjp(_lstm_seq_fwd, _lstm_seq_bwd)


def lstm_sequence(params, carry, x_BxTxD, unroll=1, custom_grad=True):
  """Runs a whole sequence: `((c0, h0), x_BxTxD) -> ((cT, hT), h_BxTxH)`.

  Equal to `nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)` given mapped params. With
  `custom_grad=False` the backward pass is JAX's autodiff of the scan (for comparison).
  """
  wi, wh, b = params['input_kernel'], params['recurrent_kernel'], params['bias']
  c0, h0 = carry
  x_TxBxD = jnp.swapaxes(x_BxTxD, 0, 1)
  if custom_grad:
    (c, h), hs = _lstm_seq(wi, wh, b, c0, h0, x_TxBxD, unroll)
  else:
    (c, h), (hs, _, _) = _scan_forward(wh, b, x_TxBxD @ wi, c0, h0, unroll)
  return (c, h), jnp.swapaxes(hs, 0, 1)


def _per_gate(init: Initializer) -> Initializer:
  """Initialises a (rows, 4H) kernel as four (rows, H) blocks, as OptimizedLSTMCell does."""
  def init_fn(key, shape, dtype=jnp.float32):
    rows, four_h = shape
    keys = jax.random.split(key, 4)
    return jnp.concatenate([init(k, (rows, four_h // 4), dtype) for k in keys], axis=-1)
  return init_fn


class LSTM(nn.Module):
  """Sequence LSTM with `nn.OptimizedLSTMCell` math (sigmoid gates, tanh), fused and hoisted.

  Call with `(carry or None, x_BxTxD)` to run a sequence, returning `((c, h), h_BxTxH)`; call
  `step(carry or None, x_BxD)` for one step (greedy / beam decoding) with the same params.
  Carries are `(c, h)` tuples like flax's. Param layout: see the module docstring.

  Attributes:
    features: hidden size H.
    kernel_init, recurrent_kernel_init, bias_init: per-gate initializers (flax's defaults).
    dtype: computation dtype (default: promoted from inputs and params).
    param_dtype: dtype of the params.
    unroll: `lax.scan` unroll factor for the time loop.
    custom_grad: use the hand-written backward pass (False: autodiff, for comparison).
  """
  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  recurrent_kernel_init: Initializer = nn.initializers.orthogonal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32
  unroll: int = 1
  custom_grad: bool = True

  @nn.compact
  def __call__(self, carry, x):
    """x (B, T, D): the whole sequence -> ((c, h), h_BxTxH); x (B, D): one step -> ((c, h), h)."""
    hf = self.features
    params = {
        'input_kernel': self.param('input_kernel', _per_gate(self.kernel_init),
                                   (x.shape[-1], 4 * hf), self.param_dtype),
        'recurrent_kernel': self.param('recurrent_kernel', _per_gate(self.recurrent_kernel_init),
                                       (hf, 4 * hf), self.param_dtype),
        'bias': self.param('bias', self.bias_init, (4 * hf,), self.param_dtype),
    }
    batch = x.shape[0]
    if carry is None:
      carry = self.zero_carry(batch)
    c, h = carry
    x, h, *ws = promote_dtype(x, h, *params.values(), dtype=self.dtype)
    c = c.astype(jnp.promote_types(x.dtype, jnp.float32))  # See the module docstring.
    params = dict(zip(params, ws))
    if x.ndim == 2:
      return lstm_step(params, (c, h), x)
    if x.ndim != 3:
      raise ValueError(f'LSTM input must be (B, T, D) or (B, D); got {x.shape}.')
    return lstm_sequence(params, (c, h), x, self.unroll, self.custom_grad)

  def step(self, carry, x_BxD):
    """One decoding step with the sequence's params: ((c, h), x_BxD) -> ((c', h'), h')."""
    if x_BxD.ndim != 2:
      raise ValueError(f'LSTM.step takes one step of inputs (B, D); got {x_BxD.shape}.')
    return self(carry, x_BxD)

  @nn.nowrap
  def zero_carry(self, batch: int, dtype=jnp.float32):
    """Zero (c, h) for a batch, as `OptimizedLSTMCell.initialize_carry` gives."""
    z = jnp.zeros((batch, self.features), dtype)
    return z, z


def lstm_params_from_cell(cell_params) -> dict[str, Array]:
  """Maps `nn.OptimizedLSTMCell` params ({'ii': {'kernel'}, ..., 'ho': {'kernel', 'bias'}})."""
  cat = lambda name, leaf: jnp.concatenate([cell_params[name + g][leaf] for g in 'ifgo'], -1)
  return {'input_kernel': cat('i', 'kernel'), 'recurrent_kernel': cat('h', 'kernel'),
          'bias': cat('h', 'bias')}
