"""The one function launch.py calls: checks the config and workdir, then dispatches a mode.

Everything a user can get wrong (a config value, a workdir, a data path) is checked here or in
the readers before the workdir is written to, and raised as a `UserError` whose message names
the field or file and what to do; launch.py prints it as one line.
"""
from __future__ import annotations

import logging as std_logging
import numbers
import os

from absl import logging

from capjax.errors import UserError

TASKS = ('caption', 'classify')
MODES = ('train', 'eval', 'predict', 'bench')
STEM_PATCH = 4  # The caption encoders' space-to-depth tile (capjax.models.cnn.CaptionEncoder).


def _number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ints(v) -> bool:
  return isinstance(v, (list, tuple)) and len(v) > 0 and all(_int(x) and x > 0 for x in v)


# (config field, test, what the value must be). Fields a config does not have are skipped, so
# one table serves every task.
_CHECKS = [
    ('seed', _int, 'a whole number'),
    ('train.steps', lambda v: _int(v) and v >= 0, 'a whole number > 0 (or set train.epochs)'),
    ('train.epochs', lambda v: _number(v) and v >= 0, 'a number >= 0 (0: use train.steps)'),
    ('train.batch_size', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('train.log_every', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('train.eval_every', lambda v: _int(v) and v >= 0, 'a whole number >= 0 (0: never)'),
    ('train.checkpoint_every', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('train.keep_checkpoints', lambda v: _int(v) and v >= 1, 'a whole number >= 1'),
    ('train.nan_policy', lambda v: v in ('stop', 'skip'), "'stop' or 'skip'"),
    ('train.label_smoothing', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optim.name', lambda v: v in ('adamw', 'sgd'), "'adamw' or 'sgd'"),
    ('optim.learning_rate', lambda v: _number(v) and v > 0, 'a number > 0'),
    ('optim.warmup_steps', lambda v: _int(v) and v >= 0, 'a whole number >= 0'),
    ('optim.final_lr_fraction', lambda v: _number(v) and 0 <= v <= 1, 'in [0, 1]'),
    ('optim.weight_decay', lambda v: _number(v) and v >= 0, 'a number >= 0'),
    ('optim.b1', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optim.b2', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optim.momentum', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optim.grad_clip_norm', lambda v: _number(v) and v >= 0, 'a number >= 0 (0: no clipping)'),
    ('eval.batch_size', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('eval.split', lambda v: v in ('train', 'validation', 'test'),
     "'train', 'validation' or 'test'"),
    ('eval.decoding', lambda v: v in ('greedy', 'beam'), "'greedy' or 'beam'"),
    ('eval.beam_size', lambda v: _int(v) and v >= 1, 'a whole number >= 1'),
    ('eval.length_alpha', lambda v: _number(v) and v >= 0, 'a number >= 0'),
    ('eval.num_samples', lambda v: _int(v) and v >= 0, 'a whole number >= 0'),
    ('data.num_threads', lambda v: _int(v) and v >= 0, 'a whole number >= 0'),
    ('data.caption_length', lambda v: _int(v) and v >= 3,
     'a whole number >= 3 (<start>, a word, <end>)'),
    ('data.image_size', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('shapes.image_size', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('data.stats_max_images', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('vocab.min_freq', lambda v: _int(v) and v >= 1, 'a whole number >= 1'),
    ('vocab.max_size', lambda v: _int(v) and v > 4, 'a whole number > 4 (4 special tokens)'),
    ('model.dtype', lambda v: v in ('float32', 'bfloat16', 'float16'),
     "'float32', 'bfloat16' or 'float16'"),
    ('model.dropout', lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('model.embed_dim', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('model.hidden', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('model.attn_dim', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('model.attention_reg', lambda v: _number(v) and v >= 0, 'a number >= 0'),
    ('model.score', lambda v: v in ('additive', 'dot'), "'additive' or 'dot'"),
    ('model.query', lambda v: v in ('previous', 'current'), "'previous' or 'current'"),
    ('model.conv', lambda v: v in ('flax', 'layers'), "'flax' or 'layers'"),
    ('augment.crop', lambda v: v in ('pad', 'resized', 'none'), "'pad', 'resized' or 'none'"),
    ('augment.crop_padding', lambda v: _int(v) and v >= 0, 'a whole number >= 0'),
    ('augment.mixup_alpha', lambda v: _number(v) and v >= 0, 'a number >= 0 (0: off)'),
    ('augment.cutmix_alpha', lambda v: _number(v) and v >= 0, 'a number >= 0 (0: off)'),
]
_CAPTION_CHECKS = [
    ('shapes.num_train', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('shapes.num_validation', lambda v: _int(v) and v > 0, 'a whole number > 0'),
    ('shapes.num_test', lambda v: _int(v) and v > 0, 'a whole number > 0'),
]
# The from-scratch caption encoders (capjax.models.cnn.CaptionEncoder and its presets).
_PATCH_ENCODERS = ('shapes_cnn', 'cnn', 'tiny_cnn')
_PATCH_CHECKS = [
    ('model.widths', _ints, 'a non-empty list of whole numbers > 0, e.g. (64, 64, 128)'),
    ('model.strides', _ints, 'a non-empty list of whole numbers > 0, e.g. (1, 1, 2)'),
]


_MISSING = object()


def _get(config, path: str):
  """config's value at a dotted path, or a sentinel when the config has no such field."""
  node = config
  for key in path.split('.'):
    if not hasattr(node, 'keys') or key not in node.keys():
      return _MISSING
    node = node[key]
  return node



def validate(config) -> None:
  """Raises UserError naming the first config field whose value is out of range."""
  task = config.get('task') if hasattr(config, 'get') else None
  if task not in TASKS:
    raise UserError(f'config.task={task!r} is unknown; use one of {", ".join(TASKS)}.')
  patch_encoder = task == 'caption' and config.model.get('encoder') in _PATCH_ENCODERS
  checks = _CHECKS + (_CAPTION_CHECKS if task == 'caption' else []) + (
      _PATCH_CHECKS if patch_encoder else [])
  for path, ok, requirement in checks:
    value = _get(config, path)
    if value is _MISSING or value is None:
      continue
    try:
      good = bool(ok(value))
    except TypeError:  # e.g. a string compared with a number
      good = False
    if not good:
      raise UserError(f'config.{path}={value!r} is not allowed: it must be {requirement}; '
                      f'change it in the config file or with --config.{path}=...')
  train = config.train
  if not train.get('epochs') and train.get('steps', 1) <= 0:
    raise UserError(f'config.train.steps={train.steps} must be > 0 when config.train.epochs '
                    f'is 0; set one of them.')
  if patch_encoder:
    if len(config.model.widths) != len(config.model.strides):
      raise UserError(f'config.model.widths has {len(config.model.widths)} entries and '
                      f'config.model.strides {len(config.model.strides)}; give one stride '
                      f'per width.')
    field = 'shapes.image_size' if config.get('dataset') == 'shapes' else 'data.image_size'
    size = _get(config, field)
    if size is not _MISSING and _int(size) and size % STEM_PATCH:
      raise UserError(f'config.{field}={size} must be a multiple of {STEM_PATCH} for '
                      f'config.model.encoder={config.model.encoder!r} (it folds '
                      f'{STEM_PATCH}x{STEM_PATCH} pixel tiles); use e.g. '
                      f'{size - size % STEM_PATCH or STEM_PATCH}.')
  for field in ('data_dir', 'tfds_dir'):
    path = config.get(field)
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'config.{field}={path!r} is a file; point it at a folder.')


def _bench(config, workdir: str | None) -> None:
  """--mode=bench: one JSON line per benchmark on stdout, also appended to
  WORKDIR/bench.jsonl when a workdir is given."""
  if config is None:
    raise UserError('--mode=bench needs --config (configs/bench.py:task=..., or a task config '
                    'such as configs/caption.py to time its own train step).')
  if config.get('task') != 'bench':
    validate(config)
  import json  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  from capjax import bench  # pylint: disable=import-outside-toplevel
  rows = bench.main(config)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'bench.jsonl'), 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)


def _check_workdir(workdir: str, mode: str) -> None:
  """Refuses a workdir that cannot work, before anything is written into it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file; pass a folder (it is created if missing).')
  if mode == 'train':
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f'--workdir={workdir} cannot be written ({parent} is not writable); '
                      f'pick a folder you can write to.')
  elif not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'--workdir={workdir} holds no checkpoints; train first with '
                    f'--mode=train --workdir={workdir}.')


def _log_filter(record: std_logging.LogRecord) -> bool:
  """capjax's INFO lines on process 0; everything else (libraries -- orbax logs every save --
  and the other processes, which would repeat process 0) only from WARNING up."""
  import jax
  if record.levelno >= std_logging.WARNING:
    return True
  return '/capjax/' in record.pathname and jax.process_index() == 0


def main(config, workdir: str, mode: str, images=()) -> None:
  """Runs `mode` ('train', 'eval', 'predict', 'bench') for `config` in `workdir`."""
  if mode not in MODES:
    raise UserError(f'--mode={mode} is unknown; use one of {", ".join(MODES)}.')
  logging.get_absl_handler().addFilter(_log_filter)
  if mode == 'bench' or (config is not None and config.get('task') == 'bench'):
    _bench(config, workdir)
    return
  if not workdir:
    raise UserError('--workdir is required.')
  if mode == 'predict':
    from capjax import predict
    predict.main(workdir, images)
    return
  if config is None:
    raise UserError('--config is required for --mode=train/eval (e.g. '
                    '--config=configs/caption.py).')
  validate(config)  # Before the slow imports below, so a typo fails in a second.
  _check_workdir(workdir, mode)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  from capjax import distributed
  if config.task == 'caption':
    from capjax import caption_task as task
  else:
    from capjax import classify_task as task
  if mode == 'eval':  # Reads only the split it scores, which training prepared.
    task.evaluate_workdir(config, workdir)
    return
  # Data first: a wrong data path fails before the workdir is created, and with several
  # processes process 0 prepares the data set alone before the others read it.
  with distributed.main_process_first('capjax_prepare_data'):
    task.load_splits(config)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'--workdir={workdir} cannot be created ({e.strerror or e}); pick a '
                    f'folder you can write to.') from e
  task.train_and_evaluate(config, workdir)
