"""Tiny datasets written in the real on-disk layouts, for reader tests.

Each `make_*` writes a few 8x8 images (Pillow) and the dataset's own text/JSON files under a
folder, and returns what a test needs to check the reader against.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

SHARED_DATA = '/work/shared/data'


def write_image(path, colour=(200, 30, 30), size=(8, 8)) -> str:
  """Writes a solid-colour RGB image; format from the extension (.JPEG counts as JPEG)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.zeros((size[0], size[1], 3), np.uint8) + np.asarray(colour, np.uint8)
  fmt = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG'}[os.path.splitext(path)[1].lower()]
  Image.fromarray(arr).save(path, fmt)
  return path


def write_text(path, text: str | bytes) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(text.encode('utf-8') if isinstance(text, str) else text)
  return path


def flickr_names(n: int, start: int = 1000) -> list[str]:
  """Flickr-style image names, e.g. '1000_ab12cd34ef.jpg'."""
  return [f'{start + i}_{i:010x}.jpg' for i in range(n)]


def make_flickr8k_official(root, train: Sequence[str], dev: Sequence[str], test: Sequence[str],
                           *, captions_per_image: int = 5, absent: Sequence[str] = (),
                           extra_token_lines: str = '') -> dict[str, list[str]]:
  """Official layout; images in `absent` are listed and captioned but not written. Adds the
  release's "<name>.jpg.1" typo line (an image in no split). Returns name -> captions."""
  root = os.fspath(root)
  captions, lines = {}, []
  for name in [*train, *dev, *test]:
    captions[name] = [f'caption {k} of {name} , with a comma' for k in range(captions_per_image)]
    lines += [f'{name}#{k}\t{c}' for k, c in enumerate(captions[name])]
    if name not in absent:
      write_image(os.path.join(root, 'Flicker8k_Dataset', name))
  lines.append('2258277193_586949ec62.jpg.1#0\tpeople waiting for the subway')
  text_dir = os.path.join(root, 'Flickr8k_text')
  write_text(os.path.join(text_dir, 'Flickr8k.token.txt'), '\n'.join(lines) + '\n'
             + extra_token_lines)
  for split, names in (('train', train), ('dev', dev), ('test', test)):
    write_text(os.path.join(text_dir, f'Flickr_8k.{split}Images.txt'), '\n'.join(names) + '\n')
  return captions


def make_flickr8k_kaggle(root, names: Sequence[str], captions_per_image: int = 2):
  """Kaggle layout: Images/ + captions.txt CSV with header. Returns name -> captions."""
  root = os.fspath(root)
  captions = {n: [f'a dog, running {k} "fast"' for k in range(captions_per_image)]
              for n in names}
  rows = ['image,caption']
  for n in names:
    write_image(os.path.join(root, 'Images', n))
    rows += [f'{n},"{c.replace(chr(34), chr(34) * 2)}"' for c in captions[n]]
  write_text(os.path.join(root, 'captions.txt'), '\n'.join(rows) + '\n')
  return captions


def make_coco(root, year: str = '2014', n_train: int = 3, n_val: int = 2,
              absent_val: int = 0) -> None:
  """annotations/captions_{train,val}<year>.json + image folders; 2 captions per image."""
  root = os.fspath(root)
  for prefix, n, absent in (('train', n_train, 0), ('val', n_val, absent_val)):
    images, anns = [], []
    for i in range(n):
      image_id = (1 if prefix == 'train' else 500) + i
      # 2014 files carry the split and year in their names; 2017 renamed them to the id.
      name = (f'{image_id:012d}.jpg' if year != '2014'
              else f'COCO_{prefix}{year}_{image_id:012d}.jpg')
      images.append({'id': image_id, 'file_name': name, 'height': 8, 'width': 8})
      anns += [{'id': 10 * image_id + k, 'image_id': image_id,
                'caption': f'A photo\nof {image_id} number {k}. '} for k in range(2)]
      if i >= absent:
        write_image(os.path.join(root, f'{prefix}{year}', name))
    write_text(os.path.join(root, 'annotations', f'captions_{prefix}{year}.json'),
               json.dumps({'info': {}, 'images': images, 'annotations': anns}))


def make_karpathy(root, splits: Sequence[str] = ('train', 'restval', 'val', 'test'),
                  only_2017_images: bool = False) -> str:
  """dataset_coco.json with one image per split entry; images in val2014/ (or, with
  only_2017_images, renamed into val2017/). Returns the file's path."""
  root = os.fspath(root)
  images = []
  for i, split in enumerate(splits):
    cocoid = 100 + i
    name = f'COCO_val2014_{cocoid:012d}.jpg'
    images.append({'filepath': 'val2014', 'filename': name, 'split': split, 'cocoid': cocoid,
                   'imgid': i, 'sentids': [2 * i, 2 * i + 1],
                   'sentences': [{'raw': f'Raw caption {k} for {cocoid}.',
                                  'tokens': ['raw', 'caption'], 'imgid': i, 'sentid': k}
                                 for k in range(2)]})
    if only_2017_images:
      write_image(os.path.join(root, 'val2017', f'{cocoid:012d}.jpg'))
    else:
      write_image(os.path.join(root, 'val2014', name))
  return write_text(os.path.join(root, 'dataset_coco.json'),
                    json.dumps({'images': images, 'dataset': 'coco'}))


def make_tiny_imagenet(root, wnids: Sequence[str], n_train: int = 6, n_val: int = 2,
                       extra_wnids: Sequence[str] = ('n09999999',)) -> None:
  """Tiny ImageNet layout with n_train images per class and n_val val/ images per class.

  `extra_wnids` appear in words.txt and val_annotations.txt but not in wnids.txt, as the
  release's full tables name classes a subset does not use."""
  root = os.fspath(root)
  write_text(os.path.join(root, 'wnids.txt'), '\n'.join(wnids) + '\n')
  words = [f'{w}\tclass{i}, other name, more' for i, w in enumerate([*wnids, *extra_wnids])]
  write_text(os.path.join(root, 'words.txt'), '\n'.join(['n00001740\tentity', *words]) + '\n')
  ann, v = [], 0
  for c, wnid in enumerate([*wnids, *extra_wnids]):
    if wnid in wnids:
      for i in range(n_train):
        write_image(os.path.join(root, 'train', wnid, 'images', f'{wnid}_{i}.JPEG'),
                    colour=(c * 20, i * 20, 0))
      write_text(os.path.join(root, 'train', wnid, f'{wnid}_boxes.txt'), 'x\t0\t0\t8\t8\n')
    for _ in range(n_val):
      write_image(os.path.join(root, 'val', 'images', f'val_{v}.JPEG'))
      ann.append(f'val_{v}.JPEG\t{wnid}\t0\t0\t8\t8')
      v += 1
  write_text(os.path.join(root, 'val', 'val_annotations.txt'), '\n'.join(ann) + '\n')


def make_image_folder(root, counts: dict[str, int], ext: str = '.png') -> None:
  """root/<class>/img_<i><ext> with counts[class] images each."""
  for c, (name, n) in enumerate(counts.items()):
    for i in range(n):
      write_image(os.path.join(os.fspath(root), name, f'img_{i}{ext}'), colour=(c * 40, i, 0))
