"""Evaluation of a trained classifier on one split: metrics, eval.json and figures.

Writes to the workdir: eval.json (flat keys: top1_accuracy, top5_accuracy, loss, micro_auc,
macro_auc, mean_class_accuracy, class_accuracy/<name>, class_auc/<name>, ...),
confusion_matrix.png (with class names) and roc.png (one-vs-rest, per class + micro + macro).
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
import scipy.special
from absl import logging

from capjax.classify import pipeline as classify_pipeline
from capjax.classify import steps as classify_steps
from capjax.metrics import classification as cls_metrics
from capjax.train import sharding
from capjax.train.evaluation import batch_sums

_eval_step = jax.jit(classify_steps.classify_eval_step, static_argnames='flip_average')
_logits = jax.jit(classify_steps.classify_logits, static_argnames='flip_average')


def validation_metrics(state, dataset, mesh, flip_average: bool = False) -> dict:
  """Loss, top-1 and top-5 accuracy over one pass of an eval dataset (padding excluded)."""
  totals = batch_sums(functools.partial(_eval_step, state, flip_average=flip_average),
                      dataset, mesh, inputs=('image', 'label', 'valid'),
                      outputs=('loss_sum', 'correct_sum', 'top5_sum', 'count'))
  count = max(totals['count'], 1.0)
  return {'loss': totals['loss_sum'] / count, 'accuracy': totals['correct_sum'] / count,
          'top5_accuracy': totals['top5_sum'] / count}


def softmax(logits_NxC: np.ndarray) -> np.ndarray:
  """Probabilities in float64: ROC needs them, and float32 rounds the smallest to 0, which
  would tie many examples at the low end of each class's curve."""
  return scipy.special.softmax(np.asarray(logits_NxC, np.float64), axis=1)


def predict_probs(state, dataset, mesh, flip_average: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(probs_NxC, labels_N, logits_NxC) of the valid rows of an eval dataset, in order."""
  labels, logits = [], []
  for batch in dataset:
    out = _logits(state, sharding.put_batch({'image': batch['image']}, mesh)['image'],
                  flip_average=flip_average)
    out = np.asarray(jax.device_get(out), np.float64)
    keep = np.asarray(batch['valid'], bool)
    logits.append(out[keep])
    labels.append(np.asarray(batch['label'])[keep])
  logits_NxC = np.concatenate(logits)
  return softmax(logits_NxC), np.concatenate(labels).astype(np.int64), logits_NxC


def evaluate(state, source, class_names, *, config, workdir: str, split: str,
             mean: np.ndarray, std: np.ndarray) -> dict:
  """Scores `source` (one split) and writes eval.json and the figures; returns eval.json."""
  mesh = sharding.make_mesh()
  t0 = time.perf_counter()
  dataset = classify_pipeline.eval_dataset(source, batch_size=config.eval.batch_size,
                                           image_size=config.data.image_size, mean=mean,
                                           std=std)
  probs_NxC, labels_N, logits_NxC = predict_probs(state, dataset, mesh,
                                                   bool(config.eval.get('flip_average')))
  results = cls_metrics.classification_report(probs_NxC, labels_N, class_names)
  log_probs = scipy.special.log_softmax(logits_NxC, axis=1)
  results['loss'] = float(-log_probs[np.arange(len(labels_N)), labels_N].mean())
  results.update({'split': split, 'dataset': config.dataset,
                  'eval_time_s': time.perf_counter() - t0})
  if jax.process_index() == 0:
    _write(workdir, results, probs_NxC, labels_N, class_names)
  return results


def _write(workdir, results, probs_NxC, labels_N, class_names) -> None:
  from capjax.tools import plots  # matplotlib only where figures are drawn.
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  cm = cls_metrics.confusion_matrix(labels_N, probs_NxC.argmax(axis=1), len(class_names))
  plots.plot_confusion_matrix(cm, class_names, os.path.join(workdir, 'confusion_matrix.png'),
                              title=f"Confusion matrix ({results['split']})")
  curves = cls_metrics.roc_curves(probs_NxC, labels_N, class_names)
  aucs = {name.split('/', 1)[1]: v for name, v in results.items()
          if name.startswith('class_auc/')}
  aucs.update(micro=results['micro_auc'], macro=results['macro_auc'])
  if curves:
    plots.plot_roc(curves, os.path.join(workdir, 'roc.png'),
                   title=f"ROC one-vs-rest ({results['split']})", aucs=aucs)
  shown = {k: round(v, 4) for k, v in results.items()
           if k in ('top1_accuracy', 'top5_accuracy', 'loss', 'micro_auc', 'macro_auc',
                    'mean_class_accuracy', 'num_examples')}
  logging.info('Evaluation on %s: %s', results['split'], json.dumps(shown))
