"""grain pipelines: shuffle, pick/tokenise captions, batch, shard per process.

Random-access `MapDataset`s all the way to the batch, so the iterator state is one
integer and a restored run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError


def _text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def caption_train_dataset(source: Sequence[dict], vocab: Vocabulary, *,
                          batch_size: int, caption_length: int, seed: int,
                          image_fn: Callable[[Any], np.ndarray] | None = None
                          ) -> grain.MapDataset:
  """Endless shuffled training batches of {'image', 'tokens'} for this process.

  Each time an image is seen, one of its reference captions is drawn at random
  (seeded by the element index, so the draw is reproducible).
  `batch_size` is the global batch; each process gets its own slice of it.
  """
  local_batch = _local_batch_size(batch_size)

  def pick(example, rng: np.random.Generator):
    captions = example['captions']
    caption = _text(captions[rng.integers(len(captions))])
    image = example['image'] if image_fn is None else image_fn(example)
    return {'image': image, 'tokens': vocab.encode(caption, caption_length)}

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(pick)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch, drop_remainder=True)


def caption_eval_dataset(source: Sequence[dict], vocab: Vocabulary, *,
                         batch_size: int, caption_length: int,
                         image_fn: Callable[[Any], np.ndarray] | None = None
                         ) -> grain.MapDataset:
  """One ordered pass over `source`, padded to whole batches.

  Every reference caption is tokenised (`tokens` is B x refs x L) so that loss and
  token accuracy average over all references; `valid` marks real (unpadded) rows.
  """
  local_batch = _local_batch_size(batch_size)

  def prep(index_and_example):
    index, example = index_and_example
    image = example['image'] if image_fn is None else image_fn(example)
    tokens = np.stack([vocab.encode(_text(c), caption_length)
                       for c in example['captions']])
    return {'image': image, 'tokens': tokens, 'index': np.int64(index), 'valid': True}

  n = len(source)
  padded = -(-n // batch_size) * batch_size
  ds = grain.MapDataset.range(padded).map(lambda i: (i % n, source[i % n]))
  ds = ds.map(prep)
  ds = ds.map_with_index(lambda i, ex: {**ex, 'valid': i < n})
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch)


def _local_batch_size(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise UserError(f'config.train.batch_size={batch_size} must be divisible by the '
                     f'number of processes ({jax.process_count()}).')
  return batch_size // jax.process_count()


def iterate(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator that prepares batches on background threads."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))
