"""Classification readers: Tiny ImageNet-200 (or any subset of its classes) and image folders.

Tiny ImageNet-200 layout (Stanford CS231n release):

  root/wnids.txt                              the release's class ids, one per line
  root/words.txt                              wnid \\t "name, other name, ..." (all of WordNet)
  root/train/<wnid>/images/<wnid>_<i>.JPEG    500 per class
  root/val/images/val_<n>.JPEG + root/val/val_annotations.txt   "file \\t wnid \\t box"

The test set's labels are not public, so the release's val/ is used as the 'test' split, and
'train'/'validation' are cut from train/ per class (450/50 by default): images sorted by their
number, the last `val_per_class` for validation. Labels follow the order of the wnid list.

Image folders: root/<class>/**/<image> with class names = sorted folder names, or
root/{train,val,test}/<class>/... where any split folder that is absent is carved out of train/
per class by fraction (`reading.split_by_fraction`, the hash order own captions are split in).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from capjax.data.images import IMAGE_EXTENSIONS
from capjax.data.reading import (SPLITS, ClassifySplit, DataError, ReadReport, canonical_split,
                                 check_fractions, finish_split, list_dir, read_lines,
                                 split_by_fraction)

_SKIP_FLAG = '--config.tiny_imagenet.skip_missing_images'
_FRACTIONS_FLAG = '--config.image_folder.split_fractions'
_SPLIT_FOLDERS = {'train': ('train',), 'validation': ('val', 'validation', 'dev'),
                  'test': ('test',)}


def _natural_key(name: str) -> list:
  """Sort key that orders 'x_2' before 'x_10'."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def read_wnids(root: str, wnids: Sequence[str] | str | None) -> list[str]:
  """The class ids to use: a list as given, a path to a wnids file, or root/wnids.txt."""
  if wnids is None or isinstance(wnids, (str, os.PathLike)):
    path = os.fspath(wnids) if wnids is not None else os.path.join(root, 'wnids.txt')
    if not os.path.isfile(path):
      raise DataError(f'Class list {path} does not exist; point the dataset root at the Tiny '
                      f'ImageNet folder (with wnids.txt) or set --config.tiny_imagenet.wnids.')
    wnids = [w.strip() for w in read_lines(path, ReadReport(source=path)) if w.strip()]
  wnids = list(wnids)
  if not wnids:
    raise DataError('The Tiny ImageNet class list is empty; give at least one wnid.')
  dupes = sorted({w for w in wnids if wnids.count(w) > 1})
  if dupes:
    raise DataError(f'The Tiny ImageNet class list repeats {dupes[:3]}; list each wnid once.')
  return wnids


def class_names_from_words(root: str, wnids: Sequence[str]) -> list[str]:
  """The first name in words.txt for each wnid ('n04070727' -> 'refrigerator'); the wnid itself
  where words.txt is absent or lacks it."""
  path = os.path.join(root, 'words.txt')
  names: dict[str, str] = {}
  if os.path.isfile(path):
    wanted = set(wnids)
    for line in read_lines(path, ReadReport(source=path)):
      wnid, _, words = line.partition('\t')
      if wnid.strip() in wanted:
        names[wnid.strip()] = words.split(',')[0].strip() or wnid.strip()
  return [names.get(w, w) for w in wnids]


def read_tiny_imagenet(root: str, split: str, *, wnids: Sequence[str] | str | None = None,
                       train_per_class: int = 450, val_per_class: int = 50,
                       skip_missing: bool = False) -> ClassifySplit:
  """Reads one split of Tiny ImageNet-200, restricted to a list of classes.

  Args:
    root: the folder holding wnids.txt, words.txt, train/ and val/.
    split: 'train' or 'validation' (both from train/), or 'test' (the release's val/).
    wnids: the classes, in label order: a list, a path to a file of wnids, or None for
      root/wnids.txt.
    train_per_class, val_per_class: images per class for train and validation; validation takes
      the last val_per_class images (by number), train the first train_per_class of the rest.
    skip_missing: skip val/ images named in val_annotations.txt but absent, instead of raising.

  Returns:
    ClassifySplit(records, class_names, report); records are {'id': file stem, 'image_path',
    'label': index into class_names}.
  """
  split = canonical_split(split)
  root = os.fspath(root)
  if not os.path.isdir(os.path.join(root, 'train')):
    raise DataError(f'No Tiny ImageNet train/ folder in {root}; point the dataset root at the '
                    f'unzipped tiny-imagenet-200 folder (with wnids.txt, train/, val/).')
  wnids = read_wnids(root, wnids)
  class_names = class_names_from_words(root, wnids)
  report = ReadReport(source=f'Tiny ImageNet ({len(wnids)} classes) split {split!r} at {root}')
  records = []
  if split == 'test':
    labels = {w: i for i, w in enumerate(wnids)}
    ann_path = os.path.join(root, 'val', 'val_annotations.txt')
    if not os.path.isfile(ann_path):
      raise DataError(f'{ann_path} does not exist; restore val/ from the Tiny ImageNet zip.')
    image_dir = os.path.join(root, 'val', 'images')
    for i, line in enumerate(read_lines(ann_path, report), start=1):
      fields = line.split('\t')
      if len(fields) < 2 or not fields[0].strip():
        if line.strip():
          report.count('malformed_lines', f'{ann_path}:{i}')
        continue
      name, wnid = fields[0].strip(), fields[1].strip()
      if wnid in labels:
        records.append({'id': os.path.splitext(name)[0],
                        'image_path': os.path.join(image_dir, name), 'label': labels[wnid]})
    on_disk = list_dir(image_dir)
    return finish_split(records, report, present=lambda p: os.path.basename(p) in on_disk,
                        what=f"Tiny ImageNet split 'test' ({image_dir})",
                        skip_missing=skip_missing, skip_flag=_SKIP_FLAG, class_names=class_names)

  for label, wnid in enumerate(wnids):
    image_dir = os.path.join(root, 'train', wnid, 'images')
    files = sorted((f for f in list_dir(image_dir) if _is_image(f)), key=_natural_key)
    if len(files) <= val_per_class:
      raise DataError(f'Tiny ImageNet class {wnid} has {len(files)} images in {image_dir}, not '
                      f'more than --config.tiny_imagenet.val_per_class={val_per_class}; check '
                      f'the wnid list and the download, or lower that value.')
    rest, val = files[:len(files) - val_per_class], files[len(files) - val_per_class:]
    chosen = rest[:train_per_class] if split == 'train' else val
    records.extend({'id': os.path.splitext(f)[0], 'image_path': os.path.join(image_dir, f),
                    'label': label} for f in chosen)
  return finish_split(records, report, class_names=class_names)


def _subdirs(folder: str) -> list[str]:
  """Sorted visible subfolder names (hidden ones like .ipynb_checkpoints are not classes)."""
  return sorted(d for d in list_dir(folder)
                if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))


def _images_under(folder: str) -> list[str]:
  """Image paths under `folder` (any depth), relative to it, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel = os.path.relpath(dirpath, folder)
    found.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if _is_image(f))
  return sorted(found, key=_natural_key)


def split_folders(root: str) -> dict[str, str]:
  """{split: folder} for root/{train,val,test}/ layouts, or {'train': root} for root/<class>/."""
  subdirs = _subdirs(root)
  known = {name: split for split, names in _SPLIT_FOLDERS.items() for name in names}
  if 'train' in subdirs and all(d in known for d in subdirs):
    return {known[d]: os.path.join(root, d) for d in subdirs}
  return {'train': root}


def read_image_folder(root: str, split: str, *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                      seed: int = 0) -> ClassifySplit:
  """Reads one split of an image-folder classification dataset.

  Args:
    root: root/<class>/... images, or root/train/<class>/... with optional val/ (or
      validation/, dev/) and test/ folders of the same classes.
    split: 'train', 'validation' (or 'val'), or 'test'.
    fractions: (train, validation, test) shares used, per class, to carve the splits that have
      no folder of their own out of train/ (or out of root for the flat layout).
    seed: varies that carving reproducibly.

  Returns:
    ClassifySplit(records, class_names, report); class_names are train's sorted class folder
    names; records are {'id': '<class>/<relative path without extension>', 'image_path',
    'label'}.
  """
  split = canonical_split(split)
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DataError(f'Image folder {root} does not exist or is not a folder; check the dataset '
                    f'root.')
  check_fractions(fractions, _FRACTIONS_FLAG)
  folders = split_folders(root)
  class_names = _subdirs(folders['train'])
  if not class_names:
    raise DataError(f'No class folders in {folders["train"]}; expected one subfolder of images '
                    f'per class (root/<class>/<image>).')
  report = ReadReport(source=f'image folder ({len(class_names)} classes) split {split!r} at '
                             f'{root}')
  carved = [s for s in SPLITS if s == 'train' or s not in folders]
  source = folders[split] if split in folders and split != 'train' else folders['train']
  extra = sorted(set(_subdirs(source)) - set(class_names))
  if extra:
    raise DataError(f'{source} has class folders {extra[:3]} that {folders["train"]} lacks; '
                    f'give every split the same class folders.')
  records = []
  for label, name in enumerate(class_names):
    files = _images_under(os.path.join(source, name))
    if not files and source == folders['train']:
      raise DataError(f'Class folder {os.path.join(source, name)} has no images; add images '
                      f'(one of {", ".join(IMAGE_EXTENSIONS)}) or remove the folder.')
    if source == folders['train']:
      shares = [fractions[SPLITS.index(s)] for s in carved]
      files = split_by_fraction(files, shares, seed, flag=_FRACTIONS_FLAG)[carved.index(split)]
      files.sort(key=_natural_key)
    records.extend({'id': f'{name}/{os.path.splitext(f)[0]}',
                    'image_path': os.path.join(source, name, f), 'label': label} for f in files)
  return finish_split(records, report, class_names=class_names)
