"""`--mode=predict`: caption (or classify) the user's own image files with a workdir.

A file that cannot be read (missing, empty, not an image, corrupt, too large) gets one line
naming it and saying why, and the other images are still captioned; only when no image at all
can be read is that an error (`UserError`, shown by launch.py as one line).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from capjax import run_files
from capjax.data import images as image_io
from capjax.data.errors import DataError
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError


def load_vocabulary(workdir: str) -> Vocabulary:
  """The workdir's vocab.json; UserError when it is missing or unreadable."""
  path = os.path.join(workdir, 'vocab.json')
  try:
    return Vocabulary.load(path)
  except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError.
    raise UserError(f'{path} cannot be read ({type(e).__name__}: '
                    f'{" ".join(str(e).split())[:120]}); it is written when training starts, '
                    f'so point --workdir at a trained run.') from e


def _load_config(workdir: str):
  try:
    return run_files.load_config(workdir)
  except (OSError, ValueError) as e:  # A config.json cut short or edited by hand.
    raise UserError(f'{os.path.join(workdir, "config.json")} cannot be read ({e}); point '
                    f'--workdir at a trained run.') from e


def caption_images(workdir: str, paths, batch_size: int = 32) -> list[dict]:
  """[{'image': path, 'caption': str} or {'image': path, 'error': str}], in `paths` order.

  Captions use the decoding set in the workdir's config.
  """
  from capjax import caption_eval, caption_task, decoding
  from capjax.train import checkpoint
  from capjax.train.optim import make_optimizer
  config = _load_config(workdir)
  vocab = load_vocabulary(workdir)
  model = caption_task.build_model(config, len(vocab))
  state = checkpoint.restore_for_inference(
      workdir, model, make_optimizer(config.optim, 1), jax.random.key(0),
      *caption_task.sample_inputs(config))
  size = caption_task.image_size(config)
  results, ready = [], []
  for path in paths:
    try:
      ready.append((len(results), image_io.load_image(path, size=(size, size))))
      results.append({'image': path})
    except DataError as e:
      results.append({'image': path, 'error': str(e)})
  run = decoding.make_captioner_fn(
      model, method=config.eval.decoding, max_len=config.data.caption_length - 1,
      end_id=vocab.end_id, beam_size=config.eval.beam_size, alpha=config.eval.length_alpha)
  batch_size = min(batch_size, len(ready)) or 1
  for start in range(0, len(ready), batch_size):
    chunk = ready[start:start + batch_size]
    images = np.stack([x for _, x in chunk])
    # Padding the last chunk to a whole batch keeps one compiled shape.
    images = np.concatenate([images, np.repeat(images[-1:], batch_size - len(chunk), 0)])
    ids = np.asarray(run(caption_eval.variables_of(state), jnp.asarray(images)))
    for (i, _), row in zip(chunk, ids):
      results[i]['caption'] = vocab.decode(row)
  return results


def main(workdir: str, paths) -> list[dict]:
  """Prints one line per image (its caption, or why it could not be read); returns results.

  Raises:
    UserError: no images were given, the workdir is not a trained run, or no image could be
      read (the message names the first bad file).
  """
  if not paths:
    raise UserError('--images is empty: pass image files, e.g. --images=a.jpg,b.png.')
  config = _load_config(workdir)
  if config.get('task') == 'classify':
    from capjax import classify_predict
    return classify_predict.predict_workdir(workdir, paths)
  results = caption_images(workdir, paths)
  bad = [r for r in results if 'error' in r]
  if len(bad) == len(results):
    raise UserError(bad[0]['error'] if len(bad) == 1 else
                    f'None of the {len(bad)} images could be read; the first: '
                    f'{bad[0]["error"]}')
  for r in results:
    print(f"{r['image']}\t{r['caption']}" if 'caption' in r else
          f"{r['image']}\terror: {r['error']}")
  if bad:
    print(f'{len(bad)} of {len(results)} images could not be read (see the error lines).')
  return results
