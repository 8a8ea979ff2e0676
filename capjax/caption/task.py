"""Captioning end to end: data -> vocabulary -> model -> train -> evaluate -> predict.

This module is the task's side of `capjax.tasks.Task`; the runtime (run.py, tools/bench.py)
reaches captioning only through it.

Encoders train end to end with the decoder (config.optim.encoder_lr_scale > 0, its own learning
rate scale) or are frozen (scale 0): a frozen encoder runs once per split into the HDF5 feature
cache and the decoder trains on those features. Either way the encoder's variables live in the
train state, so checkpoints, --mode=eval and --mode=predict see one whole captioner.

An encoder that does not start from the loop's own random init (Keras .h5 weights, a trained
classifier's backbone, or the frozen random encoder whose features were cached) is written into
the workdir as the step-0 checkpoint before the loop starts; the loop then resumes from it, as
it resumes any run. A classifier's backbone (config.model.encoder_init) also leaves
encoder_init.json (capjax.caption.encoder_init), which builds that encoder again for resuming,
evaluation and predict.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from capjax import tasks
from capjax.caption import data, encoder_init, pipeline, scst, steps
from capjax.caption import evaluate as evaluation
from capjax.caption import predict as prediction
from capjax.caption.bench import BUILDERS as BENCH
from capjax.caption.config import validate
from capjax.caption.data import load_splits
from capjax.data import features, loading
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.models import decoder, encoders, keras_weights
from capjax.models.captioner import Captioner
from capjax.tasks import Splits
from capjax.train import checkpoint, loop, sharding
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer

# capjax.tasks.Task, which the runtime uses; the rest is this task's own API.
__all__ = ['NAME', 'CURVES', 'BENCH', 'validate', 'check_start', 'load_splits', 'training_job',
           'run_info', 'restore_trained', 'evaluate', 'predict', 'describe']
NAME = 'caption'
CURVES = ('loss', 'token_accuracy')


@dataclasses.dataclass
class Trained(tasks.Trained):
  """A captioner, its vocabulary, the record of the classifier its encoder came from (if it
did) and, after training, the inputs each split was prepared as (decoded images, cached
features), so that evaluation reuses them."""
  vocab: Optional[Vocabulary] = None
  encoder_init: Optional[dict] = None
  inputs: dict = dataclasses.field(default_factory=dict)


def build_model(config, vocab_size: int, classifier: dict | None = None) -> Captioner:
  """The captioner named by config.model.encoder / config.model.decoder; with `classifier`
  (an encoder_init.json record) its encoder is that classifier's backbone."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  common = dict(embed_dim=m.embed_dim, hidden=m.hidden, dropout=m.dropout,
                feature_norm=bool(m.get('feature_norm', False)), dtype=dtype)
  if m.decoder == 'inject':
    dec = decoder.InjectDecoder(vocab_size, pool=m.pool, every_step=m.every_step, **common)
  elif m.decoder == 'merge':
    dec = decoder.MergeDecoder(vocab_size, merge=m.get('merge', 'add'), **common)
  else:
    dec = decoder.AttentionDecoder(vocab_size, attn_dim=m.attn_dim,
                                   score=m.get('score', 'additive'),
                                   coverage=bool(m.get('coverage', False)),
                                   query=m.get('query', 'previous'), **common)
  concepts = vocab_size if float(m.get('concept_weight', 0.0)) else 0
  return Captioner(encoders.build_encoder(m, dtype, classifier), dec, concepts=concepts)


def sample_inputs(config):
  """Dummy (images, tokens) that fix the model's parameter shapes at init."""
  s = data.image_size(config)
  return (jnp.zeros((1, s, s, 3), jnp.uint8),
          jnp.zeros((1, config.data.caption_length), jnp.int32))


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


def starting_state(config, model: Captioner, tx, loaded: dict | None = None):
  """The run's step-0 state: the loop's own init (same key), with `loaded` (a classifier's
  backbone) or the Keras weights of config.model.encoder_weights as the encoder. Without
  either its random encoder is a pure function of config.seed, so the cached features of a
  frozen random encoder match it."""
  state = state_lib.create(model, tx, jax.random.split(jax.random.key(config.seed))[0],
                           *sample_inputs(config))
  loaded = load_encoder_weights(config, model) if loaded is None else loaded
  if loaded is None:
    return state
  params = {**state.params, 'encoder': jax.tree.map(jnp.asarray, loaded['params'])}
  batch_stats = dict(state.batch_stats)
  if 'batch_stats' in loaded:
    batch_stats['encoder'] = jax.tree.map(jnp.asarray, loaded['batch_stats'])
  return state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))


def _seeds_encoder(config) -> bool:
  return bool(config.model.get('encoder_weights')) or data.uses_feature_cache(config)


def seed_initial_checkpoint(config, workdir: str, state, train_data, tags: dict) -> None:
  """Writes `state` as step 0, unless the workdir already has a checkpoint (a resumed run
  keeps its own); the loop then starts from it like from any checkpoint."""
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints, async_save=False)
  try:
    if mngr.latest_step() is not None:
      return
    iterator = loading.iterate(train_data, num_threads=1)
    checkpoint.save(mngr, 0, state, {**tags, 'iterator': iterator.get_state(),
                                     'train_time_s': 0.0}, force=True)
    mngr.wait_until_finished()
    logging.info('Wrote the starting encoder (%s) as the step-0 checkpoint.',
                 config.model.get('encoder_weights') or config.model.get('encoder_init')
                 or 'random init')
  finally:
    mngr.close()


def _encode_fn(config, model, state):
  """The frozen encoder as a jitted feature function, or None when nothing is cached."""
  if not data.uses_feature_cache(config):
    return None
  return data.feature_encoder(model.encoder, encoder_of(state_lib.variables(state)),
                              pooled=not data.needs_grid(config))


def _split_inputs(config, split: str, source, trained: Trained) -> data.SplitInputs:
  # A frozen encoder is the trained state's own, so the cache key's weights id holds for it.
  if trained.encoder_init is not None:
    name, weights = encoder_init.cache_ids(trained.encoder_init)
  else:
    name = config.model.encoder
    weights = features.weights_id(config.model.get('encoder_weights'), config.seed)
  return data.split_inputs(
      config, split, source, encode=_encode_fn(config, trained.model, trained.state),
      weights_id=weights, encoder_name=name)


def check_start(config, workdir: str) -> None:
  """Raises UserError, before `workdir` is written to, when config.model.encoder_init cannot
  start this run (capjax.caption.encoder_init.check_start)."""
  encoder_init.check_start(config, workdir)


def _starting_encoder(config, workdir: str) -> tuple[dict | None, dict | None]:
  """(encoder_init record, classifier variables to start from). A resumed run has its record
  and its encoder in its checkpoint (variables None); a new one reads the classifier of
  config.model.encoder_init, or has neither."""
  if encoder_init.resuming(workdir):
    return encoder_init.read_record(workdir), None
  path = config.model.get('encoder_init')
  return encoder_init.load(path) if path else (None, None)


def _initial_state(config, workdir: str, model: Captioner, tx, record, loaded):
  """The state that seeds step 0 or computes a frozen encoder's features, or None (the loop's
  own init serves). A resumed classifier encoder comes from the run's own checkpoint."""
  if loaded is not None:
    return starting_state(config, model, tx, loaded)
  if record is not None:
    if not data.uses_feature_cache(config):
      return None
    return checkpoint.restore_for_inference(workdir, model, tx, jax.random.key(0),
                                            *sample_inputs(config))
  return starting_state(config, model, tx) if _seeds_encoder(config) else None


def training_job(config, workdir: str, splits: Splits) -> tuple[loop.Job, Trained]:
  """The loop's Job for `config`, and the Trained (without its state) that evaluation needs.
  Writes the vocabulary (and a seeded encoder's step-0 checkpoint) into `workdir`."""
  sources = splits.sources
  train_captions = data.read_captions(sources['train'])
  vocab = data.vocabulary(config, workdir, train_captions)
  check_checkpoints_vocabulary(workdir, vocab)  # Before anything is written or restored.
  data.save_vocabulary(workdir, vocab)
  data.log_sizes(vocab, sources)
  tags = {'vocabulary': data.vocabulary_fingerprint(vocab)}
  record, loaded = _starting_encoder(config, workdir)
  model = build_model(config, len(vocab), record)
  total = loop.total_steps(config, len(sources['train']))
  state0 = _initial_state(config, workdir, model, make_optimizer(config.optim, total), record,
                          loaded)
  if not encoder_init.resuming(workdir):  # Before step 0 is written; none for other encoders.
    encoder_init.write_record(workdir, record)
  trained = Trained(model, state0, vocab=vocab, encoder_init=record)
  trained.inputs = {s: _split_inputs(config, s, src, trained) for s, src in sources.items()}
  train, val = trained.inputs['train'], trained.inputs['validation']
  from_features = train.input_key == 'features'
  train_data = _train_dataset(config, vocab, train, from_features)
  val_data = val.eval_dataset(vocab, batch_size=config.eval.batch_size,
                              caption_length=config.data.caption_length)
  if state0 is not None:
    seed_initial_checkpoint(config, workdir, state0, train_data, tags)
  mesh = sharding.make_mesh()
  step_fn = steps.caption_feature_train_step if from_features else steps.caption_train_step
  job = loop.Job(model=model, sample_inputs=sample_inputs(config), train_data=train_data,
                 train_step=functools.partial(
                     step_fn, attention_reg=config.model.attention_reg,
                     label_smoothing=float(config.train.get('label_smoothing', 0.0)),
                     concept_weight=float(config.model.get('concept_weight', 0.0))),
                 validate=lambda st: evaluation.teacher_forced_metrics(
                     st, val_data, mesh, val.input_key),
                 total_steps=total, name='cross_entropy', checkpoint_extras=tags)
  if config.train.get('scst_steps'):
    job.then = (scst.phase(config, model, vocab, train.source, train_captions,
                           input_key=train.input_key, image_fn=train.image_fn),)
  return job, dataclasses.replace(trained, state=None)


def check_checkpoints_vocabulary(workdir: str, vocab: Vocabulary) -> None:
  """Raises UserError when the workdir's checkpoints were trained with another vocabulary
  (vocab.json replaced or rebuilt from other data): resuming, a self-critical phase above all,
  would read the model's word ids as other words. Checkpoints that record none pass."""
  newest = checkpoint.newest_data_state(workdir)
  saved = newest[1].get('vocabulary') if newest else None
  ours = data.vocabulary_fingerprint(vocab)
  if saved is None or saved == ours:
    return
  raise UserError(
      f'The checkpoints in {os.path.join(workdir, "checkpoints")} (newest: step {newest[0]}) '
      f'were trained with a vocabulary of {saved["words"]} words (sha256 {saved["sha256"]}), '
      f'but this run\'s vocabulary, {os.path.join(workdir, data.VOCAB_FILE)} or one built from '
      f'the training captions, has {ours["words"]} words (sha256 {ours["sha256"]}); put back '
      f'the vocab.json they were trained with, or train in a new --workdir.')


def _train_dataset(config, vocab, train: data.SplitInputs, from_features: bool):
  """The endless training batches of the train split's inputs."""
  return pipeline.caption_train_dataset(
      train.source, vocab, batch_size=config.train.batch_size,
      caption_length=config.data.caption_length, seed=config.seed, image_fn=train.image_fn,
      input_key=train.input_key, flip=bool(config.data.get('flip', False)) and not from_features,
      crop_min_area=float(config.data.get('crop_min_area', 1.0)),
      concepts=bool(float(config.model.get('concept_weight', 0.0))))


def run_info(config) -> dict:
  init = config.model.get('encoder_init')
  encoder = 'classifier' if init else config.model.encoder
  return dict(model=f'{encoder}+{config.model.decoder}', image_size=data.image_size(config),
              encoder_lr_scale=float(config.optim.get('encoder_lr_scale', 1.0)),
              **({'encoder_init': os.path.abspath(os.path.expanduser(init))} if init else {}))


def restore_trained(config, workdir: str) -> Trained:
  """The captioner of the newest readable checkpoint in `workdir`, with its vocabulary; an
  encoder taken from a classifier is built from the workdir's encoder_init.json, and its
  weights are the checkpoint's (the classifier workdir is not read)."""
  vocab = prediction.load_vocabulary(workdir)
  record = encoder_init.read_record(workdir)
  model = build_model(config, len(vocab), record)
  state = checkpoint.restore_for_inference(workdir, model, make_optimizer(config.optim, 1),
                                           jax.random.key(0), *sample_inputs(config))
  return Trained(model, state, vocab=vocab, encoder_init=record)


def evaluate(config, workdir: str, trained: Trained, splits: Splits) -> dict:
  """Scores config.eval.split: eval.json, captions_<split>.jsonl and the figures."""
  split = config.eval.split
  source = splits.sources[split]
  inputs = trained.inputs.get(split) or _split_inputs(config, split, source, trained)
  scorer = evaluation.scene_accuracy(source) if config.dataset == 'shapes' else None
  return evaluation.evaluate(trained.model, trained.state, trained.vocab, inputs,
                             config=config, workdir=workdir, split=split,
                             scene_accuracy=scorer)


def predict(config, workdir: str, paths) -> list[dict]:
  """[{'path', 'caption'} or {'path', 'error'}], with the decoding set in the config."""
  return prediction.caption_images(config, restore_trained(config, workdir), paths)


def describe(result: dict) -> str:
  return result['caption']
