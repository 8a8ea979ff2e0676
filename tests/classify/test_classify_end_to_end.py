"""Tiny classification runs end to end: train -> eval -> predict -> compare, and resume."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import layouts as fx
from capjax import run
from capjax.classify import task as classify_task
from capjax.tools import compare
from configs import classify


def _config(tfds_dir, arg='runlocal'):
  config = classify.get_config(arg)
  config.tfds_dir = str(tfds_dir)
  return config


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def cnn_workdir(tfds_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('runs') / 'cnn')
  run.main(_config(tfds_dir), workdir, 'train')
  return workdir


def test_runlocal_train_writes_metrics_figures_and_run_info(cnn_workdir):
  with open(os.path.join(cnn_workdir, 'eval.json')) as f:
    results = json.load(f)
  for key in ('top1_accuracy', 'top5_accuracy', 'loss', 'micro_auc', 'macro_auc',
              'mean_class_accuracy'):
    assert np.isfinite(results[key]), key
  assert results['num_examples'] == 60 and results['split'] == 'test'
  assert sum(k.startswith('class_accuracy/') for k in results) == 30
  assert 'class_accuracy/striped star' in results and 'class_auc/solid circle' in results
  with open(os.path.join(cnn_workdir, 'run.json')) as f:
    info = json.load(f)
  assert info['task'] == 'classify' and info['dataset'] == 'shapes30'
  assert info['model'] == 'tiny_cnn' and info['num_params'] > 0 and info['train_time_s'] > 0
  for name in ('curves.png', 'confusion_matrix.png', 'roc.png', 'classify_meta.json',
               'config.json'):
    assert os.path.getsize(os.path.join(cnn_workdir, name)) > 0, name
  with open(os.path.join(cnn_workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert {r['split'] for r in rows} == {'train', 'validation'}
  assert all('loss' in r and 'accuracy' in r for r in rows)


def test_eval_mode_reproduces_the_training_evaluation(cnn_workdir, tfds_dir):
  with open(os.path.join(cnn_workdir, 'eval.json')) as f:
    first = json.load(f)
  run.main(_config(tfds_dir), cnn_workdir, 'eval')
  with open(os.path.join(cnn_workdir, 'eval.json')) as f:
    again = json.load(f)
  assert again['top1_accuracy'] == first['top1_accuracy']
  np.testing.assert_allclose(again['loss'], first['loss'], rtol=1e-6)


def test_predict_gives_top5_probabilities_and_reports_unreadable_files(cnn_workdir, tmp_path,
                                                                       capsys):
  good = fx.write_image(tmp_path / 'mine.png', colour=(10, 200, 30), size=(40, 50))
  bad = fx.write_text(tmp_path / 'broken.jpg', b'not an image')
  out = run.predict(cnn_workdir, [good, bad])
  assert [r['path'] for r in out] == [good, bad]
  names = [n for n, _ in out[0]['top']]
  probs = [p for _, p in out[0]['top']]
  assert len(names) == 5 and len(set(names)) == 5 and probs == sorted(probs, reverse=True)
  assert 0 < sum(probs) <= 1 + 1e-6
  assert 'error' in out[1] and 'broken.jpg' in out[1]['error']
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith(f'{good}\t{names[0]} ') and printed[1].startswith(f'{bad}\terror')


def test_compare_tabulates_a_plain_and_a_residual_cnn(cnn_workdir, tfds_dir, tmp_path):
  res_workdir = str(tmp_path / 'resnet')
  run.main(_config(tfds_dir, 'runlocal,model=tiny_resnet'), res_workdir, 'train')
  prefix = str(tmp_path / 'cmp')
  assert compare.main(['--out', prefix, cnn_workdir, res_workdir]) == 0
  with open(prefix + '.md') as f:
    table = f.read()
  assert 'tiny_cnn' in table and 'tiny_resnet' in table and 'top1_accuracy' in table
  assert os.path.getsize(prefix + '.png') > 0


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tfds_dir, tmp_path):
  def config(steps):
    c = _config(tfds_dir)
    # A constant learning rate (no warmup, no decay), so the schedule does not depend on the
    # run length; dropout and mixup exercise the step-folded and grain-seeded randomness.
    c.optim.update(warmup_steps=0, final_lr_fraction=1.0)
    c.model.dropout = 0.2
    c.augment.mixup_alpha = 0.4
    c.train.update(steps=steps, checkpoint_every=6, eval_every=0)
    return c

  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  run.main(config(12), straight, 'train')
  run.main(config(6), resumed, 'train')
  run.main(config(12), resumed, 'train')
  states = [classify_task.restore_trained(config(12), w).state for w in (straight, resumed)]
  assert int(states[0].step) == int(states[1].step) == 12
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (states[0].params, states[0].batch_stats),
               (states[1].params, states[1].batch_stats))


def test_config_arguments_pick_dataset_recipes_and_reject_unknown_values():
  assert classify.get_config('').model.name == 'cnn'
  tiny = classify.get_config('dataset=tiny_imagenet30')
  assert (tiny.model.name, tiny.data.image_size, tiny.train.batch_size) == ('resnet', 64, 128)
  assert classify.get_config('dataset=tiny_imagenet30,model=simple_cnn').model.name == (
      'simple_cnn')
  with pytest.raises(run.UserError, match='dataset'):
    classify.get_config('dataset=cifar')
  with pytest.raises(run.UserError, match='stage_sizes'):
    config = classify.get_config('model=simple_cnn')
    config.model.stage_sizes = (1, 1)
    run.validate(config)
