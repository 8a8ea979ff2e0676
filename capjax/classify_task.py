"""Classification end to end: data -> statistics -> model -> train -> evaluate.

The workdir gets config.json, classify_meta.json (class names, normalisation statistics,
image size: everything predict needs besides the weights), checkpoints/, metrics.jsonl,
run.json, eval.json and the figures written by classify_eval.
"""
from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax import classify_eval, run_files
from capjax.data import classify_pipeline, classify_tfds
from capjax.errors import UserError
from capjax.models import classifier, layers
from capjax.train import checkpoint, classify_steps, loop, sharding
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

META_FILE = 'classify_meta.json'
_OVERRIDES = ('widths', 'convs_per_stage', 'stage_sizes', 'stem_width', 'stem_stride')


def _wnids(value):
  """config.tiny_imagenet.wnids: None (root/wnids.txt), a file path, or 'n01,n02,...'."""
  if not value or os.path.isfile(value):
    return value or None
  if os.sep in value or value.endswith('.txt'):
    raise UserError(f'config.tiny_imagenet.wnids={value!r} looks like a path but is not a '
                    f'file; give an existing wnid file or comma-separated wnids.')
  return [w.strip() for w in value.split(',') if w.strip()]


def prepare(config):
  """The prepared TFDS builder of config.dataset (generating/decoding it the first time)."""
  size = config.data.image_size
  if config.dataset == 'shapes30':
    s = config.shapes30
    return classify_tfds.prepare_shapes30(
        config.tfds_dir, image_size=size, num_train=s.num_train,
        num_validation=s.num_validation, num_test=s.num_test, seed=s.seed)
  if config.dataset == 'tiny_imagenet30':
    t = config.tiny_imagenet
    return classify_tfds.prepare_folder(
        config.tfds_dir, 'tiny_imagenet', config.data_dir, size, wnids=_wnids(t.wnids),
        train_per_class=t.train_per_class, val_per_class=t.val_per_class,
        skip_missing=t.skip_missing_images)
  if config.dataset == 'image_folder':
    f = config.image_folder
    return classify_tfds.prepare_folder(
        config.tfds_dir, 'image_folder', config.data_dir, size,
        fractions=tuple(f.split_fractions), seed=f.split_seed)
  raise UserError(f"config.dataset={config.dataset!r} is not a classification data set; use "
                  f"shapes30, tiny_imagenet30 or image_folder.")


# The last in-memory copy of each split: run.main loads the data once to check it before
# the task loads it again, and reading Tiny ImageNet30 into memory takes seconds.
_IN_MEMORY: dict[str, tuple[str, classify_pipeline.ArraySource]] = {}


def load_splits(config, splits=('train', 'validation', 'test')) -> tuple[dict, list[str]]:
  """({split: random-access source}, class names); in memory if config.data.in_memory."""
  builder = prepare(config)
  sources = builder.as_data_source()
  sources = {s: sources[s] for s in splits}
  if config.data.get('in_memory', True):
    key = os.fspath(builder.data_path)
    for s, source in sources.items():
      if _IN_MEMORY.get(s, (None,))[0] != key:
        _IN_MEMORY[s] = (key, classify_pipeline.load_in_memory(source))
      sources[s] = _IN_MEMORY[s][1]
  return sources, classify_tfds.class_names(builder)


def build_model(model_config, num_classes: int) -> nn.Module:
  """The classifier that config.model describes (a preset plus the fields that are set)."""
  m = model_config
  if m.name not in classifier.PRESETS:
    raise UserError(f'config.model.name={m.name!r} is unknown; use one of '
                    f'{sorted(classifier.PRESETS)}.')
  preset = classifier.PRESETS[m.name]
  module_class = getattr(preset, 'func', preset)
  fields = module_class.__dataclass_fields__
  kwargs = {}
  for key in _OVERRIDES:
    value = m.get(key)
    if value:
      if key not in fields:
        raise UserError(f'config.model.{key} does not apply to config.model.name={m.name!r}; '
                        f'leave it unset (0 or ()).')
      kwargs[key] = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(
          value)
  return preset(num_classes=num_classes, dropout=float(m.dropout), dtype=jnp.dtype(m.dtype),
                conv=layers.conv_by_name(m.get('conv', 'flax')), **kwargs)


def model_label(model_config) -> str:
  """How run.json (and the comparison table) names the model, e.g. 'cnn[widths=16-32]'."""
  set_fields = [f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                for k in _OVERRIDES if (v := model_config.get(k))]
  return model_config.name + (f"[{','.join(set_fields)}]" if set_fields else '')


def normalisation(config, workdir: str, train_source, class_names) -> dict:
  """The workdir's classify_meta.json, written first from the train split's statistics.

  A resumed run (and predict) must normalise exactly as the first run did, so the stored
  statistics win over recomputing them.
  """
  path = os.path.join(workdir, META_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  mean, std = classify_pipeline.channel_stats(train_source, config.data.stats_max_images)
  meta = {'class_names': list(class_names), 'mean': mean.tolist(), 'std': std.tolist(),
          'image_size': int(config.data.image_size), 'dataset': config.dataset}
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(meta, f, indent=1)
  logging.info('Normalisation statistics of the train split: mean %s, std %s.',
               np.round(mean, 2).tolist(), np.round(std, 2).tolist())
  return meta


def read_meta(workdir: str) -> dict:
  path = os.path.join(workdir, META_FILE)
  if not os.path.exists(path):
    raise UserError(f'{path} is missing: {workdir} holds no trained classifier; train first '
                    f'with --workdir pointing at it.')
  with open(path) as f:
    return json.load(f)


def _sample_inputs(image_size: int):
  return (jnp.zeros((1, image_size, image_size, 3), jnp.float32),)


def restore_state(config, workdir: str, num_classes: int, total_steps: int = 1):
  """(model, state) from the latest checkpoint in `workdir`; UserError when there is none.

  The optimizer's state has the same shapes whatever the run length, so `total_steps`
  only matters to callers that go on training.
  """
  model = build_model(config.model, num_classes)
  state = checkpoint.restore_for_inference(
      workdir, model, make_optimizer(config.optim, total_steps), jax.random.key(config.seed),
      *_sample_inputs(config.data.image_size))
  return model, state


def training_job(config, workdir: str) -> tuple[loop.Job, dict]:
  """The loop's Job for `config`, and what evaluation needs after it (splits, class names,
  mean, std). Writes the normalisation statistics into `workdir`."""
  splits, class_names = load_splits(config)
  meta = normalisation(config, workdir, splits['train'], class_names)
  mean, std = np.asarray(meta['mean'], np.float32), np.asarray(meta['std'], np.float32)
  logging.info('%d classes; train/validation/test = %d/%d/%d images.', len(class_names),
               len(splits['train']), len(splits['validation']), len(splits['test']))
  model = build_model(config.model, len(class_names))
  size = config.data.image_size
  total_steps = loop.total_steps(config, len(splits['train']))
  size_at_step = classify_pipeline.size_schedule(config.data.get('progressive_sizes', ()),
                                                 size, total_steps)
  train_data = classify_pipeline.train_dataset(
      splits['train'], batch_size=config.train.batch_size, seed=config.seed, image_size=size,
      mean=mean, std=std, aug=config.augment, size_at_step=size_at_step)
  validate = None
  if len(splits['validation']):
    val_data = classify_pipeline.eval_dataset(splits['validation'],
                                              batch_size=config.eval.batch_size,
                                              image_size=size, mean=mean, std=std)
    mesh = sharding.make_mesh()
    flip = bool(config.eval.get('flip_average'))
    validate = lambda st: classify_eval.validation_metrics(st, val_data, mesh, flip)
  step = functools.partial(classify_steps.classify_train_step,
                           label_smoothing=float(config.train.label_smoothing))
  job = loop.Job(model=model, sample_inputs=_sample_inputs(size), train_data=train_data,
                 train_step=step, validate=validate, total_steps=total_steps)
  return job, dict(splits=splits, class_names=class_names, mean=mean, std=std)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains on the train split, then evaluates on config.eval.split; returns eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  run_files.save_config(config, workdir)
  job, ctx = training_job(config, workdir)
  outcome = loop.train(job, config, workdir)
  if outcome.interrupted:
    return {}
  run_files.write_run_info(workdir, task='classify', dataset=config.dataset,
                           model=model_label(config.model),
                           num_params=state_lib.num_params(outcome.state),
                           train_time_s=outcome.train_time_s, steps=outcome.step,
                           image_size=config.data.image_size,
                           batch_size=config.train.batch_size)
  split = config.eval.split
  return classify_eval.evaluate(outcome.state, ctx['splits'][split], ctx['class_names'],
                                config=config, workdir=workdir, split=split,
                                mean=ctx['mean'], std=ctx['std'])


def evaluate_workdir(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir` on config.eval.split (--mode=eval)."""
  split = config.eval.split
  splits, class_names = load_splits(config, (split,))
  meta = read_meta(workdir)
  if list(meta['class_names']) != list(class_names):
    raise UserError(f'The classes of config.dataset={config.dataset!r} differ from those '
                    f'{workdir} was trained on ({os.path.join(workdir, META_FILE)}); use the '
                    f'same data set and class list.')
  _, state = restore_state(config, workdir, len(class_names))
  return classify_eval.evaluate(state, splits[split], class_names, config=config,
                                workdir=workdir, split=split,
                                mean=np.asarray(meta['mean'], np.float32),
                                std=np.asarray(meta['std'], np.float32))
