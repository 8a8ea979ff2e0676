"""How varied generated captions are: distinct-n (Li et al., 2016) and distinct captions."""
from __future__ import annotations

import collections
from typing import Hashable, Mapping, Sequence


def distinct_n(captions: Sequence[Sequence[Hashable]], n: int) -> float:
  """Distinct n-grams over all n-grams of `captions` (each a sequence of words or token
  ids), pooled over the whole set; 0 when there is no n-gram at all."""
  grams = [tuple(c[i:i + n]) for c in captions for i in range(len(c) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0


def caption_diversity(captions: Mapping[Hashable, str] | Sequence[str]) -> dict:
  """What a reader of eval.json wants to know about generic captions: how many distinct
  captions the model wrote for how many images, distinct-1/2 over all generated words, and the
  most frequent caption with its count ('a dog runs through the grass' for 55 of 1,000 images
  says more than any BLEU)."""
  texts = list(captions.values()) if isinstance(captions, Mapping) else list(captions)
  if not texts:
    return {'distinct_captions': 0, 'distinct_1': 0.0, 'distinct_2': 0.0,
            'most_common_caption': '', 'most_common_caption_count': 0}
  words = [t.split() for t in texts]
  counts = collections.Counter(' '.join(w) for w in words)
  top, top_count = counts.most_common(1)[0]
  return {'distinct_captions': len(counts), 'distinct_1': distinct_n(words, 1),
          'distinct_2': distinct_n(words, 2), 'most_common_caption': top,
          'most_common_caption_count': top_count}
