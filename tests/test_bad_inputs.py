"""Every kind of bad input a user's files can hold, fed to the image loader, a caption reader
(through data preparation), the feature cache and predict: each gives a result, or one
sentence naming the file and what to do, or is skipped and counted -- never another error."""
import logging
import os
import shutil

import numpy as np
import pytest

from helpers import layouts as fx
from helpers import runs as rh
from capjax import run
from capjax.data import caption_tfds, features
from capjax.data.images import load_image
from capjax.data.reading import DataError
from capjax.errors import UserError


@pytest.fixture(scope='module')
def bad_images(tmp_path_factory):
  return rh.write_bad_images(str(tmp_path_factory.mktemp('images')))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('predict') / 'work')
  rh.make_predict_workdir(path)
  return path


def test_each_bad_image_decodes_to_rgb_or_raises_one_data_error_naming_it(bad_images):
  for path, readable, says in bad_images:
    if readable:
      image = load_image(path, size=32)
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8, path
    else:
      with pytest.raises(DataError) as e:
        load_image(path, size=32)
      message = str(e.value)
      assert path in message and says in message and '\n' not in message, message


def test_flickr8k_with_bad_files_and_lines_prepares_the_good_images_and_counts_the_rest(
    bad_images, tmp_path, caplog):
  root = tmp_path / 'flickr8k'
  readable = [p for p, ok, _ in bad_images if ok]
  broken = [p for p, ok, _ in bad_images if not ok and os.path.isfile(p)]
  names = fx.flickr_names(len(readable) + len(broken) + 1)
  fx.make_flickr8k_official(root, train=names, dev=[], test=[],
                            absent=names[-1:])  # The last image is missing.
  with open(root / 'Flickr8k_text' / 'Flickr8k.token.txt', 'ab') as f:
    f.write(f'{names[0]}#9\t   \n'.encode())  # An empty caption.
    f.write(f'{names[1]}#9\tcaf'.encode() + b'\xe9 in latin-1\n')  # Not UTF-8.
  for name, src in zip(names, readable + broken):
    shutil.copyfile(src, root / 'Flicker8k_Dataset' / name)
  tfds_dir = str(tmp_path / 'tfds')

  with pytest.raises(DataError, match=f'1 of {len(names)} images are missing.*{names[-1]}'
                                      '.*skip_missing_images=True'):
    caption_tfds.load_split(tfds_dir, 'flickr8k', str(root), 'train')
  with caplog.at_level(logging.WARNING):
    source, _ = caption_tfds.load_split(tfds_dir, 'flickr8k', str(root), 'train',
                                        skip_missing=True)
  assert len(source) == len(readable)
  assert {source[i]['id'].decode() for i in range(len(source))} == {
      os.path.splitext(n)[0] for n in names[:len(readable)]}
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert '1 images listed but not on disk' in text
  assert '1 empty caption lines' in text and '1 lines that are not UTF-8' in text
  assert f'skipped {len(broken)} of {len(names) - 1} images that cannot be decoded' in text


def test_a_wrong_data_root_is_one_data_error_naming_it(tmp_path):
  with pytest.raises(DataError, match=f'{tmp_path / "nowhere"} does not exist'):
    caption_tfds.load_split(str(tmp_path / 'tfds'), 'flickr8k', str(tmp_path / 'nowhere'),
                            'train')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='No Flickr8k data found in'):
    caption_tfds.load_split(str(tmp_path / 'tfds'), 'flickr8k', str(tmp_path / 'empty'),
                            'train')


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'empty'])
def test_a_damaged_feature_cache_file_is_rebuilt_not_read(tmp_path, damage):
  key = features.cache_key(dataset='d', split='train', records='r', encoder='e',
                           weights='w', image_size=8, pooled=True)
  ids = ['a', 'b', 'c']
  load = lambda i: np.full((8, 8, 3), i, np.uint8)
  encode = lambda x: x.reshape(len(x), -1)[:, :4].astype(np.float32)
  path = features.ensure(str(tmp_path), key, ids, load, encode, batch_size=2)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write({'garbage': b'not hdf5 at all' * 10, 'truncated': data[:len(data) // 2],
             'empty': b''}[damage])
  assert features.read_key(path) is None
  assert features.ensure(str(tmp_path), key, ids, load, encode, batch_size=2) == path
  source = features.FeatureSource(path, [['x']] * 3, ids)
  np.testing.assert_array_equal(source[2]['features'], [2, 2, 2, 2])


def test_predict_captions_the_readable_images_and_names_each_unreadable_one(
    workdir, bad_images, capsys):
  paths = [p for p, _, _ in bad_images]
  results = run.predict(workdir, paths)
  assert [r['path'] for r in results] == paths
  for (path, readable, says), r in zip(bad_images, results):
    if readable:
      assert isinstance(r['caption'], str) and 'error' not in r, r
    else:
      assert path in r['error'] and says in r['error'] and 'caption' not in r, r
  out = capsys.readouterr().out.splitlines()
  bad = sum(not ok for _, ok, _ in bad_images)
  assert len(out) == len(paths) + 1 and out[-1].startswith(f'{bad} of {len(paths)} images')


def test_predict_with_only_unreadable_images_is_one_user_error(workdir, bad_images):
  broken = [p for p, ok, _ in bad_images if not ok]
  with pytest.raises(UserError, match=f'None of the {len(broken)} images could be read'):
    run.predict(workdir, broken)
  with pytest.raises(UserError, match='zero_bytes.jpg is empty'):
    run.predict(workdir, [broken[0]])


@pytest.mark.parametrize('breakage, says', [
    ('no_vocab', 'vocab.json cannot be read'), ('bad_vocab', 'vocab.json cannot be read'),
    ('bad_config', 'config.json cannot be read'), ('no_config', 'config.json is missing'),
    ('no_checkpoints', 'checkpoints does not exist'),
    ('damaged_checkpoint', 'None of the 1 checkpoints'),
])
def test_predict_on_a_broken_workdir_is_one_user_error(workdir, bad_images, tmp_path,
                                                       breakage, says):
  work = str(tmp_path / 'work')
  shutil.copytree(workdir, work)
  if breakage == 'no_vocab':
    os.remove(os.path.join(work, 'vocab.json'))
  elif breakage == 'bad_vocab':
    open(os.path.join(work, 'vocab.json'), 'w').write('{"words": ["a"')
  elif breakage == 'bad_config':
    open(os.path.join(work, 'config.json'), 'w').write('{"task": "cap')
  elif breakage == 'no_config':
    os.remove(os.path.join(work, 'config.json'))
  elif breakage == 'no_checkpoints':
    shutil.rmtree(os.path.join(work, 'checkpoints'))
  else:
    shutil.rmtree(os.path.join(work, 'checkpoints', '1', 'state'))
  good = [p for p, ok, _ in bad_images if ok][:1]
  with pytest.raises(UserError, match=says) as e:
    run.predict(work, good)
  assert '\n' not in str(e.value)
