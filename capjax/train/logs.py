"""Metrics to `metrics.jsonl` and TensorBoard, and human progress lines."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
from absl import logging


class MetricWriter:
  """Appends {'step', 'split', **metrics} rows to metrics.jsonl and TensorBoard; only process 0
  writes.

  The interface is clu's `metric_writers.MetricWriter` (`write_scalars`, `flush`, `close`), so
  swapping in clu stays cheap. clu itself is not used: in clu 0.0.12, the newest release
  (checked 2026-12-03), `import clu.metric_writers` imports TensorFlow, which capjax does not
  need (`metric_writers/__init__.py` imports `summary_writer.SummaryWriter`, which is
  `from .tf.summary_writer import SummaryWriter`, whose module does `import tensorflow as tf`).
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.active:
      _end_partial_line(self.path)
      from tensorboardX import SummaryWriter  # Light, TF-free event writer.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """`scalars` are named '<split>/<metric>' (TensorBoard's tags); metrics.jsonl gets one row
    per split."""
    if not self.active:
      return
    rows = {}
    for tag, value in scalars.items():
      split, _, name = tag.partition('/')
      rows.setdefault(split, {'step': int(step), 'split': split})[name] = float(value)
    try:
      with open(self.path, 'a') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows.values())
    except OSError as e:  # A failed write() names no file; say which (a full disk, say).
      raise OSError(e.errno, e.strerror, e.filename or self.path) from e
    for tag, value in scalars.items():
      self._tb.add_scalar(tag, float(value), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is None:
      return
    try:
      self._tb.close()
    except OSError as e:
      # A full disk: metrics.jsonl holds the scalars; TensorBoard loses its tail.
      logging.warning('Could not finish the TensorBoard event file in %s: %s', self._tb.logdir, e)
      # tensorboardX leaves a writer whose final flush failed open: its atexit hook would flush
      # it again, and its worker thread would die at interpreter exit, each printing a traceback
      # after the run's one error line. Stop the worker and mark the writer closed.
      for file_writer in (self._tb.all_writers or {}).values():
        events = file_writer.event_writer
        events._closed = True  # pylint: disable=protected-access
        events._worker.stop()  # pylint: disable=protected-access


def tagged(split: str, metrics: Mapping[str, float]) -> dict:
  """{'<split>/<name>': value}: the scalars of one split for `MetricWriter.write_scalars`."""
  return {f'{split}/{k}': v for k, v in metrics.items()}


def _end_partial_line(path: str) -> None:
  """Ends a last line cut short by a kill, so the first row appended after a restart is not
  glued onto it (and lost with it when the file is read)."""
  try:
    with open(path, 'rb+') as f:
      f.seek(0, os.SEEK_END)
      if f.tell() == 0:
        return
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')
  except FileNotFoundError:
    pass


def read_metrics(workdir: str) -> list[dict]:
  """Rows of metrics.jsonl; a resumed run's repeated steps keep their last value."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A line cut short by a kill.
          continue
        rows[(row['split'], row['step'])] = row
  return sorted(rows.values(), key=lambda r: (r['split'], r['step']))


class Progress:
  """Steps/s over the last report window and an ETA for the run."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    shown = ' '.join(f'{k}={float(v):.4f}' for k, v in metrics.items())
    return (f'step {step}/{self.total} {shown} | {rate:.2f} steps/s | '
            f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')


def log_progress(progress: Progress, step: int, metrics: dict) -> None:
  """Logs one progress line (steps/s, ETA, the metrics)."""
  logging.info('%s', progress.line(step, metrics))
