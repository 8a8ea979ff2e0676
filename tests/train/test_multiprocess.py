"""Two processes x 1 CPU device (jax.distributed over 127.0.0.1, gloo collectives) train
exactly like one process x 2 devices: the same losses, one metrics file, one checkpoint set."""
import socket

import numpy as np
import pytest

from helpers import runs as rh

STEPS = 4
ARGS = ['--config=configs/caption.py:runlocal', f'--config.train.steps={STEPS}',
        '--config.train.log_every=1', '--config.train.checkpoint_every=2',
        '--config.train.eval_every=2']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  rh.prepare_shapes(str(tmp / 'tfds'))
  common = ARGS + [f'--config.tfds_dir={tmp / "tfds"}']
  cache = str(tmp / 'jax_cache')
  port = _free_port()
  two = [rh.launch(common + [f'--workdir={tmp / "two"}', f'--coordinator_address=127.0.0.1:{port}',
                             '--num_processes=2', f'--process_id={i}'],
                   rh.env(cache), str(tmp / f'two_{i}.log')) for i in range(2)]
  one = rh.launch(common + [f'--workdir={tmp / "one"}'],
                  rh.env(cache, XLA_FLAGS='--xla_force_host_platform_device_count=2'),
                  str(tmp / 'one.log'))
  logs = {'two_0': rh.finish(two[0], str(tmp / 'two_0.log')),
          'two_1': rh.finish(two[1], str(tmp / 'two_1.log')),
          'one': rh.finish(one, str(tmp / 'one.log'))}
  return tmp, logs


def test_two_processes_report_the_same_losses_as_one_process_with_two_devices(runs):
  tmp, logs = runs
  assert 'on 2 device(s) in 2 process(es)' in logs['two_0']
  assert 'on 2 device(s) in 1 process(es)' in logs['one']
  two, one = rh.train_rows(tmp / 'two'), rh.train_rows(tmp / 'one')
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s]['loss'] for s in two], [one[s]['loss'] for s in two],
                             rtol=1e-5)
  from capjax.train import logs as logs_lib
  val = lambda w: [r['loss'] for r in logs_lib.read_metrics(w) if r['split'] == 'validation']
  np.testing.assert_allclose(val(tmp / 'two'), val(tmp / 'one'), rtol=1e-5)


def test_two_processes_write_one_metrics_file_one_checkpoint_set_and_one_eval(runs):
  tmp, _ = runs
  lines = [l for l in open(tmp / 'two' / 'metrics.jsonl') if '"train"' in l]
  assert len(lines) == STEPS  # Only process 0 writes.
  assert rh.checkpoint_steps(tmp / 'two') == [2, 4]
  two = rh.metrics_json(tmp / 'two', 'eval.json')
  one = rh.metrics_json(tmp / 'one', 'eval.json')
  assert two['num_examples'] == one['num_examples'] == rh.SHAPES['num_test']
  np.testing.assert_allclose(two['loss'], one['loss'], rtol=1e-5)
