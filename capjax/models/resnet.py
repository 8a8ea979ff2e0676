"""ResNet50 v1 in the exact layout of `keras.applications.ResNet50` (and `ResNetTiny`, the same
layout at a fraction of the size, for tests).

Every layer with weights is a direct child of the module and carries its Keras layer name
('conv1_conv', 'conv2_block1_1_conv', 'conv2_block1_0_bn', ...), so a Flax param path maps 1:1 to a
layer group of Keras's .h5 weight files (see `capjax.models.keras_weights`).

Keras details kept on purpose, because the ImageNet weights were trained with them: biased convs
before every BatchNorm, BatchNorm epsilon 1.001e-5, the stride on the block's first 1x1 conv (not
on the 3x3 as in torchvision's "v1.5"), zero padding before the 7x7/2 stem conv and before the
3x3/2 max pool, and caffe-style input preprocessing (BGR, mean-subtracted, unscaled).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

BN_EPSILON = 1.001e-5
# Keras's BatchNormalization momentum; Flax's `momentum` has the same meaning (EMA decay).
BN_MOMENTUM = 0.99
# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils (mode='caffe').
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_caffe(images_rgb):
  """Keras 'caffe' preprocessing: RGB -> BGR, subtract the ImageNet BGR means, no scaling.

  Args:
    images_rgb: (..., H, W, 3) RGB images with values in [0, 255], any int or float dtype.

  Returns:
    float32 array of the same shape, in the input convention ResNet50's Keras weights expect.
  """
  x = jnp.asarray(images_rgb, jnp.float32)[..., ::-1]
  # Same rank as x, so this also holds under jax_numpy_rank_promotion='raise'.
  mean = jnp.asarray(CAFFE_MEAN_BGR, jnp.float32).reshape((1,) * (x.ndim - 1) + (3,))
  return x - mean


def keras_layer_names(stage_sizes: Sequence[int] = (3, 4, 6, 3)) -> list[str]:
  """Names of the layers with weights, in the order of Keras's `model.layers`.

  Keras lists a functional model's layers by graph depth, so in a projection block the shortcut
  conv sits between the second and third layers of the main path. Legacy .h5 files store layers in
  this order; the loader needs it to match layers by position when a file's names are unusable.
  """
  names = ['conv1_conv', 'conv1_bn']
  for stage, n_blocks in enumerate(stage_sizes):
    for block in range(1, n_blocks + 1):
      p = f'conv{stage + 2}_block{block}'
      if block == 1:
        names += [f'{p}_1_conv', f'{p}_1_bn', f'{p}_2_conv', f'{p}_2_bn',
                  f'{p}_0_conv', f'{p}_3_conv', f'{p}_0_bn', f'{p}_3_bn']
      else:
        names += [f'{p}_1_conv', f'{p}_1_bn', f'{p}_2_conv', f'{p}_2_bn', f'{p}_3_conv',
                  f'{p}_3_bn']
  return names


def _bottleneck(x, conv: Callable, norm: Callable, filters: int, stride: int, projection: bool,
                name: str):
  """Keras `residual_block_v1`; builds its layers in the calling module, under Keras's names."""
  if projection:
    shortcut = conv(4 * filters, (1, 1), strides=(stride, stride), name=f'{name}_0_conv')(x)
    shortcut = norm(name=f'{name}_0_bn')(shortcut)
  else:
    shortcut = x
  y = conv(filters, (1, 1), strides=(stride, stride), name=f'{name}_1_conv')(x)
  y = nn.relu(norm(name=f'{name}_1_bn')(y))
  y = conv(filters, (3, 3), padding='SAME', name=f'{name}_2_conv')(y)
  y = nn.relu(norm(name=f'{name}_2_bn')(y))
  y = conv(4 * filters, (1, 1), name=f'{name}_3_conv')(y)
  y = norm(name=f'{name}_3_bn')(y)
  return nn.relu(shortcut + y)


class ResNet(nn.Module):
  """Keras-layout ResNet v1 (bottleneck blocks); `ResNet50` is the preset with real weights.

  Attributes:
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet50. Smaller values give tiny test models
      that keep Keras's naming scheme.
    width: filters of the stem and of the first stage's bottleneck; 64 in ResNet50.
    pooled: return global-average-pooled (B, 4*8*width) features instead of the feature map.
    dtype: computation dtype of convs and BatchNorm (params stay float32).
    conv: conv module class with `nn.Conv`'s signature; swap in a faster, numerically identical
      implementation without changing param names or shapes.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  pooled: bool = False
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Maps caffe-preprocessed images to (B, h, w, 2048) features, or (B, 2048) if `pooled`.

    h and w are H and W divided by 32, rounded up. `train` selects batch statistics in BatchNorm
    (and updates 'batch_stats', which must then be mutable).
    """
    conv = functools.partial(self.conv, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    # Keras's ZeroPadding2D(3) followed by a 'valid' conv is exactly explicit (3, 3) padding.
    x = conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
             name='conv1_conv')(x_BxHxWx3)
    x = nn.relu(norm(name='conv1_bn')(x))
    # Keras pads with zeros (not -inf) before a 'valid' pool; after a ReLU both give the same max,
    # but padding with zeros keeps this exactly Keras's graph.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    for stage, n_blocks in enumerate(self.stage_sizes):
      filters = self.width * 2**stage
      for block in range(1, n_blocks + 1):
        stride = 2 if stage > 0 and block == 1 else 1
        x = _bottleneck(x, conv, norm, filters, stride, projection=block == 1,
                        name=f'conv{stage + 2}_block{block}')
    if self.pooled:
      return jnp.mean(x, axis=(1, 2))
    return x


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width=64)
# Tiny preset for tests: same structure and names per block, a fraction of the compute.
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
