"""Optimizer from config: AdamW or SGD, warmup + cosine, gradient clipping."""
from __future__ import annotations

import optax
from capjax.errors import UserError


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """`config` is config.optim; `total_steps` the run's length in steps."""
  warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)
  if config.name == 'adamw':
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay)
  elif config.name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay),
                      optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  else:
    raise UserError(f"config.optim.name={config.name!r} is not supported; "
                     "use 'adamw' or 'sgd'.")
  if config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt
