"""A tiny captioning run: trains, evaluates, is restarted, resumes, then predicts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import runs as rh
from capjax import run
from capjax.train import logs



def _config(tmp_path, steps):
  config = rh.load_config('caption', 'runlocal')
  config.tfds_dir = str(tmp_path / 'tfds')
  config.train.steps = steps
  config.train.checkpoint_every = 5
  config.train.log_every = 5
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('e2e')
  workdir = str(tmp / 'work')
  run.main(_config(tmp, 10), workdir, 'train')
  first = {r['step'] for r in logs.read_metrics(workdir) if r['split'] == 'train'}
  run.main(_config(tmp, 16), workdir, 'train')  # Same workdir, longer: must resume.
  return workdir, first


def test_run_leaves_results_in_workdir(trained):
  workdir, _ = trained
  for name in ('eval.json', 'run.json', 'vocab.json', 'config.json', 'metrics.jsonl',
               'curves.png', 'samples.png', 'captions_test.jsonl'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  results = json.load(open(os.path.join(workdir, 'eval.json')))
  for key in ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'rouge_l', 'cider', 'loss',
              'perplexity', 'token_accuracy', 'cosine_similarity', 'exact_scene_accuracy',
              'oracle_bleu_4', 'decoding'):
    assert key in results, key
  assert 0.0 <= results['exact_scene_accuracy'] <= 1.0
  assert results['oracle_bleu_4'] > 0.5  # Grammar captions share most 4-grams.
  assert results['perplexity'] == pytest.approx(np.exp(results['loss']), rel=1e-6)
  # The diversity figures count the very captions the run wrote.
  with open(os.path.join(workdir, 'captions_test.jsonl')) as f:
    generated = [json.loads(line)['generated'] for line in f]
  assert results['distinct_captions'] == len(set(generated))
  assert results['most_common_caption_count'] == max(map(generated.count, generated))
  assert 0.0 < results['distinct_1'] <= 1.0 and 0.0 < results['distinct_2'] <= 1.0


def test_restart_resumes_instead_of_starting_over(trained):
  workdir, first = trained
  assert first == {5, 10}
  rows = [r for r in logs.read_metrics(workdir) if r['split'] == 'train']
  assert sorted(r['step'] for r in rows) == [5, 10, 15, 16]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if d.isdigit())
  assert steps[-1] == 16 and 10 in steps
  assert json.load(open(os.path.join(workdir, 'run.json')))['steps'] == 16


def test_predict_captions_rgba_png_and_grey_jpeg(trained, tmp_path):
  workdir, _ = trained
  rgba = tmp_path / 'alpha.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 4), np.uint8),
                  'RGBA').save(rgba)
  grey = tmp_path / 'grey.jpg'
  Image.fromarray(np.full((40, 30), 128, np.uint8), 'L').save(grey)
  results = run.predict(workdir, [str(rgba), str(grey)])
  assert [r['path'] for r in results] == [str(rgba), str(grey)]
  assert all(isinstance(r['caption'], str) for r in results)


def test_predict_on_a_non_image_is_one_clear_error(trained, tmp_path):
  workdir, _ = trained
  bad = tmp_path / 'notes.png'
  bad.write_text('not an image')
  with pytest.raises(run.UserError, match='notes.png'):
    run.predict(workdir, [str(bad)])
