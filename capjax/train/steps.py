"""Pure train and eval steps. Constants are bound with functools.partial."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from capjax.train.state import TrainState


def masked_token_stats(logits_BxTxV, targets_BxT, weights_BxT=None):
  """Summed cross-entropy, correct predictions and counted tokens; <pad> (id 0) excluded."""
  mask = (targets_BxT != 0).astype(jnp.float32)
  if weights_BxT is not None:
    mask = mask * weights_BxT
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxTxV.astype(jnp.float32), targets_BxT)
  correct = (jnp.argmax(logits_BxTxV, -1) == targets_BxT).astype(jnp.float32)
  return (ce * mask).sum(), (correct * mask).sum(), mask.sum()


def doubly_stochastic_penalty(alphas_BxTxN, mask_BxT):
  """Show-Attend-Tell's regulariser: each grid cell's attention summed over the
  caption's words should be ~1, i.e. every region gets looked at about once."""
  total_BxN = (alphas_BxTxN * mask_BxT[..., None]).sum(1)
  return ((1.0 - total_BxN) ** 2).sum(-1).mean()


def caption_train_step(state: TrainState, batch: dict, rng: jax.Array,
                       attention_reg: float = 0.0):
  """One optimizer step of teacher-forced next-word prediction.

  `rng` is folded with the step so that dropout is a pure function of
  (seed, step): a resumed run draws exactly the masks it would have drawn.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  tokens = batch['tokens']
  targets = tokens[:, 1:]

  def loss_fn(params):
    logits, inter = state.apply_fn({'params': params}, batch['image'], tokens, train=True,
                                   rngs={'dropout': dropout_rng}, mutable=['intermediates'])
    ce, correct, count = masked_token_stats(logits, targets)
    count = jnp.maximum(count, 1.0)
    loss = ce / count
    attention = jax.tree.leaves(inter.get('intermediates', {}))
    penalty = (doubly_stochastic_penalty(attention[0], (targets != 0).astype(jnp.float32))
               if attention else jnp.zeros(()))
    return loss + attention_reg * penalty, (loss, correct / count)

  (_, (loss, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  metrics = {'loss': loss, 'token_accuracy': acc, 'grad_norm': optax.global_norm(grads)}
  return new_state, metrics


def caption_eval_step(state: TrainState, batch: dict):
  """Sums of loss/correct/tokens over every reference caption of the real rows."""
  tokens_BxRxL = batch['tokens']
  b, r, l = tokens_BxRxL.shape
  variables = {'params': state.params}
  features = state.apply_fn(variables, batch['image'], method='encode')
  features = jnp.repeat(features, r, axis=0)
  tokens = tokens_BxRxL.reshape(b * r, l)
  logits = state.apply_fn(variables, features, tokens, method='decode')
  weights = jnp.repeat(batch['valid'].astype(jnp.float32), r)[:, None]
  ce, correct, count = masked_token_stats(logits, tokens[:, 1:],
                                          jnp.broadcast_to(weights, (b * r, l - 1)))
  return {'loss_sum': ce, 'correct_sum': correct, 'token_count': count}
