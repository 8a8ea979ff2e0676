"""A tiny shapes run with a self-critical phase: it follows cross-entropy on one step counter,
logs its rewards, resumes bit-identical when stopped inside it, and refuses a workdir whose
vocabulary is not the one its checkpoints were trained with."""
import json
import os
import shutil

import pytest

from helpers import runs as rh
from capjax import run
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.train import checkpoint, loop

CE, SCST = 6, 6
SCST_METRICS = ('scst_loss', 'sample_reward', 'greedy_reward', 'sample_length', 'distinct_1',
                'distinct_2', 'sample_log_prob', 'grad_norm')


def _config(tmp, scst_steps=SCST):
  config = rh.load_config('caption', 'runlocal')
  config.tfds_dir = str(tmp / 'tfds')
  config.train.update(steps=CE, scst_steps=scst_steps, checkpoint_every=100, log_every=1,
                      eval_every=0)
  config.scst.learning_rate = 1e-3
  config.scst.bleu_weight = 0.5  # The reward the photo default uses: CIDEr-D + BLEU-4.
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run, and one stopped (as by SIGTERM) after step CE + 3 then resumed."""
  tmp = tmp_path_factory.mktemp('scst_e2e')
  rh.prepare_shapes(str(tmp / 'tfds'))
  reference, stopped = str(tmp / 'reference'), str(tmp / 'stopped')
  run.main(_config(tmp), reference, 'train')

  def stop_inside_scst(trainer):
    if trainer.step == CE + 3:
      trainer.stop.raised = 'SIGTERM'

  loop.HOOKS.append(stop_inside_scst)
  try:
    run.main(_config(tmp), stopped, 'train')
  finally:
    loop.HOOKS.remove(stop_inside_scst)
  interrupted_at = rh.checkpoint_steps(stopped)
  run.main(_config(tmp), stopped, 'train')
  return tmp, reference, stopped, interrupted_at


def test_scst_follows_cross_entropy_on_one_step_counter_and_logs_its_rewards(runs):
  _, reference, _, _ = runs
  assert rh.checkpoint_steps(reference) == [CE, CE + SCST]  # Each phase ends in one.
  rows = rh.train_rows(reference)
  assert sorted(rows) == list(range(1, CE + SCST + 1))
  assert all('loss' in rows[s] and 'sample_reward' not in rows[s] for s in range(1, CE + 1))
  for s in range(CE + 1, CE + SCST + 1):
    assert all(name in rows[s] for name in SCST_METRICS), rows[s]
    assert 0.0 <= rows[s]['distinct_1'] <= 1.0 and rows[s]['sample_reward'] >= 0.0
  assert rh.metrics_json(reference, 'run.json')['steps'] == CE + SCST
  assert 'cider' in rh.metrics_json(reference, 'eval.json')
  assert checkpoint.newest_data_state(reference)[1]['phase'] == 'scst'


def test_a_run_stopped_inside_scst_resumes_bit_identical(runs):
  _, reference, stopped, interrupted_at = runs
  assert interrupted_at == [CE, CE + 3]
  rh.assert_trees_bit_identical(rh.read_state(stopped, CE + SCST),
                                rh.read_state(reference, CE + SCST))
  ref_rows, rows = rh.train_rows(reference), rh.train_rows(stopped)
  assert all(rows[s]['sample_reward'] == ref_rows[s]['sample_reward']
             for s in range(CE + 1, CE + SCST + 1))


@pytest.mark.parametrize('words', [['a', 'b'], None], ids=['other_size', 'same_size'])
def test_scst_on_a_workdir_whose_vocabulary_differs_is_one_error_and_loses_nothing(
    runs, tmp_path, words):
  tmp, reference, _, _ = runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  path = os.path.join(workdir, 'vocab.json')
  trained = Vocabulary.load(path)
  # Another vocabulary of another size, or the same words in another order (same size).
  other = Vocabulary(words or list(reversed(trained.words[4:])))
  other.save(path)
  before = {p: os.path.getmtime(p) for p in _files(os.path.join(workdir, 'checkpoints'))}
  with pytest.raises(UserError) as error:
    run.main(_config(tmp, scst_steps=SCST + 4), workdir, 'train')
  message = str(error.value)
  assert '\n' not in message and 'trained with a vocabulary of' in message, message
  assert f'{len(trained)} words' in message and f'has {len(other)} words' in message
  assert {p: os.path.getmtime(p) for p in _files(os.path.join(workdir, 'checkpoints'))} == (
      before)
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED_DIR))
  assert json.load(open(path))['words'] == other.words  # Not overwritten either.


def _files(root):
  return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
