"""Optimizer from config: AdamW or SGD, warmup + cosine, gradient clipping.

`config.encoder_lr_scale` (captioning) gives the params under the top-level 'encoder' key
their own learning rate: the decoder's times the scale, and 0 freezes the encoder (no updates,
no optimizer state, no weight decay). Without the field, or at 1, every param is treated alike.
"""
from __future__ import annotations

import jax
import optax


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """`config` is config.optim; `total_steps` the run's length in steps."""
  warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction)
  opt = _base(config, schedule)
  scale = config.get('encoder_lr_scale', 1.0)
  if scale is not None and float(scale) != 1.0:
    encoder_opt = (optax.set_to_zero() if float(scale) == 0 else
                   _base(config, lambda step: float(scale) * schedule(step)))
    opt = optax.multi_transform({'encoder': encoder_opt, 'rest': opt}, _encoder_labels)
  if config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt


def _base(config, schedule) -> optax.GradientTransformation:
  if config.name == 'adamw':
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  # 'sgd': the only other name the config rules (capjax.configlib.COMMON) allow.
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=True))


def _encoder_labels(params) -> dict:
  """'encoder' for every leaf under params['encoder'], 'rest' for all others."""
  return {k: jax.tree.map(lambda _, k=k: 'encoder' if k == 'encoder' else 'rest', v)
          for k, v in params.items()}

