"""MS-COCO captions, from the official annotation files or a Karpathy split file.

Official layout (any subset of years and splits may be present):

  root/annotations/captions_{train,val}{2014,2017}.json
      {'images': [{'id', 'file_name'}, ...], 'annotations': [{'image_id', 'caption'}, ...]}
  root/{train,val}{2014,2017}/<file_name>

COCO's test images have no public captions, so the official files give 'train' and
'validation'. Most captioning papers instead use Karpathy's split (`dataset_coco.json`: images
with 'filepath', 'filename', 'split' in train/restval/val/test and 'sentences' with 'raw'),
which gives 'train' (train + restval), 'validation' (val) and 'test' (5000 each for val/test).
Its paths name the 2014 folders; a user who has only the 2017 images (same pictures, renamed to
<12-digit id>.jpg) is served from train2017/ or val2017/ instead.
"""
from __future__ import annotations

import json
import os
import re

from absl import logging

from capjax.data.reading import (CaptionSplit, DataError, ReadReport, canonical_split,
                                 clean_caption, finish_split, list_dir)

_ANNOTATION = re.compile(r'^captions_(train|val)(\d{4})\.json$')
_KARPATHY_SPLITS = {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)}


def _load_json(path: str) -> object:
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode('utf-8-sig'))
  except OSError as e:
    raise DataError(f'Cannot read {path} ({e.strerror or e}); check the path.') from e
  except (UnicodeDecodeError, ValueError) as e:
    raise DataError(f'{path} is not valid UTF-8 JSON ({str(e)[:100]}); re-download it.') from e


def _field(entry: object, key: str, path: str, where: str, kind=object) -> object:
  """entry[key] checked to be a `kind`, or a DataError naming the file, entry and field."""
  if not isinstance(entry, dict) or key not in entry or not isinstance(entry[key], kind):
    raise DataError(f'{path}: {where} has no {key!r} field of the expected type; this does not '
                    f'look like a COCO captions file, check that the right file is given.')
  return entry[key]


def available_annotations(root: str) -> dict[str, list[str]]:
  """{'train': [years], 'validation': [years]} of the captions_*.json in root/annotations."""
  found: dict[str, list[str]] = {'train': [], 'validation': []}
  for name in sorted(list_dir(os.path.join(root, 'annotations'))):
    m = _ANNOTATION.match(name)
    if m:
      found['train' if m.group(1) == 'train' else 'validation'].append(m.group(2))
  return found


class _ImageLocator:
  """Maps a Karpathy (filepath, filename, cocoid) to an image path, with one listing per folder."""

  def __init__(self, root: str):
    self._root = root
    self._listings: dict[str, set[str]] = {}

  def has(self, folder: str, name: str) -> bool:
    if folder not in self._listings:
      self._listings[folder] = list_dir(os.path.join(self._root, folder))
    return name in self._listings[folder]

  def path(self, filepath: str, filename: str, cocoid: object) -> str:
    if self.has(filepath, filename) or not isinstance(cocoid, int):
      return os.path.join(self._root, filepath, filename)
    new_name = f'{cocoid:012d}.jpg'  # COCO 2017 renamed the 2014 files to their ids.
    for folder in ('train2017', 'val2017'):
      if self.has(folder, new_name):
        return os.path.join(self._root, folder, new_name)
    return os.path.join(self._root, filepath, filename)


def _read_official(root: str, split: str, year: str | None,
                   report: ReadReport) -> tuple[list[dict], str]:
  if split == 'test':
    raise DataError("COCO's official test images have no public captions; give a Karpathy "
                    "split file (--config.coco.karpathy_file=PATH) to get a captioned 'test' "
                    "split.")
  years = available_annotations(root)[split]
  prefix = 'train' if split == 'train' else 'val'
  if year is not None:
    if str(year) not in years:
      raise DataError(f'{os.path.join(root, "annotations", f"captions_{prefix}{year}.json")} '
                      f'does not exist; download the {year} caption annotations, or set '
                      f'--config.coco.year to one of {years or "those present"}.')
    chosen = str(year)
  elif not years:
    raise DataError(f'No COCO caption annotations for split {split!r} in '
                    f'{os.path.join(root, "annotations")}: expected captions_{prefix}2014.json '
                    f'or captions_{prefix}2017.json; download them or fix the dataset root.')
  else:
    # Prefer a year whose images are present, then the newest.
    chosen = max(years, key=lambda y: (os.path.isdir(os.path.join(root, prefix + y)), y))
    if len(years) > 1:
      logging.info('COCO %s: using %s annotations (also present: %s); set --config.coco.year '
                   'to choose.', split, chosen, [y for y in years if y != chosen])
  path = os.path.join(root, 'annotations', f'captions_{prefix}{chosen}.json')
  image_dir = os.path.join(root, prefix + chosen)
  data = _load_json(path)
  images = _field(data, 'images', path, 'the top level', list)
  annotations = _field(data, 'annotations', path, 'the top level', list)
  captions: dict[object, list[str]] = {}
  for i, ann in enumerate(annotations):
    image_id = _field(ann, 'image_id', path, f'annotation #{i}', (int, str))
    caption = clean_caption(str(_field(ann, 'caption', path, f'annotation #{i}')))
    if not caption:
      report.count('empty_captions', f'{path}: annotation #{i}')
      continue
    captions.setdefault(image_id, []).append(caption)
  records = []
  for i, image in enumerate(images):
    image_id = _field(image, 'id', path, f'image #{i}', (int, str))
    file_name = str(_field(image, 'file_name', path, f'image #{i}'))
    if not captions.get(image_id):
      report.count('images_without_captions', file_name)
      continue
    records.append({'id': str(image_id), 'image_path': os.path.join(image_dir, file_name),
                    'captions': captions[image_id]})
  known = {image['id'] for image in images}  # All checked above.
  for image_id in captions.keys() - known:
    report.count('malformed_lines', f'{path}: captions for unknown image_id {image_id}')
  return records, image_dir


def _read_karpathy(root: str, karpathy_file: str, split: str,
                   report: ReadReport) -> tuple[list[dict], str]:
  path = karpathy_file if os.path.isabs(karpathy_file) else os.path.join(root, karpathy_file)
  if not os.path.isfile(path):
    raise DataError(f'Karpathy split file {path} does not exist; download dataset_coco.json '
                    f'or fix --config.coco.karpathy_file.')
  data = _load_json(path)
  images = _field(data, 'images', path, 'the top level', list)
  locator = _ImageLocator(root)
  wanted = _KARPATHY_SPLITS[split]
  records = []
  for i, image in enumerate(images):
    if _field(image, 'split', path, f'image #{i}') not in wanted:
      continue
    filename = str(_field(image, 'filename', path, f'image #{i}'))
    filepath = str(image.get('filepath', ''))
    cocoid = image.get('cocoid', image.get('imgid'))
    captions = []
    for sentence in _field(image, 'sentences', path, f'image #{i}', list):
      raw = sentence.get('raw') if isinstance(sentence, dict) else None
      if raw is None and isinstance(sentence, dict):
        raw = ' '.join(sentence.get('tokens', []))
      caption = clean_caption(str(raw or ''))
      if caption:
        captions.append(caption)
      else:
        report.count('empty_captions', f'{path}: {filename}')
    if not captions:
      report.count('images_without_captions', filename)
      continue
    image_id = str(cocoid) if cocoid is not None else os.path.splitext(filename)[0]
    records.append({'id': image_id, 'image_path': locator.path(filepath, filename, cocoid),
                    'captions': captions})
  return records, root


def read_coco(root: str, split: str, *, karpathy_file: str | None = None,
              year: str | int | None = None, skip_missing: bool = False) -> CaptionSplit:
  """Reads one split of COCO captions.

  Args:
    root: the folder holding annotations/ and the image folders (train2014/, val2017/, ...).
    split: 'train', 'validation' (or 'val'), or 'test' (Karpathy split only).
    karpathy_file: path to a Karpathy split file (absolute, or relative to root); when given,
      splits come from it and the official annotation files are not read.
    year: which official annotations to use (2014 or 2017); default: the newest whose image
      folder is present. Ignored with karpathy_file.
    skip_missing: skip images that are not on disk (counted in the report) instead of raising.

  Returns:
    CaptionSplit(records, report); records are {'id': COCO image id as str, 'image_path',
    'captions'}. The report is also logged.
  """
  split = canonical_split(split, 'COCO')
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(f'COCO root {root} does not exist or is not a folder; set the dataset root '
                    f'to the folder holding annotations/ and the image folders.')
  if karpathy_file:
    report = ReadReport(source=f'COCO (Karpathy split {karpathy_file}) split {split!r} at {root}')
    records, image_dir = _read_karpathy(root, os.fspath(karpathy_file), split, report)
  else:
    report = ReadReport(source=f'COCO (official annotations) split {split!r} at {root}')
    records, image_dir = _read_official(root, split, None if year is None else str(year), report)
  listings: dict[str, set[str]] = {}

  def present(p: str) -> bool:
    folder = os.path.dirname(p)
    if folder not in listings:
      listings[folder] = list_dir(folder)
    return os.path.basename(p) in listings[folder]

  return finish_split(records, report, present=present,
                      what=f"COCO split '{split}' (images under {image_dir})",
                      skip_missing=skip_missing)
