"""A user's own captioned images: an image folder plus a CSV or JSON-lines captions file.

  images_dir/<name>.jpg ...                    any image files, subfolders allowed
  captions.csv     image,caption               header row; more columns are ignored
                   dog1.jpg,"A dog, running"   several rows per image allowed
  captions.jsonl   {"image": "dog1.jpg", "caption": "A dog running"}   one object per line

Image names are paths relative to images_dir. The train/validation/test split is by fraction
of images, in a fixed pseudo-random order (a hash of each name), so it is the same on every
machine and run, does not follow any ordering in the names (dates, classes), and adding images
later moves few existing ones between splits.

Pickle files are refused on purpose: unpickling runs arbitrary code from the file, and caption
files are often downloaded from strangers.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

from capjax.data.images import IMAGE_EXTENSIONS
from capjax.data.reading import (SPLITS, CaptionSplit, DataError, ReadReport, canonical_split,
                                 check_fractions, clean_caption, finish_split, read_lines,
                                 split_by_fraction)

IMAGE_COLUMNS = ('image', 'image_name', 'filename', 'file_name', 'file', 'path')
CAPTION_COLUMNS = ('caption', 'text', 'description', 'sentence')
_FRACTIONS_FLAG = '--config.own.split_fractions'


def _pick(columns: list[str], candidates: Sequence[str], path: str, what: str) -> int:
  lowered = [c.strip().lower() for c in columns]
  for c in candidates:
    if c in lowered:
      return lowered.index(c)
  raise DataError(f'{path} has no {what} column (found {columns!r}); name the columns '
                  f'"image" and "caption" in its header row.')


def _read_csv(path: str, report: ReadReport) -> list[tuple[str, str, str]]:
  """(image, caption, where) rows of a CSV with a header row."""
  text = '\n'.join(read_lines(path, report))
  rows = csv.reader(io.StringIO(text))
  header = next(rows, None)
  if not header:
    raise DataError(f'{path} is empty; write a header row "image,caption" and one row per '
                    f'caption.')
  ii = _pick(header, IMAGE_COLUMNS, path, 'image')
  ci = _pick(header, CAPTION_COLUMNS, path, 'caption')
  out = []
  for row in rows:
    where = f'{path}:{rows.line_num}'
    if not any(cell.strip() for cell in row):
      continue
    if len(row) <= max(ii, ci):
      report.count('malformed_lines', where)
      continue
    out.append((row[ii].strip(), row[ci], where))
  return out


def _read_jsonl(path: str, report: ReadReport) -> list[tuple[str, str, str]]:
  """(image, caption, where) rows of a JSON-lines file."""
  out = []
  for i, line in enumerate(read_lines(path, report), start=1):
    where = f'{path}:{i}'
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      report.count('malformed_lines', where)
      continue
    if not isinstance(row, dict):
      report.count('malformed_lines', where)
      continue
    image = next((row[k] for k in IMAGE_COLUMNS if isinstance(row.get(k), str)), None)
    caption = next((row[k] for k in CAPTION_COLUMNS if isinstance(row.get(k), str)), None)
    if image is None or caption is None:
      report.count('malformed_lines', where)
      continue
    out.append((image.strip(), caption, where))
  return out


def read_caption_rows(captions_file: str, report: ReadReport) -> dict[str, list[str]]:
  """image name -> captions (file order) from a CSV or JSON-lines captions file."""
  path = os.fspath(captions_file)
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.pkl', '.pickle', '.p'):
    raise DataError(f'{path} is a pickle, which capjax does not load because unpickling can run '
                    f'arbitrary code; save the captions as CSV (image,caption) or JSON lines.')
  if not os.path.isfile(path):
    raise DataError(f'Captions file {path} does not exist; check --config.own.captions_file '
                    f'(a path relative to --config.data_dir, or absolute).')
  if ext in ('.csv', '.txt'):
    rows = _read_csv(path, report)
  elif ext in ('.jsonl', '.jsonlines', '.ndjson'):
    rows = _read_jsonl(path, report)
  else:
    raise DataError(f'Captions file {path} has extension {ext!r}; use a .csv file with an '
                    f'image,caption header or a .jsonl file of {{"image", "caption"}} rows.')
  captions: dict[str, list[str]] = {}
  for image, caption, where in rows:
    caption = clean_caption(caption)
    if not image:
      report.count('malformed_lines', where)
    elif not caption:
      report.count('empty_captions', where)
    else:
      captions.setdefault(image, []).append(caption)
  return captions


def read_own_captions(images_dir: str, captions_file: str, split: str, *,
                      fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                      skip_missing: bool = False) -> CaptionSplit:
  """Reads one split of a user's own captioned images.

  Args:
    images_dir: folder the image names in the captions file are relative to.
    captions_file: a .csv (header with image and caption columns) or .jsonl file; several rows
      per image give several captions.
    split: 'train', 'validation' (or 'val'/'dev'), or 'test'.
    fractions: (train, validation, test) shares of the images.
    seed: varies the split order reproducibly.
    skip_missing: skip images that are not on disk (counted in the report) instead of raising.

  Returns:
    CaptionSplit(records, report); records are {'id': the image name as written in the file,
    'image_path', 'captions'}, sorted by name. The report is also logged.
  """
  split = canonical_split(split)
  check_fractions(fractions, _FRACTIONS_FLAG)
  images_dir = os.fspath(images_dir)
  if not os.path.isdir(images_dir):
    raise DataError(f'Image folder {images_dir} does not exist or is not a folder; check '
                    f'--config.own.images_dir (by default --config.data_dir).')
  report = ReadReport(source=f'own captions {captions_file} split {split!r} in {images_dir}')
  captions = read_caption_rows(captions_file, report)
  if not captions:
    raise DataError(f'Captions file {captions_file} has no usable (image, caption) rows; check '
                    f'its header and contents.')
  names = split_by_fraction(list(captions), fractions, seed,
                            flag=_FRACTIONS_FLAG)[SPLITS.index(split)]
  records = [{'id': name, 'image_path': os.path.join(images_dir, name),
              'captions': captions[name]} for name in names]
  # Images in the folder that no caption row names are worth knowing about (a typo in a name
  # shows up both here and as a missing image), but only top-level files are checked: cheap.
  for entry in sorted(os.listdir(images_dir)):
    if entry.lower().endswith(IMAGE_EXTENSIONS) and entry not in captions:
      report.count('images_without_captions', os.path.join(images_dir, entry))
  return finish_split(records, report, present=os.path.isfile,
                      what=f"Own captions split '{split}' ({captions_file})",
                      skip_missing=skip_missing)
