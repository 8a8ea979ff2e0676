"""Real caption data sets as TF-free TFDS builders (array_record + `as_data_source`).

  flickr8k  official (Flickr8k_text/ + Flicker8k_Dataset/) or Kaggle (captions.txt + Images/)
            layout; 'validation' is the official dev split
  coco      annotations/captions_{train,val}YYYY.json (+ image folders), or a Karpathy split
  own       a folder of images plus a CSV / JSON-lines captions file

The manual dir is the data set root (config.data_dir). Each split is its own builder config,
named by a hash of what defines its contents (data set, root, reader arguments, every record's
image path and captions), so preparing 'train' never needs the test images, and a changed file
list prepares a new copy instead of silently reusing a stale one.

Examples are {'image': the file's encoded bytes, 'captions': [bytes, ...], 'id': str}: images are
decoded (and resized) in the grain map with `capjax.data.images.load_image`, so one prepared copy
serves every image size. While preparing, each image is decoded once at a tiny size to check it,
so a corrupt file is reported (and skipped) here instead of stopping training later.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from capjax.data import coco, flickr8k, own_captions
from capjax.data.catalog import CAPTION_DATASETS as DATASETS
from capjax.data.images import load_image
from capjax.data.reading import CaptionSplit, DataError, SPLITS


def read_split(dataset: str, root: str, split: str, read: dict) -> CaptionSplit:
  """The reader's records of one split; `read` holds the reader's keyword arguments."""
  if dataset == 'flickr8k':
    return flickr8k.read_flickr8k(root, split, **read)
  if dataset == 'coco':
    return coco.read_coco(root, split, **read)
  if dataset == 'own':
    read = dict(read)
    images_dir = read.pop('images_dir', None) or root
    captions_file = read.pop('captions_file', None)
    if not captions_file:
      raise DataError('--config.dataset=own needs a captions file: set '
                      '--config.own.captions_file=PATH (a .csv with image,caption columns or a '
                      '.jsonl).')
    if not os.path.isabs(captions_file):
      captions_file = os.path.join(root, captions_file)
    return own_captions.read_own_captions(images_dir, captions_file, split, **read)
  raise DataError(f"Unknown caption data set {dataset!r}; use one of {', '.join(DATASETS)}.")


@dataclasses.dataclass
class CaptionSplitConfig(tfds.core.BuilderConfig):
  """One split of a data set on disk; `read` holds the reader's arguments (JSON-friendly)."""
  dataset: str = 'flickr8k'
  split: str = 'train'
  read: dict = dataclasses.field(default_factory=dict)


def _root(root: str | None, dataset: str) -> str:
  if not root:
    raise DataError(f'The {dataset} data set needs its root folder: set --config.data_dir=PATH.')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise DataError(f'--config.data_dir={root} does not exist or is not a folder; point it at '
                    f'the {dataset} data set root.')
  return root


def split_config(dataset: str, root: str, split: str, **read) -> CaptionSplitConfig:
  """Reads the split's file list and captions (no images) and names the config by their hash."""
  if split not in SPLITS:
    raise DataError(f'Unknown split {split!r}; use one of {", ".join(SPLITS)}.')
  root = _root(root, dataset)
  records = read_split(dataset, root, split, read).records
  if not records:
    raise DataError(f'{dataset} split {split!r} under {root} has no images with captions; '
                    f'check the data set root and its split files.')
  # skip_missing is left out: its effect is in the records, and toggling it on a complete
  # download should not prepare a second copy.
  defining = {k: v for k, v in read.items() if k != 'skip_missing'}
  digest = hashlib.sha256(json.dumps(
      [dataset, root, split, defining,
       [(r['image_path'], r['id'], r['captions']) for r in records]],
      sort_keys=True).encode()).hexdigest()[:12]
  return CaptionSplitConfig(name=f'{dataset}_{split}_{digest}', dataset=dataset, split=split,
                            read=dict(read))


class CapjaxCaptions(tfds.core.GeneratorBasedBuilder):
  """One split of Flickr8k, COCO or a user's own captions: encoded images + captions."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point --config.data_dir at the unzipped data set: the Flickr8k folder (Flickr8k_text/ + '
      'Flicker8k_Dataset/, or captions.txt + Images/), the COCO folder (annotations/ + image '
      'folders), or the folder of your own images.')
  BUILDER_CONFIGS = []  # Every config is made by split_config from the data on disk.

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=f'capjax {c.dataset} captions, split {c.split}.',
        # Keep the reader's order (split-file order), not TFDS's hash-of-key order.
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            # Encoded bytes in an object Tensor: tfds.features.Image would pull in TensorFlow.
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            # COCO has 5 to 7 captions per image, so the count is left open.
            'captions': tfds.features.Tensor(shape=(None,), dtype=np.object_),
            'id': tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {c.split: self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root: str):
    c = self.builder_config
    records = read_split(c.dataset, root, c.split, c.read).records
    bad = []

    def check(record):
      try:
        with open(record['image_path'], 'rb') as f:
          data = f.read()
        # A tiny decode reads every byte of the file (JPEG draft mode still entropy-decodes),
        # so truncated files are caught here, cheaply.
        load_image(data, size=8, name=record['image_path'])
        return data
      except (OSError, DataError) as e:
        return DataError(str(e))

    # Pillow releases the GIL while decoding, so a few threads overlap reads and decoding.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      for record, data in zip(records, pool.map(check, records)):
        if isinstance(data, DataError):
          bad.append(str(data))
          continue
        yield record['id'], {'image': data, 'captions': list(record['captions']),
                             'id': record['id']}
    if bad:
      # A few broken files in a big download should not stop training; say so loudly.
      logging.warning('%s split %r: skipped %d of %d images that cannot be decoded, e.g. %s',
                      c.dataset, c.split, len(bad), len(records), bad[0])
    if len(bad) == len(records):
      raise DataError(f'No image of {c.dataset} split {c.split!r} under {root} could be '
                      f'decoded (e.g. {bad[0] if bad else "none listed"}); check the files.')


def prepare_split(tfds_dir: str | None, dataset: str, root: str, split: str,
                  **read) -> CapjaxCaptions:
  """Prepares one split once into `tfds_dir` (TFDS default when None); a no-op when the same
  records were prepared before. Raises DataError (one sentence) for missing images etc."""
  config = split_config(dataset, root, split, **read)
  builder = CapjaxCaptions(config=config, data_dir=tfds_dir, file_format='array_record')
  # No GCS lookup: the data sets are local, and the machines may be offline.
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=_root(root, dataset), try_download_gcs=False))
  return builder


def load_split(tfds_dir: str | None, dataset: str, root: str, split: str, **read):
  """(random-access source of {'image': bytes, 'captions', 'id'}, prepared config name)."""
  builder = prepare_split(tfds_dir, dataset, root, split, **read)
  return builder.as_data_source()[split], builder.builder_config.name


def reader_args(config) -> dict:
  """The reader's keyword arguments from config: config.<dataset> and
  config.data.skip_missing_images."""
  d = config.dataset
  args = {'skip_missing': bool(config.data.get('skip_missing_images', False))}
  if d == 'flickr8k':
    args['kaggle_split_sizes'] = tuple(int(v) for v in config.flickr8k.kaggle_split_sizes)
  elif d == 'coco':
    args['karpathy_file'] = config.coco.karpathy_file or None
    args['year'] = config.coco.year or None
  elif d == 'own':
    args.update(images_dir=config.own.images_dir or None,
                captions_file=config.own.captions_file or None,
                fractions=tuple(float(v) for v in config.own.split_fractions),
                seed=int(config.own.split_seed))
  return args
