"""Classification end to end: data -> statistics -> model -> train -> evaluate -> predict.

This module is the task's side of `capjax.tasks.Task`; the runtime (run.py, tools/bench.py)
reaches classification only through it. The workdir gets config.json, classify_meta.json
(capjax.classify.data), checkpoints/, metrics.jsonl, run.json, eval.json and the figures
written by capjax.classify.evaluate.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from capjax import tasks
from capjax.classify import data, pipeline, steps
from capjax.classify import evaluate as evaluation
from capjax.classify import predict as prediction
from capjax.classify.bench import BUILDERS as BENCH
from capjax.classify.config import OVERRIDES, validate
from capjax.classify.data import load_splits
from capjax.errors import UserError
from capjax.models import classifier
from capjax.tasks import Splits
from capjax.train import checkpoint, loop, sharding
from capjax.train.optim import make_optimizer

# capjax.tasks.Task, which the runtime uses; the rest is this task's own API.
__all__ = ['NAME', 'CURVES', 'BENCH', 'validate', 'check_start', 'load_splits', 'training_job', 'run_info',
           'restore_trained', 'evaluate', 'predict', 'describe']
NAME = 'classify'
CURVES = ('loss', 'accuracy')


def check_start(config, workdir: str) -> None:
  """Nothing to check: a classifier reads no other run's files (its data is checked when its
  splits load)."""
  del config, workdir


def build_model(config, num_classes: int) -> nn.Module:
  """The classifier that config.model describes (a preset plus the fields that are set)."""
  return classifier.build(config.model, num_classes)


def sample_inputs(config):
  """A dummy image batch that fixes the model's parameter shapes at init."""
  size = config.data.image_size
  return (jnp.zeros((1, size, size, 3), jnp.float32),)


def model_label(model_config) -> str:
  """How run.json (and the comparison table) names the model, e.g. 'cnn[widths=16-32]'."""
  set_fields = [f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k in OVERRIDES if (v := model_config.get(k))]
  return model_config.name + (f"[{','.join(set_fields)}]" if set_fields else '')


@dataclasses.dataclass
class Trained(tasks.Trained):
  """A classifier with the workdir's classify_meta.json (class names, normalisation
  statistics, image size): everything predict needs besides the weights."""
  meta: dict = dataclasses.field(default_factory=dict)


def training_job(config, workdir: str, splits: Splits) -> tuple[loop.Job, Trained]:
  """The loop's Job for `config`, and the Trained (without its state) that evaluation needs.
  Writes the normalisation statistics into `workdir`."""
  sources = splits.sources
  meta = data.normalisation(config, workdir, sources['train'], splits.labels)
  mean, std = data.mean_std(meta)
  logging.info('%d classes; train/validation/test = %d/%d/%d images.', len(splits.labels),
               len(sources['train']), len(sources['validation']), len(sources['test']))
  model = build_model(config, len(splits.labels))
  size = config.data.image_size
  total_steps = loop.total_steps(config, len(sources['train']))
  size_at_step = pipeline.size_schedule(config.data.get('progressive_sizes', ()), size,
                                        total_steps)
  train_data = pipeline.train_dataset(
      sources['train'], batch_size=config.train.batch_size, seed=config.seed, image_size=size,
      mean=mean, std=std, aug=config.augment, size_at_step=size_at_step)
  validate_fn = None
  if len(sources['validation']):
    val_data = pipeline.eval_dataset(sources['validation'], batch_size=config.eval.batch_size,
                                     image_size=size, mean=mean, std=std)
    mesh = sharding.make_mesh()
    flip = bool(config.eval.get('flip_average'))
    validate_fn = lambda st: evaluation.validation_metrics(st, val_data, mesh, flip)
  step = functools.partial(steps.classify_train_step,
                           label_smoothing=float(config.train.label_smoothing))
  job = loop.Job(model=model, sample_inputs=sample_inputs(config), train_data=train_data,
                 train_step=step, validate=validate_fn, total_steps=total_steps)
  return job, Trained(model, meta=meta)


def run_info(config) -> dict:
  return dict(model=model_label(config.model), image_size=config.data.image_size)


def restore_trained(config, workdir: str) -> Trained:
  """The classifier of the newest readable checkpoint in `workdir`, with its
  classify_meta.json."""
  meta = data.read_meta(workdir)
  model = build_model(config, len(meta['class_names']))
  # The optimizer's state has the same shapes whatever the run length, hence 1 step.
  state = checkpoint.restore_for_inference(workdir, model, make_optimizer(config.optim, 1),
                                           jax.random.key(0), *sample_inputs(config))
  return Trained(model, state, meta=meta)


def evaluate(config, workdir: str, trained: Trained, splits: Splits) -> dict:
  """Scores config.eval.split: eval.json, the confusion matrix and ROC figures."""
  if list(trained.meta['class_names']) != list(splits.labels):
    raise UserError(f'The classes of --config.dataset={config.dataset} differ from those '
                    f'{workdir} was trained on ({data.META_FILE} there); use the same data set '
                    f'and class list.')
  split = config.eval.split
  mean, std = data.mean_std(trained.meta)
  return evaluation.evaluate(trained.state, splits.sources[split], list(splits.labels),
                             config=config, workdir=workdir, split=split, mean=mean, std=std)


def predict(config, workdir: str, paths) -> list[dict]:
  """[{'path', 'top': [(class name, probability)] best first} or {'path', 'error'}]."""
  return prediction.classify_images(config, restore_trained(config, workdir), paths)


def describe(result: dict) -> str:
  return ', '.join(f'{name} {p:.3f}' for name, p in result['top'])
