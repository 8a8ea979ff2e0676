"""Sentence BLEU of token-id captions against fixed reference sets, on the host with numpy: a
term of self-critical training's reward (config.scst.bleu_weight).

The definition is pycocoevalcap 1.2's per-caption BLEU (`bleu_scorer.py`, the second value
`Bleu(4).compute_score` returns), term for term (tests/metrics/test_bleu.py checks equality):
  * `correct[n]`: the caption's n-grams of order n, each counted at most as often as it
    occurs in the one reference that has it most often (clipping); `guess[n]`: how many
    n-grams of order n the caption has, max(words - n + 1, 0);
  * BLEU-n = (prod over orders k <= n of (correct[k] + 1e-15) / (guess[k] + 1e-9))^(1/n);
  * times the brevity penalty exp(1 - r / c) when the caption's c words are fewer than r, the
    length of the reference closest to c (the shorter one on a tie).
As for CIDEr-D (`cider_d.py`), the reference side is built once and a call is array operations
over the captions' n-grams.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from capjax.metrics.cider_d import Captions, NgramIndex, lookup, ngram_counts, pad_tokens

# pycocoevalcap's smoothing: an order without a match gives 1e-15 / guess, not 0, and an order
# the caption is too short to have gives 1e-6.
_SMALL, _TINY = 1e-9, 1e-15


class SentenceBleu:
  """BLEU-1..max_order of token-id captions of image i against `references[i]`."""

  def __init__(self, references: Sequence[Captions], max_order: int = 4):
    if not references or any(len(refs) == 0 for refs in references):
      raise ValueError('SentenceBleu needs at least one reference caption for every image.')
    self.max_order = max_order
    tokens, lengths = pad_tokens([c for refs in references for c in refs])
    self.index = NgramIndex(tokens, lengths, max_order)
    num_refs = np.array([len(refs) for refs in references], np.int64)
    image = np.repeat(np.arange(len(references)), num_refs)
    ref_ids = self.index.ids(tokens, lengths)
    ref, _, gid, count = ngram_counts(ref_ids, ref_ids)
    # The most times any one reference of the image has each n-gram: sorted (image, n-gram)
    # keys, the maximum over each run of equal keys.
    keys = image[ref] * self.index.size + gid
    order = np.lexsort((count, keys))
    keys, count = keys[order], count[order]
    last = np.append(keys[1:] != keys[:-1], True) if keys.size else np.zeros(0, bool)
    self._ref_keys, self._ref_max_counts = keys[last], count[last]
    # Reference lengths, image x slot; an empty slot can never be the closest.
    self._ref_lengths = np.full((len(references), int(num_refs.max())), np.inf)
    slot = np.arange(len(image)) - np.repeat(np.cumsum(num_refs) - num_refs, num_refs)
    self._ref_lengths[image, slot] = lengths

  def __call__(self, images: Sequence[int], captions: Captions) -> np.ndarray:
    """M x max_order float64: BLEU-1..max_order of captions[m] against image images[m]."""
    images = np.asarray(images, np.int64)
    if len(images) != len(captions):
      raise ValueError(f'{len(images)} image indices for {len(captions)} captions.')
    m, orders = len(captions), self.max_order
    if m == 0:
      return np.zeros((0, orders))
    tokens, lengths = pad_tokens(captions)
    own = NgramIndex(tokens, lengths, orders)
    row, order, gid, count = ngram_counts(own.ids(tokens, lengths),
                                          self.index.ids(tokens, lengths))
    at = lookup(self._ref_keys, images[row] * self.index.size + np.maximum(gid, 0), gid >= 0)
    clipped = np.minimum(count, np.where(at >= 0, self._ref_max_counts[np.maximum(at, 0)], 0))
    correct = np.bincount(row * orders + order, clipped, minlength=m * orders).reshape(m, orders)
    guess = np.maximum(lengths[:, None] - np.arange(orders)[None, :], 0)
    precision = (correct + _TINY) / (guess + _SMALL)
    bleu = np.cumprod(precision, axis=1) ** (1.0 / np.arange(1, orders + 1))
    # The closest reference length, the shorter of two equally close.
    ref_lengths = self._ref_lengths[images]
    distance = np.abs(ref_lengths - lengths[:, None])
    closest = np.where(distance == distance.min(1, keepdims=True), ref_lengths, np.inf).min(1)
    ratio = (lengths + _TINY) / (closest + _SMALL)
    with np.errstate(divide='ignore', over='ignore'):
      penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    return bleu * penalty[:, None]
