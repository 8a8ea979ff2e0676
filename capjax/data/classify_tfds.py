"""Classification data sets as TF-free TFDS builders (array_record + `as_data_source`).

  shapes30       the embedded generated world (capjax.data.classify_world), nothing to read
  tiny_imagenet  Tiny ImageNet-200 layout restricted to a list of wnids (TinyImageNet30 by
                 default: the root's own wnids.txt); the manual dir is the dataset root
  image_folder   root/<class>/<image> (or root/{train,val,test}/<class>/<image>)

The two real layouts are read by capjax.data.tiny_imagenet; the builder decodes each image
once with `load_image` (greyscale, CMYK, palette, alpha... all become RGB) and stores it as
uint8 pixels at `image_size`, so training reads fixed-size arrays and never decodes a JPEG.

A real data set's config name carries a hash of what defines its contents (root, class list,
split settings, size and the list of files), and shapes30's names its size, split sizes and seed
(`generate.generated_config`), so changing any of them prepares a new copy instead of silently
reusing a stale one. Examples are {'image': uint8 HxWx3, 'label': int, 'id': str}.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from capjax.data import classify_world, generate, tiny_imagenet
from capjax.data.images import load_image
from capjax.data.reading import DataError, SPLITS


def _image_features(image_size: int, class_names) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      # Tensor with BYTES encoding, not Image: Image encoding would pull in TensorFlow, and
      # one bytes string per image writes much faster than TFDS's int64 list of uint8s.
      'image': tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.BYTES),
      'label': tfds.features.ClassLabel(names=list(class_names)),
      'id': tfds.features.Text(),
  })


class CapjaxShapes30(tfds.core.GeneratorBasedBuilder):
  """Generated images of 10 shapes x 3 fill styles under heavy nuisance variation."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [generate.generated_config(32, 15000, 1500, 3000, 0)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='capjax shapes30: generated 30-class images.',
        features=_image_features(self.builder_config.image_size, classify_world.CLASS_NAMES))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: everything is generated.
    c = self.builder_config
    counts = {'train': c.num_train, 'validation': c.num_validation, 'test': c.num_test}
    return {split: self._generate_examples(split, n) for split, n in counts.items()}

  def _generate_examples(self, split: str, count: int):
    c = self.builder_config
    render = functools.partial(classify_world.example, c.seed, split, size=c.image_size)
    for i, ex in enumerate(generate.ordered_map(render, count)):
      yield i, {'image': ex['image'], 'label': ex['label'], 'id': f'{split}_{i}'}


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  """A real data set on disk; `read` holds the reader's arguments (JSON-friendly)."""
  layout: str = 'tiny_imagenet'
  image_size: int = 64
  class_names: tuple = ()
  read: dict = dataclasses.field(default_factory=dict)


def _abs(root: str) -> str:
  return os.path.abspath(os.path.expanduser(root))


def _read_split(layout: str, root: str, split: str, read: dict):
  if layout == 'tiny_imagenet':
    return tiny_imagenet.read_tiny_imagenet(root, split, **read)
  return tiny_imagenet.read_image_folder(root, split, **read)


def folder_config(layout: str, root: str, image_size: int, **read) -> FolderConfig:
  """Reads the file lists of all splits (no images) and names the config by their hash."""
  if layout not in ('tiny_imagenet', 'image_folder'):
    raise DataError(f"Unknown classification layout {layout!r}; use 'tiny_imagenet' or "
                    f"'image_folder'.")
  if not root:
    raise DataError(f'The {layout} data set needs its root folder: set --config.data_dir=PATH.')
  root = _abs(root)
  if not os.path.isdir(root):
    raise DataError(f'--config.data_dir={root} does not exist or is not a folder; point it at '
                    f'the {layout} data set root.')
  splits = {s: _read_split(layout, root, s, read) for s in SPLITS}
  class_names = tuple(splits['train'].class_names)
  digest = hashlib.sha256(json.dumps(
      [layout, root, image_size, read, class_names,
       {s: [(r['image_path'], r['label']) for r in v.records] for s, v in splits.items()}],
      sort_keys=True).encode()).hexdigest()[:12]
  return FolderConfig(name=f'{layout}_{image_size}px_{digest}', layout=layout,
                      image_size=image_size, class_names=class_names, read=dict(read))


class CapjaxClassifyFolder(tfds.core.GeneratorBasedBuilder):
  """A Tiny ImageNet or image-folder data set decoded to fixed-size uint8 pixels."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Point --config.data_dir at the unzipped data set: the '
                                  'tiny-imagenet-200 folder (wnids.txt, train/, val/) or an '
                                  'image folder root/<class>/<image>.')
  BUILDER_CONFIGS = []  # Every config is made by folder_config from the data on disk.

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(builder=self, description=f'capjax {c.layout} images.',
                                 features=_image_features(c.image_size, c.class_names))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    return {s: self._generate_examples(root, s) for s in SPLITS}

  def _generate_examples(self, root: str, split: str):
    c = self.builder_config
    records = _read_split(c.layout, root, split, c.read).records
    bad = []

    def decode(record):
      try:
        return load_image(record['image_path'], size=c.image_size)
      except DataError as e:
        return e

    # Pillow releases the GIL while decoding, so a few threads overlap file reads and decoding.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      for record, image in zip(records, pool.map(decode, records)):
        if isinstance(image, DataError):
          bad.append(str(image))
          continue
        yield record['id'], {'image': image, 'label': record['label'], 'id': record['id']}
    if bad:
      # A few broken files in a big download should not stop training; say so loudly.
      logging.warning('%s split %r: skipped %d of %d images that cannot be decoded, e.g. %s',
                      c.layout, split, len(bad), len(records), bad[0])
    if records and len(bad) == len(records):
      raise DataError(f'No image of split {split!r} under {root} could be decoded (e.g. '
                      f'{bad[0]}); check the files.')


def _download_config(manual_dir: str | None = None):
  # No GCS lookup: the data sets are local, and the machines may be offline.
  return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)


def prepare_shapes30(data_dir: str | None, **params) -> CapjaxShapes30:
  """Generates the shapes30 data set once (a no-op when it is already on disk); `params` are
  `generate.generated_config`'s."""
  return generate.prepare(CapjaxShapes30, data_dir, _download_config(), **params)


def prepare_folder(data_dir: str | None, layout: str, root: str, image_size: int,
                   **read) -> CapjaxClassifyFolder:
  """Decodes a Tiny ImageNet / image-folder data set once into `data_dir` (TFDS default
  when None); a no-op when the same files were already prepared."""
  config = folder_config(layout, root, image_size, **read)
  builder = CapjaxClassifyFolder(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=_download_config(manual_dir=_abs(root)))
  return builder


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
  return list(builder.info.features['label'].names)
