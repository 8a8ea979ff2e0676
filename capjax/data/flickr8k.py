"""Flickr8k captions from either of its two common on-disk layouts.

Official release (Hodosh et al.), as unzipped from Flickr8k_Dataset.zip + Flickr8k_text.zip:

  root/Flicker8k_Dataset/<image>.jpg         (sic; 'Flickr8k_Dataset/' is accepted too)
  root/Flickr8k_text/Flickr8k.token.txt      "<image>.jpg#<k>\\t<caption>", 5 per image
  root/Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt   6000 / 1000 / 1000 names

Kaggle re-packaging: root/Images/<image>.jpg + root/captions.txt, a CSV with header
"image,caption" (captions may contain commas and quotes). It has no split files, so splits are
cut from the sorted image names (6000 / 1000 / rest by default, as in the official split sizes).

The token file names 92 images that are in no split, one of them the well-known typo
"2258277193_586949ec62.jpg.1"; their captions are ignored and counted as `unlisted_images`.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Sequence

from capjax.data.reading import (CaptionSplit, DataError, ReadReport, canonical_split,
                                 clean_caption, finish_split, list_dir, read_lines)

TEXT_DIR = 'Flickr8k_text'
TOKEN_FILE = 'Flickr8k.token.txt'
IMAGE_DIRS = ('Flicker8k_Dataset', 'Flickr8k_Dataset')  # The release's spelling first.
SPLIT_FILES = {'train': 'Flickr_8k.trainImages.txt', 'dev': 'Flickr_8k.devImages.txt',
               'test': 'Flickr_8k.testImages.txt'}
KAGGLE_IMAGE_DIR = 'Images'
KAGGLE_CAPTIONS = 'captions.txt'
# The release calls its validation split 'dev'; the reader keeps that name.
_SPLIT_ALIASES = {'validation': 'dev', 'val': 'dev', 'dev': 'dev'}


def detect_layout(root: str) -> str:
  """'official' or 'kaggle', from the files present under `root`; DataError if neither."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(f'Flickr8k root {root} does not exist or is not a folder; set the dataset '
                    f'root to the folder holding Flickr8k_text/ or captions.txt.')
  if os.path.isfile(os.path.join(root, TEXT_DIR, TOKEN_FILE)):
    return 'official'
  if os.path.isfile(os.path.join(root, KAGGLE_CAPTIONS)):
    return 'kaggle'
  raise DataError(
      f'No Flickr8k data found in {root}: expected {TEXT_DIR}/{TOKEN_FILE} with '
      f'{IMAGE_DIRS[0]}/ (official layout) or {KAGGLE_CAPTIONS} with {KAGGLE_IMAGE_DIR}/ (Kaggle '
      f'layout); point the dataset root at the folder that contains them.')


def _parse_token_file(path: str, report: ReadReport) -> dict[str, list[str]]:
  """image name -> captions, in file order, from Flickr8k.token.txt."""
  captions: dict[str, list[str]] = {}
  for i, line in enumerate(read_lines(path, report), start=1):
    if not line.strip():
      continue
    # Lines are "<image>#<k>\t<caption>", but a few in the release use a space for the tab.
    parts = line.split('\t', 1) if '\t' in line else line.split(None, 1)
    token = parts[0].strip()
    name = token.rpartition('#')[0] if '#' in token else token
    caption = clean_caption(parts[1]) if len(parts) > 1 else ''
    if not name:
      report.count('malformed_lines', f'{path}:{i}: {line[:80]}')
      continue
    if not caption:
      report.count('empty_captions', f'{path}:{i}: {line[:80]}')
      continue
    captions.setdefault(name, []).append(caption)
  return captions


def _parse_kaggle_csv(path: str, report: ReadReport) -> dict[str, list[str]]:
  """image name -> captions, in file order, from Kaggle's captions.txt CSV."""
  rows = csv.reader(io.StringIO('\n'.join(read_lines(path, report))))
  header = [h.strip().lower() for h in next(rows, [])]
  if 'image' not in header or 'caption' not in header:
    raise DataError(f'{path} has header {header!r}, expected the columns "image,caption"; '
                    f'add that header line (Kaggle layout) or use the official layout.')
  ii, ci = header.index('image'), header.index('caption')
  captions: dict[str, list[str]] = {}
  for row in rows:
    if not row or not any(c.strip() for c in row):
      continue
    if len(row) <= max(ii, ci):
      report.count('malformed_lines', f'{path}: {",".join(row)[:80]}')
      continue
    name = row[ii].strip()
    # A caption with an unquoted comma arrives split over extra columns; rejoin them.
    caption = clean_caption(','.join(row[ci:]) if ci == len(header) - 1 else row[ci])
    if not caption:
      report.count('empty_captions', f'{path}: {name}')
      continue
    captions.setdefault(name, []).append(caption)
  return captions


def _read_names(path: str, report: ReadReport) -> list[str]:
  return [line.strip() for line in read_lines(path, report) if line.strip()]


def kaggle_split_names(names: Sequence[str], split: str,
                       sizes: tuple[int, int] = (6000, 1000)) -> list[str]:
  """The image names of `split` for the Kaggle layout: sorted names cut at train/dev sizes.

  Sorting makes the split independent of file order; Flickr8k's names are photo ids, so the
  sorted order is not correlated with content.
  """
  n_train, n_dev = sizes
  ordered = sorted(set(names))
  cuts = {'train': (0, n_train), 'dev': (n_train, n_train + n_dev),
          'test': (n_train + n_dev, len(ordered))}
  lo, hi = cuts[split]
  return ordered[lo:hi]


def read_flickr8k(root: str, split: str, *, skip_missing: bool = False,
                  kaggle_split_sizes: tuple[int, int] = (6000, 1000)) -> CaptionSplit:
  """Reads one split of Flickr8k from the official or the Kaggle layout (auto-detected).

  Args:
    root: the folder holding Flickr8k_text/ + Flicker8k_Dataset/, or captions.txt + Images/.
    split: 'train', 'dev' (or 'validation'/'val'), or 'test'.
    skip_missing: skip images that are listed but not on disk (counted in the report) instead
      of raising DataError.
    kaggle_split_sizes: (train, dev) image counts for the Kaggle layout; the rest is test.

  Returns:
    CaptionSplit(records, report); records are {'id': image name without extension,
    'image_path': absolute-or-root-relative path, 'captions': [str, ...]} in split-file order
    (official) or sorted name order (Kaggle). The report is also logged.
  """
  split = canonical_split(split, 'Flickr8k', _SPLIT_ALIASES)
  root = os.fspath(root)
  layout = detect_layout(root)
  report = ReadReport(source=f'Flickr8k ({layout} layout) split {split!r} at {root}')
  if layout == 'official':
    text_dir = os.path.join(root, TEXT_DIR)
    captions = _parse_token_file(os.path.join(text_dir, TOKEN_FILE), report)
    split_path = os.path.join(text_dir, SPLIT_FILES[split])
    if not os.path.isfile(split_path):
      raise DataError(f'Flickr8k split file {split_path} is missing; restore it from '
                      f'Flickr8k_text.zip.')
    names = _read_names(split_path, report)
    # Captioned images in no split file (the ".jpg.1" typo among them) are counted, not used.
    listed = set(names)
    for other in set(SPLIT_FILES) - {split}:
      other_path = os.path.join(text_dir, SPLIT_FILES[other])
      if os.path.isfile(other_path):
        listed.update(_read_names(other_path, ReadReport(source=other_path)))
    for name in sorted(set(captions) - listed):
      report.count('unlisted_images', name)
    image_dir = next((os.path.join(root, d) for d in IMAGE_DIRS
                      if os.path.isdir(os.path.join(root, d))), os.path.join(root, IMAGE_DIRS[0]))
  else:
    captions = _parse_kaggle_csv(os.path.join(root, KAGGLE_CAPTIONS), report)
    names = kaggle_split_names(list(captions), split, kaggle_split_sizes)
    image_dir = os.path.join(root, KAGGLE_IMAGE_DIR)

  records = []
  for name in dict.fromkeys(names):  # Dedupe, keeping order.
    if not captions.get(name):
      report.count('images_without_captions', name)
      continue
    records.append({'id': os.path.splitext(name)[0], 'image_path': os.path.join(image_dir, name),
                    'captions': list(captions[name])})
  on_disk = list_dir(image_dir)
  return finish_split(records, report, present=lambda p: os.path.basename(p) in on_disk,
                      what=f"Flickr8k split '{split}' (images in {image_dir})",
                      skip_missing=skip_missing)
