"""`--mode=predict`: caption (or classify) the user's own image files with a workdir."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from capjax import run_files
from capjax.data import images as image_io
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError


def caption_images(workdir: str, paths) -> list[dict]:
  """[{'image': path, 'caption': str}] with the decoding set in the workdir's config."""
  from capjax import caption_task, decoding
  from capjax.train import checkpoint
  from capjax.train.optim import make_optimizer
  config = run_files.load_config(workdir)
  vocab = Vocabulary.load(os.path.join(workdir, 'vocab.json'))
  model = caption_task.build_model(config, len(vocab))
  state = checkpoint.restore_for_inference(
      workdir, model, make_optimizer(config.optim, 1), jax.random.key(0),
      *caption_task.sample_inputs(config))
  size = caption_task.image_size(config)
  batch = np.stack([image_io.load_image(p, size=(size, size)) for p in paths])
  run = decoding.make_captioner_fn(
      model, method=config.eval.decoding, max_len=config.data.caption_length - 1,
      end_id=vocab.end_id, beam_size=config.eval.beam_size, alpha=config.eval.length_alpha)
  ids = np.asarray(run({'params': state.params}, jnp.asarray(batch)))
  return [{'image': p, 'caption': vocab.decode(row)} for p, row in zip(paths, ids)]


def main(workdir: str, paths) -> list[dict]:
  """Prints one line per image and returns the results."""
  if not paths:
    raise UserError('--images is empty: pass image files, e.g. --images=a.jpg,b.png.')
  config = run_files.load_config(workdir)
  if config.task == 'classify':
    from capjax import classify_predict
    return classify_predict.predict_workdir(workdir, paths)
  results = caption_images(workdir, paths)
  for r in results:
    print(f"{r['image']}\t{r['caption']}")
  return results
