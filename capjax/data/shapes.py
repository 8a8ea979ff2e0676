"""The embedded `shapes` world: scenes, their renderer, a caption grammar and its parser.

A scene is 1-3 objects (shape, colour, size) laid out in a row or a column. Every
caption the grammar writes names every object's attributes and their order along the
layout axis, so `parse(caption) == scene` is an exact, checkable claim ("exact-scene
accuracy"). All randomness comes from a numpy Generator passed in, so a (seed, index)
pair always gives the same example.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np
from matplotlib.path import Path

from capjax.data.reading import SPLITS

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')
COLOURS = {
    'red': (215, 40, 40),
    'green': (40, 165, 60),
    'blue': (45, 85, 225),
    'yellow': (235, 215, 45),
    'purple': (145, 55, 190),
    'orange': (245, 135, 25),
}
SIZES = ('small', 'large')
LAYOUTS = ('row', 'column')  # row: relations left/right; column: above/below.

# Radii as a fraction of the image side: a small object is still ~14 px across at 64x64
# (enough to tell a star from a diamond), and three large ones fit in a row.
_RADIUS = {'small': 0.11, 'large': 0.16}

_SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}

# Templates by number of objects and layout. {0},{1},{2} are the objects in layout
# order (left->right or top->bottom); a template may name them in another order.
_TEMPLATES = {
    (1, None): ('{0}', 'there is {0}', 'an image of {0}', '{0} in the picture',
                'a picture showing {0}'),
    (2, 'row'): ('{0} left of {1}', '{0} to the left of {1}', '{1} right of {0}',
                 '{1} to the right of {0}', '{0} and {1} from left to right'),
    (2, 'column'): ('{0} above {1}', '{0} on top of {1}', '{1} below {0}',
                    '{1} under {0}', '{0} and {1} from top to bottom'),
    (3, 'row'): ('{0} {1} and {2} from left to right',
                 'from left to right {0} {1} and {2}',
                 '{2} {1} and {0} from right to left',
                 'from right to left {2} {1} and {0}',
                 '{0} left of {1} left of {2}'),
    (3, 'column'): ('{0} {1} and {2} from top to bottom',
                    'from top to bottom {0} {1} and {2}',
                    '{2} {1} and {0} from bottom to top',
                    'from bottom to top {2} {1} and {0}',
                    '{0} above {1} above {2}'),
}


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  size: str


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a caption can claim: the objects in layout order, and the layout."""
  objects: tuple[Obj, ...]
  layout: Optional[str]  # None for a single object.

  def to_json(self) -> dict:
    return {'layout': self.layout,
            'objects': [dataclasses.asdict(o) for o in self.objects]}

  @classmethod
  def from_json(cls, d: dict) -> 'Scene':
    return cls(tuple(Obj(**o) for o in d['objects']), d['layout'])


def sample_scene(rng: np.random.Generator, max_objects: int = 3) -> Scene:
  """Draws a scene uniformly over object count, layout and attributes."""
  n = int(rng.integers(1, max_objects + 1))
  objects = tuple(
      Obj(SHAPES[rng.integers(len(SHAPES))],
          list(COLOURS)[rng.integers(len(COLOURS))],
          SIZES[rng.integers(len(SIZES))]) for _ in range(n))
  layout = None if n == 1 else LAYOUTS[rng.integers(len(LAYOUTS))]
  return Scene(objects, layout)


# ---------------------------------------------------------------------------
# Rendering.


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float,
               rotation: float = 0.0) -> np.ndarray:
  """Boolean mask of `shape` at offsets (dx, dy) from its centre (y points down).

  `rotation` (radians) turns the shape; the caption world uses 0 so that a square
  and a diamond stay different shapes, the classification world rotates freely.
  """
  if rotation:
    c, s = np.cos(rotation), np.sin(rotation)
    dx, dy = c * dx + s * dy, -s * dx + c * dy
  r = radius
  if shape == 'circle':
    return dx * dx + dy * dy <= r * r
  if shape == 'square':
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
  if shape == 'diamond':
    return np.abs(dx) + np.abs(dy) <= 1.05 * r
  if shape == 'cross':
    arm = 0.34 * r
    return (((np.abs(dx) <= arm) & (np.abs(dy) <= r)) |
            ((np.abs(dy) <= arm) & (np.abs(dx) <= r)))
  if shape in ('triangle', 'star', 'hexagon'):
    points = {'triangle': 3, 'star': 10, 'hexagon': 6}[shape]
    angles = -np.pi / 2 + 2 * np.pi * np.arange(points) / points
    radii = np.full(points, r * (1.15 if shape == 'triangle' else 1.0))
    if shape == 'star':
      radii[1::2] = 0.45 * r
    poly = Path(np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1))
    pts = np.stack([dx.ravel(), dy.ravel()], -1)
    return poly.contains_points(pts).reshape(dx.shape)
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def noisy_background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A low-saturation textured background: a tone, soft stripes and pixel noise."""
  tone = rng.uniform(60, 170) + rng.uniform(-12, 12, size=3)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
  stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
  img = tone[None, None, :].astype(np.float32) + rng.uniform(4, 14) * stripes[..., None]
  return img + rng.uniform(3, 10) * rng.standard_normal((size, size, 3), np.float32)


def paint(img: np.ndarray, mask: np.ndarray, rgb, rng: np.random.Generator) -> None:
  """Paints `mask` in a slightly jittered, slightly noisy version of `rgb`, in place."""
  colour = np.asarray(rgb, np.float32) + rng.uniform(-18, 18, size=3)
  noise = rng.normal(0, 6, size=(int(mask.sum()), 3))
  img[mask] = colour + noise


def _centres(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple]:
  """Object centres: ordered along the layout axis, near one line across it.

  Objects sit in equal slots along the axis (so the order is unambiguous and they do
  not overlap) and within a few pixels of a shared line across it (so a row never
  reads as a column).
  """
  radii = [_RADIUS[o.size] * size for o in scene.objects]
  n = len(radii)
  if n == 1:
    r = radii[0]
    return [(rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1))]
  slot = size / n
  big = max(radii)
  line = rng.uniform(big + 1, size - big - 1)
  out = []
  for i, r in enumerate(radii):
    lo, hi = i * slot + r + 0.5, (i + 1) * slot - r - 0.5
    along = rng.uniform(lo, hi) if hi > lo else (i + 0.5) * slot
    across = np.clip(line + rng.uniform(-0.06, 0.06) * size, r + 1, size - r - 1)
    out.append((along, across) if scene.layout == 'row' else (across, along))
  return out


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """Renders `scene` as a (size, size, 3) uint8 RGB image."""
  img = noisy_background(rng, size)
  for obj, (cx, cy) in zip(scene.objects, _centres(scene, rng, size)):
    radius = _RADIUS[obj.size] * size * rng.uniform(0.92, 1.08)
    draw(img, obj.shape, COLOURS[obj.colour], (cx, cy), radius, rng)
  return np.clip(img, 0, 255).astype(np.uint8)


def draw(img: np.ndarray, shape: str, rgb, centre, radius: float,
         rng: np.random.Generator, rotation: float = 0.0) -> None:
  """Draws one shape into float image `img` in place, touching only its bounding box."""
  h, w = img.shape[:2]
  cx, cy = centre
  reach = 1.2 * radius + 1
  x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
  y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
  mask = shape_mask(shape, xx - cx, yy - cy, radius, rotation)
  paint(img[y0:y1, x0:x1], mask, rgb, rng)


# ---------------------------------------------------------------------------
# Grammar and parser.


def _phrase(obj: Obj, rng: np.random.Generator) -> str:
  size_words = _SIZE_WORDS[obj.size]
  return f'a {size_words[rng.integers(len(size_words))]} {obj.colour} {obj.shape}'


def describe(scene: Scene, rng: np.random.Generator) -> str:
  """One caption for `scene`, with a random template and synonyms."""
  templates = _TEMPLATES[(len(scene.objects), scene.layout)]
  template = templates[rng.integers(len(templates))]
  return template.format(*(_phrase(o, rng) for o in scene.objects))


def captions_for(scene: Scene, rng: np.random.Generator, k: int = 5) -> list[str]:
  """`k` captions for one scene, distinct whenever the grammar allows it."""
  seen, out = set(), []
  for _ in range(20 * k):
    cap = describe(scene, rng)
    if cap not in seen:
      seen.add(cap)
      out.append(cap)
    if len(out) == k:
      break
  while len(out) < k:  # Only reachable if the grammar had fewer than k variants.
    out.append(describe(scene, rng))
  return out


_SIZE_OF_WORD = {w: s for s, words in _SIZE_WORDS.items() for w in words}
_OBJECT_RE = re.compile(r'\ba (%s) (%s) (%s)\b' % (
    '|'.join(_SIZE_OF_WORD), '|'.join(COLOURS), '|'.join(SHAPES)))


def _skeletons() -> dict:
  """Maps each template with objects blanked out to (layout, layout order of slots)."""
  table = {}
  for (n, layout), templates in _TEMPLATES.items():
    for t in templates:
      order = [int(i) for i in re.findall(r'\{(\d)\}', t)]
      key = re.sub(r'\{\d\}', 'X', t)
      assert key not in table, f'ambiguous template {t!r}'
      table[key] = (layout, order)
  return table


_SKELETONS = _skeletons()


def parse(caption: str) -> Optional[Scene]:
  """The scene a caption claims, or None when it is not a sentence of the grammar."""
  words = ' '.join(re.sub(r'[^a-z ]', ' ', caption.lower()).split())
  found = list(_OBJECT_RE.finditer(words))
  skeleton = _OBJECT_RE.sub('X', words)
  if skeleton not in _SKELETONS or not found:
    return None
  layout, order = _SKELETONS[skeleton]
  if len(order) != len(found):
    return None
  objects = [None] * len(order)
  for slot, m in zip(order, found):
    objects[slot] = Obj(m.group(3), m.group(2), _SIZE_OF_WORD[m.group(1)])
  return Scene(tuple(objects), layout)


def example(seed: int, split: str, index: int, size: int = 64,
            captions_per_image: int = 5) -> dict:
  """The deterministic example `index` of `split` for a given seed."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  scene = sample_scene(rng)
  return {'image': render(scene, rng, size),
          'captions': captions_for(scene, rng, captions_per_image),
          'scene': scene}
