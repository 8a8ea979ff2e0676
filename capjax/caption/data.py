"""The captioning task's data: prepared splits, vocabulary, and what each split feeds the model.

A split reaches the model in one of three ways (`split_inputs`):
  shapes         uint8 pixels straight from the generated TFDS data set
  real images    the prepared encoded bytes, decoded at config.data.image_size (all at once into
                 memory when config.data.in_memory, else in the grain map)
  cached features  a frozen encoder (config.optim.encoder_lr_scale == 0) runs once per split
                 into the HDF5 cache (capjax.data.features); training then reads feature rows
                 and never decodes an image
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from capjax.caption import pipeline
from capjax.data import caption_tfds, features, loading, shapes_tfds
from capjax.data.tokenizer import Vocabulary
from capjax.tasks import Splits


@dataclasses.dataclass
class SplitInputs:
  """What one split feeds the model.

  Attributes:
    source: random access to {input_key or 'image', 'captions', ...}.
    input_key: 'image' (pixels or encoded bytes, through `image_fn`) or 'features' (cached).
    image_fn: example -> uint8 image, when the source's images need decoding.
    image: index -> uint8 image, for figures (samples, attention maps).
    max_refs: references per image in eval batches (images with fewer get padding rows).
  """
  source: Sequence[dict]
  input_key: str = 'image'
  image_fn: Optional[Callable[[Any], np.ndarray]] = None
  image: Optional[Callable[[int], np.ndarray]] = None
  max_refs: Optional[int] = None

  def eval_dataset(self, vocab: Vocabulary, *, batch_size: int, caption_length: int):
    return pipeline.caption_eval_dataset(
        self.source, vocab, batch_size=batch_size, caption_length=caption_length,
        image_fn=self.image_fn, input_key=self.input_key, max_refs=self.max_refs)


VOCAB_FILE = 'vocab.json'


def needed_splits(config) -> list[str]:
  """train, validation and config.eval.split: what a run reads."""
  return list(dict.fromkeys(['train', 'validation', config.eval.split]))


def load_splits(config, splits: Sequence[str] | None = None) -> Splits:
  """The random-access source of each split of config.dataset; `splits` default to
  `needed_splits`.

  Real data sets prepare each split on its own, so a run that never touches 'test' does not
  need the test images (Flickr8k's are withheld here, as in a partial download).
  """
  splits = needed_splits(config) if splits is None else splits
  if config.dataset == 'shapes':
    s = config.shapes
    builder = shapes_tfds.prepare(config.tfds_dir, image_size=s.image_size,
                                  num_train=s.num_train, num_validation=s.num_validation,
                                  num_test=s.num_test, seed=s.seed)
    sources = builder.as_data_source()
    return Splits({split: sources[split] for split in splits})
  args = caption_tfds.reader_args(config)
  return Splits({split: caption_tfds.load_split(config.tfds_dir, config.dataset, config.data_dir,
                                                split, **args)[0] for split in splits})


def split_name(source) -> str:
  """A name for a prepared split's contents (its TFDS config name hashes the records)."""
  info = getattr(source, 'dataset_info', None)
  if info is not None and getattr(info, 'config_name', None):
    return f'{info.name}/{info.config_name}'
  return repr(source)


def read_captions(source) -> list[list[str]]:
  """Every example's reference captions, as str, in order (images are not decoded)."""
  return list(loading.read_all(source, lambda i, e: [loading.text(c) for c in e['captions']]))


def read_ids(source) -> list[str]:
  """Every example's id, as str, in order (its index where it has none)."""
  return list(loading.read_all(source, lambda i, e: loading.text(e.get('id', str(i)))))


def vocabulary(config, workdir: str, train_captions: Sequence[Sequence[str]]) -> Vocabulary:
  """The workdir's vocabulary if it has one (a resumed run must keep its ids), else one built
  from the training captions and not yet saved (`save_vocabulary`)."""
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    return Vocabulary.load(path)
  return Vocabulary.build((c for caps in train_captions for c in caps),
                          min_freq=config.vocab.min_freq, max_size=config.vocab.max_size)


def vocabulary_fingerprint(vocab: Vocabulary) -> dict:
  """What identifies a vocabulary in a checkpoint: its size and a hash of its words."""
  digest = hashlib.sha256('\n'.join(vocab.words).encode()).hexdigest()[:16]
  return {'words': len(vocab), 'sha256': digest}


def save_vocabulary(workdir: str, vocab: Vocabulary) -> None:
  """Writes the workdir's vocab.json unless it has one."""
  path = os.path.join(workdir, VOCAB_FILE)
  if jax.process_index() == 0 and not os.path.exists(path):
    vocab.save(path)


def image_size(config) -> int:
  """The square side images are fed at."""
  if config.dataset == 'shapes':
    return int(config.shapes.image_size)
  return int(config.data.image_size)


def uses_feature_cache(config) -> bool:
  """A frozen encoder (encoder_lr_scale == 0) runs once per split, into the cache."""
  return float(config.optim.get('encoder_lr_scale', 1.0)) == 0.0


def needs_grid(config) -> bool:
  """Whether the decoder reads the feature grid (attention, flatten-inject) or a mean vector."""
  m = config.model
  return m.decoder == 'attention' or (m.decoder == 'inject' and m.pool == 'flatten')


def cache_dir(config) -> str:
  if config.get('features_dir'):
    return os.path.expanduser(config.features_dir)
  base = config.tfds_dir or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')
  return os.path.join(base, 'capjax_features')


def feature_encoder(encoder, encoder_variables: dict, pooled: bool) -> Callable:
  """jit(uint8 images) -> features; run in inference mode (BatchNorm running averages)."""

  @jax.jit
  def encode(images):
    x = encoder.apply(encoder_variables, images, train=False)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) if pooled else x

  return encode


def split_inputs(config, split: str, source, *, encode: Callable | None = None,
                 weights_id: str | None = None, encoder_name: str | None = None
                 ) -> SplitInputs:
  """What `split` feeds the model: pixels, decoded images, or cached features.

  `encode` (from `feature_encoder`) and `weights_id` are needed with a frozen encoder; one
  `encode` serves every split, so it is compiled once. `encoder_name` names the encoder in the
  cache key (default config.model.encoder).
  """
  size = image_size(config)
  if config.dataset == 'shapes' and not uses_feature_cache(config):
    return SplitInputs(source=source, image=lambda i: np.asarray(source[i]['image']))
  decode = pipeline.image_decoder(size)
  if uses_feature_cache(config):
    pooled = not needs_grid(config)
    key = features.cache_key(dataset=config.dataset, split=split, records=split_name(source),
                             encoder=encoder_name or config.model.encoder, weights=weights_id,
                             image_size=size, pooled=pooled)
    path = features.ensure(cache_dir(config), key, read_ids(source),
                           lambda i: decode(source[i]), encode,
                           batch_size=int(config.data.get('feature_batch_size', 32)))
    feature_source = features.FeatureSource(path, read_captions(source), read_ids(source))
    return SplitInputs(source=feature_source, input_key='features',
                       image=lambda i: decode(source[i]), max_refs=_max_refs(feature_source))
  if config.data.get('in_memory', True):
    decoded = pipeline.decode_in_memory(source, size)
    return SplitInputs(source=decoded, image=lambda i: decoded.images[i],
                       max_refs=max(len(c) for c in decoded.captions))
  return SplitInputs(source=source, image_fn=decode, image=lambda i: decode(source[i]),
                     max_refs=max(len(c) for c in read_captions(source)))


def _max_refs(source) -> int:
  return max(len(c) for c in source.captions)


def log_sizes(vocab: Vocabulary, sources: dict) -> None:
  logging.info('Vocabulary: %d words; %s.', len(vocab),
               ', '.join(f'{k} {len(v)} images' for k, v in sources.items()))
