"""Classification readers (Tiny ImageNet layout, image folders) on generated fixtures."""
import collections
import os

import pytest

from helpers import layouts as fx
from capjax.data.images import load_image
from capjax.data.reading import DataError
from capjax.data.tiny_imagenet import read_image_folder, read_tiny_imagenet

WNIDS = ['n02000003', 'n01000001', 'n03000002']  # Not sorted: labels follow the list order.


def _per_label(records):
  return dict(sorted(collections.Counter(r['label'] for r in records).items()))


def test_tiny_imagenet_train_and_validation_split_each_class_by_number(tmp_path):
  fx.make_tiny_imagenet(tmp_path, WNIDS, n_train=12)
  train = read_tiny_imagenet(tmp_path, 'train', train_per_class=9, val_per_class=3)
  val = read_tiny_imagenet(tmp_path, 'validation', train_per_class=9, val_per_class=3)
  assert _per_label(train.records) == {0: 9, 1: 9, 2: 9}
  assert _per_label(val.records) == {0: 3, 1: 3, 2: 3}
  # Natural number order: _9.._11 are validation (a string sort would pick _7, _8, _9).
  assert [r['id'] for r in val.records[:3]] == [f'{WNIDS[0]}_{i}' for i in (9, 10, 11)]
  assert train.records[0] == {'id': f'{WNIDS[0]}_0', 'label': 0, 'image_path': os.path.join(
      tmp_path, 'train', WNIDS[0], 'images', f'{WNIDS[0]}_0.JPEG')}
  assert train.class_names == ['class0', 'class1', 'class2']  # First name before the comma.


def test_tiny_imagenet_test_split_is_val_folder_restricted_to_the_classes(tmp_path):
  fx.make_tiny_imagenet(tmp_path, WNIDS, n_val=2)  # Also writes val images of an extra wnid.
  test = read_tiny_imagenet(tmp_path, 'test')
  assert _per_label(test.records) == {0: 2, 1: 2, 2: 2}
  assert test.records[0]['image_path'] == os.path.join(tmp_path, 'val', 'images', 'val_0.JPEG')


def test_tiny_imagenet_any_wnid_list_sets_classes_and_label_order(tmp_path):
  fx.make_tiny_imagenet(tmp_path, WNIDS)
  out = read_tiny_imagenet(tmp_path, 'test', wnids=[WNIDS[2], WNIDS[0]])
  assert out.class_names == ['class2', 'class0']
  assert {r['label'] for r in out.records} == {0, 1} and len(out.records) == 4
  wnid_file = fx.write_text(tmp_path / 'mine.txt', f'{WNIDS[1]}\n')
  assert read_tiny_imagenet(tmp_path, 'train', wnids=wnid_file, train_per_class=4,
                            val_per_class=2).class_names == ['class1']


def test_tiny_imagenet_problems_are_data_errors_naming_what_to_fix(tmp_path):
  fx.make_tiny_imagenet(tmp_path, WNIDS)
  with pytest.raises(DataError, match=r'n04444444 has 0 images.*--config\.tiny_imagenet\.'
                                      r'val_per_class=50'):
    read_tiny_imagenet(tmp_path, 'train', wnids=['n04444444'])
  with pytest.raises(DataError, match='repeats'):
    read_tiny_imagenet(tmp_path, 'train', wnids=[WNIDS[0], WNIDS[0]])
  with pytest.raises(DataError, match='No Tiny ImageNet train/ folder'):
    read_tiny_imagenet(tmp_path / 'val', 'train')
  os.remove(tmp_path / 'val' / 'images' / 'val_0.JPEG')
  with pytest.raises(DataError,
                     match=r'val_0\.JPEG.*--config\.tiny_imagenet\.skip_missing_images=True'):
    read_tiny_imagenet(tmp_path, 'test')
  assert len(read_tiny_imagenet(tmp_path, 'test', skip_missing=True).records) == 5


def test_image_folder_flat_layout_splits_each_class_by_fraction(tmp_path):
  fx.make_image_folder(tmp_path, {'dog': 10, 'cat': 20})
  fx.write_text(tmp_path / 'dog' / 'notes.txt', 'not an image')
  os.makedirs(tmp_path / '.ipynb_checkpoints')
  splits = {s: read_image_folder(tmp_path, s, fractions=(0.8, 0.1, 0.1))
            for s in ('train', 'validation', 'test')}
  assert splits['train'].class_names == ['cat', 'dog']
  assert _per_label(splits['train'].records) == {0: 16, 1: 8}
  assert _per_label(splits['validation'].records) == {0: 2, 1: 1}
  ids = [r['id'] for s in splits.values() for r in s.records]
  assert len(ids) == len(set(ids)) == 30 and 'cat/img_0' in ids
  again = read_image_folder(tmp_path, 'test', fractions=(0.8, 0.1, 0.1))
  assert again.records == splits['test'].records


def test_image_folder_split_layout_uses_split_folders_and_carves_missing_ones(tmp_path):
  fx.make_image_folder(tmp_path / 'train', {'a': 10, 'b': 10}, ext='.jpg')
  fx.make_image_folder(tmp_path / 'test', {'a': 1, 'b': 2}, ext='.jpg')
  test = read_image_folder(tmp_path, 'test')
  assert _per_label(test.records) == {0: 1, 1: 2}
  assert test.records[0]['image_path'] == os.path.join(tmp_path, 'test', 'a', 'img_0.jpg')
  # No val/ folder: validation is carved out of train/ with the train:validation shares.
  train = read_image_folder(tmp_path, 'train', fractions=(0.8, 0.2, 0.0))
  val = read_image_folder(tmp_path, 'val', fractions=(0.8, 0.2, 0.0))
  assert _per_label(train.records) == {0: 8, 1: 8} and _per_label(val.records) == {0: 2, 1: 2}


def test_image_folder_problems_are_data_errors(tmp_path):
  with pytest.raises(DataError, match='No class folders'):
    read_image_folder(tmp_path, 'train')
  fx.make_image_folder(tmp_path / 'train', {'a': 3})
  fx.make_image_folder(tmp_path / 'val', {'zebra': 1})
  with pytest.raises(DataError, match='zebra'):
    read_image_folder(tmp_path, 'val')
  os.makedirs(tmp_path / 'train' / 'empty')
  with pytest.raises(DataError, match='has no images'):
    read_image_folder(tmp_path, 'train')
  with pytest.raises(DataError, match=r'--config\.image_folder\.split_fractions\.'):
    read_image_folder(tmp_path, 'train', fractions=(1, 0))


TINY = os.path.join(fx.SHARED_DATA, 'tiny-imagenet-30')


@pytest.mark.skipif(not os.path.isdir(TINY), reason='shared real Tiny ImageNet not present')
def test_real_tiny_imagenet_30_classes_450_50_split_and_1500_test():
  train = read_tiny_imagenet(TINY, 'train')
  val = read_tiny_imagenet(TINY, 'validation')
  test = read_tiny_imagenet(TINY, 'test')
  assert len(train.class_names) == 30 and train.class_names[0] == 'baboon'
  assert set(_per_label(train.records).values()) == {450}
  assert set(_per_label(val.records).values()) == {50}
  assert len(test.records) == 1500 and set(_per_label(test.records).values()) == {50}
  for r in train.records[::1500] + test.records[::300]:
    assert load_image(r['image_path']).shape == (64, 64, 3)
