"""Users' image files: which names count as images, and decoding them into uint8 RGB, robustly.

Every image capjax reads goes through `load_image`. Real folders hold greyscale scans, 16-bit
PNGs, CMYK JPEGs from print workflows, palette GIFs, transparent PNGs, rotated phone photos, and
the occasional zero-byte or truncated download. `load_image` turns all of these into (H, W, 3)
uint8 RGB, and every file it cannot read into a `DataError` naming the file: any input gives an
array or a DataError, never another exception type, so a data pipeline can skip or report bad
files with one `except DataError`. `resize_image` resizes an array the same way, and
`IMAGE_EXTENSIONS` are the file endings the readers take for images when they list a folder.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from capjax.data.reading import DataError

# Lower-case endings of the files a reader lists as images (Pillow reads all of these).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
Size = Union[int, tuple[int, int]]

# Refuse images above this many pixels by default: ~100 MP is a large panorama or scan and still
# decodes in ~300 MB, while decompression bombs declare billions of pixels in a few bytes. Pillow
# itself refuses above 2 * Image.MAX_IMAGE_PIXELS (~179 MP) whatever is asked here.
DEFAULT_MAX_PIXELS = 100_000_000
# Pillow warns (on stderr, once per image) above ~89 MP; images here are refused or decoded by
# the explicit limit above, so its warning would only repeat that as noise in predict's output.
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
# Damaged EXIF/TIFF metadata makes Pillow warn, several lines per file, about tags it then
# skips; a file that still decodes is fine and one that does not becomes one DataError.
warnings.filterwarnings('ignore', category=UserWarning, module=r'PIL\.TiffImagePlugin')

# EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

# Modes that carry transparency; they are composited over white (see _to_rgb).
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')


def _hw(size: Size) -> tuple[int, int]:
  """(height, width) from an int (square) or an (height, width) pair; checks both are >= 1."""
  h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if int(h) < 1 or int(w) < 1:
    raise ValueError(f'image size must be positive, got {size!r}')
  return int(h), int(w)


# File signatures, so a file that claims a format but is broken is not called "not an image".
_SIGNATURES = ((b'\x89PNG', 'PNG'), (b'\xff\xd8\xff', 'JPEG'), (b'GIF8', 'GIF'),
               (b'BM', 'BMP'), (b'II*\x00', 'TIFF'), (b'MM\x00*', 'TIFF'))


def _sniff(fp) -> str | None:
  """The format a file's first bytes claim, or None."""
  try:
    fp.seek(0)
    head = fp.read(12)
  except (OSError, ValueError):  # closed or unseekable: just don't claim a format
    return None
  if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
    return 'WebP'
  return next((fmt for sig, fmt in _SIGNATURES if head.startswith(sig)), None)


def _name(source: Source, name: str | None) -> str:
  """How a source is named in error messages."""
  if name is not None:
    return name
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f'<{len(source)} bytes in memory>'
  return os.fspath(source)


def _first_line(e: Exception, limit: int = 160) -> str:
  """An exception's message cut to one short line, so DataError messages stay one sentence."""
  text = (str(e).strip().splitlines() or [''])[0]
  return text if len(text) <= limit else text[:limit] + '...'


def _open_source(source: Source, name: str):
  """A binary file object for `source`; raises DataError for paths that cannot be read."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    if len(source) == 0:
      raise DataError(f'Image {name} is empty (0 bytes); re-download or remove it.')
    return io.BytesIO(bytes(source))
  path = os.fspath(source)
  if not os.path.exists(path):
    raise DataError(f'Image file {path} does not exist; check the path and the dataset root.')
  if os.path.isdir(path):
    raise DataError(f'Image path {path} is a folder, not a file; point at an image file.')
  if os.path.getsize(path) == 0:
    raise DataError(f'Image file {path} is empty (0 bytes); re-download or remove it.')
  try:
    return open(path, 'rb')
  except OSError as e:
    raise DataError(f'Image file {path} cannot be opened ({e.strerror or e}); '
                    f'check its permissions.') from e


def _high_depth_to_l(im: Image.Image) -> Image.Image:
  """Greyscale deeper than 8 bits (I;16*, I, F) -> 8-bit L, keeping the image's own range.

  Pillow's own convert('L') clips these at 255, which turns most 16-bit images white.
  16-bit modes are scaled by 255/65535; 32-bit int images whose values fit 8 or 16 bits are
  treated as such (16-bit PNGs decode to 'I'); anything else (float images, odd ranges) is
  stretched min..max, with [0, 1] floats taken as already normalised.
  """
  arr = np.asarray(im).astype(np.float64)
  arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
  if im.mode.startswith('I;16') or (im.mode == 'I' and lo >= 0 and 255 < hi <= 65535):
    out = arr * (255.0 / 65535.0)
  elif im.mode == 'I' and lo >= 0 and hi <= 255:
    out = arr
  elif im.mode == 'F' and lo >= 0 and hi <= 1:
    out = arr * 255.0
  else:
    out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
  return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode='L')


def _to_rgb(im: Image.Image) -> Image.Image:
  """Any Pillow mode -> RGB.

  Transparent images are composited over white rather than having their alpha dropped: the
  colour under fully transparent pixels is arbitrary (often black, sometimes leftover junk), and
  transparent PNGs (logos, product shots, icons) are meant to be seen on a light page.
  """
  if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
    im = _high_depth_to_l(im)
  has_alpha = im.mode in _ALPHA_MODES or 'transparency' in im.info
  if has_alpha:
    rgba = im.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  # CMYK, YCbCr, LAB, HSV, 1, L and P all have direct conversions.
  return im if im.mode == 'RGB' else im.convert('RGB')


def _exif_transpose(im: Image.Image) -> Image.Image:
  """Applies the EXIF orientation, so phone photos come out upright.

  A broken EXIF block is common in otherwise good camera files, so failing to read or apply
  the orientation keeps the image as stored instead of rejecting it.
  """
  try:
    return ImageOps.exif_transpose(im)
  except Exception:  # pylint: disable=broad-except  # bad metadata must not drop good pixels
    return im


def _orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except  # see _exif_transpose
    return 1


def _decode(fp, name: str, size: tuple[int, int] | None, max_pixels: int) -> np.ndarray:
  with Image.open(fp) as im:
    w, h = im.size
    if w * h > max_pixels:
      raise DataError(
          f'Image {name} is {w}x{h} = {w * h / 1e6:.0f} MP, above the {max_pixels / 1e6:.0f} MP '
          f'limit; downscale it, or raise max_pixels if it really is that large.')
    if size is not None and im.format == 'JPEG':
      # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the requested size),
      # which is several times faster for big photos. It works in stored orientation, so the
      # target is swapped for images that EXIF rotates by 90 degrees (JPEG EXIF is in the
      # header, so reading it here decodes no pixels).
      th, tw = size
      if _orientation(im) in _TRANSPOSING_ORIENTATIONS:
        th, tw = tw, th
      im.draft('RGB', (tw, th))
    # Only frame 0 of animated images (GIF, APNG, WebP) is decoded: Image.open leaves it current.
    # load() comes before any other EXIF read: for PNG, getexif() loads the pixels itself, and
    # its errors would be swallowed by _orientation's tolerance of bad metadata.
    im.load()
    orientation = _orientation(im)
    # exif_transpose copies even upright images, so it is only called when there is a rotation.
    out = _to_rgb(_exif_transpose(im) if orientation != 1 else im)
    if size is not None and out.size != (size[1], size[0]):
      # Pillow's bilinear filter widens its support when shrinking, so downscaling is
      # antialiased (no aliasing from skipped pixels).
      out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.array(out, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[2] != 3:  # Defensive: _to_rgb always returns RGB.
    raise DataError(f'Image {name} decoded to shape {arr.shape}, not (H, W, 3); convert it to '
                    f'an ordinary RGB JPEG or PNG.')
  return arr


def load_image(source: Source, *, size: Size | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
  """Reads an image file (or its bytes) into a uint8 RGB array.

  Handles greyscale (1, L, LA, 16-bit and 32-bit int, float), palette images with or without
  transparency, RGBA (composited over white), CMYK and YCbCr, EXIF orientation, and animated
  files (first frame only). Any input either gives an array or raises `DataError`.

  Args:
    source: a path, or the file's bytes.
    size: if given, the output (height, width), or an int for a square; resized bilinearly with
      antialiasing, ignoring aspect ratio. JPEGs are decoded at a reduced scale first when
      that is still at least this size.
    max_pixels: refuse images with more pixels than this (decompression-bomb guard).
    name: what to call the image in error messages (default: the path, or '<N bytes in
      memory>'); useful when decoding bytes read from a record file.

  Returns:
    np.ndarray of shape (H, W, 3) and dtype uint8, RGB.

  Raises:
    DataError: naming the file, when it is missing, empty, not an image, corrupt or truncated,
      or too large.
  """
  hw = _hw(size) if size is not None else None
  name = _name(source, name)
  fp = _open_source(source, name)
  try:
    return _decode(fp, name, hw, max_pixels)
  except DataError:
    raise
  except Image.UnidentifiedImageError as e:
    claimed = _sniff(fp)
    if claimed:
      raise DataError(f'Image {name} starts like a {claimed} file but its header is corrupt; '
                      f're-download or remove it.') from e
    raise DataError(f'File {name} is not an image Pillow can read (unknown or unsupported '
                    f'format); remove it or convert it to JPEG or PNG.') from e
  except Image.DecompressionBombError as e:
    raise DataError(f'Image {name} is too large to decode safely ({_first_line(e)}); '
                    f'downscale it or remove it.') from e
  # Deliberately broad: corrupt files make Pillow and its codecs raise almost anything (OSError,
  # SyntaxError, ValueError, struct.error, EOFError, IndexError, MemoryError, ...). Callers get
  # one exception type for every bad file instead of a crashed input pipeline.
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Image {name} is corrupt or truncated and could not be decoded '
                    f'({type(e).__name__}: {_first_line(e)}); re-download or remove it.') from e
  finally:
    fp.close()


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
  """Resizes a uint8 image array to `size` ((height, width) or int) with antialiased bilinear.

  Args:
    image: uint8 array (H, W, 3) or (H, W).
    size: output (height, width), or an int for a square.

  Returns:
    uint8 array (height, width, 3) or (height, width), same number of channels as the input.
  """
  h, w = _hw(size)
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
    raise ValueError(f'resize_image expects uint8 (H, W, 3) or (H, W), got {arr.dtype} '
                     f'{arr.shape}')
  if arr.shape[:2] == (h, w):
    return arr.copy()
  out = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
  return np.array(out, dtype=np.uint8)
