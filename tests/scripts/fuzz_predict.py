"""Fuzzes `--mode=predict` with randomly damaged image files; not collected by pytest.

  .venv/bin/python tests/scripts/fuzz_predict.py [--n=240] [--seed=0] [--keep=DIR]

Valid images in many encodings (JPEG baseline/progressive/EXIF-rotated/CMYK, PNG RGB/RGBA/grey/
palette/16-bit, GIF, BMP, TIFF, WebP) are damaged at random -- bit flips, truncation, a wrong or
garbled header, a huge declared size, inserted/deleted/zeroed bytes, appended junk -- and each
file is fed to the image loader and to predict (a workdir with a freshly initialised captioner).
Every file must come back captioned or with one DataError line naming it; anything else counts
as unhandled. Prints the counts and exits 1 if any exception was unhandled.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import struct
import sys
import tempfile
import traceback
import zlib

import numpy as np
from PIL import Image

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # helpers, and the repository root

from helpers import runs as rh  # noqa: E402
from capjax import run  # noqa: E402
from capjax.data.images import load_image  # noqa: E402
from capjax.data.reading import DataError  # noqa: E402


def base_images(rng: np.random.Generator) -> dict[str, bytes]:
  """Valid files in every encoding the loader claims to handle."""
  rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8))

  def enc(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()

  exif = Image.Exif()
  exif[0x0112] = 6
  out = {
      'baseline.jpg': enc(rgb, 'JPEG', quality=90),
      'progressive.jpg': enc(rgb, 'JPEG', progressive=True),
      'rotated.jpg': enc(rgb, 'JPEG', exif=exif.tobytes()),
      'cmyk.jpg': enc(rgb.convert('CMYK'), 'JPEG'),
      'grey.jpg': enc(rgb.convert('L'), 'JPEG'),
      'rgb.png': enc(rgb, 'PNG'),
      'rgba.png': enc(rgb.convert('RGBA'), 'PNG'),
      'grey.png': enc(rgb.convert('L'), 'PNG'),
      'palette.png': enc(rgb.convert('P'), 'PNG'),
      'deep16.png': enc(Image.fromarray(rng.integers(0, 65536, (30, 20)).astype(np.uint16)),
                        'PNG'),
      'anim.gif': enc(rgb.convert('P'), 'GIF', save_all=True,
                      append_images=[rgb.rotate(90).convert('P')]),
      'image.bmp': enc(rgb, 'BMP'),
      'image.tiff': enc(rgb, 'TIFF'),
  }
  try:
    out['image.webp'] = enc(rgb, 'WEBP')
  except (OSError, KeyError):  # Pillow built without WebP.
    pass
  return out


def _png_with_size(w: int, h: int) -> bytes:
  """A PNG whose header declares w x h but holds almost no data (a decompression bomb)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
          + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def damage(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
  """One random kind of damage; returns (its name, the damaged bytes)."""
  b = bytearray(data)
  kind = rng.choice(['bitflip', 'bitflip_header', 'truncate', 'wrong_header', 'garble_header',
                     'insert', 'delete', 'zero_chunk', 'append_junk', 'huge_size', 'empty'])
  n = len(b)
  if kind == 'bitflip':
    for pos in rng.integers(0, n, rng.integers(1, 64)):
      b[pos] ^= 1 << int(rng.integers(8))
  elif kind == 'bitflip_header':
    for pos in rng.integers(0, min(n, 64), rng.integers(1, 8)):
      b[pos] ^= 1 << int(rng.integers(8))
  elif kind == 'truncate':
    b = b[:int(rng.integers(1, n))]
  elif kind == 'wrong_header':
    sig = [b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff\xe0', b'GIF89a', b'BM', b'II*\x00',
           b'RIFF\x00\x00\x00\x00WEBP'][int(rng.integers(6))]
    b[:len(sig)] = sig
  elif kind == 'garble_header':
    k = int(rng.integers(2, 32))
    b[:k] = rng.integers(0, 256, k, np.uint8).tobytes()
  elif kind == 'insert':
    pos = int(rng.integers(0, n))
    b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 200)), np.uint8).tobytes()
  elif kind == 'delete':
    pos = int(rng.integers(0, n))
    del b[pos:pos + int(rng.integers(1, 200))]
  elif kind == 'zero_chunk':
    pos = int(rng.integers(0, n))
    b[pos:pos + 256] = bytes(len(b[pos:pos + 256]))
  elif kind == 'append_junk':
    b += rng.integers(0, 256, int(rng.integers(1, 4000)), np.uint8).tobytes()
  elif kind == 'huge_size':
    side = int(rng.choice([20000, 65535, 1 << 20, (1 << 31) - 1]))
    b = bytearray(_png_with_size(side, side))
  else:
    b = bytearray()
  return str(kind), bytes(b)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', type=int, default=240, help='damaged files to try')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--keep', default=None, help='folder to keep the files in')
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  folder = args.keep or tempfile.mkdtemp(prefix='capjax_fuzz_')
  os.makedirs(folder, exist_ok=True)
  bases = base_images(rng)
  paths, kinds = [], {}
  for i in range(args.n):
    name = list(bases)[int(rng.integers(len(bases)))]
    kind, data = damage(bases[name], rng)
    path = os.path.join(folder, f'{i:04d}_{kind}_{name}')
    with open(path, 'wb') as f:
      f.write(data)
    paths.append(path)
    kinds[path] = kind

  # 1. The loader on its own: every file gives an array or a DataError.
  loader = collections.Counter()
  unhandled = []
  for path in paths:
    try:
      image = load_image(path, size=32)
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      loader['decoded'] += 1
    except DataError as e:
      assert path in str(e) and '\n' not in str(e), str(e)
      loader['DataError'] += 1
    except Exception:  # pylint: disable=broad-except  # what the fuzz is looking for
      unhandled.append((path, traceback.format_exc(limit=3)))

  # 2. predict, as `launch.py --mode=predict --images=...` runs it, 40 files a call.
  workdir = os.path.join(folder, 'workdir')
  rh.make_predict_workdir(workdir)
  outcome = collections.Counter()
  for start in range(0, len(paths), 40):
    chunk = paths[start:start + 40]
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        results = run.predict(workdir, chunk)
    except run.UserError as e:  # Every file of the chunk unreadable: one error line.
      outcome['chunk with no readable file (UserError)'] += 1
      assert '\n' not in str(e)
      continue
    except Exception:  # pylint: disable=broad-except
      unhandled.append((f'predict chunk {start}', traceback.format_exc(limit=5)))
      continue
    for path, r in zip(chunk, results):
      assert r['path'] == path
      if 'caption' in r:
        outcome['captioned'] += 1
      else:
        assert path in r['error'], r
        outcome['reported as unreadable'] += 1

  by_kind = collections.Counter(kinds.values())
  print(f'{len(paths)} damaged files in {folder} ({len(bases)} base encodings)')
  print('damage kinds:', dict(sorted(by_kind.items())))
  print('load_image:', dict(loader))
  print('predict:', dict(outcome))
  print(f'unhandled exceptions: {len(unhandled)}')
  for where, tb in unhandled[:5]:
    print(f'--- {where}\n{tb}')
  return 1 if unhandled else 0


if __name__ == '__main__':
  sys.exit(main())
