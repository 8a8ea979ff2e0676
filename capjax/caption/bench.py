"""Captioning's peer benchmarks (../shared/bench's `caption`, `encode` and `greedy` tasks at
its exact shapes), built from the real models and steps; tools/bench.py times them."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax.caption import decoding, steps
from capjax.models import decoder, layers, resnet
from capjax.models.captioner import Captioner
from capjax.train import state as state_lib

VOCAB = 5000
FEATURES = 2048  # The peer's precomputed (cached) ResNet50 feature vectors.


class _Identity(nn.Module):
  """The 'encoder' of precomputed features (keeps Captioner's interface)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return x


def _caption_model(cfg):
  return Captioner(_Identity(), decoder.InjectDecoder(VOCAB, embed_dim=256, hidden=512,
                                                      dtype=jnp.dtype(cfg.dtype)))


def caption(cfg):
  """Teacher-forced LSTM train step, batch 64 x 20 tokens."""
  b, t = cfg.batch_size or 64, 20
  model = _caption_model(cfg)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(b, FEATURES)), jnp.float32),
           'tokens': jnp.asarray(rng.integers(1, VOCAB, (b, t + 1)), jnp.int32)}
  state = state_lib.create(model, optax.adam(1e-3), jax.random.key(0), batch['image'][:1],
                           batch['tokens'][:1])
  step = jax.jit(steps.caption_train_step, donate_argnums=0)
  return step, (state, batch, jax.random.key(1)), True, b, {'tokens_per_example': t}


def encode(cfg):
  """ResNet50 inference, batch 32 at 224 px."""
  b = cfg.batch_size or 32
  model = resnet.ResNet50(pooled=True, conv=layers.conv_by_name(cfg.conv, 'bench.conv'),
                          dtype=jnp.dtype(cfg.dtype))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, 224, 224, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return fwd, (variables, x), False, b, {}


def greedy(cfg):
  """Greedy decoding of 256 captions x 20 steps."""
  b = cfg.batch_size or 256
  model = _caption_model(cfg)
  features = jnp.asarray(np.random.default_rng(0).normal(size=(b, FEATURES)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(0), features[:1],
                                  jnp.zeros((1, 21), jnp.int32))
  run = jax.jit(lambda v, f: decoding.greedy(model.apply, v, f, max_len=20, end_id=-1))
  return run, (variables, features), False, b, {}


BUILDERS = {'caption': caption, 'encode': encode, 'greedy': greedy}
