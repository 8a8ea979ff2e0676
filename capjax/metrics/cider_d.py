"""CIDEr-D of token-id captions against fixed reference sets: the reward of self-critical
training, computed on the host with numpy.

pycocoevalcap's `Cider` (which computes CIDEr-D) rebuilds the document frequencies and every
reference vector from Python dicts on each call. Self-critical training scores K + 1 captions
of every training image at every step, so here the reference side (n-gram ids, tf-idf values,
norms, lengths) is computed once, and a call only counts the captions' n-grams (array
operations, no Python loop per n-gram) and looks the references' values up by sorted keys.

The definition is pycocoevalcap 1.2's `cider_scorer.py`, term for term (tests/metrics/
test_cider_d.py checks per-caption equality to 1e-6):
  * the n-grams of orders 1..4 of a caption; its vector for order n holds tf(g) * idf(g) with
    idf(g) = ln(D) - ln(max(1, df(g))), where a document is one image's set of reference
    n-grams, D the number of documents of the document-frequency corpus and df(g) how many of
    them hold g (an n-gram no document holds gets ln(D));
  * against one reference, per order: sum over g of min(v_cap(g), v_ref(g)) * v_ref(g) (the
    clipping that makes it CIDEr-D), over the product of the two vectors' norms (0 when one
    is 0), times exp(-delta^2 / (2 sigma^2)) with sigma 6 and delta the difference in length;
    pycocoevalcap's "length" is a caption's number of bigrams (max(words - 1, 0)), kept here;
  * the caption's score: 10 x the mean over orders of the mean over the image's references.
Token ids are opaque: what counts as a word (and whether an end token is one) is the caller's
choice, made the same way for captions and references.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Captions = Sequence[Sequence[int]]


def pad_tokens(captions: Captions) -> tuple[np.ndarray, np.ndarray]:
  """(M x T int64 ids padded with -1, M lengths) of M token-id sequences."""
  lengths = np.fromiter((len(c) for c in captions), np.int64, len(captions))
  tokens = np.full((len(captions), max(int(lengths.max(initial=0)), 1)), -1, np.int64)
  for row, caption in enumerate(captions):
    tokens[row, :len(caption)] = caption
  return tokens, lengths


def _unique(keys: np.ndarray) -> np.ndarray:
  """Sorted distinct values. By sorting: numpy 2.4's hash-based `np.unique` took 18 s for 5M
  int64 keys on the 2-core CPU, a sort 0.8 s."""
  keys = np.sort(keys)
  return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(the position of one element of each distinct key, how many there are) by sorting."""
  order = np.argsort(keys, kind='stable')
  first = np.concatenate([[True], keys[order][1:] != keys[order][:-1]]) if keys.size else (
      np.zeros(0, bool))
  starts = np.flatnonzero(first)
  return order[starts], np.diff(np.append(starts, keys.size))


def lookup(table: np.ndarray, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """The position of each valid key in the sorted `table`, or -1 (absent, or not valid)."""
  at = np.minimum(np.searchsorted(table, keys), max(len(table) - 1, 0))
  found = valid & (table[at] == keys) if len(table) else np.zeros_like(valid)
  return np.where(found, at, -1)


class NgramIndex:
  """Dense ids for the n-grams (orders 1..max_order) of a corpus of token-id captions.

  An n-gram's key is built from its prefix's id and its last word (id(prefix) * W + word, W
  bounding the corpus's word ids), so keys stay small integers for any vocabulary and order,
  and every order is one sorted table searched with `np.searchsorted`.
  """

  def __init__(self, tokens_MxT: np.ndarray, lengths_M: np.ndarray, max_order: int = 4):
    self.max_order = max_order
    words = tokens_MxT[np.arange(tokens_MxT.shape[1]) < lengths_M[:, None]]
    self.word_bound = int(words.max()) + 1 if words.size else 0
    self.tables: list[np.ndarray] = []
    ids = None
    for order in range(1, max_order + 1):
      keys, valid = self._keys(tokens_MxT, lengths_M, order, ids)
      self.tables.append(_unique(keys[valid]))
      ids = lookup(self.tables[-1], keys, valid)
    self.offsets = np.concatenate([[0], np.cumsum([len(t) for t in self.tables])])
    self.size = int(self.offsets[-1])

  def _keys(self, tokens_MxT, lengths_M, order: int, prefix_ids):
    """Keys (M x T-order+1) of the n-grams of `order` starting at each position, and which
    exist (inside the caption, every word known to the corpus, a known prefix)."""
    t = tokens_MxT.shape[1]
    span = max(t - order + 1, 0)
    last = tokens_MxT[:, order - 1:order - 1 + span]
    valid = ((np.arange(span) + order <= lengths_M[:, None]) & (last >= 0)
             & (last < self.word_bound))
    if order == 1:
      return last, valid
    prefix = prefix_ids[:, :span]
    return prefix * self.word_bound + last, valid & (prefix >= 0)

  def ids(self, tokens_MxT: np.ndarray, lengths_M: np.ndarray) -> list[np.ndarray]:
    """Per order n, the M x (T-n+1) ids (unique across orders) of the n-grams starting at each
    position; -1 where there is none or the corpus does not hold it."""
    out, ids = [], None
    for order, table in enumerate(self.tables, start=1):
      keys, valid = self._keys(tokens_MxT, lengths_M, order, ids)
      ids = lookup(table, keys, valid)
      out.append(np.where(ids >= 0, ids + self.offsets[order - 1], -1))
    return out


def ngram_counts(identity_ids: list[np.ndarray], index_ids: list[np.ndarray]):
  """The distinct n-grams of each caption: (row, order - 1, id in the index or -1, count).

  `identity_ids` tell every n-gram of these captions apart (ids of an index of their own, or
  of one that holds them all); `index_ids` are the ids to report (-1: not in that index).
  """
  rows, orders, identity, reported = [], [], [], []
  for order, (lid, gid) in enumerate(zip(identity_ids, index_ids)):
    row, _ = np.nonzero(lid >= 0)
    rows.append(row)
    orders.append(np.full(row.shape, order))
    identity.append(lid[lid >= 0])
    reported.append(gid[lid >= 0])
  row, order, lid, gid = (np.concatenate(x) for x in (rows, orders, identity, reported))
  first, count = _group(row * (int(lid.max(initial=0)) + 1) + lid)
  return row[first], order[first], gid[first], count.astype(np.float64)


def _bigram_lengths(lengths_M: np.ndarray) -> np.ndarray:
  """pycocoevalcap's caption length: its number of bigrams."""
  return np.maximum(lengths_M - 1, 0).astype(np.float64)


class CiderD:
  """CIDEr-D of token-id captions of image i against `references[i]`.

  Args:
    references: references[i] is image i's list of reference captions (token-id sequences).
    document_frequency_corpus: the images' reference lists whose n-grams give the document
      frequencies (SCST: the training split's); by default `references` themselves, as
      pycocoevalcap does with the images it scores.
    max_order: the longest n-gram (4).
    sigma: the length penalty's width (6).

  Memory: about 24 bytes per distinct n-gram of each reference (COCO's 590k training
  references: ~0.5 GB), held in numpy arrays.
  """

  def __init__(self, references: Sequence[Captions],
               document_frequency_corpus: Sequence[Captions] | None = None, *,
               max_order: int = 4, sigma: float = 6.0):
    if not references or any(len(refs) == 0 for refs in references):
      raise ValueError('CiderD needs at least one reference caption for every image.')
    self.max_order, self.sigma = max_order, float(sigma)
    corpus = references if document_frequency_corpus is None else document_frequency_corpus
    ref_tokens, ref_lengths = pad_tokens([c for refs in references for c in refs])
    if corpus is references:
      corpus_tokens, corpus_lengths = ref_tokens, ref_lengths
      self.index = NgramIndex(ref_tokens, ref_lengths, max_order)
    else:
      corpus_tokens, corpus_lengths = pad_tokens([c for refs in corpus for c in refs])
      # One index over both: a reference n-gram the corpus lacks must still match the same
      # n-gram of a caption.
      self.index = NgramIndex(*pad_tokens(
          [c for refs in references for c in refs] + [c for refs in corpus for c in refs]),
          max_order=max_order)
    ref_ids = self.index.ids(ref_tokens, ref_lengths)
    corpus_ids = (ref_ids if corpus is references else
                  self.index.ids(corpus_tokens, corpus_lengths))
    self.log_num_documents = float(np.log(len(corpus)))
    self.idf = self.log_num_documents - np.log(np.maximum(
        1.0, self._document_frequency([len(refs) for refs in corpus], corpus_ids)))

    self.num_refs = np.array([len(refs) for refs in references], np.int64)
    self.max_refs = int(self.num_refs.max())
    image = np.repeat(np.arange(len(references)), self.num_refs)
    slot = np.arange(len(image)) - np.repeat(np.cumsum(self.num_refs) - self.num_refs,
                                             self.num_refs)
    # The index holds every reference n-gram, so its ids tell them apart too.
    ref, order, gid, count = ngram_counts(ref_ids, ref_ids)
    values = count * self.idf[gid]
    # Sorted (image, reference slot, n-gram) keys -> tf-idf values: one searchsorted per call.
    keys = self._key(image[ref], slot[ref], gid)
    by_key = np.argsort(keys)
    self._ref_keys, self._ref_values = keys[by_key], values[by_key]
    self._ref_norms = np.sqrt(np.bincount(
        (image[ref] * self.max_refs + slot[ref]) * max_order + order, values ** 2,
        minlength=len(references) * self.max_refs * max_order)).reshape(
            len(references), self.max_refs, max_order)
    self._ref_lengths = np.zeros((len(references), self.max_refs))
    self._ref_lengths[image, slot] = _bigram_lengths(ref_lengths)

  def _key(self, image, slot, gid):
    return (image * self.max_refs + slot) * max(self.index.size, 1) + gid

  def _document_frequency(self, refs_per_image: list[int], ids: list[np.ndarray]
                          ) -> np.ndarray:
    """How many images have each indexed n-gram in one of their references; `ids` are the
    index's ids of the n-grams of every reference, references in image order."""
    image = np.repeat(np.arange(len(refs_per_image)), refs_per_image)
    size = max(self.index.size, 1)
    keys = np.concatenate([np.broadcast_to(image[:, None], i.shape)[i >= 0] * size + i[i >= 0]
                           for i in ids])
    return np.bincount(_unique(keys) % size, minlength=self.index.size).astype(np.float64)

  def __call__(self, images: Sequence[int], captions: Captions) -> np.ndarray:
    """CIDEr-D of captions[m] against the references of image images[m], as float64 (M,)."""
    images = np.asarray(images, np.int64)
    if len(images) != len(captions):
      raise ValueError(f'{len(images)} image indices for {len(captions)} captions.')
    m, orders, refs = len(captions), self.max_order, self.max_refs
    if m == 0:
      return np.zeros(0)
    tokens, lengths = pad_tokens(captions)
    # An index of the captions' own n-grams tells apart those the references lack.
    own = NgramIndex(tokens, lengths, self.max_order)
    row, order, gid, count = ngram_counts(own.ids(tokens, lengths),
                                           self.index.ids(tokens, lengths))
    values = count * np.where(gid >= 0, self.idf[np.maximum(gid, 0)], self.log_num_documents)
    norms = np.sqrt(np.bincount(row * orders + order, values ** 2,
                                minlength=m * orders)).reshape(m, orders)
    # Each n-gram of a caption against the same n-gram of each of its image's references.
    image = images[row]
    slot = np.arange(refs)[None, :]
    keys = self._key(image[:, None], slot, np.maximum(gid, 0)[:, None])
    at = lookup(self._ref_keys, keys, (gid[:, None] >= 0) & (slot < self.num_refs[image][:, None]))
    ref_values = np.where(at >= 0, self._ref_values[np.maximum(at, 0)], 0.0)
    clipped = np.minimum(values[:, None], ref_values) * ref_values
    cells = (row[:, None] * refs + slot) * orders + order[:, None]
    dot = np.bincount(cells.ravel(), clipped.ravel(),
                      minlength=m * refs * orders).reshape(m, refs, orders)
    denominator = norms[:, None, :] * self._ref_norms[images]
    cosine = np.where(denominator > 0, dot / np.where(denominator > 0, denominator, 1.0), 0.0)
    delta = _bigram_lengths(lengths)[:, None] - self._ref_lengths[images]
    penalty = np.exp(-delta ** 2 / (2 * self.sigma ** 2))
    present = np.arange(refs)[None, :] < self.num_refs[images][:, None]
    per_order = (cosine * (penalty * present)[..., None]).sum(1)  # M x orders, summed refs.
    return 10.0 * per_order.mean(-1) / self.num_refs[images]
