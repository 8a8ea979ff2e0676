"""Top-5 classes, with probabilities, for the user's own image files (`--mode=predict` on a
classify workdir).

Needs only the workdir: config.json (the model), classify_meta.json (class names,
normalisation statistics, image size) and the latest checkpoint. Images are decoded with
`load_image` (any mode: greyscale, CMYK, alpha...) and resized like the evaluation images; a
file that cannot be read gets an error entry, and the others are still classified.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from capjax.classify import data, pipeline, steps
from capjax.classify.evaluate import softmax
from capjax.data.loading import load_image_files

TOP_K = 5


def classify_images(config, trained, paths, batch_size: int = 32) -> list[dict]:
  """[{'path', 'top': [(class name, probability), ...] best first} or {'path', 'error'}], in
  `paths` order, by `trained` (a classify task's Trained)."""
  names = list(trained.meta['class_names'])
  size = int(trained.meta['image_size'])
  mean, std = data.mean_std(trained.meta)
  logits_fn = jax.jit(functools.partial(steps.classify_logits,
                                        flip_average=bool(config.eval.get('flip_average'))))
  results, ready = load_image_files(paths, size)
  ready = [(i, pipeline.eval_transform(image, size, mean, std)) for i, image in ready]
  k = min(TOP_K, len(names))
  for start in range(0, len(ready), batch_size):
    chunk = ready[start:start + batch_size]
    logits = np.asarray(logits_fn(trained.state, np.stack([x for _, x in chunk])), np.float64)
    for (i, _), p in zip(chunk, softmax(logits)):
      top = np.argsort(-p, kind='stable')[:k]
      results[i]['top'] = [(names[c], float(p[c])) for c in top]
  return results
