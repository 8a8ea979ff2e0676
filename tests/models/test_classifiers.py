"""Classifier modules: SimpleCNN's exact structure, the residual CNN, the swappable conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.models import classifier


def _init(model, size):
  return model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def _shapes(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_simple_cnn_preset_is_exactly_the_benchmark_model():
  variables = _init(classifier.SimpleCNN(num_classes=30), 64)
  params = _shapes(variables['params'])
  expected, c_in = {}, 3
  for s, width in enumerate((32, 64, 128, 256), start=1):
    for j in (1, 2):
      expected[f'stage{s}_conv{j}/kernel'] = (3, 3, c_in, width)  # No bias.
      expected[f'stage{s}_bn{j}/scale'] = (width,)
      expected[f'stage{s}_bn{j}/bias'] = (width,)
      c_in = width
  expected.update({'head/kernel': (256, 30), 'head/bias': (30,)})
  assert params == expected
  assert sum(int(np.prod(s)) for s in params.values()) == 1_180_926  # torch_peer's count.
  assert set(_shapes(variables['batch_stats'])) == {
      f'stage{s}_bn{j}/{k}' for s in range(1, 5) for j in (1, 2) for k in ('mean', 'var')}


def test_simple_cnn_pools_four_times_and_uses_torch_batchnorm_settings():
  model = classifier.SimpleCNN(num_classes=30)
  variables = _init(model, 64)
  _, state = model.apply(variables, jnp.zeros((1, 64, 64, 3)), capture_intermediates=True,
                         mutable=['intermediates'])
  shapes = {k: v['__call__'][0].shape for k, v in state['intermediates'].items()
            if k.startswith('stage') and k.endswith('conv2')}
  assert shapes == {'stage1_conv2': (1, 64, 64, 32), 'stage2_conv2': (1, 32, 32, 64),
                    'stage3_conv2': (1, 16, 16, 128), 'stage4_conv2': (1, 8, 8, 256)}
  assert (model.bn_momentum, model.bn_epsilon) == (0.9, 1e-5)  # PyTorch's 0.1 / 1e-5.


@pytest.mark.parametrize('preset,size', [('tiny_cnn', 16), ('tiny_resnet', 16),
                                         ('resnet', 64)])
def test_presets_give_float32_logits_and_update_batch_stats_in_training(preset, size):
  model = classifier.PRESETS[preset](num_classes=7)
  variables = _init(model, size)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(2)})
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  assert model.apply(variables, x).shape == (2, 7)
  if preset == 'resnet':
    assert sum(v.size for v in jax.tree.leaves(variables['params'])) == 2_796_839


def test_residual_blocks_start_as_identity_and_project_when_shapes_change():
  model = classifier.ResidualCNNTiny(num_classes=3)
  params = _init(model, 16)['params']
  assert not np.any(params['stage1_block1_bn2']['scale'])  # Zero-init last BN scale.
  assert 'stage2_block1_proj_conv' in params and 'stage1_block1_proj_conv' not in params
  assert params['stage2_block1_conv1']['kernel'].shape == (3, 3, 4, 8)


class _ZeroConv(nn.Conv):
  """A stand-in for capjax.models.layers.Conv that makes its use visible: outputs zeros."""

  def __call__(self, inputs):
    return super().__call__(inputs) * 0.0


@pytest.mark.parametrize('preset', ['tiny_cnn', 'tiny_resnet'])
def test_conv_field_swaps_every_convolution(preset):
  model = classifier.PRESETS[preset](num_classes=4, conv=_ZeroConv)
  variables = _init(model, 16)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  # Every conv outputs 0, so every BN outputs its bias (0) and the logits are the head bias.
  np.testing.assert_allclose(model.apply(variables, x), 0.0, atol=1e-6)
  default = classifier.PRESETS[preset](num_classes=4)
  assert np.abs(default.apply(variables, x)).max() > 0
