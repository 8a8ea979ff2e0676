"""A trained capjax classifier as the caption encoder (`--config.model.encoder_init=WORKDIR`).

The classifier workdir is read once, when a caption run starts: its config.json says the
architecture (built by `capjax.models.classifier.build`, as the classify task builds it), its
classify_meta.json the normalisation it was trained with, and its newest readable checkpoint
the weights; the backbone (everything but 'head', BatchNorm statistics included) becomes the
captioner's encoder. The caption workdir keeps `encoder_init.json`: where the encoder came from
(source, step, sha256 of the loaded variables) and what builds it, so resuming, --mode=eval
and --mode=predict rebuild the encoder from there and take its weights from the caption
checkpoint -- the classifier workdir may be gone by then.

The classify task is not imported (the two tasks stay apart); its files are read as files.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax.errors import UserError
from capjax.models import classifier
from capjax.runtime import workdir as workdir_lib
from capjax.train import checkpoint
from capjax.train.optim import make_optimizer

RECORD_FILE = 'encoder_init.json'
# capjax.classify.data.META_FILE: the class names and normalisation statistics of a classifier.
CLASSIFY_META_FILE = 'classify_meta.json'


def _flag(path: str) -> str:
  return f'--config.model.encoder_init={path}'


def read_record(workdir: str) -> dict | None:
  """The caption workdir's encoder_init.json, or None for a run that did not start from a
  classifier."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} cannot be read ({e}); it records the classifier this run\'s '
                    f'encoder came from, so put back the file training wrote.') from e


def write_record(workdir: str, record: dict | None) -> None:
  """Writes a new run's encoder_init.json whole or not at all (a reader never sees half a
  file); None removes one left by a run that stopped before its first checkpoint, which would
  otherwise rebuild this run's encoder as a classifier's."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, RECORD_FILE)
  if record is None:
    if os.path.exists(path):
      os.remove(path)
    return
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def resuming(workdir: str) -> bool:
  """Whether the caption workdir has a finished checkpoint, which the run then resumes."""
  return bool(checkpoint.complete_steps(os.path.join(workdir, 'checkpoints')))


def check_start(config, workdir: str) -> None:
  """Raises UserError, before anything is written into `workdir`, when the run cannot start
  from config.model.encoder_init: it names no classify workdir, names one whose architecture
  or checkpoint cannot be read, or `workdir` already holds a run that started otherwise.

  A resumed run keeps the encoder of its own checkpoint, so the classifier is not read then
  (it may have been deleted since).
  """
  path = config.model.get('encoder_init')
  if not path:
    return
  if resuming(workdir):
    record = read_record(workdir)
    if record is None:
      raise UserError(f'{_flag(path)} cannot apply to --workdir={workdir}: its checkpoints are '
                      f'of a run whose encoder did not come from a classifier; train in a new '
                      f'--workdir, or drop encoder_init to resume that run.')
    source = os.path.abspath(os.path.expanduser(path))
    if source != record['source'] and os.path.isdir(source):
      arch = _architecture(_classifier_config(source))
      if arch != record['model']:
        raise UserError(f'{_flag(path)} is a {_describe(arch)} classifier, but the checkpoints '
                        f'in --workdir={workdir} hold the encoder of a {_describe(record["model"])}'
                        f' one (from {record["source"]}); resume with the classifier it started '
                        f'from, or train in a new --workdir.')
    if source != record['source']:
      logging.warning('%s resumes the encoder of its checkpoint, which came from %s (step %d), '
                      'not from %s.', workdir, record['source'], record['step'], path)
    return
  load(path)


def _classifier_config(path: str):
  """The classifier workdir's config.json; UserError when `path` is not a classify workdir."""
  if not os.path.isdir(path):
    raise UserError(f'{_flag(path)} does not exist; give the --workdir of a classifier trained '
                    f'with configs/classify.py.')
  if not os.path.exists(os.path.join(path, 'config.json')):
    raise UserError(f'{_flag(path)} is not a capjax workdir (it has no config.json); give the '
                    f'--workdir of a classifier trained with configs/classify.py.')
  config = workdir_lib.load_config(path)
  if config.get('task') != 'classify':
    raise UserError(f'{_flag(path)} is a {config.get("task")} workdir, not a classifier; give '
                    f'the --workdir of a classifier trained with configs/classify.py.')
  name = config.get('model', {}).get('name')
  if name not in classifier.PRESETS:
    raise UserError(f'{_flag(path)} holds a classifier of model {name!r}, which the caption '
                    f'encoder cannot take (it takes {", ".join(classifier.PRESETS)}); train '
                    f'one of those with configs/classify.py.')
  return config


def _architecture(config) -> dict:
  """The fields of a classify config that fix its network (what encoder_init.json keeps)."""
  # Through JSON, so a config's tuples compare equal to a record's lists.
  return json.loads(json.dumps(
      {k: config.model.get(k) for k in ('name', *classifier.ARCH_FIELDS, 'conv')}))


def _describe(arch: dict) -> str:
  """'residual_cnn (widths=(32, 64))': the preset and the fields set beside it."""
  fields = ', '.join(f'{k}={tuple(v) if isinstance(v, list) else v}' for k, v in arch.items()
                     if k not in ('name', 'conv') and v)
  return f'{arch["name"]}' + (f' ({fields})' if fields else '')


def _meta(path: str) -> dict:
  meta_path = os.path.join(path, CLASSIFY_META_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    return {k: meta[k] for k in ('class_names', 'mean', 'std', 'image_size')}
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{meta_path} cannot be read ({type(e).__name__}), so the normalisation '
                    f'the classifier in {_flag(path)} was trained with is unknown; retrain it '
                    f'there.') from e


def load(path: str) -> tuple[dict, dict]:
  """(record, encoder variables) of the classifier in workdir `path`: the variables as a
  caption encoder's ({'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}), the
  record what encoder_init.json keeps.

  Raises:
    UserError: `path` is no classify workdir, or its architecture, statistics or checkpoint
      cannot be read (the message names which and what to do).
  """
  path = os.path.abspath(os.path.expanduser(path))
  config = _classifier_config(path)
  meta = _meta(path)
  directory = os.path.join(path, 'checkpoints')
  if not checkpoint.complete_steps(directory):
    raise UserError(f'{_flag(path)} holds no checkpoint; train the classifier there first '
                    f'(python launch.py --config=configs/classify.py --workdir={path}).')
  model = classifier.build(config.model, len(meta['class_names']))
  size = int(config.data.image_size)
  try:
    # The classify task's own template (state of its optimizer), so its checkpoint reads.
    state = checkpoint.restore_for_inference(path, model, make_optimizer(config.optim, 1),
                                             jax.random.key(0),
                                             jnp.zeros((1, size, size, 3), jnp.float32))
  except UserError:
    raise UserError(f'The checkpoints of the classifier in {_flag(path)} cannot be read '
                    f'(damaged, or not written by the model its config.json describes); '
                    f'retrain the classifier there or point encoder_init at another classify '
                    f'workdir.') from None
  params = {k: v for k, v in jax.device_get(state.params).items() if k != 'head'}
  variables = {'params': {'backbone': params}}
  if state.batch_stats:
    variables['batch_stats'] = {'backbone': jax.device_get(state.batch_stats)}
  arch = _architecture(config)
  record = {'source': path, 'step': int(state.step), 'params_sha256': tree_sha256(variables),
            'model': arch, 'num_classes': len(meta['class_names']),
            'mean': list(meta['mean']), 'std': list(meta['std']),
            'image_size': int(meta['image_size']), 'dataset': config.get('dataset')}
  logging.info('Encoder: the %s classifier of %s (step %d, sha256 %s...).', arch['name'], path,
               record['step'], record['params_sha256'][:12])
  return record, variables


def tree_sha256(tree) -> str:
  """sha256 of a tree of arrays: each leaf's path, dtype, shape and bytes, in key order."""
  digest = hashlib.sha256()
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    x = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(key_path)} {x.dtype} {x.shape}\n'.encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def cache_ids(record: dict) -> tuple[str, str]:
  """(encoder name, weights id) of the feature cache's key: the name carries the hash too, so
  two classifiers' features go to two files instead of rebuilding one in turn."""
  sha = record['params_sha256']
  return f'classifier_{sha[:8]}', f'classifier-sha256:{sha}'
