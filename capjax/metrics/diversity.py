"""How varied generated captions are: distinct-n (Li et al., 2016)."""
from __future__ import annotations

from typing import Hashable, Sequence


def distinct_n(captions: Sequence[Sequence[Hashable]], n: int) -> float:
  """Distinct n-grams over all n-grams of `captions` (each a sequence of words or token
  ids), pooled over the whole set; 0 when there is no n-gram at all."""
  grams = [tuple(c[i:i + n]) for c in captions for i in range(len(c) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 0.0
