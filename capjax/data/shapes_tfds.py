"""The `shapes` data set as a TF-free TFDS builder (array_record + `data_source`)."""
from __future__ import annotations

import functools
import json

import numpy as np
import tensorflow_datasets as tfds

from capjax.data import generate, shapes

CAPTIONS_PER_IMAGE = 5


class CapjaxShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural scenes of 1-3 coloured shapes with 5 grammar captions each."""

  VERSION = tfds.core.Version('1.1.0')  # 1.1.0: larger small objects.
  BUILDER_CONFIGS = [generate.generated_config(64, 20000, 500, 1000, 0)]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description='capjax shapes: generated captioning scenes.',
        features=tfds.features.FeaturesDict({
            # Tensor, not Image: Image encoding would pull in TensorFlow.
            # One bytes string per image: TFDS's default int64-list encoding of
            # uint8 tensors costs ~1 ms an example to write.
            'image': tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'captions': tfds.features.Tensor(shape=(CAPTIONS_PER_IMAGE,),
                                             dtype=np.object_),
            'scene': tfds.features.Text(),
            'id': tfds.features.Scalar(dtype=np.int64),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: everything is generated.
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'validation': self._generate_examples('validation', c.num_validation),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split: str, count: int):
    c = self.builder_config
    render = functools.partial(shapes.example, c.seed, split, size=c.image_size,
                               captions_per_image=CAPTIONS_PER_IMAGE)
    for i, ex in enumerate(generate.ordered_map(render, count)):
      yield i, {'image': ex['image'], 'captions': ex['captions'],
                'scene': json.dumps(ex['scene'].to_json()), 'id': i}


def prepare(data_dir: str | None, **params) -> CapjaxShapes:
  """Generates the data set once (a no-op when it is already on disk); `params` are
  `generate.generated_config`'s."""
  return generate.prepare(CapjaxShapes, data_dir, **params)
