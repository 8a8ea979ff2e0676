"""Tiny captioning runs on generated Flickr8k/COCO fixtures: one per decoder.

  inject     tiny_cnn trained end to end from the decoded images (Flickr8k official layout),
             then self-critical steps on them
  merge      a frozen resnet_tiny with weights from a Keras .h5 file: features cached once, the
             decoder trains on them
  attention  a frozen tiny_cnn's cached 4x4 feature grid (COCO layout), with attention maps,
             and self-critical steps on the cached features

The Flickr8k fixture withholds its test images, like the real download here: runs that never
read 'test' must not need them.
"""
import json
import os

import jax
import numpy as np
import pytest

from helpers import layouts as fx
from helpers import runs as rh
from capjax import run
from capjax.caption import task as caption_task
from capjax.data import features
from capjax.models import encoders, keras_weights
from capjax.tools import compare

NAMES = fx.flickr_names(14)


def _config(arg, data_dir, tmp):
  c = rh.load_config('caption', arg + ',runlocal')
  c.data_dir, c.tfds_dir, c.features_dir = str(data_dir), str(tmp / 'tfds'), str(tmp / 'feat')
  c.train.update(steps=3, batch_size=4, log_every=3, checkpoint_every=3, eval_every=0)
  c.eval.update(batch_size=4, num_samples=2)
  c.data.update(caption_length=8, num_threads=1)
  c.model.update(embed_dim=8, hidden=16, attn_dim=8)
  return c


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('real_e2e')
  # Colours differ per image, so decoded pixels (and features) differ too.
  fx.make_flickr8k_official(tmp / 'f8k', NAMES[:8], NAMES[8:12], NAMES[12:],
                            absent=NAMES[12:])
  for i, name in enumerate(NAMES[:12]):
    fx.write_image(tmp / 'f8k' / 'Flicker8k_Dataset' / name, colour=(20 * i, 0, 200 - 10 * i))
  fx.make_coco(tmp / 'coco', n_train=6, n_val=4)
  return tmp


@pytest.fixture(scope='module')
def inject_run(data):
  workdir = str(data / 'inject')
  c = _config('dataset=flickr8k,decoder=inject', data / 'f8k', data)
  c.train.scst_steps = 2
  run.main(c, workdir, 'train')
  return workdir


def _assert_scst_ran(workdir):
  rows = rh.train_rows(workdir)
  assert 'loss' in rows[3] and 'sample_reward' in rows[5] and 'greedy_reward' in rows[5]


def _keras_file(path):
  """Random ResNetTiny weights saved as a Keras .h5 file (BatchNorm variances positive)."""
  arch = encoders.KERAS_BACKBONES['resnet_tiny'][0]()
  rng = np.random.default_rng(3)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.abs(rng.normal(size=s.shape)) + 0.5 if 'var' in str(p[-1]) else
                    rng.normal(size=s.shape) * 0.1).astype(s.dtype),
      keras_weights.variable_shapes(arch))
  keras_weights.save_keras_h5(variables, str(path), arch)
  return variables


@pytest.fixture(scope='module')
def merge_run(data):
  workdir = str(data / 'merge')
  c = _config('dataset=flickr8k,encoder=resnet_tiny,decoder=merge', data / 'f8k', data)
  c.model.encoder = 'resnet_tiny'  # runlocal picks tiny_cnn; the frozen scale 0 stays.
  weights = _keras_file(data / 'resnet_tiny.h5')
  c.model.encoder_weights = str(data / 'resnet_tiny.h5')
  run.main(c, workdir, 'train')
  return workdir, c, weights


def test_inject_trained_end_to_end_from_images_leaves_scores(inject_run):
  results = json.load(open(os.path.join(inject_run, 'eval.json')))
  assert results['split'] == 'validation' and results['num_examples'] == 4
  for key in ('bleu_4', 'cider', 'loss', 'token_accuracy'):
    assert np.isfinite(results[key]), key
  assert os.path.getsize(os.path.join(inject_run, 'samples.png')) > 0
  _assert_scst_ran(inject_run)


def test_merge_on_a_frozen_encoder_trains_from_cached_features_then_reuses_them(merge_run,
                                                                               data):
  workdir, config, weights = merge_run
  assert config.optim.encoder_lr_scale == 0.0
  cached = sorted(os.listdir(data / 'feat'))
  assert cached == ['flickr8k_train_resnet_tiny_32px_pooled.h5',
                    'flickr8k_validation_resnet_tiny_32px_pooled.h5']
  key = features.read_key(str(data / 'feat' / cached[1]))
  assert key['weights'].startswith('sha256:') and key['kind'] == 'pooled'
  mtimes = {n: os.path.getmtime(data / 'feat' / n) for n in cached}
  results = run.evaluate_workdir(config, workdir)  # --mode=eval: a cache hit.
  assert results['num_examples'] == 4
  assert {n: os.path.getmtime(data / 'feat' / n) for n in cached} == mtimes
  # The checkpoint holds the file's encoder (with its BatchNorm statistics), unchanged by
  # training, so new images are captioned by the encoder the decoder learned from.
  state = caption_task.restore_trained(config, workdir).state
  for got, want in zip(jax.tree.leaves(state.batch_stats['encoder']['backbone']),
                       jax.tree.leaves(weights['batch_stats'])):
    np.testing.assert_allclose(got, want)
  for got, want in zip(jax.tree.leaves(state.params['encoder']['backbone']),
                       jax.tree.leaves(weights['params'])):
    np.testing.assert_allclose(got, want)
  image = fx.write_image(data / 'other.png', size=(16, 16))
  assert isinstance(run.predict(workdir, [image])[0]['caption'], str)


def test_attention_over_the_cached_grid_draws_attention_maps(data):
  workdir = str(data / 'attention')
  c = _config('dataset=coco,decoder=attention', data / 'coco', data)
  c.optim.encoder_lr_scale = 0.0  # runlocal's tiny_cnn, frozen: its 4x4 grid is cached.
  c.train.scst_steps = 2
  run.main(c, workdir, 'train')
  _assert_scst_ran(workdir)
  assert os.path.getsize(os.path.join(workdir, 'attention_0.png')) > 0
  assert json.load(open(os.path.join(workdir, 'eval.json')))['num_examples'] == 4


def test_compare_takes_caption_workdirs(inject_run, merge_run, data, capsys):
  out = str(data / 'compare' / 'table')
  assert compare.main(['--out', out, inject_run, merge_run[0]]) == 0
  table = capsys.readouterr().out
  assert 'tiny_cnn+inject' in table and 'resnet_tiny+merge' in table and 'bleu_4' in table
  for ext in ('.md', '.csv', '.png'):
    assert os.path.getsize(out + ext) > 0
