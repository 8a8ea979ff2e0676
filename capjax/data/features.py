"""HDF5 cache of a frozen encoder's features, so the decoder trains without touching images.

One file per (data set, split, encoder, feature kind, image size) under the cache folder, e.g.
`flickr8k_train_resnet50_224px_grid.h5`:

  features   N x h x w x C (grid) or N x C (pooled), float16, one chunk per row
  ids        N example ids, in the split's order (checked against the split when read)
  attrs      'key': JSON of everything the features depend on: the prepared split (its config
             name hashes the file list and captions), encoder, weights (sha256 of the .h5 file,
             or 'random-init' and the seed), image size, kind; 'complete': 1

A file whose key differs from the wanted one (new weights, another seed, a changed file list) is
rebuilt in place; a build cut short leaves only a temporary file, never a file with a valid key.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import h5py
import numpy as np
from absl import logging

from capjax.data.reading import DataError

FORMAT_VERSION = 1


def weights_id(path: str | None, seed: int) -> str:
  """'sha256:<hex>' of a weights file, or 'random-init-seed<N>' when there is none."""
  if not path:
    return f'random-init-seed{int(seed)}'
  digest = hashlib.sha256()
  try:
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 22):
        digest.update(chunk)
  except OSError as e:
    raise DataError(f'Cannot read the encoder weights file {path} ({e.strerror or e}); fix '
                    f'--config.model.encoder_weights.') from None
  return 'sha256:' + digest.hexdigest()


def cache_key(*, dataset: str, split: str, records: str, encoder: str, weights: str,
              image_size: int, pooled: bool) -> dict:
  """Everything a cached feature file depends on; stored in, and compared with, its attrs.

  `records` names the prepared split's contents (its TFDS config name, a hash of the file
  list and captions), so new or changed images rebuild the cache.
  """
  return {'version': FORMAT_VERSION, 'dataset': dataset, 'split': split, 'records': records,
          'encoder': encoder, 'weights': weights, 'image_size': int(image_size),
          'kind': 'pooled' if pooled else 'grid'}


def cache_path(cache_dir: str, key: dict) -> str:
  """One file per data set, split, encoder, size and kind; the rest of the key is in attrs."""
  name = (f"{key['dataset']}_{key['split']}_{key['encoder']}_{key['image_size']}px_"
          f"{key['kind']}.h5")
  return os.path.join(cache_dir, name)


def read_key(path: str) -> dict | None:
  """The key of a complete cache file, or None (absent, partial, unreadable)."""
  try:
    with h5py.File(path, 'r') as f:
      if not f.attrs.get('complete'):
        return None
      return json.loads(f.attrs['key'])
  except (OSError, KeyError, ValueError):
    return None


def ensure(cache_dir: str, key: dict, ids: Sequence[str], load_image: Callable[[int], np.ndarray],
           encode: Callable[[np.ndarray], np.ndarray], batch_size: int = 32,
           log_every_s: float = 15.0) -> str:
  """The path of an up-to-date feature file for `key`, building it first if needed.

  Args:
    cache_dir: folder of the cache files (created if needed).
    key: from `cache_key`.
    ids: the split's example ids, in order; row i holds example i.
    load_image: i -> uint8 H x W x 3 image of example i, already at the encoder's input size.
    encode: uint8 B x H x W x 3 -> features B x ... (the frozen encoder, jitted).
    batch_size: images per `encode` call; the last batch is padded to keep one compiled shape.
  """
  os.makedirs(cache_dir, exist_ok=True)
  path = cache_path(cache_dir, key)
  _remove_orphans(path)
  found = read_key(path) if os.path.exists(path) else None
  if found == key:
    logging.info('Feature cache hit: %s (%d rows).', path, len(ids))
    return path
  logging.info('Feature cache %s: building %s for %d images (%s).',
               'miss' if found is None else 'stale (key changed)', path, len(ids),
               json.dumps(key, sort_keys=True))
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    _build(tmp, os.path.basename(path), key, ids, load_image, encode, batch_size, log_every_s)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _remove_orphans(path: str) -> None:
  """Deletes temporary files of builds whose process is gone (a SIGKILL/SIGTERM during a
  build skips the `finally` that would have removed them)."""
  folder, prefix = os.path.dirname(path), os.path.basename(path) + '.tmp-'
  for name in os.listdir(folder):
    if not name.startswith(prefix):
      continue
    try:
      os.kill(int(name[len(prefix):]), 0)  # Signal 0: only asks whether the process exists.
    except ProcessLookupError:
      os.remove(os.path.join(folder, name))
      logging.info('Removed %s, left by a feature-cache build that was killed.', name)
    except (ValueError, PermissionError):
      pass  # Not our naming, or another user's live process: leave it.


def _build(path, label, key, ids, load_image, encode, batch_size, log_every_s) -> None:
  n = len(ids)
  t0 = last_log = time.perf_counter()
  with h5py.File(path, 'w') as f, concurrent.futures.ThreadPoolExecutor(4) as pool:
    f.create_dataset('ids', data=np.asarray([str(i).encode('utf-8') for i in ids], dtype='S'))
    features = None
    # Decoding runs on threads one batch ahead of the encoder.
    starts = range(0, n, batch_size)
    pending = pool.map(load_image, range(min(batch_size, n)))
    for start in starts:
      images = list(pending)
      nxt = start + batch_size
      if nxt < n:
        pending = pool.map(load_image, range(nxt, min(nxt + batch_size, n)))
      real = len(images)
      images += [images[-1]] * (batch_size - real)
      out = np.asarray(encode(np.stack(images)))[:real].astype(np.float16)
      if features is None:
        features = f.create_dataset('features', shape=(n, *out.shape[1:]), dtype=np.float16,
                                    chunks=(1, *out.shape[1:]))
      features[start:start + real] = out
      done = start + real
      now = time.perf_counter()
      if now - last_log >= log_every_s or done == n:
        last_log = now
        rate = done / max(now - t0, 1e-9)
        eta = (n - done) / max(rate, 1e-9)
        logging.info('Feature cache %s: %d/%d images, %.1f images/s, ETA %dm%02ds.',
                     label, done, n, rate, eta // 60, eta % 60)
    f.attrs['key'] = json.dumps(key, sort_keys=True)
    f.attrs['complete'] = 1


class FeatureSource:
  """Random access to {'features', 'captions', 'id'} rows of a cache file (a grain source).

  Captions come from memory (read once from the prepared split), features from the file one
  row at a time, so a large grid cache never has to fit in RAM. The file is opened lazily, so
  the source can be pickled into grain worker processes.
  """

  def __init__(self, path: str, captions: Sequence[Sequence], ids: Sequence[str]):
    self.path = path
    self.captions = list(captions)
    self.ids = [str(i) for i in ids]
    self._file = None
    with h5py.File(path, 'r') as f:
      stored = [i.decode('utf-8') for i in f['ids'][:]]
      self.feature_shape = tuple(f['features'].shape[1:])
    if stored != self.ids:
      raise DataError(f'Feature cache {path} holds other examples than the split it was read '
                      f'for; delete the file to rebuild it.')

  def __len__(self) -> int:
    return len(self.ids)

  def __getitem__(self, i: int) -> dict:
    if self._file is None:
      self._file = h5py.File(self.path, 'r')
    return {'features': self._file['features'][int(i)], 'captions': self.captions[i],
            'id': self.ids[i]}

  def __getstate__(self):
    return {**self.__dict__, '_file': None}
