"""Captioning end to end: data -> vocabulary -> model -> train -> evaluate -> predict.

Encoders train end to end with the decoder (config.optim.encoder_lr_scale > 0, its own learning
rate scale) or are frozen (scale 0): a frozen encoder runs once per split into the HDF5 feature
cache and the decoder trains on those features. Either way the encoder's variables live in the
train state, so checkpoints, --mode=eval and --mode=predict see one whole captioner.

An encoder that does not start from the loop's own random init (Keras .h5 weights, or the
frozen random encoder whose features were cached) is written into the workdir as the step-0
checkpoint before the loop starts; the loop then resumes from it, as it resumes any run.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax import caption_data, caption_eval, plots, run_files
from capjax.caption_data import image_size, load_splits, sample_inputs  # noqa: F401 (API)
from capjax.data import features, shapes
from capjax.data.tokenizer import Vocabulary
from capjax.models import decoder, encoders, keras_weights
from capjax.models.captioner import Captioner
from capjax.train import checkpoint, loop, steps
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer
from capjax.errors import UserError

DECODERS = ('inject', 'merge', 'attention')


def build_model(config, vocab_size: int) -> Captioner:
  """The captioner named by config.model.encoder / config.model.decoder."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.encoder not in encoders.NAMES:
    raise UserError(f'config.model.encoder={m.encoder!r} is unknown; use one of '
                    f'{", ".join(encoders.NAMES)}.')
  enc = encoders.build_encoder(m, dtype)
  common = dict(embed_dim=m.embed_dim, hidden=m.hidden, dropout=m.dropout,
                feature_norm=bool(m.get('feature_norm', False)), dtype=dtype)
  if m.decoder == 'inject':
    dec = decoder.InjectDecoder(vocab_size, pool=m.pool, every_step=m.every_step, **common)
  elif m.decoder == 'merge':
    dec = decoder.MergeDecoder(vocab_size, merge=m.get('merge', 'add'), **common)
  elif m.decoder == 'attention':
    dec = decoder.AttentionDecoder(vocab_size, attn_dim=m.attn_dim,
                                   score=m.get('score', 'additive'),
                                   coverage=bool(m.get('coverage', False)),
                                   query=m.get('query', 'previous'), **common)
  else:
    raise UserError(f'config.model.decoder={m.decoder!r} is unknown; use one of '
                    f'{", ".join(DECODERS)}.')
  return Captioner(enc, dec)


def _check(config) -> None:
  """Config mistakes caught before any data is read."""
  m = config.model
  if m.get('encoder_weights') and m.encoder not in encoders.KERAS_BACKBONES:
    raise UserError(f'config.model.encoder_weights is set, but encoder={m.encoder!r} has no '
                    f'Keras weights; use encoder=resnet50 or xception, or unset the weights.')
  if m.get('encoder_weights') and not os.path.isfile(os.path.expanduser(m.encoder_weights)):
    raise UserError(f'config.model.encoder_weights={m.encoder_weights} does not exist; give '
                    'the path of a Keras notop .h5 file (none can be downloaded here).')
  if m.encoder in ('cnn', 'shapes_cnn') and caption_data.image_size(config) % int(
      m.get('patch', 4)):
    raise UserError(f'The image size {caption_data.image_size(config)} must be a multiple of '
                    f'config.model.patch={m.get("patch", 4)} (the cnn encoder folds '
                    f'patch x patch pixel tiles); change config.data.image_size.')
  if m.decoder == 'merge' and m.get('merge', 'add') not in ('add', 'concat'):
    raise UserError(f"config.model.merge={m.merge!r} must be 'add' or 'concat'.")


def load_encoder_weights(config, model: Captioner) -> dict | None:
  """{'params', 'batch_stats'} of the encoder from config.model.encoder_weights, or None."""
  path = config.model.get('encoder_weights')
  if not path:
    return None
  loaded = keras_weights.load_keras_h5(os.path.expanduser(path),
                                       encoders.keras_arch(model.encoder))
  return {k: {'backbone': v} for k, v in loaded.items()}


def encoder_of(variables: dict) -> dict:
  """The encoder's part of a captioner's variables ({'params': ..., 'batch_stats': ...})."""
  return {k: v['encoder'] for k, v in variables.items() if 'encoder' in v}


def starting_state(config, model: Captioner, tx):
  """The run's step-0 state: the loop's own init (same key), with the Keras weights as the
  encoder when config.model.encoder_weights is set. Without weights its random encoder is a
  pure function of config.seed, so the cached features of a frozen random encoder match it."""
  state = state_lib.create(model, tx, jax.random.split(jax.random.key(config.seed))[0],
                           *sample_inputs(config))
  loaded = load_encoder_weights(config, model)
  if loaded is None:
    return state
  params = {**state.params, 'encoder': jax.tree.map(jnp.asarray, loaded['params'])}
  batch_stats = dict(state.batch_stats)
  if 'batch_stats' in loaded:
    batch_stats['encoder'] = jax.tree.map(jnp.asarray, loaded['batch_stats'])
  return state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))


def _seeds_encoder(config) -> bool:
  return bool(config.model.get('encoder_weights')) or caption_data.uses_feature_cache(config)


def seed_initial_checkpoint(config, workdir: str, state, train_data) -> None:
  """Writes `state` as step 0, unless the workdir already has a checkpoint (a resumed run
  keeps its own); the loop then starts from it like from any checkpoint."""
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints, async_save=False)
  try:
    if mngr.latest_step() is not None:
      return
    iterator = caption_data.pipeline.iterate(train_data, num_threads=1)
    checkpoint.save(mngr, 0, state, {'iterator': iterator.get_state(), 'train_time_s': 0.0},
                    force=True)
    mngr.wait_until_finished()
    logging.info('Wrote the starting encoder (%s) as the step-0 checkpoint.',
                 config.model.get('encoder_weights') or 'random init')
  finally:
    mngr.close()


def _encode_fn(config, model, state):
  """The frozen encoder as a jitted feature function, or None when nothing is cached."""
  if not caption_data.uses_feature_cache(config):
    return None
  return caption_data.feature_encoder(model.encoder, encoder_of(caption_eval.variables_of(state)),
                                      pooled=not caption_data.needs_grid(config))


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


def _scorer(config, source):
  return scene_accuracy(source) if config.dataset == 'shapes' else None


def training_job(config, workdir: str) -> tuple[loop.Job, dict]:
  """The loop's Job for `config`, and what evaluation needs after it (model, vocab, inputs,
  sources). Writes the vocabulary (and a seeded encoder's step-0 checkpoint) into `workdir`."""
  _check(config)
  sources = load_splits(config)
  vocab = caption_data.vocabulary(config, workdir, caption_data.read_captions(sources['train']))
  caption_data.log_sizes(vocab, sources)
  model = build_model(config, len(vocab))
  total = loop.total_steps(config, len(sources['train']))
  state0 = (starting_state(config, model, make_optimizer(config.optim, total))
            if _seeds_encoder(config) else None)
  encode = _encode_fn(config, model, state0)
  weights = features.weights_id(config.model.get('encoder_weights'), config.seed)
  inputs = {s: caption_data.split_inputs(config, s, src, encode=encode, weights_id=weights)
            for s, src in sources.items()}
  train, val = inputs['train'], inputs['validation']
  from_features = train.input_key == 'features'
  train_data = caption_data.pipeline.caption_train_dataset(
      train.source, vocab, batch_size=config.train.batch_size,
      caption_length=config.data.caption_length, seed=config.seed, image_fn=train.image_fn,
      input_key=train.input_key, flip=bool(config.data.get('flip', False)) and not from_features)
  val_data = val.eval_dataset(vocab, batch_size=config.eval.batch_size,
                              caption_length=config.data.caption_length)
  if state0 is not None:
    seed_initial_checkpoint(config, workdir, state0, train_data)
  from capjax.train import sharding
  mesh = sharding.make_mesh()
  step_fn = steps.caption_feature_train_step if from_features else steps.caption_train_step
  job = loop.Job(model=model, sample_inputs=sample_inputs(config), train_data=train_data,
                 train_step=functools.partial(step_fn, attention_reg=config.model.attention_reg),
                 validate=lambda st: caption_eval.teacher_forced_metrics(
                     st, val_data, mesh, val.input_key),
                 total_steps=total)
  return job, dict(model=model, vocab=vocab, inputs=inputs, sources=sources)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains on the train split, then evaluates on config.eval.split; returns eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  run_files.save_config(config, workdir)
  job, ctx = training_job(config, workdir)
  outcome = loop.train(job, config, workdir)
  if outcome.interrupted:
    return {}
  run_files.write_run_info(workdir, task='caption', dataset=config.dataset,
                           model=f'{config.model.encoder}+{config.model.decoder}',
                           num_params=state_lib.num_params(outcome.state),
                           train_time_s=outcome.train_time_s, steps=outcome.step,
                           image_size=image_size(config), batch_size=config.train.batch_size,
                           encoder_lr_scale=float(config.optim.get('encoder_lr_scale', 1.0)))
  plots.plot_curves(run_files.curves(workdir, ('loss', 'token_accuracy')),
                    os.path.join(workdir, 'loss_curve.png'), title='captioning')
  split = config.eval.split
  return caption_eval.evaluate(ctx['model'], outcome.state, ctx['vocab'], ctx['inputs'][split],
                               config=config, workdir=workdir, split=split,
                               scene_accuracy=_scorer(config, ctx['sources'][split]))


def restore_model(config, workdir: str):
  """(model, vocab, state) of the newest checkpoint in `workdir`."""
  vocab = Vocabulary.load(os.path.join(workdir, 'vocab.json'))
  model = build_model(config, len(vocab))
  state = checkpoint.restore_for_inference(workdir, model, make_optimizer(config.optim, 1),
                                           jax.random.key(0), *sample_inputs(config))
  return model, vocab, state


def evaluate_workdir(config, workdir: str) -> dict:
  """`--mode=eval`: scores the workdir's newest checkpoint on config.eval.split."""
  split = config.eval.split
  source = load_splits(config, (split,))[split]
  model, vocab, state = restore_model(config, workdir)
  # A frozen encoder is the checkpoint's own, so the cache key's weights id still holds.
  inputs = caption_data.split_inputs(
      config, split, source, encode=_encode_fn(config, model, state),
      weights_id=features.weights_id(config.model.get('encoder_weights'), config.seed))
  return caption_eval.evaluate(model, state, vocab, inputs, config=config, workdir=workdir,
                               split=split, scene_accuracy=_scorer(config, source))
