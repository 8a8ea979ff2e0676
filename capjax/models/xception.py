"""Xception in the exact layout of `keras.applications.Xception`.

Every layer with weights is a direct child of the module and carries its Keras layer name
('block1_conv1', 'block2_sepconv1', 'block2_sepconv1_bn', ...), so a Flax param path maps 1:1 to a
layer group of Keras's .h5 weight files (see `capjax.models.keras_weights`).

Keras leaves the four strided 1x1 residual convs and their BatchNorms unnamed, so they get
auto-generated names. We use the names a fresh Keras 3 session gives them ('conv2d', 'conv2d_1',
'conv2d_2', 'conv2d_3', 'batch_normalization', ... '_3'), but weight files disagree: Keras 2
numbered them from 1, and Keras's own ImageNet file predates the explicit names altogether (every
layer is 'convolution2d_N', 'separableconvolution2d_N' or 'batchnormalization_N', with Keras-1
weight names such as 'batchnormalization_1_running_std:0'; keras-team/keras#7006, #9683). Keras
loads these files by position, so the loader does too for such names (see `keras_layer_names`).

Keras details kept on purpose: no bias on any conv, BatchNorm epsilon 1e-3, 'valid' padding in the
two stem convs, separable convs as a depthwise 3x3 then a pointwise 1x1 with nothing in between,
and 'tf' preprocessing (scaled to [-1, 1]).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

MIN_SIZE = 71  # smallest input Keras accepts; the feature map is then 3x3
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras's default; same meaning as Flax's `momentum`
# (block, features) of the entry-flow blocks, each with a strided 1x1 residual conv.
_ENTRY_BLOCKS = ((2, 128), (3, 256), (4, 728))
_MIDDLE_BLOCKS = range(5, 13)


def preprocess_tf(images_rgb):
  """Keras 'tf' preprocessing: scales [0, 255] RGB to [-1, 1] as x / 127.5 - 1.

  Args:
    images_rgb: (..., H, W, 3) RGB images with values in [0, 255], any int or float dtype.

  Returns:
    float32 array of the same shape.
  """
  return jnp.asarray(images_rgb, jnp.float32) / 127.5 - 1.0


def _auto(kind: str, i: int) -> str:
  """Keras 3's auto name for the i-th (0-based) unnamed layer of a kind: 'conv2d', 'conv2d_1'."""
  return kind if i == 0 else f'{kind}_{i}'


def keras_layer_names() -> list[str]:
  """Names of the layers with weights, in the order of Keras's `model.layers`.

  Keras orders a functional model's layers by graph depth, which puts each residual conv after
  the main path's layers of its block. Legacy .h5 files store layers in this order; Keras (and our
  loader) match auto-named layers by this position.
  """
  names = ['block1_conv1', 'block1_conv1_bn', 'block1_conv2', 'block1_conv2_bn']
  for i, (block, _) in enumerate(_ENTRY_BLOCKS):
    names += [f'block{block}_sepconv1', f'block{block}_sepconv1_bn', f'block{block}_sepconv2',
              f'block{block}_sepconv2_bn', _auto('conv2d', i), _auto('batch_normalization', i)]
  for block in _MIDDLE_BLOCKS:
    for k in (1, 2, 3):
      names += [f'block{block}_sepconv{k}', f'block{block}_sepconv{k}_bn']
  names += ['block13_sepconv1', 'block13_sepconv1_bn', 'block13_sepconv2', 'block13_sepconv2_bn',
            _auto('conv2d', 3), _auto('batch_normalization', 3)]
  names += ['block14_sepconv1', 'block14_sepconv1_bn', 'block14_sepconv2', 'block14_sepconv2_bn']
  return names


class SeparableConv(nn.Module):
  """Keras `SeparableConv2D` (depth multiplier 1, no bias): depthwise 3x3, then pointwise 1x1.

  Params: {'depthwise': {'kernel': (kh, kw, 1, C)}, 'pointwise': {'kernel': (1, 1, C, features)}}.
  Keras stores the depthwise kernel as (kh, kw, C, 1); the loader converts.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = self.conv(channels, self.kernel_size, padding='SAME', feature_group_count=channels,
                  use_bias=False, dtype=self.dtype, name='depthwise')(x)
    return self.conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name='pointwise')(x)


class Xception(nn.Module):
  """Keras-layout Xception; inputs at least 71x71, 'tf'-preprocessed (see `preprocess_tf`).

  Attributes:
    pooled: return global-average-pooled (B, 2048) features instead of the feature map.
    dtype: computation dtype of convs and BatchNorm (params stay float32).
    conv: conv module class with `nn.Conv`'s signature (used for the plain, depthwise and
      pointwise convs); swap in a faster, numerically identical implementation.
  """
  pooled: bool = False
  dtype: Any = jnp.float32
  conv: Any = nn.Conv

  @nn.compact
  def __call__(self, x_BxHxWx3, train: bool = False):
    """Maps 'tf'-preprocessed images to (B, h, w, 2048) features, or (B, 2048) if `pooled`.

    For 299x299 inputs h = w = 10. `train` selects batch statistics in BatchNorm (and updates
    'batch_stats', which must then be mutable).
    """
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=self.dtype)
    sep = functools.partial(SeparableConv, dtype=self.dtype, conv=self.conv)
    # Keras's max pool 'same' pads with -inf like lax's SAME, and puts the odd pad at the end.
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding='SAME')

    x = conv(32, (3, 3), strides=(2, 2), padding='VALID', name='block1_conv1')(x_BxHxWx3)
    x = nn.relu(norm(name='block1_conv1_bn')(x))
    x = conv(64, (3, 3), padding='VALID', name='block1_conv2')(x)
    x = nn.relu(norm(name='block1_conv2_bn')(x))

    for i, (block, features) in enumerate(_ENTRY_BLOCKS):
      residual = conv(features, (1, 1), strides=(2, 2), padding='SAME', name=_auto('conv2d', i))(x)
      residual = norm(name=_auto('batch_normalization', i))(residual)
      if block > 2:  # block 2 follows the stem's ReLU directly
        x = nn.relu(x)
      x = sep(features, name=f'block{block}_sepconv1')(x)
      x = nn.relu(norm(name=f'block{block}_sepconv1_bn')(x))
      x = sep(features, name=f'block{block}_sepconv2')(x)
      x = norm(name=f'block{block}_sepconv2_bn')(x)
      x = pool(x) + residual

    for block in _MIDDLE_BLOCKS:
      residual = x
      for k in (1, 2, 3):
        x = sep(728, name=f'block{block}_sepconv{k}')(nn.relu(x))
        x = norm(name=f'block{block}_sepconv{k}_bn')(x)
      x = x + residual

    residual = conv(1024, (1, 1), strides=(2, 2), padding='SAME', name=_auto('conv2d', 3))(x)
    residual = norm(name=_auto('batch_normalization', 3))(residual)
    x = sep(728, name='block13_sepconv1')(nn.relu(x))
    x = nn.relu(norm(name='block13_sepconv1_bn')(x))
    x = sep(1024, name='block13_sepconv2')(x)
    x = norm(name='block13_sepconv2_bn')(x)
    x = pool(x) + residual

    x = sep(1536, name='block14_sepconv1')(x)
    x = nn.relu(norm(name='block14_sepconv1_bn')(x))
    x = sep(2048, name='block14_sepconv2')(x)
    x = nn.relu(norm(name='block14_sepconv2_bn')(x))
    if self.pooled:
      return jnp.mean(x, axis=(1, 2))
    return x
