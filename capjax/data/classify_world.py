"""The embedded classification world `shapes30`: 10 shapes x 3 fill styles = 30 classes.

Each image holds one target object on a textured background with small clutter. The class
is the object's shape and fill style; everything else is a nuisance drawn at random:
position, scale, rotation (any angle), colours (object, stripe and background), stripe
period/angle/phase, clutter (small dots and line segments) and pixel noise. A linear model
on raw pixels cannot read any of the class attributes (position and rotation scatter every
shape over all pixels, colour is uninformative), while a small CNN learns them.

Shapes are chosen to stay distinct under rotation and mirroring (no square and diamond,
which are one shape rotated; no chiral shapes, so a horizontal flip keeps the class and is
a valid augmentation). All randomness comes from a numpy Generator seeded by
(seed, split, index), so an example is a pure function of those.
"""
from __future__ import annotations

import colorsys

import numpy as np
from matplotlib.path import Path

from capjax.data import shapes
from capjax.data.reading import SPLITS

SHAPES = ('circle', 'ellipse', 'semicircle', 'crescent', 'heart', 'triangle', 'square',
          'star', 'cross', 'arrow')
FILLS = ('solid', 'outline', 'striped')
CLASS_NAMES = tuple(f'{fill} {shape}' for shape in SHAPES for fill in FILLS)

# Object radius as a fraction of the image side: at the smallest scale a 32-pixel image
# still shows the shape's outline (~10 px radius) and its stripes (period >= 3.8 px).
_RADIUS_RANGE = (0.3, 0.45)

_ARROW = np.array([(-1.0, -0.26), (0.15, -0.26), (0.15, -0.68), (1.0, 0.0), (0.15, 0.68),
                   (0.15, 0.26), (-1.0, 0.26)])


def _polygon(points: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  pts = np.stack([dx.ravel(), dy.ravel()], -1)
  return Path(points * r).contains_points(pts).reshape(dx.shape)


def _heart(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """The implicit heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, point down (y down in images)."""
  x, y = dx / (0.85 * r), -(dy / (0.85 * r) + 0.15)
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


def object_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float,
                rotation: float) -> np.ndarray:
  """Boolean mask of `shape` with radius `r`, rotated by `rotation`, at offsets (dx, dy)."""
  if shape in ('circle', 'triangle', 'square', 'cross'):
    return shapes.shape_mask(shape, dx, dy, r, rotation)
  c, s = np.cos(rotation), np.sin(rotation)
  dx, dy = c * dx + s * dy, -s * dx + c * dy
  if shape == 'star':  # shapes.py's star has 5 sharp points.
    return shapes.shape_mask('star', dx, dy, 1.1 * r)
  if shape == 'ellipse':
    return (dx / r) ** 2 + (dy / (0.6 * r)) ** 2 <= 1
  if shape == 'semicircle':
    return (dx * dx + (dy + 0.4 * r) ** 2 <= r * r) & (dy >= -0.4 * r)
  if shape == 'crescent':
    return (dx * dx + dy * dy <= r * r) & ((dx - 0.5 * r) ** 2 + dy * dy > (0.8 * r) ** 2)
  if shape == 'heart':
    return _heart(dx, dy, r)
  if shape == 'arrow':
    return _polygon(_ARROW, dx, dy, r)
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def _erode(mask: np.ndarray, t: int) -> np.ndarray:
  """Binary erosion by a disc of radius `t` pixels (pixels outside count as empty)."""
  h, w = mask.shape
  padded = np.zeros((h + 2 * t, w + 2 * t), bool)
  padded[t:t + h, t:t + w] = mask
  out = mask.copy()
  for oy in range(-t, t + 1):
    for ox in range(-t, t + 1):
      if ox * ox + oy * oy <= t * t:
        out &= padded[t + oy:t + oy + h, t + ox:t + ox + w]
  return out


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
  """A saturated colour of any hue: it stands out from the low-saturation background."""
  hue, sat, val = rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
  return 255.0 * np.asarray(colorsys.hsv_to_rgb(hue, sat, val), np.float32)


def _other_colour(rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
  """A colour clearly different from `colour` (for stripes), by hue or brightness."""
  for _ in range(20):
    other = _bright_colour(rng) * rng.choice([1.0, 0.45])
    if np.abs(other - colour).sum() > 150:
      return other
  return 255.0 - colour


def _clutter(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
  """Small dots and short thin lines in random colours, drawn before the object."""
  size = img.shape[0]
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  for _ in range(count):
    colour = _bright_colour(rng) * rng.uniform(0.5, 1.0)
    cx, cy = rng.uniform(0, size, 2)
    if rng.uniform() < 0.5:
      mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (rng.uniform(0.03, 0.06) * size) ** 2
    else:
      angle, half = rng.uniform(0, np.pi), rng.uniform(0.08, 0.18) * size
      along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
      across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
      mask = (np.abs(along) <= half) & (np.abs(across) <= 0.6)
    img[mask] = colour


def render(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """An image of class `label` (an index into CLASS_NAMES) as (size, size, 3) uint8."""
  shape, fill = SHAPES[label // len(FILLS)], FILLS[label % len(FILLS)]
  img = shapes.noisy_background(rng, size)
  _clutter(img, rng, int(rng.integers(1, 5)))
  r = rng.uniform(*_RADIUS_RANGE) * size
  # Centre anywhere that keeps most of the object in the frame.
  cx, cy = rng.uniform(0.7 * r, size - 0.7 * r, 2)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  mask = object_mask(shape, xx - cx, yy - cy, r, rng.uniform(0, 2 * np.pi))
  colour = _bright_colour(rng)
  if fill == 'outline':
    mask &= ~_erode(mask, max(1, int(round(0.07 * size))))
  layer = np.broadcast_to(colour, img.shape).copy()
  if fill == 'striped':
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.18) * size
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform()
    layer[(phase % 1.0) < 0.5] = _other_colour(rng, colour)
  img[mask] = layer[mask] + rng.normal(0, 6, size=(int(mask.sum()), 3))
  img += rng.uniform(2, 12) * rng.standard_normal(img.shape, np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def example(seed: int, split: str, index: int, size: int = 32) -> dict:
  """Example `index` of `split`: {'image', 'label'}; labels cycle so splits are balanced."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  label = index % len(CLASS_NAMES)
  return {'image': render(label, rng, size), 'label': label}
