"""Top-5 classes, with probabilities, for the user's own image files.

Needs only the workdir: config.json (the model), classify_meta.json (class names,
normalisation statistics, image size) and the latest checkpoint. Images are decoded with
`load_image` (any mode: greyscale, CMYK, alpha...) and resized like the evaluation images.
"""
from __future__ import annotations

import functools

from typing import Sequence

import jax
import numpy as np

from capjax import classify_task, run_files
from capjax.data import classify_pipeline
from capjax.data.errors import DataError
from capjax.data.images import load_image
from capjax.errors import UserError
from capjax.train import classify_steps

TOP_K = 5


def predict_workdir(workdir: str, image_paths: Sequence[str], batch_size: int = 32
                    ) -> list[dict]:
  """Classifies each image; prints one line per image and returns one dict per image.

  Returns:
    [{'path', 'top': [(class name, probability), ...] best first}], or
    [{'path', 'error'}] for a file that cannot be read (the others are still classified).
  """
  if not image_paths:
    raise UserError('No images to classify; pass --images=a.jpg,b.png.')
  config = run_files.load_config(workdir)
  meta = classify_task.read_meta(workdir)
  names = list(meta['class_names'])
  size = int(meta['image_size'])
  mean, std = np.asarray(meta['mean'], np.float32), np.asarray(meta['std'], np.float32)
  _, state = classify_task.restore_state(config, workdir, len(names))
  logits_fn = jax.jit(functools.partial(classify_steps.classify_logits,
                                        flip_average=bool(config.eval.get('flip_average'))))

  results, ready = [], []
  for path in image_paths:
    try:
      image = load_image(path, size=size)
    except DataError as e:
      results.append({'path': path, 'error': str(e)})
      continue
    results.append({'path': path})
    ready.append((len(results) - 1,
                  classify_pipeline.eval_transform(image, size, mean, std)))
  k = min(TOP_K, len(names))
  for start in range(0, len(ready), batch_size):
    chunk = ready[start:start + batch_size]
    logits = np.asarray(logits_fn(state, np.stack([x for _, x in chunk])), np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for (i, _), p in zip(chunk, probs):
      top = np.argsort(-p, kind='stable')[:k]
      results[i]['top'] = [(names[c], float(p[c])) for c in top]
  for r in results:
    if 'error' in r:
      print(f"{r['path']}: error: {r['error']}")
    else:
      print(f"{r['path']}: " + ', '.join(f'{n} {p:.3f}' for n, p in r['top']))
  return results
