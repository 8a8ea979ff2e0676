"""Classification preprocessing: determinism, shapes/dtypes, normalisation, augmentations."""
import ml_collections
import numpy as np
import pytest

from capjax.data import classify_pipeline as cp


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


def test_crops_keep_or_set_the_size_and_stay_inside_the_padded_image():
  rng = np.random.default_rng(0)
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  crop = cp.random_crop_with_padding(image, rng, 2)
  assert crop.shape == (8, 8, 3)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode='reflect')
  assert any(np.array_equal(crop, padded[y:y + 8, x:x + 8])
             for y in range(5) for x in range(5))
  assert cp.random_resized_crop(image, rng, 5).shape == (5, 5, 3)
  assert cp.random_resized_crop(image, rng, 16).dtype == np.uint8


def test_flip_only_mirrors_and_jitter_stays_in_pixel_range():
  image = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  aug = _aug(crop='none', brightness=0.0, contrast=0.0, saturation=0.0)
  outs = [cp.augment(image, np.random.default_rng(s), aug, 6) for s in range(20)]
  assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
  assert any(np.array_equal(o, image[:, ::-1]) for o in outs)
  jittered = cp.colour_jitter(image.astype(np.float32) * 1.5, np.random.default_rng(1),
                              0.5, 0.5, 0.5)
  assert jittered.min() >= 0 and jittered.max() <= 255


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
def test_size_schedule_rejects_bad_fractions_and_sizes(bad):
  with pytest.raises(cp.UserError, match='progressive_sizes'):
    cp.size_schedule(bad, image_size=12, total_steps=8)


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
