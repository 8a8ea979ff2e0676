"""Evaluation of a trained captioner on one split: losses, decoding, caption metrics, figures."""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax.caption import decoding, steps
from capjax.caption.data import SplitInputs
from capjax.data import loading, shapes
from capjax.data.tokenizer import Vocabulary
from capjax.metrics.caption import caption_metrics, cosine_similarity
from capjax.metrics.diversity import caption_diversity
from capjax.runtime import distributed
from capjax.train import sharding
from capjax.train import state as state_lib
from capjax.train.evaluation import batch_sums

_eval_step = jax.jit(steps.caption_eval_step)


def teacher_forced_metrics(state, dataset, mesh, input_key: str = 'image') -> dict:
  """Loss, perplexity and token accuracy over every reference, <pad> excluded."""
  totals = batch_sums(functools.partial(_eval_step, state), dataset, mesh,
                      inputs=(input_key, 'tokens', 'valid'),
                      outputs=('loss_sum', 'correct_sum', 'token_count'))
  count = max(totals['token_count'], 1.0)
  loss = totals['loss_sum'] / count
  return {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))),
          'token_accuracy': totals['correct_sum'] / count}


def make_decode_fn(model, vocab: Vocabulary, *, config, from_features: bool):
  """jit(variables, images or features) -> B x max_len ids with config.eval's method."""
  return decoding.make_captioner_fn(
      model, method=config.eval.decoding, max_len=config.data.caption_length - 1,
      end_id=vocab.end_id, beam_size=config.eval.beam_size, alpha=config.eval.length_alpha,
      from_features=from_features)


def generate(model, variables, vocab: Vocabulary, batches, *, config,
             from_features: bool = False) -> dict:
  """{index: caption} decoded with config.eval's method for every (inputs, index, valid)."""
  run = make_decode_fn(model, vocab, config=config, from_features=from_features)
  out = {}
  for inputs, indices, valid in batches:
    # With several processes each decodes its rows; gather them all (and the matching index
    # and valid rows) so every process scores the whole split and process 0 writes it.
    ids, indices, valid = (distributed.to_host(x) for x in (run(variables, inputs), indices,
                                                               valid))
    for row, index, ok in zip(ids, indices, valid):
      if ok:
        out[int(index)] = vocab.decode(row)
  return out


def attention_maps(model, variables, features, vocab: Vocabulary, max_len: int) -> list:
  """Greedy decoding of a batch step by step, keeping each step's attention.

  Returns one (words, T x N attention weights over the N grid cells) per example, up to its
  first <end>. `AttentionDecoder.step` sows 'step_attention', which `mutable=['intermediates']`
  returns. The whole batch goes through one compiled `start` and `step`.
  """
  start = jax.jit(lambda v, f: model.apply(v, f, method='start', mutable=['intermediates']))
  step = jax.jit(lambda v, c, t: model.apply(v, c, t, method='step', mutable=['intermediates']))
  (carry, logits), inter = start(variables, features)
  tokens, alphas = [], []
  ended = np.zeros(features.shape[0], bool)
  for _ in range(max_len):
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.append(np.asarray(token))
    alphas.append(np.asarray(jax.tree.leaves(inter['intermediates'])[-1], np.float32))
    ended |= tokens[-1] == vocab.end_id
    if ended.all():
      break
    (carry, logits), inter = step(variables, carry, token)
  out = []
  for b, row in enumerate(np.stack(tokens, 1)):
    ended = np.flatnonzero(row == vocab.end_id)
    length = int(ended[0]) if ended.size else len(row)
    words = [vocab.decode([int(t)]) or '<unk>' for t in row[:length]]
    maps = np.stack([a[b] for a in alphas[:length]]) if length else np.zeros((0, 1), np.float32)
    out.append((words, maps))
  return out


def evaluate(model, state, vocab: Vocabulary, inputs, *, config, workdir: str, split: str,
             scene_accuracy: Optional[Callable[[dict, dict], dict]] = None) -> dict:
  """Scores a split and writes eval.json, captions_<split>.jsonl, samples.png (and
  attention_<k>.png for attention decoders). Besides the caption metrics, eval.json says how
  varied the captions are (`caption_diversity`: distinct captions, distinct-1/2, the most
  common caption).

  `inputs` is a SplitInputs, or a plain source of {'image' (uint8), 'captions'}.
  """
  if not isinstance(inputs, SplitInputs):
    inputs = SplitInputs(source=inputs, image=lambda i: np.asarray(inputs[i]['image']))
  source, key = inputs.source, inputs.input_key
  mesh = sharding.make_mesh()
  t0 = time.perf_counter()
  dataset = inputs.eval_dataset(vocab, batch_size=config.eval.batch_size,
                                caption_length=config.data.caption_length)
  results = teacher_forced_metrics(state, dataset, mesh, key)
  variables = state_lib.variables(state)
  batches = (tuple(sharding.put_batch({key: b[key], 'index': b['index'].astype(np.int32),
                                       'valid': b['valid']}, mesh)[k]
                   for k in (key, 'index', 'valid'))
             for b in dataset)
  hyps = generate(model, variables, vocab, batches, config=config,
                  from_features=key == 'features')
  refs = {i: [loading.text(c) for c in source[i]['captions']] for i in hyps}
  results.update(caption_metrics(refs, hyps, meteor=config.eval.meteor))
  results['cosine_similarity'] = cosine_similarity(refs, hyps)
  results.update(caption_diversity(hyps))
  if scene_accuracy is not None:
    results.update(scene_accuracy(refs, hyps))
  results.update({'decoding': config.eval.decoding, 'beam_size': int(
      config.eval.beam_size if config.eval.decoding == 'beam' else 1),
                  'split': split, 'num_examples': len(hyps),
                  'eval_time_s': time.perf_counter() - t0})
  if jax.process_index() == 0:
    _write(workdir, split, results, refs, hyps, inputs, config)
    if config.model.decoder == 'attention':
      _plot_attention(model, variables, vocab, inputs, config, workdir)
  return results


def _write(workdir, split, results, refs, hyps, inputs: SplitInputs, config) -> None:
  from capjax.tools import plots  # matplotlib only where figures are drawn.
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(os.path.join(workdir, f'captions_{split}.jsonl'), 'w') as f:
    for i in sorted(hyps):
      f.write(json.dumps({'index': i, 'generated': hyps[i], 'references': refs[i]}) + '\n')
  shown = sorted(hyps)[:config.eval.num_samples]
  plots.plot_caption_samples([inputs.image(i) for i in shown],
                             [hyps[i] for i in shown], [refs[i] for i in shown],
                             os.path.join(workdir, 'samples.png'))
  logging.info('Evaluation on %s: %s', split, json.dumps(
      {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


def _plot_attention(model, variables, vocab, inputs: SplitInputs, config, workdir) -> None:
  """attention_<k>.png for the first config.eval.attention_plots examples."""
  from capjax.tools import plots  # matplotlib only where figures are drawn.
  count = min(int(config.eval.get('attention_plots', 3)), len(inputs.source))
  if count == 0:
    return
  examples = [inputs.source[k] for k in range(count)]
  if inputs.input_key == 'features':
    features = jnp.asarray(np.stack([e['features'] for e in examples]), jnp.float32)
  else:
    images = [e['image'] if inputs.image_fn is None else inputs.image_fn(e) for e in examples]
    features = model.apply(variables, jnp.asarray(np.stack(images)), method='encode')
  h, w = features.shape[1:3]
  for k, (words, maps) in enumerate(attention_maps(model, variables, features, vocab,
                                                   config.data.caption_length - 1)):
    if words:
      plots.plot_attention(inputs.image(k), words, maps.reshape(len(words), h, w),
                           os.path.join(workdir, f'attention_{k}.png'))


def scene_accuracy(source):
  """For shapes: exact-scene accuracy of the generated captions, and the oracle BLEU-4."""

  def score(refs: dict, hyps: dict) -> dict:
    truth = {i: shapes.Scene.from_json(json.loads(source[i]['scene'])) for i in hyps}
    exact = np.mean([shapes.parse(hyps[i]) == truth[i] for i in hyps])
    # A fresh grammar caption per true scene, scored against the same references:
    # the BLEU ceiling that the grammar's own variety allows.
    rng = np.random.default_rng(12345)
    oracle = {i: shapes.describe(truth[i], rng) for i in hyps}
    oracle_bleu = caption_metrics(refs, oracle, meteor=False)['bleu_4']
    return {'exact_scene_accuracy': float(exact), 'oracle_bleu_4': oracle_bleu}

  return score
