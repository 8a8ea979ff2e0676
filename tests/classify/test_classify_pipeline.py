"""Classification preprocessing: determinism, shapes/dtypes, normalisation, augmentations."""
import ml_collections
import numpy as np
import pytest

from capjax.classify import pipeline as cp
from capjax.classify.config import check_progressive_sizes
from capjax.errors import UserError


def _source(n=40, size=12, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
           'label': np.int64(i % 5)} for i in range(n)]


def _aug(**overrides):
  aug = dict(crop='pad', crop_padding=2, crop_scale=(0.35, 1.0), flip=True, brightness=0.2,
             contrast=0.2, saturation=0.2, mixup_alpha=0.0, cutmix_alpha=0.0)
  aug.update(overrides)
  return ml_collections.ConfigDict(aug)


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


STATS = (np.array([100, 110, 120], np.float32), np.array([50, 60, 70], np.float32))


@pytest.mark.parametrize('crop', ['pad', 'resized', 'none'])
def test_train_batches_are_deterministic_given_the_seed_with_fixed_shapes(crop):
  src = _source()
  make = lambda seed: cp.train_dataset(src, batch_size=8, seed=seed, image_size=10,
                                       mean=STATS[0], std=STATS[1], aug=_aug(crop=crop))
  a, b, c = _batches(make(1), 3), _batches(make(1), 3), _batches(make(2), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert a[0]['image'].shape == (8, 10, 10, 3) and a[0]['image'].dtype == np.float32
  assert a[0]['label'].shape == (8,) and a[0]['label'].dtype == np.int32
  # Random access: element 2 of a fresh dataset is batch 2 of the iteration (exact resume).
  np.testing.assert_array_equal(make(1)[2]['image'], a[2]['image'])


def test_channel_stats_match_numpy_over_the_training_images():
  src = _source(n=30)
  mean, std = cp.channel_stats(src)
  pixels = np.stack([e['image'] for e in src]).reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)
  sub_mean, _ = cp.channel_stats(src, max_images=3)  # Evenly spaced: images 0, 14, 29.
  np.testing.assert_allclose(
      sub_mean, np.stack([src[i]['image'] for i in (0, 14, 29)]).reshape(-1, 3).mean(0),
      rtol=1e-5)


def test_eval_images_normalised_with_train_stats_have_zero_mean_unit_std():
  src = _source(n=20)
  mean, std = cp.channel_stats(src)
  ds = cp.eval_dataset(src, batch_size=8, image_size=12, mean=mean, std=std)
  batches = list(ds)
  valid = np.concatenate([b['valid'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])[valid]
  np.testing.assert_allclose(images.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(images.reshape(-1, 3).std(0), 1.0, atol=1e-4)
  # Padded to whole batches; every example once among the valid rows, in order.
  assert len(batches) == 3 and valid.sum() == 20 and valid.dtype == bool
  assert np.concatenate([b['index'] for b in batches])[valid].tolist() == list(range(20))


def test_shift_crops_are_windows_of_the_reflect_padded_image_and_flips_mirror_them():
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  shifts = np.array([[-2, 1], [0, 0], [2, -2], [1, 2]], np.int32)
  flips = np.array([False, True, True, False])
  crops = cp.shift_crop(images, shifts, flips)
  for image, (dy, dx), flip, crop in zip(images, shifts, flips, crops):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode='reflect')
    window = padded[2 + dy:10 + dy, 2 + dx:10 + dx]
    np.testing.assert_array_equal(crop, window[:, ::-1] if flip else window)
  rng = np.random.default_rng(0)
  assert cp.random_resized_crop(images[0], rng, 5).shape == (5, 5, 3)
  assert cp.random_resized_crop(images[0], rng, 16).dtype == np.uint8


def _jitter_reference(x, b, c, s):
  """Brightness, then contrast about the mean grey, then saturation about each pixel's grey."""
  grey = lambda y: (y @ cp._LUMA)[..., None]
  y = x * b
  y = c * y + (1 - c) * grey(y).mean()
  y = s * y + (1 - s) * grey(y)
  return np.clip(y, 0, 255)


def test_batched_colour_jitter_is_brightness_then_contrast_then_saturation():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (3, 5, 6, 3)).astype(np.float32)
  factors = np.array([[1.3, 0.8, 1.2], [1.0, 1.0, 1.0], [0.7, 1.4, 0.5]])
  out = cp.colour_jitter(x, factors)
  for xi, fi, oi in zip(x, factors, out):
    np.testing.assert_allclose(oi, _jitter_reference(xi, *fi), rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(out[1], x[1])  # Factors of 1 change nothing.
  assert cp.colour_jitter(x, np.ones((3, 3))) is x
  assert out.min() >= 0 and out.max() <= 255


def test_a_batch_augments_each_image_as_augment_does_alone():
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  aug = _aug(crop='pad', crop_padding=2, flip=True, brightness=0.2, contrast=0.2,
             saturation=0.2)
  drawn = [cp.draw_augment(im, np.random.default_rng(i), aug, 8) for i, im in enumerate(images)]
  batch = cp.apply_augment({k: np.stack([d[k] for d in drawn]) for k in drawn[0]})
  for i, image in enumerate(images):
    alone = cp.augment(image, np.random.default_rng(i), aug, 8)
    np.testing.assert_allclose(batch[i], alone, rtol=1e-6, atol=1e-4)
    d = drawn[i]
    crop = cp.shift_crop(image[None], d['shift'][None], d['flip'][None])[0]
    np.testing.assert_allclose(alone, _jitter_reference(crop.astype(np.float32), *d['jitter']),
                               rtol=1e-5, atol=1e-3)
  assert all(np.abs(d['shift']).max() <= 2 for d in drawn)


def test_flip_only_mirrors():
  image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  aug = _aug(crop='none', brightness=0.0, contrast=0.0, saturation=0.0)
  outs = [cp.augment(image, np.random.default_rng(s), aug, 6) for s in range(20)]
  assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
  assert any(np.array_equal(o, image[:, ::-1]) for o in outs)


@pytest.mark.parametrize('mixup,cutmix', [(0.4, 0.0), (0.0, 1.0)])
def test_mixed_batches_carry_partner_labels_and_weights(mixup, cutmix):
  src = _source()
  ds = cp.train_dataset(src, batch_size=8, seed=0, image_size=12, mean=STATS[0],
                        std=STATS[1], aug=_aug(crop='none', mixup_alpha=mixup,
                                               cutmix_alpha=cutmix))
  batch = ds[0]
  np.testing.assert_array_equal(batch['label_b'], batch['label'][::-1])
  assert batch['mix'].shape == (8,) and 0.0 <= batch['mix'][0] <= 1.0
  assert batch['image'].shape == (8, 12, 12, 3) and batch['image'].dtype == np.float32
  np.testing.assert_array_equal(ds[0]['image'], batch['image'])


def test_size_schedule_switches_at_the_start_fractions():
  at = cp.size_schedule(((0, 8), (0.5, 10), (0.75, 12)), image_size=12, total_steps=8)
  assert [at(s) for s in range(9)] == [8, 8, 8, 8, 10, 10, 12, 12, 12]
  assert cp.size_schedule((), image_size=12, total_steps=8)(5) == 12


@pytest.mark.parametrize('bad', [((0.1, 8),), ((0, 8), (0, 10)), ((0, 8), (1.0, 12)),
                                 ((0, 4),), ((0, 16),)])
def test_progressive_sizes_with_bad_fractions_or_sizes_are_config_errors(bad):
  with pytest.raises(UserError, match='--config.data.progressive_sizes'):
    check_progressive_sizes(bad, image_size=12)


def test_progressive_batches_take_each_steps_size_and_stay_deterministic():
  src = _source()
  at = cp.size_schedule(((0, 8), (0.5, 12)), image_size=12, total_steps=4)
  make = lambda: cp.train_dataset(src, batch_size=8, seed=1, image_size=12, mean=STATS[0],
                                  std=STATS[1], aug=_aug(crop='pad'), size_at_step=at)
  batches = _batches(make(), 5)
  assert [b['image'].shape[1:3] for b in batches] == [(8, 8)] * 2 + [(12, 12)] * 3
  np.testing.assert_array_equal(make()[3]['image'], batches[3]['image'])
  # The steps at full size see what the same seed gives without a schedule.
  plain = cp.train_dataset(src, batch_size=8, seed=1, image_size=12, mean=STATS[0],
                           std=STATS[1], aug=_aug(crop='pad'))
  np.testing.assert_array_equal(plain[2]['image'], batches[2]['image'])
