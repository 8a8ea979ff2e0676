"""The classification task's data: the prepared splits, and the workdir's classify_meta.json
(class names, normalisation statistics, image size: everything predict needs besides the
weights)."""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
from absl import logging

from capjax.classify import pipeline
from capjax.data import classify_tfds
from capjax.data.reading import SPLITS
from capjax.errors import UserError
from capjax.tasks import Splits

META_FILE = 'classify_meta.json'


def _wnids(value):
  """config.tiny_imagenet.wnids: None (root/wnids.txt), a file path, or 'n01,n02,...'."""
  if not value or os.path.isfile(value):
    return value or None
  if os.sep in value or value.endswith('.txt'):
    raise UserError(f'--config.tiny_imagenet.wnids={value!r} looks like a path but is not a '
                    f'file; give an existing wnid file or comma-separated wnids.')
  return [w.strip() for w in value.split(',') if w.strip()]


def prepare(config):
  """The prepared TFDS builder of config.dataset (generating/decoding it the first time)."""
  size = config.data.image_size
  if config.dataset == 'shapes30':
    s = config.shapes30
    return classify_tfds.prepare_shapes30(
        config.tfds_dir, image_size=size, num_train=s.num_train,
        num_validation=s.num_validation, num_test=s.num_test, seed=s.seed)
  if config.dataset == 'tiny_imagenet30':
    t = config.tiny_imagenet
    return classify_tfds.prepare_folder(
        config.tfds_dir, 'tiny_imagenet', config.data_dir, size, wnids=_wnids(t.wnids),
        train_per_class=t.train_per_class, val_per_class=t.val_per_class,
        skip_missing=t.skip_missing_images)
  f = config.image_folder
  return classify_tfds.prepare_folder(
      config.tfds_dir, 'image_folder', config.data_dir, size,
      fractions=tuple(f.split_fractions), seed=f.split_seed)


def load_splits(config, splits: Sequence[str] | None = None) -> Splits:
  """Each split's random-access source, read into memory if config.data.in_memory, and the
  class names."""
  builder = prepare(config)
  sources = builder.as_data_source()
  sources = {s: sources[s] for s in (splits or SPLITS)}
  if config.data.get('in_memory', True):
    sources = {s: pipeline.load_in_memory(source) for s, source in sources.items()}
  return Splits(sources, tuple(classify_tfds.class_names(builder)))


def normalisation(config, workdir: str, train_source, class_names) -> dict:
  """The workdir's classify_meta.json, written first from the train split's statistics.

  A resumed run (and predict) must normalise exactly as the first run did, so the stored
  statistics win over recomputing them.
  """
  path = os.path.join(workdir, META_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  mean, std = pipeline.channel_stats(train_source, config.data.stats_max_images)
  meta = {'class_names': list(class_names), 'mean': mean.tolist(), 'std': std.tolist(),
          'image_size': int(config.data.image_size), 'dataset': config.dataset}
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(meta, f, indent=1)
  logging.info('Normalisation statistics of the train split: mean %s, std %s.',
               np.round(mean, 2).tolist(), np.round(std, 2).tolist())
  return meta


def read_meta(workdir: str) -> dict:
  path = os.path.join(workdir, META_FILE)
  if not os.path.exists(path):
    raise UserError(f'{path} is missing: {workdir} holds no trained classifier; train first '
                    f'with --workdir pointing at it.')
  with open(path) as f:
    return json.load(f)


def mean_std(meta: dict) -> tuple[np.ndarray, np.ndarray]:
  """The normalisation statistics of a classify_meta.json, as float32 arrays."""
  return np.asarray(meta['mean'], np.float32), np.asarray(meta['std'], np.float32)
