"""Real caption data sets through the TFDS builders, and the frozen-encoder feature cache."""
import os

import numpy as np
import pytest

from helpers import layouts as fx
from capjax.caption import pipeline
from capjax.data import caption_tfds, features, loading
from capjax.data.reading import DataError

NAMES = fx.flickr_names(6)
TRAIN, DEV, TEST = NAMES[:3], NAMES[3:5], NAMES[5:]


def _load(tmp_path, dataset, root, split, **read):
  return caption_tfds.load_split(str(tmp_path / 'tfds'), dataset, str(root), split, **read)[0]


def _texts(example):
  return [loading.text(c) for c in example['captions']]


def test_flickr8k_official_layout_prepares_encoded_images_that_decode_at_any_size(tmp_path):
  captions = fx.make_flickr8k_official(tmp_path / 'f8k', TRAIN, DEV, TEST)
  train = _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'train')
  assert len(train) == 3
  example = train[0]
  assert isinstance(example['image'], bytes)  # Encoded: decoded in the grain map.
  assert loading.text(example['id']) == os.path.splitext(TRAIN[0])[0]
  assert _texts(example) == captions[TRAIN[0]]
  assert pipeline.image_decoder(12)(example).shape == (12, 12, 3)
  # 'validation' is the official dev split.
  validation = _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'validation')
  assert [loading.text(validation[i]['id']) for i in range(2)] == [
      os.path.splitext(n)[0] for n in DEV]


def test_flickr8k_kaggle_layout_and_coco_json_prepare_through_the_same_builder(tmp_path):
  names = fx.flickr_names(5)
  fx.make_flickr8k_kaggle(tmp_path / 'kaggle', names)
  train = _load(tmp_path, 'flickr8k', tmp_path / 'kaggle', 'train', kaggle_split_sizes=(3, 1))
  assert len(train) == 3 and _texts(train[0]) == ['a dog, running 0 "fast"',
                                                  'a dog, running 1 "fast"']
  fx.make_coco(tmp_path / 'coco', n_train=3, n_val=2)
  coco_val = _load(tmp_path, 'coco', tmp_path / 'coco', 'validation')
  assert len(coco_val) == 2
  assert _texts(coco_val[0]) == ['A photo of 500 number 0.', 'A photo of 500 number 1.']


def test_own_images_with_a_captions_csv_prepare_with_the_captions_file_relative_to_the_root(
    tmp_path):
  rows = ['image,caption']
  for i in range(10):
    fx.write_image(tmp_path / 'own' / f'img{i}.png', colour=(i * 20, 0, 0))
    rows += [f'img{i}.png,"a red square, number {i}"', f'img{i}.png,another caption {i}']
  fx.write_text(tmp_path / 'own' / 'captions.csv', '\n'.join(rows) + '\n')
  args = dict(captions_file='captions.csv', fractions=(0.8, 0.1, 0.1), seed=0)
  train = _load(tmp_path, 'own', tmp_path / 'own', 'train', **args)
  assert len(train) == 8 and len(_texts(train[0])) == 2
  with pytest.raises(DataError, match=r'--config\.own\.captions_file=PATH'):
    _load(tmp_path, 'own', tmp_path / 'own', 'train')


def test_a_split_with_missing_images_fails_in_one_sentence_unless_skipping(tmp_path):
  fx.make_flickr8k_official(tmp_path / 'f8k', TRAIN, DEV, TEST, absent=[TEST[0], TRAIN[1]])
  with pytest.raises(DataError, match=r"split 'test'.*1 of 1 images are missing.*"
                                      r"--config\.data\.skip_missing_images=True"):
    _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'test')
  with pytest.raises(DataError, match='1 of 3 images are missing'):
    _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'train')
  train = _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'train', skip_missing=True)
  assert len(train) == 2
  # A split left with no images at all is an error, not an empty data set.
  with pytest.raises(DataError, match="split 'test'.*no images"):
    _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'test', skip_missing=True)


def test_a_corrupt_image_is_skipped_while_preparing_with_a_warning(tmp_path):
  fx.make_flickr8k_official(tmp_path / 'f8k', TRAIN, DEV, TEST)
  (tmp_path / 'f8k' / 'Flicker8k_Dataset' / TRAIN[2]).write_bytes(b'\xff\xd8\xff garbage')
  train = _load(tmp_path, 'flickr8k', tmp_path / 'f8k', 'train')
  assert len(train) == 2


def test_changed_captions_prepare_a_new_copy(tmp_path):
  fx.make_flickr8k_official(tmp_path / 'f8k', TRAIN, DEV, TEST)
  first = caption_tfds.split_config('flickr8k', str(tmp_path / 'f8k'), 'train').name
  token = tmp_path / 'f8k' / 'Flickr8k_text' / 'Flickr8k.token.txt'
  token.write_text(token.read_text().replace('caption 0', 'a new caption'))
  assert caption_tfds.split_config('flickr8k', str(tmp_path / 'f8k'), 'train').name != first


# --- Feature cache --------------------------------------------------------------------------


class _Counter:
  """A fake image loader and encoder that count their calls."""

  def __init__(self, scale=1.0, fail_after=None):
    self.images = self.batches = 0
    self.scale, self.fail_after = scale, fail_after

  def load(self, i):
    self.images += 1
    return np.full((4, 4, 3), i, np.uint8)

  def encode(self, images):
    self.batches += 1
    if self.fail_after is not None and self.batches > self.fail_after:
      raise KeyboardInterrupt  # A kill in the middle of a build.
    return images.reshape(len(images), -1, 3)[:, :2].astype(np.float32) * self.scale


def _key(weights='random-init-seed0', size=4):
  return features.cache_key(dataset='flickr8k', split='train', records='r1', encoder='cnn',
                            weights=weights, image_size=size, pooled=False)


def test_feature_cache_builds_once_then_hits_and_rebuilds_when_the_key_changes(tmp_path):
  ids = [f'img{i}' for i in range(5)]
  first = _Counter()
  path = features.ensure(str(tmp_path), _key(), ids, first.load, first.encode, batch_size=2)
  assert (first.images, first.batches) == (5, 3)  # The last batch is padded, not recompiled.
  source = features.FeatureSource(path, [['a b']] * 5, ids)
  row = source[3]
  assert row['features'].dtype == np.float16 and row['features'].shape == (2, 3)
  np.testing.assert_array_equal(row['features'], 3.0)
  # Same key: nothing is decoded or encoded again.
  hit = _Counter()
  assert features.ensure(str(tmp_path), _key(), ids, hit.load, hit.encode) == path
  assert (hit.images, hit.batches) == (0, 0)
  # New weights: the same file is rebuilt with the new features.
  stale = _Counter(scale=2.0)
  assert features.ensure(str(tmp_path), _key(weights='sha256:abc'), ids, stale.load,
                         stale.encode, batch_size=2) == path
  assert stale.images == 5
  np.testing.assert_array_equal(features.FeatureSource(path, [[]] * 5, ids)[3]['features'], 6)
  assert features.read_key(path)['weights'] == 'sha256:abc'


def test_weights_id_follows_the_file_contents_and_the_seed(tmp_path):
  weights = tmp_path / 'w.h5'
  weights.write_bytes(b'one')
  a = features.weights_id(str(weights), 0)
  weights.write_bytes(b'two')
  assert features.weights_id(str(weights), 0) != a
  assert features.weights_id(None, 0) != features.weights_id(None, 1)
  with pytest.raises(DataError, match=r'--config\.model\.encoder_weights'):
    features.weights_id(str(tmp_path / 'absent.h5'), 0)


def test_an_interrupted_build_leaves_no_cache_file(tmp_path):
  ids = [f'img{i}' for i in range(6)]
  with pytest.raises(KeyboardInterrupt):
    features.ensure(str(tmp_path), _key(), ids, _Counter().load,
                    _Counter(fail_after=1).encode, batch_size=2)
  assert os.listdir(tmp_path) == []


def test_a_build_killed_outright_leaves_a_temporary_file_that_the_next_build_removes(tmp_path):
  orphan = tmp_path / (os.path.basename(features.cache_path(str(tmp_path), _key())) +
                       '.tmp-999999999')  # No such process.
  orphan.write_bytes(b'half a file')
  counter = _Counter()
  path = features.ensure(str(tmp_path), _key(), ['a'], counter.load, counter.encode)
  assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_feature_rows_of_another_split_are_refused(tmp_path):
  counter = _Counter()
  path = features.ensure(str(tmp_path), _key(), ['a', 'b'], counter.load, counter.encode)
  with pytest.raises(DataError, match='delete the file'):
    features.FeatureSource(path, [[], []], ['a', 'c'])


def test_training_batches_from_cached_features_never_decode_an_image(tmp_path, monkeypatch):
  from capjax.data.tokenizer import Vocabulary
  counter = _Counter()
  ids = [f'img{i}' for i in range(4)]
  path = features.ensure(str(tmp_path), _key(), ids, counter.load, counter.encode)
  source = features.FeatureSource(path, [['a dog runs', 'a cat sits']] * 4, ids)

  def refuse(*args, **kwargs):
    raise AssertionError('an image was decoded')

  monkeypatch.setattr(pipeline, 'load_image', refuse)
  vocab = Vocabulary.build(['a dog runs', 'a cat sits'])
  ds = pipeline.caption_train_dataset(source, vocab, batch_size=2, caption_length=6, seed=0,
                                      input_key='features', flip=True)
  batch = ds[0]
  assert batch['features'].shape == (2, 2, 3) and batch['tokens'].shape == (2, 6)
  assert 'image' not in batch
