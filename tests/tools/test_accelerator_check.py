"""The accelerator check: `--quick` end to end on the CPU (what CI runs), a failing item's row,
and the pure choices (device batch, items, XLA flags, parsing a run's output)."""
import json
import os
import subprocess
import sys
import time

import jax
import pytest

from helpers import runs as rh
from capjax.tools import accelerator_check as ac
from capjax.tools import accelerator_items as ac_items

GIB = 2 ** 30


@pytest.fixture(scope='module')
def quick_check(tmp_path_factory):
  """One `--quick` check (about 1-3 minutes on 2 cores); the tests below read what it wrote."""
  out = tmp_path_factory.mktemp('accelerator_check')
  proc = subprocess.run(
      [sys.executable, '-m', 'capjax.tools.accelerator_check', f'--out={out}', '--quick'],
      cwd=rh.ROOT, env=rh.env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / ac.JSONL_FILE) as f:
    rows = [json.loads(line) for line in f]
  markdown = (out / ac.MARKDOWN_FILE).read_text()
  return out, rows, markdown, proc.stdout


def test_quick_check_has_a_row_per_item_each_with_a_positive_rate(quick_check):
  out, rows, _, stdout = quick_check
  expected = [*ac_items.train_items(quick=True), *ac_items.bench_items(True, 'cpu', None)]
  assert [r['item'] for r in rows] == [i.name for i in expected]
  assert len(rows) == 2 + 4 * 2  # Two trainings; four tasks in f32 and bf16.
  for row in rows:
    assert 'error' not in row, row
    assert row['examples_per_s'] > 0 and row['wall_s'] > 0, row
    assert row['backend'] == 'cpu' and row['jax'] == jax.__version__ and row['n_devices'] >= 1
    assert 'xla_backend_optimization_level=0' in row['xla_flags']  # --quick on a CPU.
  assert '10 of 10 items ran' in stdout


def test_quick_bench_rows_keep_the_bench_fields_at_their_dtype_and_batch(quick_check):
  _, rows, _, _ = quick_check
  bench_rows = [r for r in rows if r['kind'] == 'bench']
  assert {(r['task'], r['dtype']) for r in bench_rows} == {
      (t, d) for t in ('classify', 'caption', 'encode', 'greedy') for d in ac_items.DTYPES}
  for row in bench_rows:
    assert row['batch_size'] == ac_items.QUICK_BATCH and row['batch_label'] == 'quick'
    assert row['flops_per_step'] > 0 and row['mfu'] > 0 and row['peak_flops'] > 0
    assert row['step_ms'] == pytest.approx(1000 * ac_items.QUICK_BATCH / row['examples_per_s'])


def test_quick_trainings_leave_their_workdirs_and_eval_metrics(quick_check):
  out, rows, _, _ = quick_check
  by_item = {r['item']: r for r in rows}
  caption, classify = by_item['caption_train'], by_item['classify_train']
  for row in (caption, classify):
    assert row['steps'] == 6 and row['dtype'] == 'float32' and row['batch_size'] == 16
    assert row['steps_per_s'] > 0 and row['train_time_s'] > 0
    assert os.path.isfile(os.path.join(row['workdir'], 'eval.json'))
    assert row['workdir'].startswith(str(out)) and os.path.isfile(row['log'])
  assert 0 <= caption['eval']['bleu_4'] <= 1 and 'exact_scene_accuracy' in caption['eval']
  assert caption['eval']['num_examples'] == 32  # runlocal's test split.
  assert 0 <= classify['eval']['top1_accuracy'] <= classify['eval']['top5_accuracy'] <= 1
  assert not any('/' in k for k in classify['eval'])  # No per-class entries.


def test_quick_markdown_lists_every_item(quick_check):
  _, rows, markdown, _ = quick_check
  lines = markdown.splitlines()
  assert lines[0].startswith('# capjax accelerator check')
  assert any(line.startswith('- device: ') and 'backend cpu' in line for line in lines)
  table = [line for line in lines if line.startswith('| ') and not line.startswith('| item')]
  assert [line.split(' | ')[0][2:] for line in table] == [r['item'] for r in rows]
  classify_line = next(line for line in table if line.startswith('| classify_train |'))
  assert 'top1_accuracy' in classify_line and '6 steps' in classify_line
  assert '| 2 (quick) |' in next(line for line in table if line.startswith('| greedy_bf16_quick'))


def test_a_failing_item_gets_its_error_and_the_next_items_still_run(tmp_path):
  ctx = ac.Context(out=str(tmp_path), tfds_dir=str(tmp_path / 'tfds'),
                   environment={'backend': 'cpu'}, deadline=time.monotonic() + 600,
                   budget_s=600, peaks={'cpu': {'peak_flops': 1e11, 'peak_source': 'given'}})
  items = [
      ac_items.BenchItem('no_such_task', 'float32', 'quick', steps=1, warmup=0, batch_size=1),
      ac_items.TrainItem('broken_train', 'caption', 'configs/caption.py:runlocal',
                   ('--config.train.steps=0',), timeout_s=60),
      # Its peer-batch item never ran, so its batch cannot be known.
      ac_items.BenchItem('greedy', 'float32', 'device', steps=1, warmup=0, batch_scale=4),
      ac_items.BenchItem('greedy', 'float32', 'quick', steps=1, warmup=0, batch_size=1),
  ]
  seen = []
  rows = ac.run_items(items, ctx, on_row=lambda r: seen.append(r['item']))
  assert seen == [r['item'] for r in rows] == [i.name for i in items]
  assert "'no_such_task' is unknown" in rows[0]['error']
  assert rows[1]['error'].startswith('launch.py exited with status 2:')
  assert '--config.train.steps=0 must be > 0' in rows[1]['error']
  assert rows[2]['error'].startswith('not run: its batch is 4x the peer batch')
  assert 'error' not in rows[3] and rows[3]['examples_per_s'] > 0 and rows[3]['batch_size'] == 1
  assert all('\n' not in r.get('error', '') for r in rows)


def test_no_item_starts_once_the_budget_is_spent(tmp_path):
  ctx = ac.Context(out=str(tmp_path), tfds_dir=str(tmp_path), environment={},
                   deadline=time.monotonic() - 1, budget_s=5)
  rows = ac.run_items(ac_items.bench_items(True, 'cpu', None)[:2], ctx)
  assert [r['error'] for r in rows] == ["not run: the check's time budget (--budget_s=5) was "
                                        'spent.'] * 2


def test_an_unwritable_out_is_one_error_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  proc = subprocess.run([sys.executable, '-m', 'capjax.tools.accelerator_check',
                         f'--out={a_file}/check'], cwd=rh.ROOT, env=rh.env(),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr.startswith(f'error: --out={a_file}/check cannot be written (')
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('platform,memory,scale', [
    ('cpu', None, 1), ('cpu', 512 * GIB, 1),  # The peer's batch fills a CPU already.
    ('gpu', 141 * GIB, 8), ('gpu', 80 * GIB, 8), ('gpu', 64 * GIB, 8),  # H200, H100
    ('gpu', 40 * GIB, 4), ('tpu', 16 * GIB, 4),  # A100 40 GB, TPU v5e
    ('gpu', 12 * GIB, 2), ('gpu', None, 4)])
def test_device_batch_scale_by_platform_and_memory(platform, memory, scale):
  assert ac_items.device_batch_scale(platform, memory) == scale


def test_full_items_on_a_gpu_take_each_task_at_the_peer_and_the_device_batch():
  items = ac_items.bench_items(False, 'gpu', 141 * GIB)
  assert len(items) == 4 * 2 * 2
  assert [i.name for i in items[:2]] == ['classify_f32_peer', 'classify_f32_device']
  assert all(i.batch_size == 0 and i.batch_scale == 0 for i in items if i.batch_label == 'peer')
  assert all(i.batch_scale == 8 for i in items if i.batch_label == 'device')
  assert {(i.steps, i.warmup) for i in items} == {(20, 5)}
  assert [i.dtype for i in items] == ['float32'] * 8 + ['bfloat16'] * 8


def test_full_items_on_a_cpu_run_the_peer_batch_only():
  items = ac_items.bench_items(False, 'cpu', None)
  assert [i.name for i in items] == [f'{t}_{d}_peer' for d in ('f32', 'bf16')
                                     for t in ('classify', 'caption', 'encode', 'greedy')]
  assert {(i.steps, i.warmup) for i in items} == {(10, 3)}


def test_full_trainings_use_the_real_configs_for_a_few_hundred_steps():
  caption, classify = ac_items.train_items(quick=False)
  assert (caption.config, classify.config) == ('configs/caption.py', 'configs/classify.py')
  assert '--config.train.steps=400' in caption.overrides
  assert '--config.train.steps=300' in classify.overrides
  for item in ac_items.train_items(quick=True):
    assert item.config.endswith(':runlocal') and '--config.train.steps=6' in item.overrides


@pytest.mark.parametrize('quick', [False, True])
def test_every_training_override_is_a_field_whose_value_the_task_accepts(quick):
  """The full check runs only where there is an accelerator: its launch.py flags are checked
  here against the configs' fields and the tasks' rules, as launch.py would check them."""
  from capjax import run
  for item in ac_items.train_items(quick):
    name, _, arg = item.config[len('configs/'):].partition(':')
    config = rh.load_config(name.removesuffix('.py'), arg)
    for flag in item.overrides:
      path, _, value = flag[len('--config.'):].partition('=')
      *parents, field = path.split('.')
      parent = config
      for key in parents:
        parent = parent[key]
      assert field in parent, flag
      parent[field] = type(parent[field])(value)
    run.validate(config)
    default = rh.load_config(name.removesuffix('.py'), arg)
    assert config.train.steps < default.train.steps  # Shorter than the config's own run,
    assert config.train.batch_size == default.train.batch_size  # at its batch.


def test_quick_xla_flags_add_the_optimisation_level_unless_the_user_set_one():
  assert ac.quick_xla_flags('') == '--xla_backend_optimization_level=0'
  assert ac.quick_xla_flags('--xla_dump_to=/tmp/d') == (
      '--xla_dump_to=/tmp/d --xla_backend_optimization_level=0')
  assert ac.quick_xla_flags('--xla_backend_optimization_level=3') == (
      '--xla_backend_optimization_level=3')


def test_steady_steps_per_s_leaves_out_the_compiling_interval():
  log = ('I1203 logs.py:116] step 2/6 loss=3.6964 | 0.18 steps/s | ETA 0m21s\n'
         'something else\n'
         'I1203 logs.py:116] step 4/6 loss=3.6390 | 17.18 steps/s | ETA 0m00s\n'
         'I1203 logs.py:116] step 6/6 loss=3.5377 | 17.88 steps/s | ETA 0m00s\n')
  assert ac.steady_steps_per_s(log) == pytest.approx(17.53)
  assert ac.steady_steps_per_s(log.splitlines()[0]) is None


def test_launch_failure_is_one_sentence():
  assert ac.launch_failure(2, 'W some warning\nerror: --workdir is required.\n') == (
      'launch.py exited with status 2: --workdir is required.')
  traceback = 'Traceback (most recent call last):\n  File "x"\nMemoryError: out of memory\n'
  assert ac.launch_failure(1, traceback) == ('launch.py exited with status 1: '
                                             'MemoryError: out of memory')
  assert ac.launch_failure(-9, '') == 'launch.py exited with status -9: no output'


def test_one_sentence_keeps_the_first_line_of_a_long_error():
  error = RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB.\n' + 'x' * 5000)
  assert ac.one_sentence(error) == ('RuntimeError: RESOURCE_EXHAUSTED: Out of memory '
                                    'allocating 9 GiB.')
  assert len(ac.one_sentence(RuntimeError('y' * 1000))) == 300
