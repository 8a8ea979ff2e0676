"""Caption vocabulary: built from training captions, saved as JSON beside the model."""
from __future__ import annotations

import collections
import json
import re
from typing import Iterable, Sequence

import numpy as np

PAD, START, END, UNK = '<pad>', '<start>', '<end>', '<unk>'
SPECIALS = (PAD, START, END, UNK)  # PAD must be id 0: masks and padding rely on it.


def normalize(caption: str) -> list[str]:
  """Lower-cases, drops punctuation (keeping in-word apostrophes), splits on space."""
  text = re.sub(r"[^a-z0-9' ]+", ' ', caption.lower())
  return [w.strip("'") for w in text.split() if w.strip("'")]


class Vocabulary:
  """Maps words to ids and back; ids 0..3 are <pad> <start> <end> <unk>."""

  def __init__(self, words: Sequence[str]):
    self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
    self.ids = {w: i for i, w in enumerate(self.words)}

  pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

  def __len__(self) -> int:
    return len(self.words)

  @classmethod
  def build(cls, captions: Iterable[str], min_freq: int = 1,
            max_size: int | None = None) -> 'Vocabulary':
    """Keeps words seen >= `min_freq` times, most frequent first (ties alphabetical)."""
    counts = collections.Counter(w for c in captions for w in normalize(c))
    kept = sorted((w for w, n in counts.items() if n >= min_freq),
                  key=lambda w: (-counts[w], w))
    if max_size is not None:
      kept = kept[:max(max_size - len(SPECIALS), 0)]
    return cls(kept)

  def encode(self, caption: str, length: int) -> np.ndarray:
    """`<start> words <end>` padded or cut to `length` ids (int32).

    A caption longer than `length` loses its tail words but keeps `<end>`, so the
    model always learns to stop.
    """
    ids = [self.ids.get(w, self.unk_id) for w in normalize(caption)][:length - 2]
    ids = [self.start_id] + ids + [self.end_id]
    return np.asarray(ids + [self.pad_id] * (length - len(ids)), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Words up to the first <end>, without <start>/<pad>."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.end_id:
        break
      if i not in (self.pad_id, self.start_id):
        out.append(self.words[i] if i < len(self.words) else UNK)
    return ' '.join(out)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump({'words': self.words}, f, indent=0)

  @classmethod
  def load(cls, path: str) -> 'Vocabulary':
    with open(path) as f:
      words = json.load(f)['words']
    if tuple(words[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f'{path} is not a capjax vocabulary (it must start with '
                       f'{list(SPECIALS)}); re-run training to write a new one.')
    return cls(words[len(SPECIALS):])
