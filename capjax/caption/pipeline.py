"""Captioning's grain pipelines: shuffle, pick/tokenise captions, decode/flip images, batch,
shard per process.

Random-access `MapDataset`s all the way to the batch, so the iterator state is one
integer and a restored run sees exactly the batches it would have seen.

A source yields {'image' (uint8 pixels or encoded bytes) | 'features', 'captions', ...};
`image_fn` turns an example into the model input (e.g. decodes and resizes the bytes with
`capjax.data.images.load_image`), and `input_key` names it in the batch ('image', or 'features'
for a frozen encoder's cached features).
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
from absl import logging

from capjax.data.images import load_image, resize_image
from capjax.data.loading import local_batch_size, text
from capjax.data.tokenizer import SPECIALS, Vocabulary, normalize


def random_resized_crop(image: np.ndarray, rng: np.random.Generator,
                        min_area: float) -> np.ndarray:
  """A crop of `min_area`..1 of the image's area, of aspect ratio 3/4..4/3 (log-uniform),
  resized back to the image's size: Inception's scale augmentation, mild enough that the
  objects a caption names mostly stay in view."""
  h, w = image.shape[:2]
  area = rng.uniform(min_area, 1.0) * h * w
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  ch = int(round(min(h, np.sqrt(area / aspect))))
  cw = int(round(min(w, np.sqrt(area * aspect))))
  y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
  return resize_image(np.ascontiguousarray(image[y:y + ch, x:x + cw]), (h, w))


def augmenter(*, flip: bool = False, crop_min_area: float = 1.0
              ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
  """(image, rng) -> the training view of a uint8 image: a random resized crop when
  `crop_min_area` < 1, then mirrored left-right half of the time with `flip`."""

  def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if crop_min_area < 1.0:
      x = random_resized_crop(x, rng, crop_min_area)
    if flip and rng.random() < 0.5:
      x = np.ascontiguousarray(x[:, ::-1])
    return x

  return augment


def concept_targets(captions: Sequence, vocab: Vocabulary) -> np.ndarray:
  """Multi-hot float32 (len(vocab),): the words of all an image's reference captions, the
  targets of the encoder's concept head (`Captioner.concepts`). Special tokens and <unk>
  are never targets."""
  hot = np.zeros(len(vocab), np.float32)
  for caption in captions:
    hot[[vocab.ids.get(w, vocab.unk_id) for w in normalize(text(caption))]] = 1.0
  hot[:len(SPECIALS)] = 0.0
  return hot


def caption_train_dataset(source: Sequence[dict], vocab: Vocabulary, *,
                          batch_size: int, caption_length: int, seed: int,
                          image_fn: Callable[[Any], np.ndarray] | None = None,
                          input_key: str = 'image', flip: bool = False,
                          crop_min_area: float = 1.0, concepts: bool = False
                          ) -> grain.MapDataset:
  """Endless shuffled training batches of {input_key, 'tokens'} for this process.

  Each time an image is seen, one of its reference captions is drawn at random
  (seeded by the element index, so the draw is reproducible); images (never cached
  features) are augmented as `augmenter(flip=, crop_min_area=)` says. With `concepts`, each
  example also carries 'concepts', the multi-hot of its references' words.
  `batch_size` is the global batch; each process gets its own slice of it.
  """
  local_batch = local_batch_size(batch_size)
  augment = augmenter(flip=flip, crop_min_area=crop_min_area)

  def pick(example, rng: np.random.Generator):
    captions = example['captions']
    caption = text(captions[rng.integers(len(captions))])
    x = example[input_key] if image_fn is None else image_fn(example)
    if input_key == 'image':
      x = augment(x, rng)
    out = {input_key: x, 'tokens': vocab.encode(caption, caption_length)}
    if concepts:
      out['concepts'] = concept_targets(captions, vocab)
    return out

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(pick)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch, drop_remainder=True)


def caption_scst_dataset(source: Sequence[dict], *, batch_size: int, seed: int,
                         image_fn: Callable[[Any], np.ndarray] | None = None,
                         input_key: str = 'image', flip: bool = False,
                         crop_min_area: float = 1.0) -> grain.MapDataset:
  """Endless shuffled batches of {input_key, 'index'} for self-critical training: no caption,
  only each image's index in `source`, by which the host scores the captions sampled for it
  against all its references. Images are augmented as `caption_train_dataset` does.
  """
  local_batch = local_batch_size(batch_size)
  augment = augmenter(flip=flip, crop_min_area=crop_min_area)

  def load(index, rng: np.random.Generator):
    example = source[index]
    x = example[input_key] if image_fn is None else image_fn(example)
    if input_key == 'image':
      x = augment(x, rng)
    return {input_key: x, 'index': np.int32(index)}

  ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(load)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch, drop_remainder=True)


def caption_eval_dataset(source: Sequence[dict], vocab: Vocabulary, *,
                         batch_size: int, caption_length: int,
                         image_fn: Callable[[Any], np.ndarray] | None = None,
                         input_key: str = 'image', max_refs: int | None = None
                         ) -> grain.MapDataset:
  """One ordered pass over `source`, padded to whole batches.

  Every reference caption is tokenised (`tokens` is B x refs x L) so that loss and
  token accuracy average over all references; `valid` marks real (unpadded) rows. Images
  with fewer than `max_refs` references (COCO has 5 to 7) get all-<pad> rows, which the
  loss masks out; by default every image must have as many as the first.
  """
  local_batch = local_batch_size(batch_size)

  def prep(index_and_example):
    index, example = index_and_example
    x = example[input_key] if image_fn is None else image_fn(example)
    tokens = np.stack([vocab.encode(text(c), caption_length)
                       for c in example['captions']])
    if max_refs is not None:
      tokens = np.pad(tokens[:max_refs], ((0, max(max_refs - len(tokens), 0)), (0, 0)))
    return {input_key: x, 'tokens': tokens, 'index': np.int64(index), 'valid': True}

  n = len(source)
  padded = -(-n // batch_size) * batch_size
  ds = grain.MapDataset.range(padded).map(lambda i: (i % n, source[i % n]))
  ds = ds.map(prep)
  ds = ds.map_with_index(lambda i, ex: {**ex, 'valid': i < n})
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch)


def image_decoder(size: int) -> Callable[[dict], np.ndarray]:
  """example -> uint8 size x size x 3: decodes example['image'] bytes, or resizes pixels."""

  def decode(example: dict) -> np.ndarray:
    image = example['image']
    if isinstance(image, (bytes, bytearray, memoryview)):
      return load_image(image, size=size, name=text(example.get('id', '<image>')))
    image = np.asarray(image, np.uint8)
    if image.shape[:2] != (size, size):
      from capjax.data.images import resize_image  # pylint: disable=import-outside-toplevel
      image = resize_image(image, size)
    return image

  return decode


class DecodedSource:
  """A split held in memory with its images decoded once: {'image', 'captions', 'id'}."""

  def __init__(self, images: np.ndarray, captions: Sequence, ids: Sequence[str]):
    self.images, self.captions, self.ids = images, list(captions), list(ids)

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> dict:
    return {'image': self.images[i], 'captions': self.captions[i], 'id': self.ids[i]}


def decode_in_memory(source: Sequence[dict], size: int, threads: int = 4) -> DecodedSource:
  """Decodes every image of `source` once (small data sets: Flickr8k at 128 px is ~350 MB),
  so training epochs never decode a JPEG again."""
  decode = image_decoder(size)
  n = len(source)
  images = np.zeros((n, size, size, 3), np.uint8)
  captions, ids = [None] * n, [None] * n

  def one(i):
    example = source[i]
    images[i] = decode(example)
    captions[i] = [text(c) for c in example['captions']]
    ids[i] = text(example.get('id', str(i)))

  # Pillow releases the GIL while decoding, so threads overlap reading and decoding.
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(one, range(n)))
  logging.info('Decoded %d images at %dx%d into memory (%.0f MB).', n, size, size,
               images.nbytes / 2**20)
  return DecodedSource(images, captions, ids)
