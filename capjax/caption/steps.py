"""Captioning's pure train and eval steps. Constants are bound with functools.partial."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from capjax.train import state as state_lib
from capjax.train.state import TrainState


def masked_token_stats(logits_BxTxV, targets_BxT, weights_BxT=None):
  """Summed cross-entropy, correct predictions and counted tokens; <pad> (id 0) excluded."""
  mask = (targets_BxT != 0).astype(jnp.float32)
  if weights_BxT is not None:
    mask = mask * weights_BxT
  logits = logits_BxTxV.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
  correct = top1_correct(logits, targets_BxT).astype(jnp.float32)
  return (ce * mask).sum(), (correct * mask).sum(), mask.sum()


def top1_correct(logits_BxTxV, targets_BxT):
  """Whether each target's logit is the largest: `argmax == target` up to exact ties (then
  true), computed as a max and a gather. XLA:CPU's argmax is a variadic reduce that took 15 ms
  of the benchmark's 260 ms caption step (64 x 20 x 5000 logits); a max fuses with the softmax's.
  """
  target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
  return target_logit >= logits_BxTxV.max(-1)


def smoothed_token_loss(logits_BxTxV, targets_BxT, label_smoothing: float):
  """Summed cross-entropy against targets smoothed towards the uniform distribution over the
  vocabulary (<pad> positions excluded), without materialising B x T x V targets:
  (1 - e) * CE + e * (logsumexp - mean logit)."""
  mask = (targets_BxT != 0).astype(jnp.float32)
  logits = logits_BxTxV.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
  uniform = jax.nn.logsumexp(logits, -1) - logits.mean(-1)
  return (((1.0 - label_smoothing) * ce + label_smoothing * uniform) * mask).sum()


def concept_loss(concept_logits_BxV, concepts_BxV):
  """Binary cross-entropy of the concept head summed over the vocabulary, divided by the
  number of the image's words (so an image with many words weighs as much as one with few),
  averaged over the batch."""
  bce = optax.sigmoid_binary_cross_entropy(concept_logits_BxV, concepts_BxV).sum(-1)
  return (bce / jnp.maximum(concepts_BxV.sum(-1), 1.0)).mean()


def doubly_stochastic_penalty(alphas_BxTxN, mask_BxT):
  """Show-Attend-Tell's regulariser: each grid cell's attention summed over the
  caption's words should be ~1, i.e. every region gets looked at about once."""
  total_BxN = (alphas_BxTxN * mask_BxT[..., None]).sum(1)
  return ((1.0 - total_BxN) ** 2).sum(-1).mean()


def _caption_step(state: TrainState, batch: dict, rng: jax.Array, attention_reg: float,
                  from_features: bool, label_smoothing: float, concept_weight: float):
  dropout_rng = jax.random.fold_in(rng, state.step)
  tokens = batch['tokens']
  targets = tokens[:, 1:]
  # BatchNorm statistics only change when the encoder runs in training mode.
  mutable = ['intermediates'] + (['batch_stats'] if state.batch_stats and not from_features
                                 else [])

  def loss_fn(params):
    inputs = batch['features'] if from_features else batch['image']
    logits, updates = state.apply_fn(
        state_lib.variables(state, params), inputs, tokens, train=True,
        rngs={'dropout': dropout_rng}, mutable=mutable,
        method='decode' if from_features else None)
    ce, correct, count = masked_token_stats(logits, targets)
    count = jnp.maximum(count, 1.0)
    loss = ce / count
    objective = (smoothed_token_loss(logits, targets, label_smoothing) / count
                 if label_smoothing else loss)
    sown = updates.get('intermediates', {})
    attention = jax.tree.leaves(sown.get('decoder', {}))
    if attention and attention_reg:
      objective += attention_reg * doubly_stochastic_penalty(
          attention[0], (targets != 0).astype(jnp.float32))
    concepts = jnp.zeros(())
    if concept_weight:
      concepts = concept_loss(sown['concept_logits'][0], batch['concepts'])
      objective += concept_weight * concepts
    return objective, (loss, correct / count, concepts, updates.get('batch_stats'))

  (_, (loss, acc, concepts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  if batch_stats is not None:
    new_state = new_state.replace(batch_stats=batch_stats)
  metrics = {'loss': loss, 'token_accuracy': acc, 'grad_norm': optax.tree.norm(grads)}
  if concept_weight:
    metrics['concept_loss'] = concepts
  return new_state, metrics


def caption_train_step(state: TrainState, batch: dict, rng: jax.Array,
                       attention_reg: float = 0.0, label_smoothing: float = 0.0,
                       concept_weight: float = 0.0):
  """One optimizer step of teacher-forced next-word prediction from batch['image'].

  The objective is the (label-smoothed) token cross-entropy, plus `attention_reg` times the
  doubly stochastic penalty and `concept_weight` times the concept head's loss (which needs
  batch['concepts']); the 'loss' metric is always the plain cross-entropy.
  `rng` is folded with the step so that dropout is a pure function of
  (seed, step): a resumed run draws exactly the masks it would have drawn.
  """
  return _caption_step(state, batch, rng, attention_reg, False, label_smoothing,
                       concept_weight)


def caption_feature_train_step(state: TrainState, batch: dict, rng: jax.Array,
                               attention_reg: float = 0.0, label_smoothing: float = 0.0,
                               concept_weight: float = 0.0):
  """`caption_train_step` from precomputed encoder features (batch['features']): only the
  decoder runs, for a frozen encoder whose features come from the HDF5 cache."""
  return _caption_step(state, batch, rng, attention_reg, True, label_smoothing,
                       concept_weight)


def caption_eval_step(state: TrainState, batch: dict):
  """Sums of loss/correct/tokens over every reference caption of the real rows.

  Reads batch['features'] when the batch carries cached features, else encodes batch['image'].
  """
  tokens_BxRxL = batch['tokens']
  b, r, l = tokens_BxRxL.shape
  variables = state_lib.variables(state)
  if 'features' in batch:
    features = batch['features']
  else:
    features = state.apply_fn(variables, batch['image'], method='encode')
  features = jnp.repeat(features, r, axis=0)
  tokens = tokens_BxRxL.reshape(b * r, l)
  logits = state.apply_fn(variables, features, tokens, method='decode')
  weights = jnp.repeat(batch['valid'].astype(jnp.float32), r)[:, None]
  ce, correct, count = masked_token_stats(logits, tokens[:, 1:],
                                          jnp.broadcast_to(weights, (b * r, l - 1)))
  return {'loss_sum': ce, 'correct_sum': correct, 'token_count': count}


def scst_train_step(state: TrainState, batch: dict, rng: jax.Array, train_encoder: bool = True):
  """One self-critical step (Rennie et al., 2017): the REINFORCE gradient of the expected
  reward, with the baseline already subtracted on the host.

  batch: 'advantages' B x K (reward minus baseline) of the K samples of B training images,
  and the sampler's `decoding.Draws` fields 'log_probs' B x K (each sample's summed log-probs
  up to and including <end>) and 'pullback' (their vjp to the params).
  loss = -mean over the B*K captions of advantage * log p(caption): averaged per caption, not
  per token, so it is exactly the gradient of the mean expected reward and a long caption's
  tokens are not down-weighted. The gradient is the pullback of d loss / d log p, so it is
  that of the policy that drew the samples, from the sampler's own forward pass.
  With `train_encoder=False` params['encoder'] is kept as it was: its gradient is zero, and
  this also spares it the optimizer's weight decay. (Not optim.encoder_lr_scale=0's
  optax.multi_transform: that would change the optimizer state's structure, which both phases'
  checkpoints share.)
  """
  del rng  # The samples carry the randomness; the forward pass had none.
  advantages_BxK = batch['advantages'].astype(jnp.float32)
  log_p_BxK = batch['log_probs']
  (grads,) = batch['pullback'](-advantages_BxK / advantages_BxK.size)
  metrics = {'scst_loss': -(advantages_BxK * log_p_BxK).mean(),
             'sample_log_prob': log_p_BxK.mean(), 'grad_norm': optax.tree.norm(grads)}
  new_state = state.apply_gradients(grads=grads)
  if not train_encoder:
    new_state = new_state.replace(params={**new_state.params, 'encoder': state.params['encoder']})
  return new_state, metrics
