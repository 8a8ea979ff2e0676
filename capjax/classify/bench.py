"""Classification's peer benchmark (../shared/bench's `classify` task at its exact shapes),
built from the real model and train step; tools/bench.py times it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax.classify import steps
from capjax.models import classifier, layers
from capjax.train import state as state_lib


def classify(cfg):
  """SimpleCNN train step, batch 128 at 64 px, 30 classes."""
  b = cfg.batch_size or 128
  model = classifier.SimpleCNN(num_classes=30, conv=layers.conv_by_name(cfg.conv, 'bench.conv'))
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(b, 64, 64, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 30, b), jnp.int32)}
  state = state_lib.create(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                           batch['image'][:1])
  step = jax.jit(steps.classify_train_step, donate_argnums=0)
  return step, (state, batch, jax.random.key(1)), True, b, {}


BUILDERS = {'classify': classify}
