"""A run killed by SIGKILL at a step that is not a checkpoint step, and restarted with the same
command, ends bit-identical to a run that was never interrupted (data order, caption draws and
dropout included). SIGTERM/SIGINT are tested on the loop itself in tests/train/test_loop_faults.py."""
import signal

import pytest

from helpers import runs as rh

STEPS, ARGS = rh.RESUME_STEPS, rh.RESUME_ARGS


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('resume')
  rh.prepare_shapes(str(tmp / 'tfds'))
  return tmp


def test_sigkill_then_restart_is_bit_identical_to_an_uninterrupted_run(data):
  tmp = data
  args = lambda w: ARGS + [f'--workdir={tmp / w}', f'--config.tfds_dir={tmp / "tfds"}']
  env = lambda **kw: rh.env(str(tmp / 'jax_cache'), **kw)
  log = lambda name: str(tmp / f'{name}.log')
  # The reference runs beside the interrupted one (2 cores).
  ref = rh.launch(args('ref'), env(), log('ref'))

  # SIGKILL after step 8: not a checkpoint step, so steps 6-8 are lost and recomputed.
  run = rh.launch(args('run'), env(), log('kill'), pause_after=8)
  rh.wait_for_line(run, log('kill'), 'Paused after step 8')
  run.send_signal(signal.SIGKILL)
  run.wait(60)
  assert rh.checkpoint_steps(tmp / 'run') == [5]
  assert max(rh.train_rows(tmp / 'run')) >= 7  # Progress past the checkpoint was lost.

  # The same command again: resumes at 5 and finishes.
  text = rh.finish(rh.launch(args('run'), env(), log('resume')), log('resume'))
  assert 'Resumed from the checkpoint at step 5' in text
  rh.finish(ref, log('ref'))

  assert rh.checkpoint_steps(tmp / 'run')[-1] == STEPS == rh.checkpoint_steps(tmp / 'ref')[-1]
  rh.assert_trees_bit_identical(rh.read_state(tmp / 'run', STEPS),
                                rh.read_state(tmp / 'ref', STEPS))
  ref_rows, run_rows = rh.train_rows(tmp / 'ref'), rh.train_rows(tmp / 'run')
  assert sorted(run_rows) == list(range(1, STEPS + 1)) == sorted(ref_rows)
  assert all(run_rows[s]['loss'] == ref_rows[s]['loss'] for s in ref_rows)
  assert (rh.metrics_json(tmp / 'run', 'eval.json')['loss'] ==
          rh.metrics_json(tmp / 'ref', 'eval.json')['loss'])
