"""The vectorised CIDEr-D scorer equals pycocoevalcap's Cider (CIDEr-D) caption by caption."""
import contextlib
import io

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from capjax.metrics.cider_d import CiderD

# Hand-picked edge cases: a caption equal to a reference, one word (no bigram), an empty
# caption, repeated words (clipping), words no reference has, references of unequal count.
HAND_REFS = [
    ['a red circle left of a blue star', 'a circle and a star',
     'the red circle is left of the star'],
    ['a big green square', 'a green square', 'big green square on the left', 'a square'],
    ['two dogs', 'two dogs play in the grass with a ball'],
    ['a man rides a horse on a beach', 'a person on a horse', 'man horse beach',
     'a man riding a horse along the sea shore', 'a horse'],
    ['a cat <end>', 'a black cat sleeps <end>'],
]
HAND_HYPS = ['a red circle left of a blue star', 'square', '',
             'a a a a man horse zebra on a beach beach', 'a cat <end>']


def _random_fixture(num_images=60, seed=0):
  """Captions over a 12-word vocabulary, so n-grams of every order recur across images."""
  rng = np.random.default_rng(seed)
  words = 'a the red blue dog cat runs sits on grass mat <end>'.split()
  sentence = lambda: ' '.join(rng.choice(words, rng.integers(0, 12)))
  refs = [[sentence() for _ in range(rng.integers(1, 6))] for _ in range(num_images)]
  return refs, [sentence() for _ in range(num_images)]


def _pycocoevalcap_scores(refs, hyps):
  with contextlib.redirect_stdout(io.StringIO()):
    _, per_image = Cider().compute_score({i: r for i, r in enumerate(refs)},
                                         {i: [h] for i, h in enumerate(hyps)})
  return np.asarray(per_image)


def _ids(vocabulary: dict):
  return lambda text: [vocabulary.setdefault(w, len(vocabulary)) for w in text.split()]


@pytest.mark.parametrize('fixture', ['hand', 'random'])
def test_scores_equal_pycocoevalcap_cider_d_per_caption(fixture):
  refs, hyps = (HAND_REFS, HAND_HYPS) if fixture == 'hand' else _random_fixture()
  ids = _ids({})
  # pycocoevalcap takes its document frequencies from the images it scores: so does CiderD
  # by default, so the two see the same corpus.
  scorer = CiderD([[ids(r) for r in image_refs] for image_refs in refs])
  ours = scorer(np.arange(len(hyps)), [ids(h) for h in hyps])
  expected = _pycocoevalcap_scores(refs, hyps)
  assert expected.max() > 1.0  # The fixture has real matches, not only zeros.
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_document_frequencies_from_another_corpus_equal_scoring_within_that_corpus():
  refs, hyps = _random_fixture(seed=1)
  ids = _ids({})
  every_image = [[ids(r) for r in image_refs] for image_refs in refs]
  some = [3, 17, 17, 42]  # An image may be scored twice in one call.
  scorer = CiderD([every_image[i] for i in some], document_frequency_corpus=every_image)
  ours = scorer(np.arange(len(some)), [ids(hyps[i]) for i in some])
  np.testing.assert_allclose(ours, _pycocoevalcap_scores(refs, hyps)[some], rtol=0, atol=1e-6)


def test_a_call_scores_each_caption_against_the_image_it_names():
  ids = _ids({})
  scorer = CiderD([[ids(r) for r in image_refs] for image_refs in HAND_REFS])
  caption = ids('a green square')
  scores = scorer([1, 0, 1], [caption, caption, ids('')])
  # Against image 0 it shares only 'a', which every image's references have (idf 0).
  assert scores[0] > 1.0 and scores[1] == 0.0 and scores[2] == 0.0


def test_no_references_for_an_image_is_an_error():
  with pytest.raises(ValueError, match='at least one reference'):
    CiderD([[[1, 2]], []])
