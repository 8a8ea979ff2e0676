"""Caption readers (Flickr8k, COCO, own CSV/JSONL) on generated files in the real layouts."""
import json
import os

import pytest

from helpers import layouts as fx
from capjax.data.coco import read_coco
from capjax.data.flickr8k import detect_layout, kaggle_split_names, read_flickr8k
from capjax.data.own_captions import read_own_captions
from capjax.data.reading import canonical_split, DataError, split_by_fraction

NAMES = fx.flickr_names(7)
TRAIN, DEV, TEST = NAMES[:4], NAMES[4:6], NAMES[6:]


# --- Flickr8k ---------------------------------------------------------------------------------


def test_flickr8k_official_split_has_listed_images_with_their_five_captions(tmp_path):
  captions = fx.make_flickr8k_official(tmp_path, TRAIN, DEV, TEST)
  records, report = read_flickr8k(tmp_path, 'train')
  assert [r['image_path'] for r in records] == [
      os.path.join(tmp_path, 'Flicker8k_Dataset', n) for n in TRAIN]
  assert records[0]['id'] == os.path.splitext(TRAIN[0])[0]
  assert records[0]['captions'] == captions[TRAIN[0]]  # Commas kept, order kept.
  assert (report.images, report.captions) == (4, 20)
  # The release's "<name>.jpg.1" typo names an image in no split: counted, not an error.
  assert report.unlisted_images == 1
  assert report.examples['unlisted_images'] == '2258277193_586949ec62.jpg.1'


def test_flickr8k_validation_is_an_alias_of_dev(tmp_path):
  fx.make_flickr8k_official(tmp_path, TRAIN, DEV, TEST)
  assert read_flickr8k(tmp_path, 'validation').records == read_flickr8k(tmp_path, 'dev').records
  with pytest.raises(DataError, match=r"Flickr8k split 'holdout'; use one of train, "
                                      r"dev \(validation\), test\."):
    read_flickr8k(tmp_path, 'holdout')


def test_flickr8k_token_lines_with_space_bad_utf8_or_empty_caption_are_handled(tmp_path):
  extra = (f'{TRAIN[0]}#5 space separated caption\n'.encode()
           + f'{TRAIN[1]}#5\t\n'.encode()
           + f'{TRAIN[2]}#5\tcaf\xe9 in latin-1\n'.encode('latin-1'))
  fx.make_flickr8k_official(tmp_path, TRAIN, DEV, TEST)
  token = tmp_path / 'Flickr8k_text' / 'Flickr8k.token.txt'
  token.write_bytes(token.read_bytes() + extra)
  records, report = read_flickr8k(tmp_path, 'train')
  assert records[0]['captions'][-1] == 'space separated caption'
  assert (report.empty_captions, report.undecodable_lines) == (1, 1)
  assert 'Flickr8k.token.txt' in report.examples['undecodable_lines']
  assert len(records[2]['captions']) == 5


def test_flickr8k_missing_images_raise_naming_count_split_example_and_skip_flag(tmp_path):
  fx.make_flickr8k_official(tmp_path, TRAIN, DEV, TEST, absent=[TEST[0], TRAIN[1]])
  with pytest.raises(DataError) as info:
    read_flickr8k(tmp_path, 'test')
  message = str(info.value)
  for part in ("'test'", '1 of 1 images are missing', TEST[0],
               '--config.data.skip_missing_images=True'):
    assert part in message
  with pytest.raises(DataError, match='1 of 4'):
    read_flickr8k(tmp_path, 'train')


def test_flickr8k_skip_missing_drops_and_counts_missing_images(tmp_path):
  fx.make_flickr8k_official(tmp_path, TRAIN, DEV, TEST, absent=[TRAIN[1]])
  records, report = read_flickr8k(tmp_path, 'train', skip_missing=True)
  assert [r['id'] for r in records] == [os.path.splitext(n)[0] for n in TRAIN if n != TRAIN[1]]
  assert report.missing_images == 1 and TRAIN[1] in report.examples['missing_images']
  assert 'not on disk' in report.summary()


def test_flickr8k_kaggle_csv_keeps_commas_and_quotes_and_splits_by_sorted_name(tmp_path):
  names = fx.flickr_names(6)[::-1]  # Written in reverse, to prove the split sorts.
  captions = fx.make_flickr8k_kaggle(tmp_path, names)
  assert detect_layout(tmp_path) == 'kaggle'
  train, _ = read_flickr8k(tmp_path, 'train', kaggle_split_sizes=(3, 2))
  dev, _ = read_flickr8k(tmp_path, 'dev', kaggle_split_sizes=(3, 2))
  test, _ = read_flickr8k(tmp_path, 'test', kaggle_split_sizes=(3, 2))
  ordered = sorted(names)
  assert [os.path.basename(r['image_path']) for r in train + dev + test] == ordered
  assert (len(train), len(dev), len(test)) == (3, 2, 1)
  assert train[0]['captions'] == captions[ordered[0]] == ['a dog, running 0 "fast"',
                                                          'a dog, running 1 "fast"']
  assert kaggle_split_names(names, 'test', (3, 2)) == ordered[5:]


def test_flickr8k_root_without_either_layout_names_root_and_expected_files(tmp_path):
  (tmp_path / 'something.txt').write_text('x')
  with pytest.raises(DataError) as info:
    read_flickr8k(tmp_path, 'train')
  for part in (str(tmp_path), 'Flickr8k.token.txt', 'captions.txt'):
    assert part in str(info.value)
  with pytest.raises(DataError, match='does not exist'):
    read_flickr8k(tmp_path / 'nope', 'train')


# --- COCO -------------------------------------------------------------------------------------


def test_coco_official_groups_captions_by_image_and_cleans_whitespace(tmp_path):
  fx.make_coco(tmp_path, n_train=3, n_val=2)
  records, report = read_coco(tmp_path, 'train')
  assert [r['id'] for r in records] == ['1', '2', '3']
  assert records[0]['image_path'] == os.path.join(tmp_path, 'train2014',
                                                  'COCO_train2014_000000000001.jpg')
  assert records[0]['captions'] == ['A photo of 1 number 0.', 'A photo of 1 number 1.']
  assert (report.images, report.captions) == (3, 6)
  assert len(read_coco(tmp_path, 'val').records) == 2


def test_coco_test_split_without_karpathy_file_explains_what_to_do(tmp_path):
  fx.make_coco(tmp_path)
  with pytest.raises(DataError, match=r'--config\.coco\.karpathy_file=PATH'):
    read_coco(tmp_path, 'test')


def test_coco_missing_images_raise_or_are_skipped(tmp_path):
  fx.make_coco(tmp_path, n_val=3, absent_val=2)
  with pytest.raises(DataError, match=r"'validation'.*2 of 3 images are missing"):
    read_coco(tmp_path, 'validation')
  records, report = read_coco(tmp_path, 'validation', skip_missing=True)
  assert len(records) == 1 and report.missing_images == 2


def test_coco_picks_a_year_with_images_and_honours_an_explicit_year(tmp_path):
  fx.make_coco(tmp_path, year='2017', n_train=2)
  fx.make_coco(tmp_path, year='2014', n_train=4)
  assert len(read_coco(tmp_path, 'train').records) == 2  # Newest present year by default.
  assert len(read_coco(tmp_path, 'train', year=2014).records) == 4
  with pytest.raises(DataError, match='captions_train2015.json'):
    read_coco(tmp_path, 'train', year=2015)


def test_coco_malformed_annotation_file_names_file_and_field(tmp_path):
  fx.make_coco(tmp_path)
  path = tmp_path / 'annotations' / 'captions_val2014.json'
  path.write_text(json.dumps({'images': [{'id': 1}], 'annotations': []}))
  with pytest.raises(DataError, match=r"captions_val2014.json: image #0 has no 'file_name'"):
    read_coco(tmp_path, 'val')
  path.write_text('{"images": [')
  with pytest.raises(DataError, match='not valid UTF-8 JSON'):
    read_coco(tmp_path, 'val')


def test_coco_karpathy_split_puts_restval_in_train_and_uses_raw_sentences(tmp_path):
  path = fx.make_karpathy(tmp_path)
  train, report = read_coco(tmp_path, 'train', karpathy_file=path)
  assert [r['id'] for r in train] == ['100', '101']  # train + restval
  assert train[0]['captions'] == ['Raw caption 0 for 100.', 'Raw caption 1 for 100.']
  assert [r['id'] for r in read_coco(tmp_path, 'validation',
                                     karpathy_file='dataset_coco.json').records] == ['102']
  test = read_coco(tmp_path, 'test', karpathy_file=path).records
  assert test[0]['image_path'] == os.path.join(tmp_path, 'val2014',
                                              'COCO_val2014_000000000103.jpg')


def test_coco_karpathy_split_finds_renamed_2017_images(tmp_path):
  path = fx.make_karpathy(tmp_path, only_2017_images=True)
  test = read_coco(tmp_path, 'test', karpathy_file=path).records
  assert test[0]['image_path'] == os.path.join(tmp_path, 'val2017', '000000000103.jpg')


# --- own captions -----------------------------------------------------------------------------


def _own_images(tmp_path, n=10):
  names = [f'photo_{i}.jpg' for i in range(n)]
  for name in names:
    fx.write_image(tmp_path / 'imgs' / name)
  return names


def test_own_csv_groups_rows_per_image_and_split_partitions_all_images(tmp_path):
  names = _own_images(tmp_path)
  rows = ['Image,Caption,extra'] + [f'{n},"A dog, {k}",x' for n in names for k in range(2)]
  csv_path = fx.write_text(tmp_path / 'caps.csv', '\r\n'.join(rows) + '\r\n')
  splits = {s: read_own_captions(tmp_path / 'imgs', csv_path, s, fractions=(0.6, 0.2, 0.2))
            for s in ('train', 'validation', 'test')}
  ids = {s: [r['id'] for r in out.records] for s, out in splits.items()}
  assert sorted(ids['train'] + ids['validation'] + ids['test']) == sorted(names)
  assert [len(v) for v in ids.values()] == [6, 2, 2]
  assert splits['train'].records[0]['captions'] == ['A dog, 0', 'A dog, 1']
  again = read_own_captions(tmp_path / 'imgs', csv_path, 'val', fractions=(0.6, 0.2, 0.2))
  assert [r['id'] for r in again.records] == ids['validation']  # Deterministic.


def test_own_jsonl_reads_rows_and_counts_bad_lines(tmp_path):
  names = _own_images(tmp_path, 3)
  lines = [json.dumps({'image': n, 'caption': f'cat {n}'}) for n in names]
  lines += ['not json', json.dumps({'image': names[0]}), json.dumps({'image': names[0],
                                                                     'caption': '  '})]
  path = fx.write_text(tmp_path / 'caps.jsonl', '\n'.join(lines) + '\n')
  records, report = read_own_captions(tmp_path / 'imgs', path, 'train', fractions=(1, 0, 0))
  assert sorted(r['id'] for r in records) == names
  assert (report.malformed_lines, report.empty_captions) == (2, 1)


def test_own_captions_missing_image_names_the_file_and_skip_flag(tmp_path):
  _own_images(tmp_path, 2)
  path = fx.write_text(tmp_path / 'caps.csv', 'image,caption\nphoto_0.jpg,a\nghost.jpg,b\n')
  with pytest.raises(DataError, match=r'ghost\.jpg.*--config\.data\.skip_missing_images=True'):
    read_own_captions(tmp_path / 'imgs', path, 'train', fractions=(1, 0, 0))
  records, report = read_own_captions(tmp_path / 'imgs', path, 'train', fractions=(1, 0, 0),
                                      skip_missing=True)
  assert [r['id'] for r in records] == ['photo_0.jpg'] and report.missing_images == 1
  assert report.images_without_captions == 1  # photo_1.jpg has no caption row.


@pytest.mark.parametrize('name,content,match', [
    ('caps.pkl', b'\x80\x04N.', 'arbitrary code'),
    ('caps.csv', b'file,text_col\na.jpg,b\n', 'no caption column'),
    ('caps.xml', b'<x/>', "extension '.xml'"),
])
def test_own_captions_unusable_files_are_refused_with_a_reason(tmp_path, name, content, match):
  _own_images(tmp_path, 1)
  path = fx.write_text(tmp_path / name, content)
  with pytest.raises(DataError, match=match):
    read_own_captions(tmp_path / 'imgs', path, 'train')


def test_own_captions_bad_split_fractions_name_the_flag(tmp_path):
  _own_images(tmp_path, 2)
  path = fx.write_text(tmp_path / 'caps.csv', 'image,caption\nphoto_0.jpg,a\nphoto_1.jpg,b\n')
  for fractions in ((1, 0), (0, 0, 0)):
    with pytest.raises(DataError, match=r'--config\.own\.split_fractions\.'):
      read_own_captions(tmp_path / 'imgs', path, 'train', fractions=fractions)


def test_split_by_fraction_sizes_add_up_and_do_not_follow_name_order():
  names = [f'img_{i:03d}' for i in range(100)]
  groups = split_by_fraction(names, (0.7, 0.2, 0.1), flag='--f')
  assert [len(g) for g in groups] == [70, 20, 10]
  assert groups[2] != names[-10:]
  assert split_by_fraction(names, (0.7, 0.2, 0.1), seed=1, flag='--f') != groups
  with pytest.raises(DataError, match='sum to more than 0; fix --f'):
    split_by_fraction(names, (0, 0), flag='--f')


def test_canonical_split_takes_aliases_and_a_reader_s_own_names():
  assert [canonical_split(s) for s in ('train', 'val', 'dev', 'validation', 'test')] == [
      'train', 'validation', 'validation', 'validation', 'test']
  assert canonical_split('val', 'Flickr8k', {'validation': 'dev', 'val': 'dev'}) == 'dev'
  with pytest.raises(DataError, match=r"^Unknown split 'eval'; use one of train, validation, "
                                      r"test\.$"):
    canonical_split('eval')


# --- real data (when present) -----------------------------------------------------------------

FLICKR = os.path.join(fx.SHARED_DATA, 'flickr8k')


@pytest.mark.skipif(not os.path.isdir(FLICKR), reason='shared real Flickr8k not present')
def test_real_flickr8k_counts_and_withheld_test_images():
  records, report = read_flickr8k(FLICKR, 'train')
  assert (len(records), report.captions) == (6000, 30000)
  assert len(read_flickr8k(FLICKR, 'dev').records) == 1000
  assert report.unlisted_images == 92
  with pytest.raises(DataError, match=r"'test'.*1000 of 1000 images are missing"):
    read_flickr8k(FLICKR, 'test')
  assert read_flickr8k(FLICKR, 'test', skip_missing=True).report.missing_images == 1000
