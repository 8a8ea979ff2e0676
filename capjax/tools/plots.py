"""Figures for training curves, classification and caption results. One PNG per function.

Every function builds its own `matplotlib.figure.Figure` (never pyplot), saves it with the Agg
renderer that Figure.savefig uses for PNG, and lets it go: no global backend switch, no open
pyplot figures piling up over a long run, and usable off the main thread. Sizes are fixed
figsize x DPI (constrained layout, no bbox 'tight'), so the pixel size of each figure is known.
"""
from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np

from capjax.metrics.classification import auc

DPI = 100
_SPLITS = {'train': 'train', 'eval': 'validation', 'val': 'validation', 'valid': 'validation',
           'validation': 'validation', 'test': 'test'}


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, format='png')
  fig.clear()  # drop artists now rather than when the garbage collector gets to the figure
  return path


def _split_key(key: str) -> tuple[str, str]:
  """'train/loss' -> ('loss', 'train'); 'eval_accuracy' -> ('accuracy', 'validation')."""
  for sep in ('/', '_'):
    head, _, tail = key.partition(sep)
    if tail and head.lower() in _SPLITS:
      return tail, _SPLITS[head.lower()]
  return key, key


def plot_curves(history: Mapping[str, Sequence[tuple[float, float]]], path: str,
                title: str = '') -> str:
  """Line plots of metrics over steps, one panel per metric, train vs validation overlaid.

  Args:
    history: {'train/loss': [(step, value), ...], 'eval/loss': [...], 'train/accuracy': ...}.
      A key '<split>/<metric>' or '<split>_<metric>' with split in train/eval/val/validation/test
      puts the series in the <metric> panel; any other key gets a panel of its own.
    path: output PNG path.
  """
  panels: dict[str, list[tuple[str, np.ndarray]]] = {}
  for key, points in history.items():
    metric, split = _split_key(key)
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    panels.setdefault(metric, []).append((split, xy))
  n = max(len(panels), 1)
  ncols = min(n, 3)
  nrows = math.ceil(n / ncols)
  fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout='constrained')
  for idx, (metric, series) in enumerate(panels.items()):
    ax = fig.add_subplot(nrows, ncols, idx + 1)
    for split, xy in series:
      # Sparse series (eval every N steps) get markers so single points stay visible.
      ax.plot(xy[:, 0], xy[:, 1], label=split, marker='o' if len(xy) < 30 else None,
              markersize=3, linewidth=1.2)
    ax.set_xlabel('step')
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_confusion_matrix(cm_CxC, class_names: Sequence[str], path: str, normalize: bool = True,
                          title: str = 'Confusion matrix') -> str:
  """Heat map of a confusion matrix (rows = true class), row-normalised by default.

  Figure size and font size scale with the number of classes so 30+ names stay readable;
  cell values are written in only up to 15 classes.
  """
  cm = np.asarray(cm_CxC, dtype=np.float64)
  num_classes = cm.shape[0]
  if cm.shape != (num_classes, num_classes) or len(class_names) != num_classes:
    raise ValueError(f'Need a square matrix and one name per class, got {cm.shape} and '
                     f'{len(class_names)} names.')
  if normalize:
    rows = cm.sum(axis=1, keepdims=True)
    cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  side = min(max(6.0, 0.32 * num_classes + 3.0), 24.0)
  fontsize = 10 if num_classes <= 15 else max(5, 10 - (num_classes - 15) // 6)
  fig = Figure(figsize=(side + 1.2, side), layout='constrained')
  ax = fig.add_subplot()
  im = ax.imshow(cm, cmap='Blues', vmin=0, vmax=1 if normalize else None)
  fig.colorbar(im, ax=ax, shrink=0.8)
  ticks = np.arange(num_classes)
  ax.set_xticks(ticks, [str(n) for n in class_names], rotation=90, fontsize=fontsize)
  ax.set_yticks(ticks, [str(n) for n in class_names], fontsize=fontsize)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title + (' (row-normalised)' if normalize else ''))
  if num_classes <= 15:
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(num_classes):
      for j in range(num_classes):
        text = f'{cm[i, j]:.2f}' if normalize else f'{int(cm[i, j])}'
        ax.text(j, i, text, ha='center', va='center', fontsize=fontsize - 2,
                color='white' if cm[i, j] > threshold else 'black')
  return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str,
             title: str = 'ROC (one-vs-rest)', aucs: Mapping[str, float] | None = None) -> str:
  """ROC curves as returned by metrics.classification.roc_curves.

  Args:
    curves: {class name: (fpr, tpr)} plus optional 'micro' and 'macro' entries, drawn bold.
    aucs: areas for the legend; by default the trapezoid area of each curve.
  Per-class curves are labelled in the legend only up to 10 classes; beyond that they are thin
  unlabelled lines, as 30 legend entries would hide the plot.
  """
  aucs = dict(aucs or {})
  fig = Figure(figsize=(7, 6), layout='constrained')
  ax = fig.add_subplot()
  classes = [k for k in curves if k not in ('micro', 'macro')]
  label_classes = len(classes) <= 10
  for idx, name in enumerate(classes):
    fpr, tpr = curves[name]
    if label_classes:
      ax.plot(fpr, tpr, linewidth=1.0, color=matplotlib.colormaps['tab10'](idx),
              label=f'{name} ({aucs.get(name, auc(fpr, tpr)):.3f})')
    else:
      ax.plot(fpr, tpr, linewidth=0.6, alpha=0.5,
              color=matplotlib.colormaps['viridis'](idx / max(len(classes) - 1, 1)))
  for name, style in (('micro', ':'), ('macro', '--')):
    if name in curves:
      fpr, tpr = curves[name]
      area = aucs.get(name, auc(fpr, tpr))
      ax.plot(fpr, tpr, style, color='black' if name == 'micro' else 'crimson', linewidth=2.2,
              label=f'{name}-average ({area:.3f})')
  ax.plot([0, 1], [0, 1], color='gray', linewidth=0.8, alpha=0.6)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel('false positive rate')
  ax.set_ylabel('true positive rate')
  ax.set_title(title if label_classes else f'{title}, {len(classes)} classes (thin lines)')
  ax.legend(loc='lower right', fontsize='small')
  ax.grid(alpha=0.3)
  return _save(fig, path)


def _wrap(text: str, width: int, max_lines: int) -> str:
  lines = textwrap.wrap(text, width) or ['']
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:width - 3] + '...'
  return '\n'.join(lines)


def plot_caption_samples(images: Sequence[np.ndarray], generated: Sequence[str],
                         references: Sequence[Sequence[str] | str], path: str,
                         ncols: int = 4, num_references: int = 2) -> str:
  """Grid of images, each with its generated caption (bold) and up to `num_references` of its
  reference captions under it, so a reader can judge the caption against what people wrote.

  Args:
    images: HxWx3 (or HxW) arrays, uint8 or floats in [0, 1]; sizes may differ.
    generated: one string per image.
    references: per image, its reference captions (or one string).
  """
  if not (len(images) == len(generated) == len(references)) or not images:
    raise ValueError(f'Need the same, non-zero number of images ({len(images)}), generated '
                     f'({len(generated)}) and reference ({len(references)}) captions.')
  ncols = max(1, min(ncols, len(images)))
  nrows = math.ceil(len(images) / ncols)
  # 9 pt text; ~40 characters fit a 3.6-inch panel. Generated caption: up to 3 lines; each
  # reference: up to 2 lines; the text panel is sized for that many lines.
  panel_w, image_h, font_pt, width = 3.6, 3.0, 9, 40
  line_in = 1.3 * font_pt / 72
  text_lines = 3 + 2 * num_references
  text_h = line_in * text_lines + 0.1
  fig = Figure(figsize=(panel_w * ncols, (image_h + text_h) * nrows), layout='constrained')
  grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[image_h, text_h] * nrows)
  for idx, (image, gen, refs) in enumerate(zip(images, generated, references)):
    row, col = divmod(idx, ncols)
    ax = fig.add_subplot(grid[2 * row, col])
    ax.imshow(np.asarray(image), cmap='gray' if np.ndim(image) == 2 else None)
    ax.set_axis_off()
    text_ax = fig.add_subplot(grid[2 * row + 1, col])
    text_ax.set_axis_off()
    refs = [refs] if isinstance(refs, str) else list(refs)
    blocks = [(_wrap(gen, width, 3), dict(color='navy', fontweight='bold'))]
    blocks += [(_wrap(f'ref: {r}', width, 2), dict(color='dimgray'))
               for r in refs[:num_references]]
    top = 1.0  # Each block starts below the lines already written (axes fraction).
    for text, style in blocks:
      text_ax.text(0.0, top, text, va='top', ha='left', fontsize=font_pt,
                   transform=text_ax.transAxes, **style)
      top -= (text.count('\n') + 1) * line_in / text_h + 0.02
  return _save(fig, path)


def plot_attention(image: np.ndarray, words: Sequence[str], attention_maps_TxHxW, path: str,
                   ncols: int = 5) -> str:
  """The image once per generated word, overlaid with that word's attention map.

  Args:
    image: HxWx3 image (uint8 or floats in [0, 1]).
    words: T generated words.
    attention_maps_TxHxW: attention over the encoder's spatial grid (e.g. 7x7) per word; each
      map is stretched over the whole image with bilinear interpolation.
  """
  maps = np.asarray(attention_maps_TxHxW, dtype=np.float64)
  if maps.ndim != 3 or maps.shape[0] != len(words) or not words:
    raise ValueError(f'Need one HxW attention map per word, got {maps.shape} for '
                     f'{len(words)} words.')
  image = np.asarray(image)
  height, width = image.shape[:2]
  panels = len(words) + 1  # the first panel is the plain image
  ncols = max(1, min(ncols, panels))
  nrows = math.ceil(panels / ncols)
  fig = Figure(figsize=(2.4 * ncols, 2.6 * nrows), layout='constrained')
  ax = fig.add_subplot(nrows, ncols, 1)
  ax.imshow(image)
  ax.set_title('input', fontsize=9)
  ax.set_axis_off()
  for t, word in enumerate(words):
    ax = fig.add_subplot(nrows, ncols, t + 2)
    ax.imshow(image)
    # Scaled per word: each map sums to 1 over the grid, so a shared scale would wash most out.
    ax.imshow(maps[t], cmap='jet', alpha=0.5, interpolation='bilinear',
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.set_title(word, fontsize=9)
    ax.set_axis_off()
  return _save(fig, path)


def plot_bars(rows: Sequence[Mapping[str, object]], metric_names: Sequence[str], path: str,
              label_key: str = 'workdir', title: str = '') -> str:
  """Grouped bar chart: one group per metric, one bar per row (e.g. per model).

  Args:
    rows: dicts holding `label_key` and metric values; a missing, blank or non-numeric value
      draws no bar.
    metric_names: the metrics to show, in order. They share one y axis, so pick metrics on a
      similar scale (e.g. leave the loss out).
  """
  if not rows or not metric_names:
    raise ValueError('Need at least one row and one metric to plot.')
  values = np.full((len(rows), len(metric_names)), np.nan)
  for i, row in enumerate(rows):
    for j, name in enumerate(metric_names):
      try:
        values[i, j] = float(row.get(name))
      except (TypeError, ValueError):
        pass
  width = 0.8 / len(rows)
  x = np.arange(len(metric_names))
  fig = Figure(figsize=(max(6.0, 1.0 + len(metric_names) * (0.6 + 0.25 * len(rows))), 4.8),
               layout='constrained')
  ax = fig.add_subplot()
  for i, row in enumerate(rows):
    offset = (i - (len(rows) - 1) / 2) * width
    present = ~np.isnan(values[i])
    bars = ax.bar(x[present] + offset, values[i][present], width, color=f'C{i % 10}')
    if len(rows) * len(metric_names) <= 40:  # value labels only while they can fit
      ax.bar_label(bars, fmt='%.3g', fontsize=6, rotation=90, padding=2)
  # Explicit handles: a row whose first metric is missing would otherwise lend the legend nothing.
  ax.legend(handles=[Patch(color=f'C{i % 10}', label=str(row.get(label_key, i)))
                     for i, row in enumerate(rows)], fontsize='small')
  ax.margins(y=0.12)  # head-room for the value labels
  ax.set_xticks(x, list(metric_names), rotation=30, ha='right')
  ax.grid(axis='y', alpha=0.3)
  if title:
    ax.set_title(title)
  return _save(fig, path)
