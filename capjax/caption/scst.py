"""Self-critical sequence training (SCST; Rennie et al., CVPR 2017): a training phase after
cross-entropy that raises the expected CIDEr-D of sampled captions.

A step, for a batch of B training images:
  1. decode, jitted (`decoding.make_sampler_fn`): K captions per image sampled from the model
     (temperature 1) with their log-probs, in one scan under `jax.vjp`, and the greedy ones;
  2. reward, on the host (`CaptionRewards`): the CIDEr-D of each caption against its image's
     references, with document frequencies from the training split's references;
     advantage = reward - baseline (`advantages`);
  3. gradient, jitted (`steps.scst_train_step`): the advantage-weighted log-probs pulled back
     through the sampler's own forward pass (its vjp residuals), so no second forward runs.

The end token is a word on both sides: every reference is scored with `<end>` appended, and a
caption with its `<end>` (one that ran out of length has none). CIDEr-D then rewards ending
where the references end ("... on the grass <end>"), and a caption cut off mid-phrase misses
those n-grams; leaving `<end>` out inflates CIDEr-D and teaches truncated captions (SacreEOS,
Hu et al., 2023). Words are the vocabulary's (`tokenizer.normalize`); a reference word outside
the vocabulary gets an id of its own, so a sampled `<unk>` never matches it.

Baselines (config.scst.baseline): 'mean', the mean reward of the image's other K-1 samples
(Luo, 2020, "a better variant of SCST"), or 'greedy', the greedy caption's reward (Rennie).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from capjax.caption import decoding, pipeline, steps
from capjax.data.tokenizer import Vocabulary, normalize
from capjax.metrics.bleu import SentenceBleu
from capjax.metrics.cider_d import CiderD
from capjax.metrics.diversity import distinct_n
from capjax.runtime import distributed
from capjax.train import loop
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

PHASE = 'scst'
# Never sampled: not words, and never a target of cross-entropy training.
BANNED = (Vocabulary.pad_id, Vocabulary.start_id)
# The sampler's random stream: its own, apart from dropout's (which folds in the step alone).
_SAMPLING_STREAM = 1


def caption_ids(row: Sequence[int], end_id: int) -> list[int]:
  """A decoded row as the words CIDEr-D scores: up to and including the first <end>, without
  <pad>/<start> (as `Vocabulary.decode` skips them)."""
  out = []
  for token in row:
    token = int(token)
    if token in BANNED:
      continue
    out.append(token)
    if token == end_id:
      break
  return out


class CaptionRewards:
  """CIDEr-D (+ bleu_weight x BLEU-4) rewards of token-id captions of the training images.

  Args:
    vocab: the model's vocabulary.
    references: references[i]: the reference captions (text) of training image i; they are
      both what a caption of image i is scored against and the document-frequency corpus.
    bleu_weight: the weight of sentence BLEU-4 (pycocoevalcap's) in the reward; 0 leaves
      CIDEr-D alone. CIDEr-D weights n-grams by rarity, so optimising it alone can trade the
      common 4-grams BLEU-4 counts ("in front of a") for rarer words.
  """

  def __init__(self, vocab: Vocabulary, references: Sequence[Sequence[str]],
               bleu_weight: float = 0.0):
    self.end_id, self.bleu_weight = vocab.end_id, float(bleu_weight)
    unknown: dict[str, int] = {}

    def word_id(word: str) -> int:
      known = vocab.ids.get(word)
      return known if known is not None else unknown.setdefault(word, len(vocab) + len(unknown))

    tokenized = [[[word_id(w) for w in normalize(text)] + [vocab.end_id] for text in refs]
                 for refs in references]
    self.cider = CiderD(tokenized)
    self.bleu = SentenceBleu(tokenized) if self.bleu_weight else None

  def __call__(self, images_B: np.ndarray, tokens_BxNxT: np.ndarray) -> np.ndarray:
    """B x N rewards of N decoded captions (ids, <pad> after <end>) of each image."""
    b, n, _ = tokens_BxNxT.shape
    captions = [caption_ids(row, self.end_id) for row in tokens_BxNxT.reshape(b * n, -1)]
    images = np.repeat(np.asarray(images_B), n)
    reward = self.cider(images, captions)
    if self.bleu is not None:
      reward = reward + self.bleu_weight * self.bleu(images, captions)[:, 3]
    return reward.reshape(b, n)


def advantages(sample_rewards_BxK: np.ndarray, greedy_rewards_B: np.ndarray,
               baseline: str) -> np.ndarray:
  """reward - baseline per sample: 'greedy' subtracts the greedy caption's reward, 'mean'
  the mean reward of the image's other K-1 samples (which needs K >= 2)."""
  if baseline == 'greedy':
    return sample_rewards_BxK - greedy_rewards_B[:, None]
  k = sample_rewards_BxK.shape[1]
  others = (sample_rewards_BxK.sum(1, keepdims=True) - sample_rewards_BxK) / (k - 1)
  return sample_rewards_BxK - others


def sample_statistics(samples_BxKxT: np.ndarray, end_id: int) -> dict:
  """Mean length in words (without <end>) and distinct-1/2 of the sampled captions."""
  words = [[t for t in caption_ids(row, end_id) if t != end_id]
           for row in samples_BxKxT.reshape(-1, samples_BxKxT.shape[-1])]
  return {'sample_length': float(np.mean([len(w) for w in words])),
          'distinct_1': distinct_n(words, 1), 'distinct_2': distinct_n(words, 2)}


def prepare_batch(state, batch: dict, rng: jax.Array, step: int, *, sampler: Callable,
                  rewards: CaptionRewards, baseline: str, input_key: str):
  """`loop.Phase.prepare` of SCST: samples and greedy captions of the batch's images, their
  rewards on the host, and the batch of `steps.scst_train_step`: the advantages with the
  sampler's log-probs and pullback.

  The advantages are put on device with the batch's sharding. Every process scores the whole
  global batch (cheap) so that each holds the advantages of its own rows.
  """
  key = jax.random.fold_in(jax.random.fold_in(rng, _SAMPLING_STREAM), step)
  draws = sampler(state_lib.variables(state), batch[input_key], key)
  images = distributed.to_host(batch['index'])
  samples_host = distributed.to_host(draws.samples)
  greedy_host = distributed.to_host(draws.greedy)
  sample_rewards = rewards(images, samples_host)
  greedy_rewards = rewards(images, greedy_host[:, None])[:, 0]
  advantage = advantages(sample_rewards, greedy_rewards, baseline).astype(np.float32)
  advantage_device = jax.make_array_from_callback(advantage.shape, batch['index'].sharding,
                                                  lambda index: advantage[index])
  metrics = {'sample_reward': float(sample_rewards.mean()),
             'greedy_reward': float(greedy_rewards.mean()),
             **sample_statistics(samples_host, rewards.end_id)}
  return step_batch(draws, advantage_device), metrics


def step_batch(draws: decoding.Draws, advantages_BxK) -> dict:
  """The batch of `steps.scst_train_step`: the advantages of the sampler's draws, with the
  draws' log-probs and the pullback that turns them into the gradient."""
  return {'advantages': advantages_BxK, 'log_probs': draws.log_probs,
          'pullback': draws.pullback}


def optimizer(config, steps_: int):
  """config.optim's optimizer (same structure, so checkpoints of both phases restore into
  one template) at config.scst.learning_rate, constant: no warmup, no decay."""
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.update(learning_rate=float(config.scst.learning_rate), warmup_steps=0,
               final_lr_fraction=1.0)
  return make_optimizer(optim, steps_)


def crop_min_area(config) -> float:
  """The random-crop fraction of the SCST phase's images: config.scst's, else config.data's."""
  own = config.scst.get('crop_min_area')
  return float(config.data.get('crop_min_area', 1.0) if own is None else own)


def phase(config, model, vocab: Vocabulary, train_source, train_captions, *, input_key: str,
          image_fn=None) -> loop.Phase:
  """The SCST phase of config.train.scst_steps steps on the train split."""
  bleu_weight = float(config.scst.get('bleu_weight', 0.0))
  logging.info('SCST: scoring against the references of %d training images (CIDEr-D, '
               'document frequencies of the training split; + %g x BLEU-4)...',
               len(train_captions), bleu_weight)
  rewards = CaptionRewards(vocab, train_captions, bleu_weight=bleu_weight)
  from_features = input_key == 'features'
  train_encoder = bool(config.scst.get('train_encoder', True))
  sampler = decoding.make_sampler_fn(
      model, num_samples=int(config.scst.num_samples),
      max_len=config.data.caption_length - 1, end_id=vocab.end_id, banned_ids=BANNED,
      from_features=from_features, train_encoder=train_encoder)
  data = pipeline.caption_scst_dataset(
      train_source, batch_size=config.train.batch_size, seed=config.seed, image_fn=image_fn,
      input_key=input_key, flip=bool(config.data.get('flip', False)) and not from_features,
      crop_min_area=crop_min_area(config))
  return loop.Phase(
      name=PHASE, steps=int(config.train.scst_steps), train_data=data,
      train_step=functools.partial(steps.scst_train_step, train_encoder=train_encoder),
      optimizer=optimizer(config, int(config.train.scst_steps)),
      prepare=functools.partial(prepare_batch, sampler=sampler, rewards=rewards,
                                baseline=config.scst.baseline, input_key=input_key))
