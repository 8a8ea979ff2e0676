"""Keras-layout ResNet50 and Xception: names, order, sizes and forward passes match Keras.

The layer-name lists below were printed from Keras 3.15.1 (`[l.name for l in
keras.applications.ResNet50(include_top=False, weights=None).layers if l.weights]`, likewise for
Xception); their order is the order Keras loads .h5 files in. Parameter counts are Keras's
trainable / non-trainable totals for the notop models. Numerical agreement with Keras itself is
checked by tests/scripts/keras_reference_check.py (needs TensorFlow, so not part of this suite).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.models import resnet, xception

KERAS_RESNET50_LAYERS = [
    'conv1_conv', 'conv1_bn', 'conv2_block1_1_conv', 'conv2_block1_1_bn', 'conv2_block1_2_conv',
    'conv2_block1_2_bn', 'conv2_block1_0_conv', 'conv2_block1_3_conv', 'conv2_block1_0_bn',
    'conv2_block1_3_bn', 'conv2_block2_1_conv', 'conv2_block2_1_bn', 'conv2_block2_2_conv',
    'conv2_block2_2_bn', 'conv2_block2_3_conv', 'conv2_block2_3_bn', 'conv2_block3_1_conv',
    'conv2_block3_1_bn', 'conv2_block3_2_conv', 'conv2_block3_2_bn', 'conv2_block3_3_conv',
    'conv2_block3_3_bn', 'conv3_block1_1_conv', 'conv3_block1_1_bn', 'conv3_block1_2_conv',
    'conv3_block1_2_bn', 'conv3_block1_0_conv', 'conv3_block1_3_conv', 'conv3_block1_0_bn',
    'conv3_block1_3_bn', 'conv3_block2_1_conv', 'conv3_block2_1_bn', 'conv3_block2_2_conv',
    'conv3_block2_2_bn', 'conv3_block2_3_conv', 'conv3_block2_3_bn', 'conv3_block3_1_conv',
    'conv3_block3_1_bn', 'conv3_block3_2_conv', 'conv3_block3_2_bn', 'conv3_block3_3_conv',
    'conv3_block3_3_bn', 'conv3_block4_1_conv', 'conv3_block4_1_bn', 'conv3_block4_2_conv',
    'conv3_block4_2_bn', 'conv3_block4_3_conv', 'conv3_block4_3_bn', 'conv4_block1_1_conv',
    'conv4_block1_1_bn', 'conv4_block1_2_conv', 'conv4_block1_2_bn', 'conv4_block1_0_conv',
    'conv4_block1_3_conv', 'conv4_block1_0_bn', 'conv4_block1_3_bn', 'conv4_block2_1_conv',
    'conv4_block2_1_bn', 'conv4_block2_2_conv', 'conv4_block2_2_bn', 'conv4_block2_3_conv',
    'conv4_block2_3_bn', 'conv4_block3_1_conv', 'conv4_block3_1_bn', 'conv4_block3_2_conv',
    'conv4_block3_2_bn', 'conv4_block3_3_conv', 'conv4_block3_3_bn', 'conv4_block4_1_conv',
    'conv4_block4_1_bn', 'conv4_block4_2_conv', 'conv4_block4_2_bn', 'conv4_block4_3_conv',
    'conv4_block4_3_bn', 'conv4_block5_1_conv', 'conv4_block5_1_bn', 'conv4_block5_2_conv',
    'conv4_block5_2_bn', 'conv4_block5_3_conv', 'conv4_block5_3_bn', 'conv4_block6_1_conv',
    'conv4_block6_1_bn', 'conv4_block6_2_conv', 'conv4_block6_2_bn', 'conv4_block6_3_conv',
    'conv4_block6_3_bn', 'conv5_block1_1_conv', 'conv5_block1_1_bn', 'conv5_block1_2_conv',
    'conv5_block1_2_bn', 'conv5_block1_0_conv', 'conv5_block1_3_conv', 'conv5_block1_0_bn',
    'conv5_block1_3_bn', 'conv5_block2_1_conv', 'conv5_block2_1_bn', 'conv5_block2_2_conv',
    'conv5_block2_2_bn', 'conv5_block2_3_conv', 'conv5_block2_3_bn', 'conv5_block3_1_conv',
    'conv5_block3_1_bn', 'conv5_block3_2_conv', 'conv5_block3_2_bn', 'conv5_block3_3_conv',
    'conv5_block3_3_bn']

KERAS_XCEPTION_LAYERS = [
    'block1_conv1', 'block1_conv1_bn', 'block1_conv2', 'block1_conv2_bn', 'block2_sepconv1',
    'block2_sepconv1_bn', 'block2_sepconv2', 'block2_sepconv2_bn', 'conv2d', 'batch_normalization',
    'block3_sepconv1', 'block3_sepconv1_bn', 'block3_sepconv2', 'block3_sepconv2_bn', 'conv2d_1',
    'batch_normalization_1', 'block4_sepconv1', 'block4_sepconv1_bn', 'block4_sepconv2',
    'block4_sepconv2_bn', 'conv2d_2', 'batch_normalization_2', 'block5_sepconv1',
    'block5_sepconv1_bn', 'block5_sepconv2', 'block5_sepconv2_bn', 'block5_sepconv3',
    'block5_sepconv3_bn', 'block6_sepconv1', 'block6_sepconv1_bn', 'block6_sepconv2',
    'block6_sepconv2_bn', 'block6_sepconv3', 'block6_sepconv3_bn', 'block7_sepconv1',
    'block7_sepconv1_bn', 'block7_sepconv2', 'block7_sepconv2_bn', 'block7_sepconv3',
    'block7_sepconv3_bn', 'block8_sepconv1', 'block8_sepconv1_bn', 'block8_sepconv2',
    'block8_sepconv2_bn', 'block8_sepconv3', 'block8_sepconv3_bn', 'block9_sepconv1',
    'block9_sepconv1_bn', 'block9_sepconv2', 'block9_sepconv2_bn', 'block9_sepconv3',
    'block9_sepconv3_bn', 'block10_sepconv1', 'block10_sepconv1_bn', 'block10_sepconv2',
    'block10_sepconv2_bn', 'block10_sepconv3', 'block10_sepconv3_bn', 'block11_sepconv1',
    'block11_sepconv1_bn', 'block11_sepconv2', 'block11_sepconv2_bn', 'block11_sepconv3',
    'block11_sepconv3_bn', 'block12_sepconv1', 'block12_sepconv1_bn', 'block12_sepconv2',
    'block12_sepconv2_bn', 'block12_sepconv3', 'block12_sepconv3_bn', 'block13_sepconv1',
    'block13_sepconv1_bn', 'block13_sepconv2', 'block13_sepconv2_bn', 'conv2d_3',
    'batch_normalization_3', 'block14_sepconv1', 'block14_sepconv1_bn', 'block14_sepconv2',
    'block14_sepconv2_bn']


@functools.lru_cache(maxsize=None)
def _shapes(model, size):
  """Variable shapes of `model` without running it (cached: tracing ResNet50 takes a second)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))


def _random_variables(shapes, seed=0):
  """Random float32 variables with positive BatchNorm variances."""
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
    return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('model, names, keras_names, size, counts', [
    (resnet.ResNet50(), resnet.keras_layer_names(), KERAS_RESNET50_LAYERS, 32,
     (23_534_592, 53_120)),
    (xception.Xception(), xception.keras_layer_names(), KERAS_XCEPTION_LAYERS, 71,
     (20_806_952, 54_528)),
], ids=['resnet50', 'xception'])
def test_flax_param_names_and_sizes_are_kerass(model, names, keras_names, size, counts):
  variables = _shapes(model, size)
  assert names == keras_names  # same names in Keras's loading order
  assert set(variables['params']) | set(variables['batch_stats']) == set(keras_names)
  assert set(variables['batch_stats']) == {n for n in keras_names if 'bn' in n or 'batch_norm' in n}
  assert (_count(variables['params']), _count(variables['batch_stats'])) == counts


def test_resnet_layers_follow_keras_v1_conventions():
  params = _shapes(resnet.ResNet50(), 32)['params']
  assert params['conv1_conv']['kernel'].shape == (7, 7, 3, 64)
  # Stride lives on the 1x1 conv of a projection block; every conv has a bias.
  assert params['conv3_block1_1_conv']['kernel'].shape == (1, 1, 256, 128)
  assert params['conv3_block1_2_conv']['kernel'].shape == (3, 3, 128, 128)
  assert params['conv3_block1_0_conv']['kernel'].shape == (1, 1, 256, 512)
  assert all('bias' in params[n] for n in params if n.endswith('_conv'))


def test_xception_layers_follow_keras_conventions():
  variables = _shapes(xception.Xception(), 71)
  params = variables['params']
  assert set(params['block2_sepconv1']) == {'depthwise', 'pointwise'}
  assert params['block2_sepconv1']['depthwise']['kernel'].shape == (3, 3, 1, 64)
  assert params['block2_sepconv1']['pointwise']['kernel'].shape == (1, 1, 64, 128)
  assert params['conv2d_3']['kernel'].shape == (1, 1, 728, 1024)
  conv_paths = [jax.tree_util.keystr(path) for path, _ in
                jax.tree_util.tree_flatten_with_path(params)[0]
                if path[0].key not in variables['batch_stats']]
  assert len(conv_paths) == 2 + 4 + 2 * 34  # 2 stem, 4 residual, 34 separable convs
  assert all(p.endswith("['kernel']") for p in conv_paths)  # no conv has a bias, as in Keras


@pytest.mark.parametrize('model, size, grid', [
    (resnet.ResNet50(), 224, 7), (resnet.ResNet50(), 32, 1), (xception.Xception(), 299, 10),
    (xception.Xception(), 71, 3)])
def test_feature_map_sizes_match_kerass(model, size, grid):
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                       jnp.zeros((2, size, size, 3), jnp.float32))
  assert out.shape == (2, grid, grid, 2048)


def test_resnet50_forward_runs_and_is_finite():
  model = resnet.ResNet50()
  variables = _random_variables(_shapes(model, 32))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  fmap = jax.jit(model.apply)(variables, x)
  assert fmap.shape == (2, 1, 1, 2048) and bool(jnp.all(jnp.isfinite(fmap)))


def test_xception_forward_runs_at_minimum_size_in_train_mode():
  model = xception.Xception()
  variables = _random_variables(_shapes(model, 71))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 71, 71, 3)), jnp.float32)
  out, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  assert out.shape == (2, 3, 3, 2048) and bool(jnp.all(jnp.isfinite(out)))
  assert set(updates['batch_stats']) == set(variables['batch_stats'])


def test_tiny_resnet_pooled_output_is_mean_of_feature_map_and_dtype_is_threaded():
  variables = _random_variables(_shapes(resnet.ResNetTiny(), 32))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
  both = lambda v, x: (resnet.ResNetTiny().apply(v, x), resnet.ResNetTiny(pooled=True).apply(v, x))
  fmap, pooled = jax.jit(both)(variables, x)  # one compilation for both
  np.testing.assert_allclose(pooled, fmap.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
  half = jax.eval_shape(resnet.ResNetTiny(dtype=jnp.bfloat16).apply, variables, x)
  assert half.dtype == jnp.bfloat16 and half.shape == fmap.shape == (2, 2, 2, 256)


class _TaggedConv(nn.Conv):
  """nn.Conv that records each call, to prove a model builds its convs from its `conv` field."""

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    self.sow('intermediates', 'tagged', y)
    return y


@pytest.mark.parametrize('model, size', [(resnet.ResNetTiny, 32), (xception.Xception, 71)],
                         ids=['resnet', 'xception'])
def test_swapped_conv_class_builds_every_conv_with_unchanged_params(model, size):
  plain, tagged = _shapes(model(), size), _shapes(model(conv=_TaggedConv), size)
  assert jax.tree.map(lambda s: s.shape, plain) == jax.tree.map(lambda s: s.shape, tagged)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model(conv=_TaggedConv).apply(v, x, mutable=['intermediates']), plain, x)
  tagged_paths = {jax.tree_util.keystr(p[:-2]) for p, _ in
                  jax.tree_util.tree_flatten_with_path(state['intermediates'])[0]}
  kernels = {jax.tree_util.keystr(p[:-1]) for p, _ in
             jax.tree_util.tree_flatten_with_path(plain['params'])[0]
             if jax.tree_util.keystr(p).endswith("['kernel']")}
  assert tagged_paths == kernels


def test_preprocess_caffe_is_bgr_minus_imagenet_means_without_scaling():
  rgb = np.array([[[10, 20, 30]]], np.uint8)
  expected = np.array([[[30 - 103.939, 20 - 116.779, 10 - 123.68]]], np.float32)
  np.testing.assert_allclose(resnet.preprocess_caffe(rgb), expected, rtol=1e-6)
  batch = resnet.preprocess_caffe(np.zeros((2, 4, 4, 3), np.uint8))  # rank promotion stays off
  assert batch.shape == (2, 4, 4, 3) and batch.dtype == jnp.float32


def test_preprocess_tf_maps_0_255_to_minus_one_one():
  out = xception.preprocess_tf(np.array([0, 255, 127.5], np.float32))
  np.testing.assert_allclose(out, [-1.0, 1.0, 0.0], atol=1e-7)
  assert xception.preprocess_tf(np.zeros((2, 8, 8, 3), np.uint8)).dtype == jnp.float32
