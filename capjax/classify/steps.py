"""Classification's pure train/eval steps. Constants are bound with functools.partial.

The train step keeps BatchNorm's running statistics in `state.batch_stats` and draws
dropout masks from `rng` folded with `state.step`, so a resumed run draws exactly what
it would have drawn. Augmentation (crops, flips, jitter, mixup/cutmix) happens in the
grain pipeline; mixed batches arrive with 'label_b' and 'mix' (see capjax.classify.pipeline).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from capjax.train import state as state_lib
from capjax.train.state import TrainState


def smoothed_cross_entropy(logits_BxC: jnp.ndarray, labels_B: jnp.ndarray,
                           label_smoothing: float) -> jnp.ndarray:
  """Per-example cross-entropy against labels smoothed towards the uniform distribution."""
  num_classes = logits_BxC.shape[-1]
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits_BxC, targets_BxC)


def classify_train_step(state: TrainState, batch: dict, rng: jax.Array, *,
                        label_smoothing: float = 0.0):
  """One optimizer step on softmax cross-entropy; returns (state, metrics).

  metrics: 'objective' (the smoothed/mixed loss that is minimised), 'loss' and 'accuracy'
  (plain cross-entropy and top-1 against 'label', comparable with validation), 'grad_norm'.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  images, labels = batch['image'], batch['label']

  def loss_fn(params):
    logits, updates = state.apply_fn(state_lib.variables(state, params), images, train=True,
                                     mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    objective = smoothed_cross_entropy(logits, labels, label_smoothing)
    if 'mix' in batch:
      objective = batch['mix'] * objective + (1.0 - batch['mix']) * smoothed_cross_entropy(
          logits, batch['label_b'], label_smoothing)
    return objective.mean(), (logits, updates.get('batch_stats', state.batch_stats))

  (objective, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {
      'objective': objective,
      'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
      'accuracy': (jnp.argmax(logits, -1) == labels).astype(jnp.float32).mean(),
      'grad_norm': optax.tree.norm(grads),
  }
  return new_state, metrics


def classify_logits(state: TrainState, images_BxHxWxC: jnp.ndarray,
                    flip_average: bool = False) -> jnp.ndarray:
  """Inference-mode logits (BatchNorm uses the running statistics).

  With `flip_average`, the mean of the logits of each image and its mirror image: test-time
  augmentation for a model trained with random horizontal flips.
  """
  logits = lambda x: state.apply_fn(state_lib.variables(state), x, train=False)
  if not flip_average:
    return logits(images_BxHxWxC)
  return 0.5 * (logits(images_BxHxWxC) + logits(images_BxHxWxC[:, :, ::-1]))


def classify_eval_step(state: TrainState, batch: dict, flip_average: bool = False) -> dict:
  """Sums of loss, top-1 and top-5 hits and the count over the batch's valid rows."""
  logits_BxC = classify_logits(state, batch['image'], flip_average)
  labels_B = batch['label']
  valid_B = batch['valid'].astype(jnp.float32)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  true_B1 = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=1)
  rank_B = (logits_BxC > true_B1).sum(-1)
  return {'loss_sum': (ce_B * valid_B).sum(),
          'correct_sum': ((rank_B == 0) * valid_B).sum(),
          'top5_sum': ((rank_B < 5) * valid_B).sum(),
          'count': valid_B.sum()}
