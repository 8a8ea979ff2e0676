"""Classification's grain pipelines: augment, normalise, batch, shard per process.

Everything random happens in `random_map`s, whose numpy Generator grain seeds from the
dataset seed and the element's position: a batch is a pure function of (seed, step), the
iterator state is one integer, and a resumed run sees exactly the batches it would have.

Images are stored as uint8 at `image_size`. Each image's random draws are made per element;
the crops, flips and colour jitter they describe run on the whole batch at once (uint8, then
float32), which then is normalised with per-channel statistics of the training split
(`channel_stats`), so the model always sees float32 inputs with ~zero mean and unit
variance per channel.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from capjax.data import loading
from capjax.data.loading import local_batch_size
from capjax.errors import UserError

# ITU-R 601 luma weights, for the greyscale used by contrast and saturation jitter.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class ArraySource:
  """A split held in memory: uint8 images N x H x W x 3 and int64 labels N.

  Reading an element costs microseconds instead of the ~200 us of an array_record read plus
  TFDS decoding, CPU time that a 2-core machine would otherwise take from training.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    return {'image': self.images[i], 'label': self.labels[i]}


def load_in_memory(source: Sequence[dict]) -> ArraySource:
  """Reads a whole split into an ArraySource."""
  pairs = list(loading.read_all(source, lambda i, e: (np.asarray(e['image'], np.uint8),
                                                      int(e['label'])), chunk=1024))
  if not pairs:
    return ArraySource(np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64))
  images, labels = zip(*pairs)
  return ArraySource(np.stack(images), np.asarray(labels, np.int64))


def channel_stats(source: Sequence[dict], max_images: int = 10000) -> tuple[np.ndarray,
                                                                         np.ndarray]:
  """Per-channel (mean, std) of the pixels (0-255 scale) of up to `max_images` images.

  Images are taken evenly spaced over `source` (all of them when it is small enough), so the
  statistics are deterministic and cover every class of a class-sorted split.
  """
  n = len(source)
  if n == 0:
    raise UserError('The training split is empty, so no normalisation statistics can be '
                    'computed; check the dataset root and split settings.')
  idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
  total = np.zeros(3, np.float64)
  total_sq = np.zeros(3, np.float64)
  count = 0
  for start in range(0, len(idx), 256):
    chunk = idx[start:start + 256]
    if isinstance(source, ArraySource):
      images = source.images[chunk]
    else:
      images = np.stack([np.asarray(source[int(i)]['image']) for i in chunk])
    pixels = images.reshape(-1, 3).astype(np.float64)
    total += pixels.sum(0)
    total_sq += (pixels * pixels).sum(0)
    count += pixels.shape[0]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
  # A constant channel (e.g. a greyscale-only data set's colour spread) must not divide by 0.
  return mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 HxWx3 image to size x size."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
  """Indices into [0, n) mirrored at the edges like np.pad(mode='reflect'); |pad| < n."""
  idx = np.abs(idx)
  return np.where(idx >= n, 2 * (n - 1) - idx, idx)


def shift_crop(images_BxHxWx3: np.ndarray, shifts_Bx2: np.ndarray,
               flips_B: np.ndarray | None = None) -> np.ndarray:
  """Each image shifted by (dy, dx), its edges reflect-padded, mirrored where `flips_B`.

  Image b is the crop at (pad + dy, pad + dx) of the image reflect-padded by pad >= |dy|,
  |dx| (np.pad mode='reflect'). One gather does the batch's crops and flips together.
  """
  b, h, w = images_BxHxWx3.shape[:3]
  rows = _reflect(np.arange(h)[None, :] + shifts_Bx2[:, :1], h)
  cols = _reflect(np.arange(w)[None, :] + shifts_Bx2[:, 1:], w)
  if flips_B is not None:
    cols = np.where(flips_B[:, None], cols[:, ::-1], cols)
  return images_BxHxWx3[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.35, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop: a box of `scale` x the area and aspect in `ratio`, resized.

  Falls back to the whole image when no box fits after 10 tries (as torchvision does).
  """
  h, w = image.shape[:2]
  log_ratio = np.log(np.asarray(ratio, np.float64))
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      return resize(np.ascontiguousarray(image[y:y + ch, x:x + cw]), size)
  return resize(image, size)


def jitter_factors(rng: np.random.Generator, brightness: float, contrast: float,
                   saturation: float) -> np.ndarray:
  """Random brightness, contrast and saturation factors, each in [1 - s, 1 + s] (1 if s = 0)."""
  return np.array([rng.uniform(1 - x, 1 + x) if x else 1.0
                   for x in (brightness, contrast, saturation)], np.float64)


def colour_jitter(x_BxHxWx3: np.ndarray, factors_Bx3: np.ndarray) -> np.ndarray:
  """Brightness, contrast and saturation (float 0-255 images, `jitter_factors` per image).

  Applied in that order (contrast pivots on the mean grey level, saturation on each pixel's
  grey level); the three are linear, so they are folded into one 3x3 matrix and an offset
  per image and each image is touched once.
  """
  if np.all(factors_Bx3 == 1.0):
    return x_BxHxWx3
  b, c, s = factors_Bx3.T  # Each B, float64.
  pixels_BxPx3 = x_BxHxWx3.reshape(len(x_BxHxWx3), -1, 3)
  mean_grey = b * (pixels_BxPx3.mean(1) @ _LUMA)
  # Saturation: y -> s y + (1 - s) grey(y) = y @ (s I + (1 - s) L 1^T).
  per_image = lambda v: v[:, None, None]
  sat_Bx3x3 = (per_image(s) * np.eye(3, dtype=np.float32)
               + per_image(1 - s) * np.outer(_LUMA, np.ones(3, np.float32)))
  # The luma weights sum to 1, so the contrast offset passes saturation unchanged.
  offset = per_image((1 - c) * mean_grey).astype(np.float32)
  out = pixels_BxPx3 @ (per_image(c * b) * sat_Bx3x3).astype(np.float32) + offset
  return np.clip(out, 0.0, 255.0).reshape(x_BxHxWx3.shape)


def normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  return ((np.asarray(image, np.float32) - mean) / std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Augment:
  """config.augment as plain attributes: ConfigDict lookups cost ~2 us each, per image."""
  crop: str = 'pad'
  crop_padding: int = 4
  crop_scale: tuple = (0.35, 1.0)
  flip: bool = True
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0

  @classmethod
  def from_config(cls, aug) -> 'Augment':
    """config.augment, whose fields and values classify.config.validate has checked."""
    if isinstance(aug, cls):
      return aug
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})


def draw_augment(image: np.ndarray, rng: np.random.Generator, aug: Augment, image_size: int,
                 stored_size: int | None = None) -> dict:
  """One image's share of the training transform: its resize or resized crop, and every random
  draw of `apply_augment` (shift, flip, jitter factors).

  `stored_size` is the size crop_padding is given for (default `image_size`): a smaller
  `image_size` (progressive resizing) pads proportionally less, so the shifts stay the
  same fraction of the image.
  """
  shift = np.zeros(2, np.int32)
  if aug.crop == 'pad':
    image = resize(image, image_size)
    pad = aug.crop_padding * image_size // (stored_size or image_size)
    if pad > 0:
      shift = (rng.integers(0, 2 * pad + 1, size=2) - pad).astype(np.int32)
  elif aug.crop == 'resized':
    image = random_resized_crop(image, rng, image_size, aug.crop_scale)
  else:
    image = resize(image, image_size)
  flip = np.bool_(aug.flip and rng.uniform() < 0.5)
  return {'image': image, 'shift': shift, 'flip': flip,
          'jitter': jitter_factors(rng, aug.brightness, aug.contrast, aug.saturation)}


def apply_augment(drawn: dict) -> np.ndarray:
  """A batch of `draw_augment` results -> float32 0-255 images B x H x W x 3.

  Per batch rather than per image: one at a time, a 32x32 image's crop and jitter took ~250 us,
  and the default config's loader went from 25.8 to 58.2 batches/s of 64 by batching them
  (2026-12-02, 2-core CPU), which matters when two cores both train and feed the model.
  """
  images = shift_crop(drawn['image'], drawn['shift'], drawn['flip'])
  return colour_jitter(images.astype(np.float32), drawn['jitter'])


def augment(image: np.ndarray, rng: np.random.Generator, aug: Augment, image_size: int,
            stored_size: int | None = None) -> np.ndarray:
  """The training transform of one uint8 image, as float32 0-255, per config.augment."""
  drawn = draw_augment(image, rng, aug, image_size, stored_size)
  return apply_augment({k: np.asarray(v)[None] for k, v in drawn.items()})[0]


def mix_batch(batch: dict, rng: np.random.Generator, mixup_alpha: float,
              cutmix_alpha: float) -> dict:
  """Mixup or CutMix (one of them, chosen at random when both are on) of a whole batch.

  Each image is mixed with the batch's reversed order; 'label_b' is the partner's label and
  'mix' the weight of 'label' (the area kept, for CutMix), so the loss is
  mix * CE(label) + (1 - mix) * CE(label_b).
  """
  x, labels = batch['image'], batch['label']
  n = len(labels)
  use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.uniform() < 0.5)
  alpha = cutmix_alpha if use_cutmix else mixup_alpha
  lam = float(rng.beta(alpha, alpha))
  if use_cutmix:
    h, w = x.shape[1:3]
    ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.copy()
    x[:, y0:y1, x0:x1] = batch['image'][::-1, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  else:
    x = (lam * x + (1 - lam) * x[::-1]).astype(np.float32)
  return {**batch, 'image': x, 'label_b': labels[::-1].copy(),
          'mix': np.full((n,), lam, np.float32)}


def size_schedule(progressive_sizes: Sequence[Sequence[float]], image_size: int,
                  total_steps: int) -> Callable[[int], int]:
  """step -> training image size, from config.data.progressive_sizes.

  `progressive_sizes` holds (start_fraction, size) pairs, fractions of `total_steps` in
  ascending order from 0: e.g. ((0, 40), (0.5, 48), (0.85, 64)) trains the first half at
  40 px, then 48, and the last 15% at 64. Empty: `image_size` throughout. Small images early
  and full-size ones at the end (as fast.ai's and FFCV's fast ImageNet recipes) buy more
  epochs in a time budget; the model sees the evaluation size before it is evaluated.
  """
  if not progressive_sizes:
    return lambda step: image_size
  starts = [float(f) for f, _ in progressive_sizes]
  sizes = [int(z) for _, z in progressive_sizes]
  bounds = [round(f * total_steps) for f in starts]
  return lambda step: sizes[bisect.bisect_right(bounds, step) - 1]


def train_dataset(source: Sequence[dict], *, batch_size: int, seed: int, image_size: int,
                  mean: np.ndarray, std: np.ndarray, aug,
                  size_at_step: Callable[[int], int] | None = None) -> grain.MapDataset:
  """Endless shuffled, augmented, normalised batches {'image', 'label'[, 'label_b', 'mix']}.

  `batch_size` is the global batch; each process gets its own slice. `aug` is
  config.augment. With mixup/cutmix on, every batch also carries 'label_b' and 'mix'
  (see `mix_batch`), so the train step's inputs have the same structure every step.
  `size_at_step` (see `size_schedule`) gives each step's image size; default `image_size`.
  """
  local_batch = local_batch_size(batch_size)
  aug = Augment.from_config(aug)
  size_at_step = size_at_step or (lambda step: image_size)

  def draw(position_and_example, rng: np.random.Generator):
    # Global element i belongs to global batch i // batch_size on every process.
    position, example = position_and_example
    size = size_at_step(position // batch_size)
    drawn = draw_augment(np.asarray(example['image']), rng, aug, size, stored_size=image_size)
    return {**drawn, 'label': np.int32(example['label'])}

  def finish(batch):
    images = apply_augment(batch)
    return {'image': normalise(images, mean, std), 'label': batch['label']}

  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.map_with_index(lambda i, example: (i, example)).random_map(draw)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.batch(local_batch, drop_remainder=True).map(finish)
  if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
    ds = ds.random_map(lambda b, rng: mix_batch(b, rng, aug.mixup_alpha, aug.cutmix_alpha))
  return ds


def eval_transform(image: np.ndarray, image_size: int, mean: np.ndarray,
                   std: np.ndarray) -> np.ndarray:
  """What evaluation and prediction do to a uint8 image: resize and normalise."""
  return normalise(resize(np.asarray(image), image_size), mean, std)


def eval_dataset(source: Sequence[dict], *, batch_size: int, image_size: int,
                 mean: np.ndarray, std: np.ndarray) -> grain.MapDataset:
  """One ordered pass over `source`, padded to whole batches.

  Batches are {'image', 'label', 'index', 'valid'}; 'valid' is False on the padding rows
  (repeats of the first examples), which metrics must leave out.
  """
  local_batch = local_batch_size(batch_size)
  n = len(source)
  padded = -(-n // batch_size) * batch_size

  def prep(i: int):
    example = source[i % n]
    return {'image': eval_transform(example['image'], image_size, mean, std),
            'label': np.int32(example['label']), 'index': np.int64(i % n),
            'valid': np.bool_(i < n)}

  ds = grain.MapDataset.range(padded).map(prep)
  ds = ds[jax.process_index()::jax.process_count()]
  return ds.batch(local_batch)
