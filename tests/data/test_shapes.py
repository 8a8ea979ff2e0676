"""The shapes world: renderer determinism, grammar <-> parser round trip."""
import functools
import re

import numpy as np
import pytest

from helpers import runs as rh
from capjax.data import generate, shapes


def test_example_is_a_pure_function_of_seed_split_index():
  a = shapes.example(3, 'train', 17)
  b = shapes.example(3, 'train', 17)
  c = shapes.example(3, 'test', 17)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['captions'] == b['captions'] and a['scene'] == b['scene']
  assert not np.array_equal(a['image'], c['image'])


@pytest.mark.parametrize('size', [32, 64, 96])
def test_render_shape_and_dtype(size):
  ex = shapes.example(0, 'train', 1, size=size)
  assert ex['image'].shape == (size, size, 3) and ex['image'].dtype == np.uint8


def test_every_caption_parses_back_to_its_scene():
  for i in range(300):
    ex = shapes.example(1, 'validation', i)
    assert len(ex['captions']) == 5 and len(set(ex['captions'])) == 5
    for caption in ex['captions']:
      assert shapes.parse(caption) == ex['scene'], caption


def test_parse_rejects_non_grammar_and_wrong_counts():
  assert shapes.parse('a big red circle left of') is None
  assert shapes.parse('a red circle') is None  # No size: not a full claim.
  assert shapes.parse('a large red circle a large red circle') is None
  assert shapes.parse('') is None


def test_parse_orders_objects_along_the_layout():
  scene = shapes.parse('a big blue star right of a small red circle')
  assert scene.layout == 'row'
  assert [o.shape for o in scene.objects] == ['circle', 'star']
  assert scene == shapes.parse('a little red circle to the left of a large blue star')


def test_grammar_covers_sizes_colours_shapes_and_relations():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(2000)]
  assert {len(s.objects) for s in scenes} == {1, 2, 3}
  assert {s.layout for s in scenes} == {None, 'row', 'column'}
  assert {o.shape for s in scenes for o in s.objects} == set(shapes.SHAPES)
  assert {o.colour for s in scenes for o in s.objects} == set(shapes.COLOURS)
  assert len(shapes.SHAPES) >= 5 and len(shapes.COLOURS) >= 6


def test_objects_are_drawn_in_their_colour_where_the_scene_says():
  scene = shapes.Scene((shapes.Obj('square', 'red', 'large'),
                        shapes.Obj('square', 'blue', 'large')), 'row')
  img = shapes.render(scene, np.random.default_rng(0), 64).astype(int)
  red = (img[..., 0] > 170) & (img[..., 2] < 100)
  blue = (img[..., 2] > 170) & (img[..., 0] < 100)
  assert red.sum() > 50 and blue.sum() > 50
  # Row layout, red first: every red pixel is left of every blue pixel.
  assert np.nonzero(red)[1].max() < np.nonzero(blue)[1].min()


def test_scene_json_round_trip():
  scene = shapes.example(0, 'train', 5)['scene']
  assert shapes.Scene.from_json(scene.to_json()) == scene


def _max_caption_words() -> int:
  """The grammar's longest caption in words (every object phrase is 'a <size> <colour> <shape>')."""
  return max(len(re.sub(r'\{\d\}', ' ', t).split()) + 4 * n
             for (n, _), templates in shapes._TEMPLATES.items() for t in templates)


def test_max_caption_words_is_the_longest_caption_and_the_default_length_fits_it():
  rng = np.random.default_rng(0)
  longest = max(len(shapes.describe(shapes.sample_scene(rng), rng).split())
                for _ in range(3000))
  assert longest == _max_caption_words() == 17
  # <start> + words + <end>, no more: the decoder scans caption_length - 1 steps.
  assert rh.load_config('caption').data.caption_length == _max_caption_words() + 2


def test_worker_processes_render_the_same_examples_in_order(monkeypatch):
  """Parallel generation must not change the data set: same examples, same order."""
  monkeypatch.setattr(generate, 'MIN_PARALLEL', 1)
  render = functools.partial(shapes.example, 7, 'test', size=32, captions_per_image=2)
  parallel = list(generate.ordered_map(render, 450, workers=2))
  assert len(parallel) == 450
  for i, ex in enumerate(parallel):
    expected = render(i)
    np.testing.assert_array_equal(ex['image'], expected['image'])
    assert (ex['captions'], ex['scene']) == (expected['captions'], expected['scene'])
