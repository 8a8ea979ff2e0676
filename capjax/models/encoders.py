"""Caption encoders by name: the small from-scratch CNNs and the Keras-layout backbones.

Every encoder maps uint8 RGB images B x H x W x 3 to a feature grid B x h x w x C; each does its
own input preprocessing, so callers (training, the feature cache, predict) all feed raw pixels.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import cnn, layers, resnet, xception

# The preprocessing each Keras backbone's ImageNet weights were trained with.
_PREPROCESS = {'caffe': resnet.preprocess_caffe, 'tf': xception.preprocess_tf}


class KerasEncoder(nn.Module):
  """A Keras-layout backbone behind its Keras preprocessing.

  The backbone's variables live under 'backbone', laid out exactly as `keras_weights.load_keras_h5`
  returns them, so a .h5 file's variables drop in as {'params': {'backbone': ...}, ...}.
  """
  backbone: nn.Module
  preprocess: str = 'caffe'  # 'caffe' for ResNet50, 'tf' for Xception.

  def __call__(self, images_BxHxWx3, train: bool = False):
    return self.backbone(_PREPROCESS[self.preprocess](images_BxHxWx3), train=train)


# name -> (backbone preset for keras_weights, preprocessing); names and sizes: models/catalog.py.
KERAS_BACKBONES = {
    'resnet50': (resnet.ResNet50, 'caffe'),
    'xception': (xception.Xception, 'tf'),
    'resnet_tiny': (resnet.ResNetTiny, 'caffe'),
}

def build_encoder(model_config, dtype: Any = jnp.float32) -> nn.Module:
  """The encoder config.model.encoder names; ValueError for an unknown name."""
  m = model_config
  if m.encoder in ('shapes_cnn', 'cnn'):  # One small CNN; 'cnn' names it for photos.
    return cnn.CaptionEncoder(widths=tuple(m.widths), strides=tuple(m.strides), norm=m.norm,
                              patch=int(m.get('patch', 4)), dtype=dtype,
                              conv=layers.conv_by_name(m.get('conv', 'flax')))
  if m.encoder == 'tiny_cnn':
    return cnn.CaptionEncoderTiny(dtype=dtype)
  if m.encoder in KERAS_BACKBONES:
    preset, preprocess = KERAS_BACKBONES[m.encoder]
    return KerasEncoder(preset(dtype=dtype), preprocess)
  raise ValueError(f'unknown encoder {m.encoder!r}')


def keras_arch(encoder: nn.Module) -> nn.Module:
  """The backbone module that `keras_weights.load_keras_h5` takes for a KerasEncoder."""
  return encoder.backbone
