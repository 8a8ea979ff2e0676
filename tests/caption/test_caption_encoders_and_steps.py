"""Merge decoder, feature-input steps, encoder freezing and Keras encoders in the captioner."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import runs as rh
from capjax.caption import steps
from capjax.caption import task as caption_task
from capjax.models import cnn, decoder, encoders, keras_weights
from capjax.models.captioner import Captioner
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

V, L = 11, 7


def _tokens(b=3):
  return jax.random.randint(jax.random.key(2), (b, L), 3, V).at[:, 0].set(1)


@pytest.mark.parametrize('merge', ['add', 'concat'])
def test_merge_decoder_step_by_step_reproduces_teacher_forcing(merge):
  dec = decoder.MergeDecoder(V, 8, 16, merge=merge, feature_norm=True)
  features = jax.random.normal(jax.random.key(1), (3, 2, 2, 5))
  tokens = _tokens()
  variables = dec.init(jax.random.key(0), features, tokens)
  full = dec.apply(variables, features, tokens)
  assert full.shape == (3, L - 1, V)
  state, logits = dec.apply(variables, features, method='start')
  stepped = [logits]
  for t in range(1, L - 1):
    state, logits = dec.apply(variables, state, tokens[:, t], method='step')
    stepped.append(logits)
  np.testing.assert_allclose(jnp.stack(stepped, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('make', [
    lambda: decoder.MergeDecoder(V, 8, 16, feature_norm=True),
    lambda: decoder.InjectDecoder(V, 8, 16, pool='mean', feature_norm=True)])
def test_pooled_cache_rows_and_the_full_grid_give_the_same_logits(make):
  """Training reads pooled cached features; predict feeds the grid: they must agree."""
  dec = make()
  grid = jax.random.normal(jax.random.key(1), (3, 2, 2, 5)) * 50.0
  tokens = _tokens()
  variables = dec.init(jax.random.key(0), grid, tokens)
  np.testing.assert_allclose(dec.apply(variables, grid.mean((1, 2)), tokens),
                             dec.apply(variables, grid, tokens), rtol=1e-4, atol=1e-4)


def _state(encoder_lr_scale=1.0, encoder=None):
  enc = encoder or cnn.CaptionEncoderTiny()
  model = Captioner(enc, decoder.MergeDecoder(V, 8, 16))
  optim = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0,
      weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0,
      encoder_lr_scale=encoder_lr_scale))
  images = jnp.asarray(np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3) % 251, jnp.uint8)
  tokens = jnp.asarray([[1, 4, 5, 6, 2, 0, 0], [1, 7, 8, 2, 0, 0, 0]], jnp.int32)
  state = state_lib.create(model, make_optimizer(optim, 10), jax.random.key(0), images, tokens)
  return model, state, {'image': images, 'tokens': tokens}


def test_feature_train_step_golden_value_and_equal_to_the_image_step_on_its_features():
  model, state, batch = _state()
  features = model.apply({'params': state.params}, batch['image'], method='encode')
  feature_batch = {'features': features, 'tokens': batch['tokens']}
  step = jax.jit(steps.caption_feature_train_step)
  _, from_images = jax.jit(steps.caption_train_step)(state, batch, jax.random.key(0))
  losses = []
  for _ in range(3):
    state, metrics = step(state, feature_batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], from_images['loss'], rtol=1e-6)
  # Recorded from this implementation (f32, CPU); a change here means the maths changed.
  np.testing.assert_allclose(losses, [2.339468, 2.249600, 2.170534], rtol=2e-4)


def test_encoder_lr_scale_zero_freezes_the_encoder_and_a_small_scale_moves_it_less():
  params = {'encoder': {'w': jnp.ones((3,))}, 'decoder': {'w': jnp.ones((3,))}}
  grads = {'encoder': {'w': jnp.full((3,), 0.5)}, 'decoder': {'w': jnp.full((3,), 0.5)}}

  def moved(scale):
    optim = ml_collections.ConfigDict(dict(
        name='adamw', learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0,
        weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0,
        encoder_lr_scale=scale))
    tx = make_optimizer(optim, 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return float(jnp.abs(updates['encoder']['w']).max()), float(
        jnp.abs(updates['decoder']['w']).max())

  frozen, full, small = moved(0.0), moved(1.0), moved(0.1)
  assert frozen[0] == 0.0 and frozen[1] > 0
  np.testing.assert_allclose(small[0], 0.1 * full[0], rtol=1e-5)
  np.testing.assert_allclose((small[1], frozen[1]), (full[1], full[1]), rtol=1e-6)


def test_training_a_batchnorm_encoder_end_to_end_updates_its_statistics():
  _, state, batch = _state(encoder=encoders.KerasEncoder(
      encoders.KERAS_BACKBONES['resnet_tiny'][0](), 'caffe'))
  new, metrics = jax.jit(steps.caption_train_step)(state, batch, jax.random.key(0))
  assert np.isfinite(float(metrics['loss']))
  before = jax.tree.leaves(state.batch_stats)
  after = jax.tree.leaves(new.batch_stats)
  assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(after, before))


def _config(arg):
  return rh.load_config('caption', arg)


def test_encoder_weights_from_a_keras_h5_file_become_the_captioner_encoder(tmp_path):
  config = _config('dataset=flickr8k,encoder=resnet_tiny,decoder=merge')
  model = caption_task.build_model(config, V)
  arch = encoders.keras_arch(model.encoder)
  template = keras_weights.variable_shapes(arch)
  rng = np.random.default_rng(7)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), template)
  path = str(tmp_path / 'tiny.h5')
  keras_weights.save_keras_h5(variables, path, arch)
  config.model.encoder_weights = path
  loaded = caption_task.load_encoder_weights(config, model)
  for a, b in zip(jax.tree.leaves(loaded['params']['backbone']),
                  jax.tree.leaves(variables['params'])):
    np.testing.assert_array_equal(a, b)
  assert set(loaded) == {'params', 'batch_stats'}


def test_config_variants_pick_encoder_preprocessing_size_and_freezing():
  resnet = _config('dataset=flickr8k,encoder=resnet50,decoder=attention')
  assert (resnet.data.image_size, resnet.optim.encoder_lr_scale) == (224, 0.0)
  assert resnet.eval.split == 'validation'
  xcp = _config('dataset=coco,encoder=xception')
  assert (xcp.data.image_size, xcp.model.decoder) == (299, 'merge')
  model = caption_task.build_model(xcp, V)
  assert model.encoder.preprocess == 'tf'
  assert caption_task.build_model(resnet, V).encoder.preprocess == 'caffe'
  scratch = _config('dataset=flickr8k')
  assert (scratch.model.encoder, scratch.optim.encoder_lr_scale) == ('cnn', 1.0)
  assert (scratch.model.decoder, scratch.model.query) == ('attention', 'current')
  shapes = _config(None)  # The shapes default is untouched by the variants.
  assert (shapes.model.encoder, shapes.model.decoder, shapes.data.image_size) == (
      'shapes_cnn', 'attention', 64)
