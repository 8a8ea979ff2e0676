"""Captions for the user's own image files (`--mode=predict` on a caption workdir).

A file that cannot be read (missing, empty, not an image, corrupt, too large) gets an error
entry naming it and saying why, and the other images are still captioned.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from capjax.caption import data
from capjax.caption import evaluate as evaluation
from capjax.data.loading import load_image_files
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.train import state as state_lib


def load_vocabulary(workdir: str) -> Vocabulary:
  """The workdir's vocab.json; UserError when it is missing or unreadable."""
  path = os.path.join(workdir, 'vocab.json')
  try:
    return Vocabulary.load(path)
  except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError.
    raise UserError(f'{path} cannot be read ({type(e).__name__}: '
                    f'{" ".join(str(e).split())[:120]}); it is written when training starts, '
                    f'so point --workdir at a trained run.') from e


def caption_images(config, trained, paths, batch_size: int = 32) -> list[dict]:
  """[{'path', 'caption'} or {'path', 'error'}], in `paths` order, decoded with
  config.eval's method by `trained` (a caption task's Trained)."""
  size = data.image_size(config)
  results, ready = load_image_files(paths, size)
  vocab = trained.vocab
  run = evaluation.make_decode_fn(trained.model, vocab, config=config, from_features=False)
  variables = state_lib.variables(trained.state)
  batch_size = min(batch_size, len(ready)) or 1
  for start in range(0, len(ready), batch_size):
    chunk = ready[start:start + batch_size]
    images = np.stack([x for _, x in chunk])
    # Padding the last chunk to a whole batch keeps one compiled shape.
    images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(chunk), 0)])
    ids = np.asarray(run(variables, jnp.asarray(images)))
    for (i, _), row in zip(chunk, ids):
      results[i]['caption'] = vocab.decode(row)
  return results
