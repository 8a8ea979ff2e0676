"""Evaluation of a trained captioner on one split: losses, decoding, caption metrics."""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from capjax import decoding
from capjax.data import pipeline
from capjax.data.tokenizer import Vocabulary
from capjax.metrics.caption import caption_metrics, cosine_similarity
from capjax.train import sharding, steps


def teacher_forced_metrics(state, dataset, mesh) -> dict:
  """Loss, perplexity and token accuracy over every reference, <pad> excluded."""
  eval_fn = jax.jit(steps.caption_eval_step)
  totals = {'loss_sum': 0.0, 'correct_sum': 0.0, 'token_count': 0.0}
  for batch in dataset:
    batch = sharding.put_batch({k: batch[k] for k in ('image', 'tokens', 'valid')}, mesh)
    out = jax.device_get(eval_fn(state, batch))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  count = max(totals['token_count'], 1.0)
  loss = totals['loss_sum'] / count
  return {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))),
          'token_accuracy': totals['correct_sum'] / count}


def generate(model, variables, vocab: Vocabulary, images_iter, *, config) -> dict:
  """{index: caption} decoded with config.eval's method for every (image, index) batch."""
  run = decoding.make_captioner_fn(
      model, method=config.eval.decoding, max_len=config.data.caption_length - 1,
      end_id=vocab.end_id, beam_size=config.eval.beam_size, alpha=config.eval.length_alpha)
  out = {}
  for images, indices, valid in images_iter:
    ids = np.asarray(jax.device_get(run(variables, images)))
    for row, index, ok in zip(ids, indices, valid):
      if ok:
        out[int(index)] = vocab.decode(row)
  return out


def evaluate(model, state, vocab: Vocabulary, source: Sequence[dict], *, config,
             workdir: str, split: str,
             scene_accuracy: Optional[Callable[[dict, dict], dict]] = None) -> dict:
  """Scores `source` and writes eval.json, captions_<split>.jsonl and samples.png."""
  mesh = sharding.make_mesh()
  t0 = time.perf_counter()
  dataset = pipeline.caption_eval_dataset(source, vocab, batch_size=config.eval.batch_size,
                                          caption_length=config.data.caption_length)
  results = teacher_forced_metrics(state, dataset, mesh)
  variables = {'params': state.params}
  batches = ((sharding.put_batch({'image': b['image']}, mesh)['image'], b['index'], b['valid'])
             for b in dataset)
  hyps = generate(model, variables, vocab, batches, config=config)
  refs = {i: [pipeline._text(c) for c in source[i]['captions']] for i in hyps}
  results.update(caption_metrics(refs, hyps, meteor=config.eval.meteor))
  results['cosine_similarity'] = cosine_similarity(refs, hyps)
  if scene_accuracy is not None:
    results.update(scene_accuracy(refs, hyps))
  results.update({'decoding': config.eval.decoding, 'beam_size': int(
      config.eval.beam_size if config.eval.decoding == 'beam' else 1),
                  'split': split, 'num_examples': len(hyps),
                  'eval_time_s': time.perf_counter() - t0})
  if jax.process_index() == 0:
    _write(workdir, split, results, refs, hyps, source, config)
  return results


def _write(workdir, split, results, refs, hyps, source, config) -> None:
  from capjax import plots  # matplotlib only where figures are drawn.
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(os.path.join(workdir, f'captions_{split}.jsonl'), 'w') as f:
    for i in sorted(hyps):
      f.write(json.dumps({'index': i, 'generated': hyps[i], 'references': refs[i]}) + '\n')
  shown = sorted(hyps)[:config.eval.num_samples]
  plots.plot_caption_samples([np.asarray(source[i]['image']) for i in shown],
                             [hyps[i] for i in shown], [refs[i][0] for i in shown],
                             os.path.join(workdir, 'samples.png'))
  logging.info('Evaluation on %s: %s', split, json.dumps(
      {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))
