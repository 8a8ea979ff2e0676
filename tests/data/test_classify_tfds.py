"""Classification builders (shapes30, Tiny ImageNet layout, image folders) and the world."""
import os

import numpy as np
import pytest
from PIL import Image

from helpers import layouts as fx
from capjax.data import classify_tfds, classify_world
from capjax.data.reading import DataError

WNIDS = ['n02000003', 'n01000001']


def _write_mode(path, mode):
  """An 8x8 image saved in a non-RGB mode ('L' greyscale, 'CMYK' JPEG)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  colour = {'L': 90, 'CMYK': (0, 255, 255, 0)}[mode]
  Image.new(mode, (8, 8), colour).save(path, 'JPEG')


def test_world_examples_are_deterministic_balanced_and_use_every_class():
  a = classify_world.example(3, 'train', 7, size=24)
  b = classify_world.example(3, 'train', 7, size=24)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].shape == (24, 24, 3) and a['image'].dtype == np.uint8
  assert not np.array_equal(a['image'], classify_world.example(3, 'test', 7, 24)['image'])
  labels = [classify_world.example(0, 'train', i, 16)['label'] for i in range(60)]
  assert np.bincount(labels).tolist() == [2] * 30
  assert len(set(classify_world.CLASS_NAMES)) == 30


@pytest.mark.parametrize('shape', classify_world.SHAPES)
def test_world_shapes_cover_a_sensible_area_at_any_rotation(shape):
  yy, xx = np.mgrid[-20:20, -20:20].astype(np.float32) + 0.5
  for rotation in (0.0, 1.0, 2.5):
    area = classify_world.object_mask(shape, xx, yy, 15.0, rotation).sum()
    assert 0.15 * 15 ** 2 < area < np.pi * 15 ** 2 * 1.05, (shape, rotation, area)


def test_shapes30_builder_writes_balanced_splits_with_class_names(tmp_path):
  builder = classify_tfds.prepare_shapes30(str(tmp_path), image_size=16, num_train=60,
                                           num_validation=30, num_test=30, seed=1)
  src = builder.as_data_source()
  assert {s: len(src[s]) for s in ('train', 'validation', 'test')} == {
      'train': 60, 'validation': 30, 'test': 30}
  # TFDS stores examples in key-hash order: look example 5 up by its id.
  ex = next(e for e in (src['train'][i] for i in range(60)) if e['id'] == b'train_5')
  assert ex['image'].shape == (16, 16, 3) and ex['image'].dtype == np.uint8
  np.testing.assert_array_equal(ex['image'],
                                classify_world.example(1, 'train', 5, 16)['image'])
  assert int(ex['label']) == 5
  assert classify_tfds.class_names(builder) == list(classify_world.CLASS_NAMES)
  assert np.bincount([int(src['test'][i]['label']) for i in range(30)]).tolist() == [1] * 30


def test_tiny_imagenet_builder_decodes_all_modes_and_splits_per_class(tmp_path):
  root = tmp_path / 'tiny'
  fx.make_tiny_imagenet(root, WNIDS, n_train=5, n_val=2)
  # A greyscale and a CMYK JPEG, as in the real release.
  _write_mode(str(root / 'train' / WNIDS[0] / 'images' / f'{WNIDS[0]}_1.JPEG'), 'L')
  _write_mode(str(root / 'val' / 'images' / 'val_0.JPEG'), 'CMYK')
  builder = classify_tfds.prepare_folder(str(tmp_path / 'tfds'), 'tiny_imagenet', str(root),
                                         12, train_per_class=3, val_per_class=2)
  src = builder.as_data_source()
  assert [len(src[s]) for s in ('train', 'validation', 'test')] == [6, 4, 4]
  assert classify_tfds.class_names(builder) == ['class0', 'class1']
  by_id = {src['train'][i]['id'].decode(): src['train'][i] for i in range(6)}
  grey = by_id[f'{WNIDS[0]}_1']['image']
  assert grey.shape == (12, 12, 3) and grey.dtype == np.uint8
  assert np.all(grey == grey[..., :1]) and int(grey[0, 0, 0]) in range(85, 96)
  cmyk = next(src['test'][i] for i in range(4) if src['test'][i]['id'] == b'val_0')['image']
  assert cmyk.shape == (12, 12, 3) and cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 60
  assert sorted(int(src['test'][i]['label']) for i in range(4)) == [0, 0, 1, 1]


def test_folder_builder_name_changes_with_the_files_so_stale_data_is_never_reused(tmp_path):
  root = tmp_path / 'folder'
  fx.make_image_folder(root, {'cat': 10, 'dog': 10})
  first = classify_tfds.folder_config('image_folder', str(root), 16)
  assert first.name == classify_tfds.folder_config('image_folder', str(root), 16).name
  fx.write_image(str(root / 'dog' / 'img_99.png'))
  assert classify_tfds.folder_config('image_folder', str(root), 16).name != first.name
  assert classify_tfds.folder_config('image_folder', str(root), 24).name != first.name


def test_image_folder_builder_reads_flat_layout_into_three_splits(tmp_path):
  root = tmp_path / 'folder'
  fx.make_image_folder(root, {'cat': 10, 'dog': 10}, ext='.jpg')
  builder = classify_tfds.prepare_folder(str(tmp_path / 'tfds'), 'image_folder', str(root),
                                         8, fractions=(0.6, 0.2, 0.2), seed=0)
  src = builder.as_data_source()
  assert [len(src[s]) for s in ('train', 'validation', 'test')] == [12, 4, 4]
  assert classify_tfds.class_names(builder) == ['cat', 'dog']
  ids = {src[s][i]['id'].decode() for s in ('train', 'validation', 'test')
         for i in range(len(src[s]))}
  assert len(ids) == 20


def test_folder_builder_problems_are_data_errors_naming_the_config_field(tmp_path):
  with pytest.raises(DataError, match=r'--config\.data_dir=PATH'):
    classify_tfds.prepare_folder(str(tmp_path), 'tiny_imagenet', None, 64)
  with pytest.raises(DataError, match=r'--config\.data_dir=.*nope does not exist'):
    classify_tfds.prepare_folder(str(tmp_path), 'image_folder', str(tmp_path / 'nope'), 64)
  root = tmp_path / 'folder'
  fx.make_image_folder(root, {'cat': 4})
  for name in os.listdir(root / 'cat'):  # Every image broken: nothing to train on.
    fx.write_text(root / 'cat' / name, b'not an image')
  with pytest.raises(DataError, match='could be decoded'):
    classify_tfds.prepare_folder(str(tmp_path / 'tfds'), 'image_folder', str(root), 8,
                                 fractions=(1.0, 0.0, 0.0))
