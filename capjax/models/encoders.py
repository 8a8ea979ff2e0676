"""Caption encoders by name: the small from-scratch CNNs and the Keras-layout backbones.

Every encoder maps uint8 RGB images B x H x W x 3 to a feature grid B x h x w x C; each does its
own input preprocessing, so callers (training, the feature cache, predict) all feed raw pixels.
A trained capjax classifier's backbone is one too (`ClassifierEncoder`, built from a classify
workdir's description by `build_encoder(..., classifier=...)`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import classifier as classifiers
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


class ClassifierEncoder(nn.Module):
  """A capjax classifier without its head, behind the normalisation it was trained with.

  The classifier saw (pixels - mean) / std with its training split's channel statistics
  (classify_meta.json), so its features only mean anything for inputs normalised the same way.
  The backbone's variables live under 'backbone', laid out as the classifier's own minus
  'head', so a classify checkpoint's variables drop in as {'params': {'backbone': ...}, ...}.
  """
  backbone: nn.Module  # A capjax.models.classifier model built with with_head=False.
  mean: tuple = (0.0, 0.0, 0.0)  # Per channel, in pixel units (0-255).
  std: tuple = (1.0, 1.0, 1.0)

  def __call__(self, images_BxHxWx3, train: bool = False):
    mean = jnp.asarray(self.mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(self.std, jnp.float32).reshape(1, 1, 1, -1)
    return self.backbone((images_BxHxWx3.astype(jnp.float32) - mean) / std, train=train)


# name -> (backbone preset for keras_weights, preprocessing); names and sizes: models/catalog.py.
KERAS_BACKBONES = {
    'resnet50': (resnet.ResNet50, 'caffe'),
    'xception': (xception.Xception, 'tf'),
    'resnet_tiny': (resnet.ResNetTiny, 'caffe'),
}

def build_encoder(model_config, dtype: Any = jnp.float32, classifier: dict | None = None
                  ) -> nn.Module:
  """The encoder config.model.encoder names, or with `classifier` (a classify workdir's
  {'model': its config.json's model fields, 'num_classes', 'mean', 'std'}) that classifier's
  backbone, whatever the name; ValueError for an unknown name."""
  m = model_config
  if classifier is not None:
    backbone = classifiers.build(classifier['model'], int(classifier['num_classes']),
                                 dtype=dtype, with_head=False)
    return ClassifierEncoder(backbone, mean=tuple(float(v) for v in classifier['mean']),
                             std=tuple(float(v) for v in classifier['std']))
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
