"""The vectorised sentence BLEU equals pycocoevalcap's per-caption Bleu(4) scores."""
import contextlib
import io

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from capjax.metrics.bleu import SentenceBleu
from test_cider_d import HAND_HYPS, HAND_REFS, _ids, _random_fixture


def _pycocoevalcap_scores(refs, hyps):
  with contextlib.redirect_stdout(io.StringIO()):
    _, per_order = Bleu(4).compute_score({i: r for i, r in enumerate(refs)},
                                         {i: [h] for i, h in enumerate(hyps)})
  return np.asarray(per_order).T  # M x 4.


def _fixture_with_near_copies(seed=2):
  """The random fixture, half its captions a reference with one word changed: random
  sentences alone share almost no 4-grams."""
  refs, hyps = _random_fixture(seed=seed)
  rng = np.random.default_rng(seed)
  for i in range(0, len(hyps), 2):
    words = refs[i][0].split()
    if words:
      words[rng.integers(len(words))] = 'zebra'
    hyps[i] = ' '.join(words)
  return refs, hyps


@pytest.mark.parametrize('fixture', ['hand', 'random'])
def test_scores_equal_pycocoevalcap_bleu_per_caption(fixture):
  refs, hyps = (HAND_REFS, HAND_HYPS) if fixture == 'hand' else _fixture_with_near_copies()
  ids = _ids({})
  scorer = SentenceBleu([[ids(r) for r in image_refs] for image_refs in refs])
  ours = scorer(np.arange(len(hyps)), [ids(h) for h in hyps])
  expected = _pycocoevalcap_scores(refs, hyps)
  assert ours.shape == (len(hyps), 4)
  assert expected[:, 3].max() > 0.5  # Real 4-gram matches, not only zeros.
  np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_clipping_brevity_and_closest_reference():
  ids = _ids({})
  scorer = SentenceBleu([[ids('a cat sat on the mat'), ids('a cat')]])
  exact, repeated, short, tie = scorer(
      [0, 0, 0, 0], [ids('a cat sat on the mat'), ids('a a a a'), ids('cat sat on'),
                     ids('a cat sat on')])
  np.testing.assert_allclose(exact, 1.0)
  np.testing.assert_allclose(repeated[0], 0.25)  # 'a' counts once: 1 of 4 unigrams.
  # 3 words, all n-grams in the first reference; the closest reference ('a cat', 1 away)
  # is shorter, so no brevity penalty, though the matching one is twice as long.
  np.testing.assert_allclose(short[:3], [1.0, 1.0, 1.0])
  # No 4-gram at all: pycocoevalcap's smoothing leaves (1e-15 / 1e-9) ** (1/4).
  np.testing.assert_allclose(short[3], 1e-6 ** 0.25, rtol=1e-6)
  # 4 words, both references 2 away: the shorter is taken, so no brevity penalty.
  np.testing.assert_allclose(tie[0], 1.0)


def test_images_without_references_are_refused():
  with pytest.raises(ValueError, match='at least one reference'):
    SentenceBleu([[[1, 2]], []])
