"""model.dtype=bfloat16: float32 params, gradients, optimizer and BatchNorm state; bf16 matmuls
and convolutions, forward and backward; float32 logits, LSTM cell state and loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import precision
from helpers import runs as rh
from capjax.caption import decoding
from capjax.caption import steps as caption_steps
from capjax.caption import task as caption_task
from capjax.classify import steps as classify_steps
from capjax.classify import task as classify_task
from capjax.models import lstm
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

VOCAB = 13


def _lstm_inputs(steps=200, batch=8, d=16, h=32):
  """Params of an LSTM that integrates: forget gate sigmoid(6) = 0.9975, input gate
  sigmoid(-3) = 0.047, so c sums many small updates over ~400 steps."""
  k = jax.random.split(jax.random.key(0), 3)
  params = {'input_kernel': jax.random.normal(k[0], (d, 4 * h)) * 0.3,
            'recurrent_kernel': jax.random.normal(k[1], (h, 4 * h)) * 0.1,
            'bias': jnp.zeros(4 * h).at[:h].set(-3.0).at[h:2 * h].set(6.0)}
  return params, jax.random.normal(k[2], (batch, steps, d))


def test_lstm_cell_state_in_float32_tracks_float32_where_a_bf16_cell_state_drifts():
  params, x = _lstm_inputs()
  bf16 = lambda a: a.astype(jnp.bfloat16)
  zeros = jnp.zeros((x.shape[0], params['recurrent_kernel'].shape[0]))
  # The reference sees the same bf16-rounded weights and inputs: only the arithmetic differs.
  rounded = lambda a: bf16(a).astype(jnp.float32)
  (c_ref, _), _ = lstm.lstm_sequence(jax.tree.map(rounded, params), (zeros, zeros), rounded(x))
  bf_params = jax.tree.map(bf16, params)
  (c_mixed, h_mixed), hs_mixed = lstm.lstm_sequence(bf_params, (zeros, bf16(zeros)), bf16(x))
  (c_all_bf16, _), _ = lstm.lstm_sequence(bf_params, (bf16(zeros), bf16(zeros)), bf16(x))
  assert (c_mixed.dtype, h_mixed.dtype, hs_mixed.dtype) == (jnp.float32, jnp.bfloat16,
                                                            jnp.bfloat16)
  assert c_all_bf16.dtype == jnp.bfloat16
  scale = float(jnp.abs(c_ref).mean())
  err_mixed = float(jnp.abs(c_mixed - c_ref).mean()) / scale
  err_all_bf16 = float(jnp.abs(c_all_bf16.astype(jnp.float32) - c_ref).mean()) / scale
  # Measured: 0.2% against 6.8% after 200 steps (bf16 rounds this forget gate to 0.996 or 1).
  assert err_mixed < 0.01 and err_all_bf16 > 5 * err_mixed, (err_mixed, err_all_bf16)


def _sequence_loss(module, x):
  def loss(variables):
    (c, _), hs = module.apply(variables, None, x)
    return jnp.sum(hs.astype(jnp.float32) ** 2) + jnp.sum(c)
  return loss


@pytest.mark.parametrize('custom_grad', [True, False])
def test_bf16_lstm_module_keeps_c_float32_and_gives_float32_gradients(custom_grad):
  _, x = _lstm_inputs(steps=20)
  module = lstm.LSTM(32, dtype=jnp.bfloat16, custom_grad=custom_grad)
  variables = module.init(jax.random.key(1), None, x)
  (c, h), hs = module.apply(variables, None, x)
  assert (c.dtype, h.dtype, hs.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  grads = jax.grad(_sequence_loss(module, x))(variables)
  assert set(precision.float_dtypes(grads).values()) == {'float32'}
  # Against the float32 module's gradients: bf16 matmuls over 20 steps, a few percent.
  f32_grads = jax.grad(_sequence_loss(lstm.LSTM(32, custom_grad=custom_grad), x))(variables)
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(f32_grads)):
    assert float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)) < 0.03
  found = precision.traced_matmul_dtypes(jax.grad(_sequence_loss(module, x)), variables)
  assert found and not precision.not_in('bfloat16', found)


def _caption_case(dtype, decoder='attention', encoder='tiny_cnn', **model):
  config = rh.load_config('caption', f'runlocal,decoder={decoder}')
  config.model.update(dtype=dtype, encoder=encoder, **model)
  captioner = caption_task.build_model(config, VOCAB)
  state = state_lib.create(captioner, make_optimizer(config.optim, 10), jax.random.key(0),
                           *caption_task.sample_inputs(config))
  size, length = config.data.image_size, config.data.caption_length
  batch = {'image': jax.random.randint(jax.random.key(1), (4, size, size, 3), 0, 256
                                       ).astype(jnp.uint8),
           'tokens': jax.random.randint(jax.random.key(2), (4, length), 1, VOCAB)}
  step = functools.partial(caption_steps.caption_train_step,
                           attention_reg=float(config.model.attention_reg))
  return captioner, state, batch, step


def _classify_case(dtype, name='tiny_cnn', conv='layers'):
  config = rh.load_config('classify', f'runlocal,model={name}')
  config.model.update(dtype=dtype, conv=conv, dropout=0.1)
  model = classify_task.build_model(config, 5)
  state = state_lib.create(model, make_optimizer(config.optim, 10), jax.random.key(0),
                           *classify_task.sample_inputs(config))
  size = config.data.image_size
  batch = {'image': jax.random.normal(jax.random.key(1), (4, size, size, 3)),
           'label': jnp.arange(4) % 5}
  return model, state, batch, functools.partial(classify_steps.classify_train_step,
                                                label_smoothing=0.1)


CASES = {
    'caption_attention': lambda dt: _caption_case(dt),
    'caption_attention_previous_coverage': lambda dt: _caption_case(
        dt, query='previous', coverage=True, score='additive', attention_reg=0.1),
    'caption_inject_every_step': lambda dt: _caption_case(dt, 'inject', every_step=True),
    'caption_merge_layernorm': lambda dt: _caption_case(dt, 'merge', feature_norm=True),
    'caption_shapes_cnn_layers_conv': lambda dt: _caption_case(
        dt, encoder='shapes_cnn', widths=(8, 8, 8, 8), conv='layers', norm=True),
    'caption_keras_resnet_batchnorm': lambda dt: _caption_case(dt, 'merge', 'resnet_tiny'),
    'classify_cnn_layers_conv': lambda dt: _classify_case(dt),
    'classify_resnet_flax_conv': lambda dt: _classify_case(dt, 'tiny_resnet', 'flax'),
}


@pytest.mark.parametrize('case', CASES)
def test_bf16_train_step_keeps_float32_state_and_runs_every_matmul_in_bf16(case):
  _, state, batch, train_step = CASES[case]('bfloat16')
  assert set(precision.float_dtypes(state.params).values()) == {'float32'}
  rng = jax.random.key(3)
  # Forward, backward and the optimizer: every matmul and convolution reads bf16 operands.
  found = precision.traced_matmul_dtypes(train_step, state, batch, rng)
  assert found and not precision.not_in('bfloat16', found), precision.not_in('bfloat16', found)
  new_state, metrics = jax.eval_shape(train_step, state, batch, rng)
  kept = {'params': new_state.params, 'opt_state': new_state.opt_state,
          'batch_stats': new_state.batch_stats}
  assert set(precision.float_dtypes(kept).values()) == {'float32'}
  assert all(m.dtype == jnp.float32 for m in metrics.values())


@pytest.mark.parametrize('case', ['caption_attention', 'classify_cnn_layers_conv'])
def test_float32_train_step_runs_every_matmul_in_float32(case):
  _, state, batch, train_step = CASES[case]('float32')
  found = precision.traced_matmul_dtypes(train_step, state, batch, jax.random.key(3))
  assert found and not precision.not_in('float32', found)


@pytest.mark.parametrize('decoder', ['attention', 'inject', 'merge'])
def test_bf16_decoders_give_float32_logits_and_decode_with_bf16_matmuls(decoder):
  captioner, state, batch, _ = _caption_case('bfloat16', decoder)
  variables = state_lib.variables(state)
  logits = jax.eval_shape(lambda v: state.apply_fn(v, batch['image'], batch['tokens']),
                          variables)
  assert logits.dtype == jnp.float32
  features = state.apply_fn(variables, batch['image'], method='encode')
  assert features.dtype == jnp.bfloat16
  (carry, first_logits) = jax.eval_shape(
      lambda v: state.apply_fn(v, features, method='start'), variables)
  assert first_logits.dtype == jnp.float32
  # The LSTM's cell state is the first leaf of every decoder's carry: float32.
  assert jax.tree.leaves(carry)[0].dtype == jnp.float32
  for method in ('greedy', 'beam'):
    run = decoding.make_captioner_fn(captioner, method=method, max_len=5,
                                     end_id=2, beam_size=2)
    found = precision.traced_matmul_dtypes(run, variables, batch['image'])
    assert found and not precision.not_in('bfloat16', found)
    assert np.asarray(run(variables, batch['image'])).shape == (4, 5)
