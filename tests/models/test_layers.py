"""capjax.models.layers: Conv equals nn.Conv and LSTM equals nn.RNN(OptimizedLSTMCell)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.models import layers
from capjax.models import lstm as lstm_lib

TOL = dict(rtol=2e-5, atol=2e-5)


def _randn(seed, shape, scale=1.0):
  # numpy, not jax.random: each new jax.random shape costs seconds of compile on a busy CPU.
  return jnp.asarray(scale * np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _random_like(tree, seed=0, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([_randn(seed + i, l.shape, scale) for i, l in enumerate(leaves)])


def _assert_trees_close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


CONV_CASES = {
    '3x3_same_s1': dict(features=5, kernel_size=(3, 3)),
    '3x3_same_s2': dict(features=5, kernel_size=(3, 3), strides=2),
    '7x7_s2_explicit': dict(features=6, kernel_size=(7, 7), strides=2, padding=3),
    '1x1_s2': dict(features=5, kernel_size=(1, 1), strides=(2, 2)),
    '1x1_s1_nobias': dict(features=5, kernel_size=(1, 1), use_bias=False),
    '3x3_valid_nobias': dict(features=5, kernel_size=(3, 3), padding='VALID', use_bias=False),
    '3x2_asym_pairs': dict(features=3, kernel_size=(3, 2), strides=(2, 1),
                           padding=((1, 2), (0, 1))),
    '3x3_grouped': dict(features=6, kernel_size=(3, 3), feature_group_count=2),
}
X_CONV = (2, 9, 7, 4)  # odd spatial sizes on purpose


@functools.cache
def _conv_inputs(case):
  x = _randn(0, X_CONV)
  shapes = jax.eval_shape(nn.Conv(**CONV_CASES[case]).init, jax.random.PRNGKey(0), x)
  return x, _random_like(shapes, seed=1)


def _out_and_grads(module, params, x):
  y, vjp = jax.vjp(lambda p, x_: module.apply(p, x_), params, x)
  return y, vjp(_randn(9, y.shape))


@functools.cache
def _conv_reference(case):
  x, params = _conv_inputs(case)
  return jax.jit(functools.partial(_out_and_grads, nn.Conv(**CONV_CASES[case])))(params, x)


@pytest.mark.parametrize('case,impl', [(c, 'auto') for c in CONV_CASES] + [
    ('3x3_same_s2', 'im2col'), ('7x7_s2_explicit', 'im2col'), ('3x2_asym_pairs', 'im2col'),
    ('3x3_valid_nobias', 'hybrid'), ('3x3_same_s2', 'hybrid'), ('7x7_s2_explicit', 'hybrid'),
    ('3x2_asym_pairs', 'hybrid'), ('3x3_same_s1', 'lax')])
def test_conv_values_and_grads_equal_nn_conv(case, impl):
  x, params = _conv_inputs(case)
  mine = layers.Conv(**CONV_CASES[case], impl=impl)
  _assert_trees_close(jax.jit(functools.partial(_out_and_grads, mine))(params, x),
                      _conv_reference(case))


@pytest.mark.parametrize('batch,images_per_chunk', [(5, None), (6, None), (6, 3)])
def test_chunked_weight_grad_equals_lax_weight_grad(batch, images_per_chunk):
  # The default chunking (2 images, 1 for odd batches) and an explicit one, over several chunks.
  x, g = _randn(0, (batch, 9, 7, 4)), _randn(1, (batch, 5, 4, 6))
  kernel = _randn(2, (3, 3, 4, 6))
  strides, pads = (2, 2), ((1, 1), (1, 1))
  _, vjp = jax.vjp(lambda k: layers._lax_conv(x, k, strides, pads), kernel)
  np.testing.assert_allclose(
      layers._weight_grad(x, g, kernel.shape, strides, pads, images_per_chunk), vjp(g)[0], **TOL)


def test_conv_params_have_nn_conv_names_and_shapes():
  x = jax.ShapeDtypeStruct(X_CONV, jnp.float32)
  for cfg in CONV_CASES.values():
    shapes = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    assert shapes(layers.Conv(**cfg)) == shapes(nn.Conv(**cfg))


def test_conv_bfloat16_dtype_follows_nn_conv():
  x, params = _conv_inputs('3x3_same_s1')
  cfg = dict(CONV_CASES['3x3_same_s1'], dtype=jnp.bfloat16)
  y = jax.jit(layers.Conv(**cfg).apply)(params, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(np.float32),
                             nn.Conv(**cfg).apply(params, x).astype(np.float32), rtol=0.05, atol=0.05)


def test_conv_rejects_unsupported_padding_and_int_kernel_size():
  x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
  with pytest.raises(ValueError, match='CIRCULAR'):
    jax.eval_shape(layers.Conv(4, (3, 3), padding='CIRCULAR').init, jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='1-D'):
    jax.eval_shape(layers.Conv(4, 3).init, jax.random.PRNGKey(0), x)


# ------------------------------------------------------------------------------------------ LSTM

B, T, D, H = 3, 6, 5, 8
_REF_RNN = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True)


@functools.cache
def _lstm_inputs():
  x = _randn(0, (B, T, D))
  carry = (_randn(1, (B, H)), _randn(2, (B, H)))
  shapes = jax.eval_shape(_REF_RNN.init, jax.random.PRNGKey(0), x)['params']['cell']
  return x, carry, _random_like(shapes, seed=3)  # random biases exercise the bias mapping


def _seq_loss(apply_fn, params, carry, x):
  out = jax.tree.leaves(apply_fn(params, carry, x))
  return sum(jnp.vdot(o, _randn(20 + i, o.shape)) for i, o in enumerate(out))


@functools.cache
def _lstm_reference():
  x, carry, cell_params = _lstm_inputs()
  apply_fn = lambda p, c, x_: _REF_RNN.apply({'params': {'cell': p}}, x_, initial_carry=c)
  out = jax.jit(apply_fn)(cell_params, carry, x)
  grads = jax.jit(jax.grad(functools.partial(_seq_loss, apply_fn), argnums=(0, 1, 2)))(
      cell_params, carry, x)
  return out, (lstm_lib.lstm_params_from_cell(grads[0]),) + grads[1:]


@pytest.mark.parametrize('unroll,custom_grad', [(1, True), (4, True), (1, False)])
def test_lstm_values_and_grads_equal_optimized_lstm_cell(unroll, custom_grad):
  x, carry, cell_params = _lstm_inputs()
  lstm = lstm_lib.LSTM(H, unroll=unroll, custom_grad=custom_grad)
  apply_fn = lambda p, c, x_: lstm.apply({'params': p}, c, x_)
  params = lstm_lib.lstm_params_from_cell(cell_params)
  out = jax.jit(apply_fn)(params, carry, x)
  grads = jax.jit(jax.grad(functools.partial(_seq_loss, apply_fn), argnums=(0, 1, 2)))(
      params, carry, x)
  ref_out, ref_grads = _lstm_reference()
  _assert_trees_close(out, ref_out)
  _assert_trees_close(grads, ref_grads)


def test_lstm_step_by_step_equals_sequence():
  x, carry, cell_params = _lstm_inputs()
  variables = {'params': lstm_lib.lstm_params_from_cell(cell_params)}
  lstm = lstm_lib.LSTM(H)
  (c_seq, h_seq), y_seq = jax.jit(lstm.apply)(variables, carry, x)
  step = jax.jit(functools.partial(lstm.apply, method='step'))
  c = carry
  for t in range(T):
    c, y_t = step(variables, c, x[:, t])
    np.testing.assert_allclose(y_t, y_seq[:, t], **TOL)
  _assert_trees_close(c, (c_seq, h_seq))


def test_lstm_init_matches_cell_shapes_and_none_carry_is_zeros():
  x, _, cell_params = _lstm_inputs()
  lstm = lstm_lib.LSTM(H)
  variables = jax.jit(lstm.init)(jax.random.PRNGKey(3), None, x)
  assert jax.tree.map(jnp.shape, variables['params']) == jax.tree.map(
      jnp.shape, lstm_lib.lstm_params_from_cell(cell_params))
  apply = jax.jit(lstm.apply)
  zeros = (jnp.zeros((B, H)), jnp.zeros((B, H)))
  _assert_trees_close(apply(variables, None, x), apply(variables, zeros, x))
  # Each gate's recurrent block is orthogonal, as in OptimizedLSTMCell's per-gate init.
  wh = np.asarray(variables['params']['recurrent_kernel'])
  for k in range(4):
    blk = wh[:, k * H:(k + 1) * H]
    np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-5)


# ------------------------------------------------------------------------------------------ pool


@pytest.mark.parametrize('shape,window', [((2, 8, 6, 3), (2, 2)), ((2, 9, 7, 3), (3, 2))])
def test_max_pool_values_and_grads_equal_nn_max_pool_with_ties(shape, window):
  # Rounded ReLU outputs give many tied maxima; the first in each window must take the gradient.
  x = jnp.maximum(jnp.round(_randn(0, shape)), 0.0)
  ref = lambda x_: nn.max_pool(x_, window, window)
  mine = lambda x_: layers.max_pool(x_, window)
  y_ref, vjp_ref = jax.vjp(ref, x)
  y, vjp = jax.jit(lambda x_: jax.vjp(mine, x_))(x)
  ct = _randn(1, y_ref.shape)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(ct)[0], vjp_ref(ct)[0])
