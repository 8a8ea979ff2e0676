"""load_image / resize_image: every Pillow mode becomes uint8 RGB, every bad file a DataError."""
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from capjax.data.images import load_image, resize_image
from capjax.data.reading import DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
  """A valid-looking PNG header that claims a huge image, with almost no pixel data."""
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr)
          + _png_chunk(b'IDAT', zlib.compress(b'\0' * 64)) + _png_chunk(b'IEND', b''))


def _check_rgb(arr, shape=(12, 16)):
  assert arr.dtype == np.uint8 and arr.shape == (*shape, 3)


def test_rgb_png_roundtrips_exactly():
  np.testing.assert_array_equal(load_image(_encode(Image.fromarray(RGB), 'PNG')), RGB)


def test_path_and_bytes_give_the_same_pixels(tmp_path):
  data = _encode(Image.fromarray(RGB), 'PNG')
  (tmp_path / 'a.png').write_bytes(data)
  np.testing.assert_array_equal(load_image(tmp_path / 'a.png'), load_image(data))
  np.testing.assert_array_equal(load_image(str(tmp_path / 'a.png')), RGB)


@pytest.mark.parametrize('mode', ['L', '1', 'P', 'LA', 'PA', 'CMYK', 'YCbCr', 'LAB'])
def test_every_8bit_mode_decodes_to_rgb(mode):
  im = Image.fromarray(RGB).convert(mode)
  fmt = 'PNG' if mode in ('1', 'P', 'L', 'LA') else 'TIFF'
  _check_rgb(load_image(_encode(im, fmt)))


def test_greyscale_is_replicated_to_three_equal_channels():
  grey = RGB[..., 0]
  out = load_image(_encode(Image.fromarray(grey), 'PNG'))
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], grey)


def test_cmyk_jpeg_decodes_to_close_rgb():
  cmyk = Image.fromarray(np.full((16, 16, 3), (200, 100, 50), np.uint8)).convert('CMYK')
  out = load_image(_encode(cmyk, 'JPEG', quality=95))
  np.testing.assert_allclose(out[8, 8], (200, 100, 50), atol=6)


def test_16bit_greyscale_png_is_scaled_not_clipped():
  ramp = np.linspace(0, 65535, 12 * 16).reshape(12, 16).astype(np.uint16)
  data = _encode(Image.fromarray(ramp), 'PNG')
  out = load_image(data)
  _check_rgb(out)
  np.testing.assert_allclose(out[..., 0], ramp / 257.0, atol=1)  # Clipping would give 255s.


@pytest.mark.parametrize('dtype,scale', [(np.int32, 65535), (np.float32, 1.0)])
def test_32bit_int_and_float_images_are_scaled_to_8_bits(dtype, scale):
  ramp = np.linspace(0, 1, 12 * 16).reshape(12, 16)
  out = load_image(_encode(Image.fromarray((ramp * scale).astype(dtype)), 'TIFF'))
  _check_rgb(out)
  np.testing.assert_allclose(out[..., 1], ramp * 255, atol=1)


def test_rgba_transparent_pixels_become_white_and_opaque_keep_colour():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[0, 0, 3] = 255  # One opaque pixel; the rest fully transparent (black underneath).
  out = load_image(_encode(Image.fromarray(rgba, 'RGBA'), 'PNG'))
  np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(out[1, 1], (255, 255, 255))


def test_palette_with_transparent_index_is_composited_over_white():
  pal = Image.fromarray(RGB).convert('P')
  idx = int(np.asarray(pal)[0, 0])
  out = load_image(_encode(pal, 'PNG', transparency=idx))
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))


def test_exif_orientation_6_rotates_the_image_upright():
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  data = _encode(Image.fromarray(RGB), 'PNG', exif=exif)
  out = load_image(data)
  np.testing.assert_array_equal(out, np.rot90(RGB, k=-1))
  # The requested size applies to the upright image, also on the JPEG draft path.
  jpg = _encode(Image.fromarray(np.repeat(np.repeat(RGB, 20, 0), 20, 1)), 'JPEG', exif=exif)
  assert load_image(jpg, size=(30, 20)).shape == (30, 20, 3)


def test_animated_gif_gives_its_first_frame():
  frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 220)]
  data = _encode(frames[0], 'GIF', save_all=True, append_images=frames[1:])
  assert Image.open(io.BytesIO(data)).n_frames == 2
  np.testing.assert_array_equal(load_image(data), np.full((8, 8, 3), 40, np.uint8))


def test_size_resizes_large_jpeg_via_draft_to_exact_shape():
  big = np.repeat(np.repeat(RGB, 40, 0), 40, 1)  # 480x640
  out = load_image(_encode(Image.fromarray(big), 'JPEG', quality=95), size=(24, 32))
  _check_rgb(out, (24, 32))
  np.testing.assert_allclose(out.astype(float), resize_image(big, (24, 32)), atol=40)
  _check_rgb(load_image(_encode(Image.fromarray(big), 'PNG'), size=10), (10, 10))


def test_resize_image_antialiases_when_shrinking():
  checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  rgb = np.repeat(checker[..., None], 3, axis=2)
  small = resize_image(rgb, 8)
  assert small.shape == (8, 8, 3) and small.dtype == np.uint8
  assert np.all(np.abs(small.astype(int) - 127) < 20)  # Averaged, not sampled to 0/255.
  assert resize_image(checker, (4, 6)).shape == (4, 6)
  with pytest.raises(ValueError):
    resize_image(rgb.astype(np.float32), 8)


def test_too_many_pixels_is_refused_with_the_limit_named():
  with pytest.raises(DataError, match=r'above the .* limit'):
    load_image(_encode(Image.fromarray(RGB), 'PNG'), max_pixels=100, name='big.png')


def test_decompression_bomb_header_is_a_data_error_not_a_crash(tmp_path):
  path = tmp_path / 'bomb.png'
  path.write_bytes(_png_declaring(20000, 20000))  # 400 MP declared in ~80 bytes.
  with pytest.raises(DataError, match='bomb.png'):
    load_image(path)


def _bad_files():
  png = _encode(Image.fromarray(RGB), 'PNG')
  jpg = _encode(Image.fromarray(np.repeat(np.repeat(RGB, 4, 0), 4, 1)), 'JPEG')
  flipped = bytearray(png)
  flipped[png.find(b'IDAT') + 12] ^= 0x10  # Inside the compressed pixel data.
  header_flipped = bytearray(png)
  header_flipped[20] ^= 0x01  # IHDR width: its CRC no longer matches.
  return {
      'zero_byte.jpg': b'',
      'truncated.jpg': jpg[:len(jpg) // 2],
      'random_bytes.jpg': RNG.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
      'text_file.png': b'this is a text file, not an image\n',
      'bit_flipped.png': bytes(flipped),
      'bad_header.png': bytes(header_flipped),
  }


@pytest.mark.parametrize('name', sorted(_bad_files()))
def test_bad_file_raises_data_error_naming_the_file(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(_bad_files()[name])
  with pytest.raises(DataError, match=name) as info:
    load_image(path)
  assert '\n' not in str(info.value)


def test_missing_path_and_folder_raise_data_error_naming_them(tmp_path):
  with pytest.raises(DataError, match='nowhere.jpg'):
    load_image(tmp_path / 'nowhere.jpg')
  with pytest.raises(DataError, match='is a folder'):
    load_image(tmp_path)


def test_bytes_source_errors_use_the_given_name():
  with pytest.raises(DataError, match='record 17'):
    load_image(b'not an image', name='record 17')


@pytest.mark.filterwarnings('ignore')  # Pillow warns about the junk metadata it skips.
def test_fuzzed_bytes_give_an_array_or_data_error_never_another_exception():
  rng = np.random.default_rng(1)
  seeds = [_encode(Image.fromarray(RGB), fmt) for fmt in ('PNG', 'JPEG', 'GIF', 'BMP', 'TIFF')]
  outcomes = set()
  for i in range(300):
    data = bytearray(seeds[i % len(seeds)])
    kind = i % 3
    if kind == 0:  # Overwrite a few bytes.
      for j in rng.integers(0, len(data), rng.integers(1, 8)):
        data[j] = rng.integers(0, 256)
    elif kind == 1:  # Truncate.
      data = data[:rng.integers(0, len(data))]
    else:  # Insert junk.
      j = rng.integers(0, len(data))
      data[j:j] = rng.integers(0, 256, rng.integers(1, 40), dtype=np.uint8).tobytes()
    try:
      arr = load_image(bytes(data))
      assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
      outcomes.add('array')
    except DataError:
      outcomes.add('error')
  assert outcomes == {'array', 'error'}


@pytest.mark.skipif(not os.path.isdir('/work/shared/data/tiny-imagenet-30/train'),
                    reason='shared real data not present')
def test_real_tiny_imagenet_greyscale_jpeg_loads_as_rgb():
  path = '/work/shared/data/tiny-imagenet-30/train/n02504458/images/n02504458_211.JPEG'
  if not os.path.exists(path):
    pytest.skip('expected greyscale example not present')
  assert Image.open(path).mode == 'L'
  out = load_image(path)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
