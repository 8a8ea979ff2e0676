"""Classification metrics: top-k accuracy, confusion matrix, one-vs-rest ROC / AUC.

Pure numpy, no sklearn. Shapes are in the names: `scores_NxC` are per-class scores for N examples,
`labels_N` integer class ids in [0, C).

ROC/AUC functions expect *probabilities* (softmax outputs), not logits: one-vs-rest ranks the
examples by the score of one class, and a logit is not comparable across examples the way a
probability is (softmax divides by a per-example sum); micro AUC also pools all classes' scores.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_scores_labels(scores_NxC, labels_N) -> tuple[np.ndarray, np.ndarray]:
  scores_NxC = np.asarray(scores_NxC, dtype=np.float64)
  labels_N = np.asarray(labels_N)
  if scores_NxC.ndim != 2:
    raise ValueError(f'Scores must have shape [N, C], got {scores_NxC.shape}.')
  if labels_N.shape != (scores_NxC.shape[0],):
    raise ValueError(f'Labels must have shape [{scores_NxC.shape[0]}] to match the scores, '
                     f'got {labels_N.shape}.')
  if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= scores_NxC.shape[1]):
    raise ValueError(f'Labels must lie in [0, {scores_NxC.shape[1]}), '
                     f'got range [{labels_N.min()}, {labels_N.max()}].')
  return scores_NxC, labels_N.astype(np.int64)


def _check_probs(probs_NxC: np.ndarray) -> None:
  if probs_NxC.size and (probs_NxC.min() < 0.0 or probs_NxC.max() > 1.0):
    raise ValueError('ROC/AUC needs probabilities in [0, 1] but got values outside that range; '
                     'apply softmax to the logits first.')


def topk_accuracy(scores_NxC, labels_N, k: int) -> float:
  """Fraction of examples whose true class is among the k highest scores.

  Works on logits or probabilities (only the order within a row matters). Ties are broken the way
  a stable descending sort breaks them: the lower class index ranks first, so k=1 agrees with
  `argmax`. An empty batch gives nan.
  """
  scores_NxC, labels_N = _check_scores_labels(scores_NxC, labels_N)
  if k < 1:
    raise ValueError(f'k must be at least 1, got {k}.')
  if labels_N.size == 0:
    return float('nan')
  true_N1 = np.take_along_axis(scores_NxC, labels_N[:, None], axis=1)
  lower_index_1xC = np.arange(scores_NxC.shape[1])[None, :] < labels_N[:, None]
  # Rank of the true class = classes strictly ahead of it + equal ones that a stable sort puts first.
  rank_N = ((scores_NxC > true_N1) | ((scores_NxC == true_N1) & lower_index_1xC)).sum(axis=1)
  return float(np.mean(rank_N < k))


def confusion_matrix(labels_N, preds_N, num_classes: int) -> np.ndarray:
  """Counts `cm[true, pred]` as an int64 [C, C] matrix (rows are the true classes)."""
  labels_N = np.asarray(labels_N, dtype=np.int64).reshape(-1)
  preds_N = np.asarray(preds_N, dtype=np.int64).reshape(-1)
  if labels_N.shape != preds_N.shape:
    raise ValueError(f'Labels and predictions differ in length: {labels_N.size} vs {preds_N.size}.')
  for name, x in (('labels', labels_N), ('predictions', preds_N)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f'All {name} must lie in [0, {num_classes}), '
                       f'got range [{x.min()}, {x.max()}].')
  flat = np.bincount(labels_N * num_classes + preds_N, minlength=num_classes * num_classes)
  return flat.reshape(num_classes, num_classes)


def per_class_accuracy(cm_CxC) -> np.ndarray:
  """Recall of each class, `cm[c, c] / cm[c, :].sum()`; nan for a class with no examples."""
  cm_CxC = np.asarray(cm_CxC, dtype=np.float64)
  support_C = cm_CxC.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(support_C > 0, np.diag(cm_CxC) / support_C, np.nan)


def roc_curve(scores_N, positives_N, *, drop_intermediate: bool = True):
  """Binary ROC curve with the semantics of sklearn.metrics.roc_curve.

  Examples with tied scores form one threshold, so a tie between a positive and a negative is a
  diagonal step (worth 0.5 of a pair in the AUC) rather than an order-dependent staircase. The
  first point is (0, 0) at threshold +inf. `drop_intermediate` removes collinear points (as
  sklearn does by default); the AUC is unchanged. With no positives (or no negatives) the tpr
  (or fpr) is nan, as the rate is undefined.

  Returns:
    (fpr, tpr, thresholds), each 1-D, thresholds decreasing.
  """
  scores_N = np.asarray(scores_N, dtype=np.float64).reshape(-1)
  positives_N = np.asarray(positives_N).reshape(-1).astype(bool)
  if scores_N.shape != positives_N.shape:
    raise ValueError(f'Scores and labels differ in length: {scores_N.size} vs {positives_N.size}.')
  if scores_N.size == 0:
    raise ValueError('ROC needs at least one example.')
  order = np.argsort(-scores_N, kind='stable')
  sorted_scores, sorted_pos = scores_N[order], positives_N[order]
  # The last index of each run of equal scores: the curve only moves at distinct thresholds.
  last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores_N.size - 1]
  tps = np.cumsum(sorted_pos)[last_of_run].astype(np.float64)
  fps = 1.0 + last_of_run - tps
  thresholds = sorted_scores[last_of_run]
  if drop_intermediate and tps.size > 2:
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
  thresholds = np.r_[np.inf, thresholds]
  with np.errstate(invalid='ignore', divide='ignore'):
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
  return fpr, tpr, thresholds


def roc_curve_ovr(probs_NxC, labels_N, *, drop_intermediate: bool = True):
  """One-vs-rest ROC curve of every class: a list of C (fpr, tpr, thresholds) tuples.

  A class absent from `labels_N` gets a nan tpr (see `roc_curve`).
  """
  probs_NxC, labels_N = _check_scores_labels(probs_NxC, labels_N)
  _check_probs(probs_NxC)
  return [roc_curve(probs_NxC[:, c], labels_N == c, drop_intermediate=drop_intermediate)
          for c in range(probs_NxC.shape[1])]


def auc(fpr, tpr) -> float:
  """Area under a curve by the trapezoid rule; x (fpr) must be monotonic. nan in, nan out."""
  fpr = np.asarray(fpr, dtype=np.float64)
  tpr = np.asarray(tpr, dtype=np.float64)
  if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size < 2:
    raise ValueError(f'AUC needs two 1-D arrays of equal length >= 2, got {fpr.shape}, {tpr.shape}.')
  if np.isnan(fpr).any() or np.isnan(tpr).any():
    return float('nan')
  dx = np.diff(fpr)
  if (dx < 0).any() and (dx > 0).any():
    raise ValueError('AUC needs a monotonic x (fpr) array.')
  # Written out rather than np.trapezoid, which numpy 1.26 (allowed by pyproject) lacks.
  return float(abs(np.sum(dx * (tpr[1:] + tpr[:-1]) / 2.0)))


def _defined_classes(labels_N: np.ndarray, num_classes: int) -> np.ndarray:
  """Bool [C]: classes with at least one positive and one negative, so their AUC is defined."""
  counts_C = np.bincount(labels_N, minlength=num_classes)
  return (counts_C > 0) & (counts_C < labels_N.size)


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  if class_names is None:
    return [str(c) for c in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f'Got {len(class_names)} class names for {num_classes} classes.')
  return [str(n) for n in class_names]


def roc_auc_summary(probs_NxC, labels_N, class_names: Sequence[str] | None = None) -> dict:
  """Per-class, micro and macro one-vs-rest ROC AUC.

  micro: one ROC over all N*C (one-hot label, probability) pairs.
  macro: the unweighted mean of the per-class AUCs, over classes whose AUC is defined (at least
  one positive and one negative example); the others are listed in `skipped_classes`.

  Returns:
    {'per_class_auc': {name: auc}, 'micro_auc': float, 'macro_auc': float,
     'skipped_classes': [name, ...]}; nan where nothing is defined.
  """
  probs_NxC, labels_N = _check_scores_labels(probs_NxC, labels_N)
  _check_probs(probs_NxC)
  num_classes = probs_NxC.shape[1]
  names = _names(class_names, num_classes)
  defined_C = _defined_classes(labels_N, num_classes)
  per_class = {}
  for c in np.flatnonzero(defined_C):
    per_class[names[c]] = auc(*roc_curve(probs_NxC[:, c], labels_N == c)[:2])
  onehot_NxC = labels_N[:, None] == np.arange(num_classes)[None, :]
  micro = auc(*roc_curve(probs_NxC, onehot_NxC)[:2]) if num_classes > 1 else float('nan')
  macro = float(np.mean(list(per_class.values()))) if per_class else float('nan')
  return {
      'per_class_auc': per_class,
      'micro_auc': micro,
      'macro_auc': macro,
      'skipped_classes': [names[c] for c in np.flatnonzero(~defined_C)],
  }


def roc_curves(probs_NxC, labels_N, class_names: Sequence[str] | None = None) -> dict:
  """ROC curves to plot: {class name: (fpr, tpr)} plus 'micro' and 'macro'.

  Classes without a defined curve are left out. The 'macro' curve averages the per-class tpr
  interpolated on the union of their fpr points (the usual plotting convention); its area is close
  to, but not exactly, `roc_auc_summary`'s macro AUC, which is the mean of per-class areas.
  """
  probs_NxC, labels_N = _check_scores_labels(probs_NxC, labels_N)
  _check_probs(probs_NxC)
  num_classes = probs_NxC.shape[1]
  names = _names(class_names, num_classes)
  curves = {}
  for c in np.flatnonzero(_defined_classes(labels_N, num_classes)):
    fpr, tpr, _ = roc_curve(probs_NxC[:, c], labels_N == c)
    curves[names[c]] = (fpr, tpr)
  if not curves:
    return curves
  all_fpr = np.unique(np.concatenate([f for f, _ in curves.values()]))
  mean_tpr = np.mean([np.interp(all_fpr, f, t) for f, t in curves.values()], axis=0)
  onehot_NxC = labels_N[:, None] == np.arange(num_classes)[None, :]
  micro_fpr, micro_tpr, _ = roc_curve(probs_NxC, onehot_NxC)
  curves['micro'] = (micro_fpr, micro_tpr)
  curves['macro'] = (all_fpr, mean_tpr)
  return curves


def classification_report(probs_NxC, labels_N, class_names: Sequence[str] | None = None) -> dict:
  """Flat metric dict for eval.json: accuracies, AUCs and per-class accuracy/AUC.

  Keys: num_examples, top1_accuracy, top5_accuracy (1.0 by definition when C <= 5),
  mean_class_accuracy (balanced accuracy), macro_auc, micro_auc, auc_skipped_classes (count),
  'class_accuracy/<name>' and 'class_auc/<name>'. Per-class entries are left out for classes
  absent from the labels, so every value is a finite number (nan is not valid JSON); macro/micro
  AUC may still be nan when no class has a defined AUC.
  """
  probs_NxC, labels_N = _check_scores_labels(probs_NxC, labels_N)
  num_classes = probs_NxC.shape[1]
  names = _names(class_names, num_classes)
  cm = confusion_matrix(labels_N, probs_NxC.argmax(axis=1), num_classes)
  class_acc_C = per_class_accuracy(cm)
  summary = roc_auc_summary(probs_NxC, labels_N, names)
  report = {
      'num_examples': int(labels_N.size),
      'top1_accuracy': topk_accuracy(probs_NxC, labels_N, 1),
      'top5_accuracy': topk_accuracy(probs_NxC, labels_N, 5),
      'mean_class_accuracy': float(np.nanmean(class_acc_C)) if labels_N.size else float('nan'),
      'macro_auc': summary['macro_auc'],
      'micro_auc': summary['micro_auc'],
      'auc_skipped_classes': len(summary['skipped_classes']),
  }
  for name, acc in zip(names, class_acc_C):
    if not np.isnan(acc):
      report[f'class_accuracy/{name}'] = float(acc)
  for name, value in summary['per_class_auc'].items():
    report[f'class_auc/{name}'] = value
  return report
