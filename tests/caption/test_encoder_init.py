"""A trained classifier's backbone as the caption encoder (--config.model.encoder_init): the
caption run starts from exactly those weights, fine-tunes or freezes them, records where they
came from, and evaluates and predicts without the classifier workdir; each bad classifier
workdir is one error line, exit 2, with nothing already saved touched."""
import concurrent.futures
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import runs as rh
from capjax import run
from capjax.caption import encoder_init
from capjax.errors import UserError

CLASSIFY_STEPS, CAPTION_STEPS = 12, 6


def _classifier(tmp, name: str, model: str) -> str:
  config = rh.load_config('classify', 'runlocal')
  config.tfds_dir = str(tmp / 'tfds')
  config.model.name = model
  workdir = str(tmp / name)
  run.main(config, workdir, 'train')
  return workdir


def _caption_config(tmp, source: str, scale: float):
  config = rh.load_config('caption', 'runlocal')
  config.tfds_dir = str(tmp / 'tfds')
  config.features_dir = str(tmp / 'features')
  config.model.encoder_init = source
  config.optim.encoder_lr_scale = scale
  config.train.update(steps=CAPTION_STEPS, checkpoint_every=CAPTION_STEPS, eval_every=0)
  return config


def _backbone(state: dict) -> dict:
  """The classifier's variables as a caption encoder holds them (everything but 'head')."""
  out = {'params': {'backbone': {k: v for k, v in state['params'].items() if k != 'head'}}}
  if state.get('batch_stats'):
    out['batch_stats'] = {'backbone': state['batch_stats']}
  return out


def _encoder(state: dict) -> dict:
  return {k: state[k]['encoder'] for k in ('params', 'batch_stats')
          if 'encoder' in (state.get(k) or {})}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A residual classifier (BatchNorm) and a plain one, and caption runs on the first:
  fine-tuned (scale 1) and frozen (scale 0)."""
  tmp = tmp_path_factory.mktemp('encoder_init')
  rh.prepare_shapes(str(tmp / 'tfds'))
  residual = _classifier(tmp, 'residual', 'tiny_resnet')
  plain = _classifier(tmp, 'plain', 'tiny_cnn')
  tuned, frozen = str(tmp / 'tuned'), str(tmp / 'frozen')
  run.main(_caption_config(tmp, residual, 1.0), tuned, 'train')
  run.main(_caption_config(tmp, residual, 0.0), frozen, 'train')
  return tmp, residual, plain, tuned, frozen


def test_caption_run_starts_from_the_classifier_and_records_it(runs):
  _, residual, _, tuned, _ = runs
  classifier_state = rh.read_state(residual, CLASSIFY_STEPS)
  record = json.load(open(os.path.join(tuned, encoder_init.RECORD_FILE)))
  assert record['source'] == residual and record['step'] == CLASSIFY_STEPS
  assert record['model']['name'] == 'tiny_resnet'
  assert record['params_sha256'] == encoder_init.tree_sha256(_backbone(classifier_state))
  meta = json.load(open(os.path.join(residual, encoder_init.CLASSIFY_META_FILE)))
  assert record['mean'] == meta['mean'] and record['std'] == meta['std']
  # Step 0 holds the classifier's backbone bit for bit, BatchNorm statistics included...
  assert rh.checkpoint_steps(tuned) == [0, CAPTION_STEPS]
  start = _encoder(rh.read_state(tuned, 0))
  assert 'batch_stats' in start
  rh.assert_trees_bit_identical(start, _backbone(classifier_state))
  # ...and fine-tuning (encoder_lr_scale 1) moved it.
  end = _encoder(rh.read_state(tuned, CAPTION_STEPS))['params']
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(start['params']), jax.tree.leaves(end)))
  info = json.load(open(os.path.join(tuned, 'run.json')))
  assert info['model'] == 'classifier+attention' and info['encoder_init'] == residual


def test_frozen_classifier_encoder_uses_the_feature_cache_and_stays_put(runs):
  tmp, residual, _, _, frozen = runs
  classifier_state = rh.read_state(residual, CLASSIFY_STEPS)
  rh.assert_trees_bit_identical(_encoder(rh.read_state(frozen, CAPTION_STEPS)),
                                _backbone(classifier_state))
  record = json.load(open(os.path.join(frozen, encoder_init.RECORD_FILE)))
  cached = os.listdir(tmp / 'features')
  assert any(f'classifier_{record["params_sha256"][:8]}' in name for name in cached), cached


def test_eval_and_predict_use_the_recorded_encoder_without_the_classifier(runs, tmp_path):
  tmp, residual, _, tuned, _ = runs
  moved = str(tmp_path / 'moved_classifier')
  shutil.move(residual, moved)  # eval/predict must not need it.
  try:
    config = _caption_config(tmp, residual, 1.0)
    trained_eval = rh.metrics_json(tuned, 'eval.json')
    again = run.evaluate_workdir(config, tuned)
    assert again['bleu_4'] == pytest.approx(trained_eval['bleu_4'], abs=1e-9)
    assert again['cider'] == pytest.approx(trained_eval['cider'], abs=1e-9)
    image = tmp_path / 'shape.png'
    from PIL import Image
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)
    results = run.predict(tuned, [str(image)])
    assert 'caption' in results[0], results
  finally:
    shutil.move(moved, residual)


def _launch(args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(rh.ROOT, 'launch.py'), *args],
                        cwd=rh.ROOT, env=rh.env(), capture_output=True, text=True,
                        timeout=timeout)


def test_bad_encoder_init_is_one_error_line_exit_2_and_loses_nothing(runs, tmp_path):
  tmp, residual, plain, tuned, _ = runs
  # A classifier whose checkpoints are damaged, and one whose config.json now describes
  # another network than its checkpoint holds.
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(residual, damaged)
  for path in glob.glob(os.path.join(damaged, 'checkpoints', '*', 'state', '**', 'd', '*'),
                        recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(7)
  relabelled = str(tmp_path / 'relabelled')
  shutil.copytree(residual, relabelled)
  config_path = os.path.join(relabelled, 'config.json')
  config = json.load(open(config_path))
  config['model']['name'] = 'tiny_cnn'
  json.dump(config, open(config_path, 'w'))
  # A caption run started from `residual`, resumed with a classifier of another architecture.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(tuned, resumed)
  before = {p: os.path.getmtime(p) for p in glob.glob(f'{resumed}/**', recursive=True)}
  common = ['--config=configs/caption.py:runlocal', f'--config.tfds_dir={tmp / "tfds"}',
            f'--config.features_dir={tmp / "features"}']
  cases = [
      (str(tmp_path / 'nothing'), 'new', 'does not exist'),
      (tuned, 'new', 'is a caption workdir, not a classifier'),
      (damaged, 'new', 'cannot be read (damaged'),
      (relabelled, 'new', 'cannot be read (damaged, or not written by the model'),
      (plain, resumed, 'is a tiny_cnn classifier, but the checkpoints'),
  ]

  def attempt(case):
    source, workdir, _ = case
    workdir = str(tmp_path / 'new_run') if workdir == 'new' else workdir
    return _launch([*common, f'--config.model.encoder_init={source}', f'--workdir={workdir}',
                    f'--config.train.steps={2 * CAPTION_STEPS}'])

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outs = list(pool.map(attempt, cases))
  for (source, _, says), out in zip(cases, outs):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (source, out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0], (source,
                                                                                      lines)
  assert not (tmp_path / 'new_run').exists()
  after = {p: os.path.getmtime(p) for p in glob.glob(f'{resumed}/**', recursive=True)}
  assert after == before  # The resumed run's files, checkpoints included, are untouched.


def test_encoder_init_with_keras_weights_is_refused():
  config = rh.load_config('caption', 'runlocal')
  config.model.update(encoder='resnet_tiny', encoder_weights=__file__,
                      encoder_init='/somewhere')
  with pytest.raises(UserError, match='set one of them'):
    run.validate(config)
