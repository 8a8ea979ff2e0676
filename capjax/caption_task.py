"""Captioning end to end: data -> vocabulary -> model -> train -> evaluate -> predict."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax import caption_eval, plots, run_files
from capjax.data import pipeline, shapes, shapes_tfds
from capjax.data.tokenizer import Vocabulary
from capjax.models import cnn, decoder
from capjax.models.captioner import Captioner
from capjax.train import checkpoint, loop, steps
from capjax.train import state as state_lib
from capjax.errors import UserError


def load_splits(config) -> dict:
  """{'train', 'validation', 'test'} random-access sources for config.dataset."""
  if config.dataset == 'shapes':
    s = config.shapes
    builder = shapes_tfds.prepare(config.tfds_dir, image_size=s.image_size,
                                  num_train=s.num_train, num_validation=s.num_validation,
                                  num_test=s.num_test, seed=s.seed)
    return builder.as_data_source()
  raise UserError(f"config.dataset={config.dataset!r} is not a caption data set here; "
                   "use 'shapes'.")


def build_model(config, vocab_size: int) -> Captioner:
  """The captioner named by config.model.encoder / config.model.decoder."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.encoder == 'shapes_cnn':
    enc = cnn.CaptionEncoder(widths=tuple(m.widths), strides=tuple(m.strides), norm=m.norm,
                             dtype=dtype)
  elif m.encoder == 'tiny_cnn':
    enc = cnn.CaptionEncoderTiny(dtype=dtype)
  else:
    raise UserError(f"config.model.encoder={m.encoder!r} is unknown; use 'shapes_cnn' or "
                    "'tiny_cnn'.")
  if m.decoder == 'inject':
    dec = decoder.InjectDecoder(vocab_size, embed_dim=m.embed_dim, hidden=m.hidden,
                                dropout=m.dropout, pool=m.pool, every_step=m.every_step,
                                dtype=dtype)
  elif m.decoder == 'attention':
    dec = decoder.AttentionDecoder(vocab_size, embed_dim=m.embed_dim, hidden=m.hidden,
                                   attn_dim=m.attn_dim, dropout=m.dropout, dtype=dtype)
  else:
    raise UserError(f"config.model.decoder={m.decoder!r} is unknown; use 'inject' or "
                    "'attention'.")
  return Captioner(enc, dec)


def vocabulary(config, workdir: str, train_source) -> Vocabulary:
  """The workdir's vocabulary if it has one (a resumed run must keep its ids)."""
  path = os.path.join(workdir, 'vocab.json')
  if os.path.exists(path):
    return Vocabulary.load(path)
  captions = (pipeline._text(c) for i in range(len(train_source))
              for c in train_source[i]['captions'])
  vocab = Vocabulary.build(captions, min_freq=config.vocab.min_freq,
                           max_size=config.vocab.max_size)
  if jax.process_index() == 0:
    vocab.save(path)
  return vocab


def scene_accuracy(source):
  """For shapes: exact-scene accuracy of the generated captions, and the oracle BLEU-4."""
  from capjax.metrics.caption import caption_metrics

  def score(refs: dict, hyps: dict) -> dict:
    truth = {i: shapes.Scene.from_json(json.loads(source[i]['scene'])) for i in hyps}
    exact = np.mean([shapes.parse(hyps[i]) == truth[i] for i in hyps])
    # A fresh grammar caption per true scene, scored against the same references:
    # the BLEU ceiling that the grammar's own variety allows.
    rng = np.random.default_rng(12345)
    oracle = {i: shapes.describe(truth[i], rng) for i in hyps}
    oracle_bleu = caption_metrics(refs, oracle, meteor=False)['bleu_4']
    return {'exact_scene_accuracy': float(exact), 'oracle_bleu_4': oracle_bleu}

  return score


def image_size(config) -> int:
  """The square side images are fed at."""
  return config.shapes.image_size


def sample_inputs(config):
  """Dummy (images, tokens) that fix the model's parameter shapes at init."""
  s = image_size(config)
  return (jnp.zeros((1, s, s, 3), jnp.uint8),
          jnp.zeros((1, config.data.caption_length), jnp.int32))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains on the train split, then evaluates on config.eval.split; returns eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  run_files.save_config(config, workdir)
  splits = load_splits(config)
  vocab = vocabulary(config, workdir, splits['train'])
  logging.info('Vocabulary: %d words; train/validation/test = %d/%d/%d images.', len(vocab),
               len(splits['train']), len(splits['validation']), len(splits['test']))
  model = build_model(config, len(vocab))
  total = loop.total_steps(config, len(splits['train']))
  train_data = pipeline.caption_train_dataset(
      splits['train'], vocab, batch_size=config.train.batch_size,
      caption_length=config.data.caption_length, seed=config.seed)
  val_data = pipeline.caption_eval_dataset(
      splits['validation'], vocab, batch_size=config.eval.batch_size,
      caption_length=config.data.caption_length)
  from capjax.train import sharding
  mesh = sharding.make_mesh()
  job = loop.Job(model=model, sample_inputs=sample_inputs(config),
                 train_data=train_data,
                 train_step=functools.partial(steps.caption_train_step,
                                              attention_reg=config.model.attention_reg),
                 validate=lambda st: caption_eval.teacher_forced_metrics(st, val_data, mesh),
                 total_steps=total)
  outcome = loop.train(job, config, workdir)
  if outcome.interrupted:
    return {}
  run_files.write_run_info(workdir, task='caption', dataset=config.dataset,
                           model=f'{config.model.encoder}+{config.model.decoder}',
                           num_params=state_lib.num_params(outcome.state),
                           train_time_s=outcome.train_time_s, steps=outcome.step)
  plots.plot_curves(run_files.curves(workdir, ('loss', 'token_accuracy')),
                    os.path.join(workdir, 'loss_curve.png'), title='captioning')
  split = config.eval.split
  scorer = scene_accuracy(splits[split]) if config.dataset == 'shapes' else None
  return caption_eval.evaluate(model, outcome.state, vocab, splits[split], config=config,
                               workdir=workdir, split=split, scene_accuracy=scorer)


def evaluate_workdir(config, workdir: str) -> dict:
  """`--mode=eval`: scores the workdir's newest checkpoint on config.eval.split."""
  from capjax.train import checkpoint
  from capjax.train.optim import make_optimizer
  splits = load_splits(config)
  vocab = Vocabulary.load(os.path.join(workdir, 'vocab.json'))
  model = build_model(config, len(vocab))
  state = checkpoint.restore_for_inference(workdir, model, make_optimizer(config.optim, 1),
                                           jax.random.key(0), *sample_inputs(config))
  split = config.eval.split
  scorer = scene_accuracy(splits[split]) if config.dataset == 'shapes' else None
  return caption_eval.evaluate(model, state, vocab, splits[split], config=config,
                               workdir=workdir, split=split, scene_accuracy=scorer)
