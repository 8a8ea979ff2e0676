"""Image classifiers trained from scratch: a plain CNN and a residual CNN for small images.

Both take normalised float images B x H x W x C (the grain pipeline normalises with the
training split's channel statistics) and return float32 logits B x num_classes. Both use
BatchNorm, so applying them in training needs `mutable=['batch_stats']`; the train state
keeps the statistics (`TrainState.batch_stats`).

Presets (`PRESETS`, by config name) are `functools.partial`s of the two classes, including tiny
ones for tests and runlocal smoke runs; `build` makes one from a classify config's `model`.
With `with_head=False` a classifier returns its last stage's feature grid instead of logits:
the caption task's `ClassifierEncoder` (capjax.models.encoders) is such a backbone, its
variables laid out as the classifier's minus 'head', so a trained classifier's drop in.
`SimpleCNN` is exactly the throughput benchmark's model (bench/torch_peer.py `simple_cnn`):
4 stages x (conv3x3 no-bias -> BN -> ReLU) x 2 -> maxpool 2, widths 32/64/128/256, global
average pool, dense. BatchNorm momentum 0.9 and epsilon 1e-5 are PyTorch's defaults
(PyTorch's momentum 0.1 weights the new batch; Flax's 0.9 weights the running value).

`conv` is a module field so a faster, numerically identical convolution
(`capjax.models.layers.Conv`) can replace `nn.Conv` from the config without touching the
models; it must accept nn.Conv's constructor arguments.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from capjax.models import layers

ModuleDef = Any

# He initialisation for convs followed by ReLU (as torchvision's ResNets): Flax's default
# LeCun init halves the activation variance at every conv+ReLU, which slows the first epochs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class _Classifier(nn.Module):
  """What both classifiers share: BatchNorm settings, and the head (global average pool ->
  dropout -> dense 'head' -> float32 logits), left out with `with_head=False`."""
  num_classes: int
  dropout: float = 0.0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  with_head: bool = True

  def _norm(self, train: bool):
    return functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype)

  def _head(self, x_BxHxWxC: jnp.ndarray, train: bool) -> jnp.ndarray:
    if not self.with_head:  # A backbone: the grid, for a caption decoder to pool or attend over.
      return x_BxHxWxC
    x_BxD = jnp.mean(x_BxHxWxC, axis=(1, 2))
    x_BxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxD)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x_BxD)
    return logits.astype(jnp.float32)


class CNN(_Classifier):
  """Stages of `convs_per_stage` x (conv3x3 no-bias -> BN -> ReLU), each then maxpool 2.

  Layer names: stage{s}_conv{j}, stage{s}_bn{j} (1-based), head.
  """
  widths: Sequence[int] = (32, 64, 128, 256)
  convs_per_stage: int = 2

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    norm = self._norm(train)
    x = x_BxHxWxC.astype(self.dtype)
    for s, width in enumerate(self.widths, start=1):
      for j in range(1, self.convs_per_stage + 1):
        x = self.conv(width, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                      kernel_init=_CONV_INIT, name=f'stage{s}_conv{j}')(x)
        x = nn.relu(norm(name=f'stage{s}_bn{j}')(x))
      x = layers.max_pool(x, (2, 2))  # nn.max_pool's equal, ~10x faster on XLA:CPU.
    return self._head(x, train)


class ResidualCNN(_Classifier):
  """A ResNet of basic blocks sized for 32-64 pixel inputs.

  Stem: one conv3x3 with `stem_stride` (2 for 64x64 inputs: the first stage then runs at
  32x32, a quarter of the compute, and 64x64 Tiny ImageNet images carry little detail at
  full resolution) -> BN -> ReLU. Then stages of `stage_sizes[i]` basic blocks
  (conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut) of width `widths[i]`; every stage
  after the first halves the resolution in its first block, whose shortcut is a strided
  1x1 conv + BN. The last BN of each block starts at zero scale, so every block starts as
  the identity (Goyal et al. 2017), which lets the deeper net train at a high learning rate
  from the first step.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (32, 64, 128, 256)
  stem_width: int = 32
  stem_stride: int = 2

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_CONV_INIT)
    norm = self._norm(train)
    x = x_BxHxWxC.astype(self.dtype)
    x = conv(self.stem_width, (3, 3), strides=self.stem_stride, padding='SAME', name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for b in range(1, blocks + 1):
        stride = 2 if s > 1 and b == 1 else 1
        p = f'stage{s}_block{b}'
        y = conv(width, (3, 3), strides=stride, padding='SAME', name=f'{p}_conv1')(x)
        y = nn.relu(norm(name=f'{p}_bn1')(y))
        y = conv(width, (3, 3), padding='SAME', name=f'{p}_conv2')(y)
        y = norm(name=f'{p}_bn2', scale_init=nn.initializers.zeros)(y)
        if x.shape[-1] != width or stride != 1:
          x = conv(width, (1, 1), strides=stride, name=f'{p}_proj_conv')(x)
          x = norm(name=f'{p}_proj_bn')(x)
        x = nn.relu(x + y)
    return self._head(x, train)


# The benchmark's model (bench/torch_peer.py): 1,180,926 parameters with 30 classes.
SimpleCNN = functools.partial(CNN, widths=(32, 64, 128, 256), convs_per_stage=2)
# ResNet-18's layout (2 basic blocks per stage) at half width, for 64x64 inputs: stem
# stride 2, stages at 32/16/8/4 pixels. 2.80M parameters (30 classes) and 0.73 GFLOP per
# 64x64 training image (forward + backward), 63% of SimpleCNN's 1.17: more epochs fit a
# CPU budget, and residual blocks train faster per epoch.
ResNet64 = functools.partial(ResidualCNN, stage_sizes=(2, 2, 2, 2), widths=(32, 64, 128, 256),
                             stem_width=32, stem_stride=2)
# Tiny presets for tests: the same structure at a fraction of the compute.
CNNTiny = functools.partial(CNN, widths=(4, 8), convs_per_stage=1)
ResidualCNNTiny = functools.partial(ResidualCNN, stage_sizes=(1, 1), widths=(4, 8),
                                    stem_width=4, stem_stride=1)

PRESETS = {'simple_cnn': SimpleCNN, 'resnet': ResNet64, 'cnn': CNN,
           'residual_cnn': ResidualCNN, 'tiny_cnn': CNNTiny, 'tiny_resnet': ResidualCNNTiny}
# The architecture fields of a classify config's `model` that replace its preset's value where
# they are set (0 / () keep the preset's).
ARCH_FIELDS = ('widths', 'convs_per_stage', 'stage_sizes', 'stem_width', 'stem_stride')


def build(model_config, num_classes: int, *, dtype: Any = None,
          with_head: bool = True) -> nn.Module:
  """The classifier a classify config's `model` (a ConfigDict or a dict: name, the
  ARCH_FIELDS, conv, dropout, dtype) describes. The classify task and a caption encoder taken
  from a classify workdir's config.json both build it here, so they build the same network.
  `dtype` overrides the config's compute dtype."""
  m = model_config
  kwargs = {}
  for key in ARCH_FIELDS:
    value = m.get(key)
    if value:
      kwargs[key] = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(
          value)
  return PRESETS[m['name']](num_classes=num_classes, dropout=float(m.get('dropout') or 0.0),
                            dtype=jnp.dtype(dtype or m.get('dtype') or 'float32'),
                            conv=layers.conv_by_name(m.get('conv') or 'flax'),
                            with_head=with_head, **kwargs)
