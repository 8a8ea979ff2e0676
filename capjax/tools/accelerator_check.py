"""One command that says how capjax runs on the machine it is on (a GPU, a TPU or a CPU).

    python -m capjax.tools.accelerator_check --out=DIR [--quick]

In this order:
  1. a probe, in a child process: backend, device kind, count and memory, versions;
  2. a short `shapes` captioning run and a short `shapes30` classification run, each trained
     and evaluated by launch.py in a child process (so it gets launch.py's XLA flags and
     huge-page restart exactly as a user's run does, and the device is not shared with this
     process's buffers), with the real configs/caption.py and configs/classify.py at fewer
     steps and a smaller generated data set;
  3. the four peer benchmarks of capjax.tools.bench (classify, caption, encode, greedy) in
     float32 and bfloat16, at the peer's batch and at a batch sized for the device.

DIR/accelerator_check.jsonl gets one JSON line per item as it ends (a bench row keeps every
field of `--mode=bench`'s); DIR/accelerator_check.md the same items as a Markdown table. An item
that fails (out of memory, an unsupported dtype...) gets its one-sentence 'error' and the check
goes on; the exit status is nonzero only when no item ran. --quick shrinks everything to a
smoke run of a minute or two on a CPU (tiny batches, a few steps); CI runs it. See
docs/accelerators.md. What it runs is capjax.tools.accelerator_items; the Markdown table is
capjax.tools.accelerator_report's.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from capjax.errors import UserError
from capjax.tools.accelerator_items import BenchItem, TrainItem, bench_items, train_items
from capjax.tools.accelerator_report import summary, to_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JSONL_FILE = 'accelerator_check.jsonl'
MARKDOWN_FILE = 'accelerator_check.md'
# The 8 minutes the full check must fit in on one H200, less the item still running when it
# is spent (a bench item, or a training run's remaining time).
DEFAULT_BUDGET_S = 450.0


class ItemFailed(Exception):
  """An item that could not run, with the one sentence its row's 'error' shows."""


def one_sentence(error: BaseException) -> str:
  """'Type: first line of the message', on one line and at most 300 characters: what a row's
  'error' holds (XLA's out-of-memory messages run to pages)."""
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  text = f'{type(error).__name__}: {lines[0] if lines else "(no message)"}'
  return text if len(text) <= 300 else text[:297] + '...'


_PROGRESS = re.compile(r'step (\d+)/\d+ .*\| ([0-9.]+) steps/s')


def steady_steps_per_s(log_text: str) -> float | None:
  """The median steps/s of a run's progress lines (capjax.train.logs.Progress), leaving out
  the first interval, which holds the step's compilation; None with fewer than two lines."""
  rates = [float(m.group(2)) for m in _PROGRESS.finditer(log_text)]
  return statistics.median(rates[1:]) if len(rates) > 1 else None


def launch_failure(returncode: int, output: str) -> str:
  """One sentence for a launch.py that failed: its own `error:` line when it printed one,
  else the last line of its output (a traceback's exception)."""
  lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
  said = [ln for ln in lines if ln.startswith('error:')]
  last = said[-1][len('error:'):].strip() if said else (lines[-1] if lines else 'no output')
  if len(last) > 250:
    last = last[:247] + '...'
  return f'launch.py exited with status {returncode}: {last}'


def eval_numbers(eval_json: dict) -> dict:
  """eval.json's top-level numbers, without per-class entries ('class_accuracy/...')."""
  return {k: v for k, v in eval_json.items()
          if '/' not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}


QUICK_XLA_FLAG = ('xla_backend_optimization_level', '0')


def quick_xla_flags(xla_flags: str) -> str:
  """XLA_FLAGS for --quick on a CPU: XLA's backend optimisations off, unless the user set the
  level. Compiling is nearly all of a smoke run's time there; this made the jitted init of the
  classify benchmark's train state compile in 2.1 s instead of 20 s (2-core EPYC, jax 0.10.2).
  The programs compute the same thing, only slower, and a smoke run's timings mean little.
  """
  name, value = QUICK_XLA_FLAG
  if any(f.lstrip('-').split('=')[0] == name for f in xla_flags.split()):
    return xla_flags
  return f'{xla_flags} --{name}={value}'.strip()


# --- Running items ---------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What running the items needs besides the items."""
  out: str
  tfds_dir: str
  environment: dict  # The probe's fields, put in every row.
  deadline: float  # time.monotonic() after which no item starts.
  budget_s: float
  bench_config: object = None  # configs/bench.py's `bench` field (loaded on first use).
  # bench.measure_peak's fields by dtype ('cpu' for every dtype on a CPU; see _peak).
  peaks: dict = dataclasses.field(default_factory=dict)
  peer_batches: dict = dataclasses.field(default_factory=dict)  # task -> the peer's batch.


def _load_bench_config():
  """configs/bench.py's `bench` field: the defaults `--mode=bench` times with (conv...)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('capjax_bench_config',
                                                os.path.join(ROOT, 'configs', 'bench.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('').bench


def _peak(ctx: Context, dtype: str) -> dict:
  """bench.measure_peak's MFU yardstick for `dtype`, measured once per dtype (on a CPU once:
  its yardstick there is the best f32 GEMM whatever the dtype)."""
  from capjax.tools import bench  # pylint: disable=import-outside-toplevel
  key = 'cpu' if ctx.environment.get('backend') == 'cpu' else dtype
  if key not in ctx.peaks:
    try:
      ctx.peaks[key] = bench.measure_peak(dtype)
    except Exception as e:  # pylint: disable=broad-except
      # No MFU then (bench leaves it None for a zero peak); the row itself still runs.
      ctx.peaks[key] = {'peak_flops': 0.0, 'peak_source': f'not measured ({one_sentence(e)})'}
  return ctx.peaks[key]


def run_bench_item(item: BenchItem, ctx: Context) -> dict:
  """bench.run_task at the item's dtype and batch, in this process; raises what it raises."""
  from capjax.tools import bench  # pylint: disable=import-outside-toplevel
  batch = item.batch_size
  if item.batch_scale:
    if item.task not in ctx.peer_batches:
      raise ItemFailed(f'not run: its batch is {item.batch_scale}x the peer batch, which '
                       f'no {item.task} peer-batch item reported (see that row).')
    batch = item.batch_scale * ctx.peer_batches[item.task]
  if ctx.bench_config is None:
    ctx.bench_config = _load_bench_config()
  cfg = ctx.bench_config.copy_and_resolve_references()
  cfg.update(task=item.task, dtype=item.dtype, batch_size=batch, steps=item.steps,
             warmup=item.warmup)
  row = bench.run_task(item.task, cfg, _peak(ctx, item.dtype))
  if item.batch_label == 'peer':
    ctx.peer_batches[item.task] = row['batch_size']
  return {**row, 'batch_label': item.batch_label}


def run_train_item(item: TrainItem, ctx: Context) -> dict:
  """launch.py train + eval in OUT/<item.name> (started afresh); raises ItemFailed when it
  fails or times out."""
  workdir = os.path.join(ctx.out, item.name)
  log_path = os.path.join(ctx.out, 'logs', f'{item.name}.log')
  shutil.rmtree(workdir, ignore_errors=True)  # A previous check's run would resume instead.
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  config_file, _, config_args = item.config.partition(':')
  config_flag = os.path.join(ROOT, config_file) + (f':{config_args}' if config_args else '')
  command = [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config_flag}',
             f'--workdir={workdir}', f'--config.tfds_dir={ctx.tfds_dir}', *item.overrides]
  timeout = max(30.0, min(item.timeout_s, ctx.deadline - time.monotonic()))
  with open(log_path, 'w') as log:
    log.write(' '.join(command) + '\n')
    log.flush()
    try:
      proc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'), timeout=timeout,
                            check=False)
    except subprocess.TimeoutExpired:
      raise ItemFailed(f'launch.py did not finish in {timeout:.0f} s and was stopped; see '
                       f'{log_path}.') from None
  with open(log_path) as f:
    output = f.read()
  if proc.returncode != 0:
    raise ItemFailed(launch_failure(proc.returncode, output))
  try:
    with open(os.path.join(workdir, 'run.json')) as f:
      run_info = json.load(f)
    with open(os.path.join(workdir, 'eval.json')) as f:
      metrics = eval_numbers(json.load(f))
    with open(os.path.join(workdir, 'config.json')) as f:
      dtype = json.load(f).get('model', {}).get('dtype')
  except (OSError, ValueError) as e:
    raise ItemFailed(f'launch.py exited 0 but left no readable run.json, eval.json and '
                     f'config.json in {workdir} ({one_sentence(e)}).') from None
  rate = steady_steps_per_s(output)
  batch = run_info.get('batch_size')
  return {'task': item.task, 'config': item.config, 'dtype': dtype, 'batch_size': batch,
          'steps': run_info.get('steps'), 'train_time_s': run_info.get('train_time_s'),
          'steps_per_s': rate, 'step_ms': 1000 / rate if rate else None,
          'examples_per_s': rate * batch if rate and batch else None,
          'eval': metrics, 'workdir': workdir, 'log': log_path}


def _free_device_memory(failed: bool) -> None:
  """Frees the dead arrays of the item just run, so its large batch does not leave the next
  with less room; after a failure (an out-of-memory, say) also every compiled program, whose
  buffers a half-run step may still hold."""
  gc.collect()
  if failed:
    import jax  # pylint: disable=import-outside-toplevel
    jax.clear_caches()
    gc.collect()


def run_items(items: Sequence[BenchItem | TrainItem], ctx: Context, on_row=None) -> list[dict]:
  """Runs every item in order and returns one row each; a failing item's row holds 'error'
  (one sentence) and the rest still run. `on_row(row)` is called as each row is done."""
  rows = []
  for item in items:
    kind = 'bench' if isinstance(item, BenchItem) else 'train'
    row = {'item': item.name, 'kind': kind, 'task': item.task,
           'dtype': getattr(item, 'dtype', None), **ctx.environment}
    start = time.monotonic()
    if start > ctx.deadline:
      row['error'] = f'not run: the check\'s time budget (--budget_s={ctx.budget_s:g}) was spent.'
    else:
      try:
        row.update(run_bench_item(item, ctx) if kind == 'bench' else run_train_item(item, ctx))
      except Exception as e:  # pylint: disable=broad-except
        # Anything at all (XLA's out-of-memory, an unsupported dtype, a bad task name): the
        # row says what, and the check goes on to the next item.
        row['error'] = str(e) if isinstance(e, ItemFailed) else one_sentence(e)
      if kind == 'bench':
        _free_device_memory(failed='error' in row)
    row['wall_s'] = time.monotonic() - start
    rows.append(row)
    if on_row:
      on_row(row)
  return rows


def run_check(train: Sequence[TrainItem], benchmarks: Sequence[BenchItem], ctx: Context,
              on_row=None, overlap: bool = False) -> list[dict]:
  """The training items, then the benchmarks; with `overlap`, side by side (the training
  runs in child processes while this one benchmarks), rows still in that order.

  Overlapping is for --quick on a CPU only: there both are mostly single-threaded XLA
  compilation, so two cores finish in about half the time, and a smoke run's timings are not
  measurements. On an accelerator they would share the device and skew each other.
  """
  if not overlap:
    return run_items([*train, *benchmarks], ctx, on_row)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    training = pool.submit(run_items, train, ctx, on_row)
    bench_rows = run_items(benchmarks, ctx, on_row)
    return training.result() + bench_rows


# --- The command -----------------------------------------------------------------------------

_PROBE = """
import json, sys
from capjax.tools import bench
import jax
device = jax.devices()[0]
try:
  memory = (device.memory_stats() or {}).get('bytes_limit')
except Exception:
  memory = None
print(json.dumps({**bench.environment(), 'platform': device.platform,
                  'device_memory_bytes': memory, 'python': sys.version.split()[0]}))
"""


def probe_environment(timeout_s: float = 180) -> dict:
  """The backend, devices and versions, from a child process: this one starts no backend
  until the training runs (children too) are done, so they have the device to themselves."""
  try:
    proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    raise ItemFailed(f'JAX did not start a backend within {timeout_s:.0f} s.') from None
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode != 0 or not lines:
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ['no output']
    raise ItemFailed(f'JAX could not start a backend: {last[-1].strip()[:250]}')
  return json.loads(lines[-1])


def prepare_out(out: str) -> str:
  """Creates --out and checks it can be written; UserError with one sentence if not."""
  out = os.path.abspath(out)
  try:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, JSONL_FILE), 'w'):
      pass
  except OSError as e:
    raise UserError(f'--out={out} cannot be written ({e.strerror or e}); pick a folder you can '
                    f'write to.') from None
  return out


def _check_checkout() -> None:
  missing = [p for p in ('launch.py', 'configs/caption.py', 'configs/classify.py',
                         'configs/bench.py') if not os.path.isfile(os.path.join(ROOT, p))]
  if missing:
    raise UserError(f'{ROOT} is not a capjax checkout ({", ".join(missing)} missing); run the '
                    f'check from a clone of the repository.')


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; returns the exit status (0: some item ran, 1: none did, 2: bad input)."""
  parser = argparse.ArgumentParser(prog='python -m capjax.tools.accelerator_check',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder for the JSONL, the Markdown table, '
                      'the training workdirs and logs (created if missing)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny batches and a few steps: a smoke run (CI)')
  parser.add_argument('--tfds_dir', default=None,
                      help='where the generated shapes data sets go (default: OUT/tfds)')
  parser.add_argument('--budget_s', type=float, default=DEFAULT_BUDGET_S,
                      help='no item starts after this many seconds (default: %(default)s)')
  args = parser.parse_args(argv)
  command = 'python -m capjax.tools.accelerator_check ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  try:
    if args.budget_s <= 0:
      raise UserError(f'--budget_s={args.budget_s:g} must be > 0 (seconds).')
    _check_checkout()
    out = prepare_out(args.out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  jsonl_path, md_path = os.path.join(out, JSONL_FILE), os.path.join(out, MARKDOWN_FILE)

  def write(rows, environment):
    with open(jsonl_path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
    with open(md_path, 'w') as f:
      f.write(to_markdown(rows, environment, command))

  started = time.monotonic()
  try:
    environment = probe_environment()
  except ItemFailed as e:
    write([{'item': 'probe', 'kind': 'probe', 'error': str(e)}], {})
    print(f'error: {e}', file=sys.stderr)
    return 1
  platform = environment.get('platform') or environment.get('backend', 'cpu')
  print(f"{environment.get('n_devices')} x {environment.get('device_kind')} "
        f"({environment.get('backend')}), jax {environment.get('jax')}", flush=True)
  quick_cpu = args.quick and platform == 'cpu'
  if quick_cpu:  # Before any backend starts, here or in the training runs' processes.
    os.environ['XLA_FLAGS'] = quick_xla_flags(os.environ.get('XLA_FLAGS', ''))
    environment['xla_flags'] = os.environ['XLA_FLAGS']  # What the training runs get too.
  ctx = Context(out=out, tfds_dir=os.path.abspath(args.tfds_dir or os.path.join(out, 'tfds')),
                environment=environment, deadline=started + args.budget_s,
                budget_s=args.budget_s)
  # Training first: its children then have the device to themselves (this process starts its
  # backend, and holds its memory, with the first benchmark).
  train = train_items(args.quick)
  benchmarks = bench_items(args.quick, platform, environment.get('device_memory_bytes'))
  order = [item.name for item in [*train, *benchmarks]]
  done: dict[str, dict] = {}
  lock = threading.Lock()

  def on_row(row):
    with lock:
      done[row['item']] = row
      print(f"[{len(done)}/{len(order)}] {summary(row)}", flush=True)
      # After every item: an interrupted check keeps what it measured.
      write([done[n] for n in order if n in done], environment)

  run_check(train, benchmarks, ctx, on_row, overlap=quick_cpu)
  with open(md_path) as f:
    print(f.read(), end='')
  succeeded = sum('error' not in r for r in done.values())
  print(f'{succeeded} of {len(done)} items ran in {time.monotonic() - started:.0f} s; '
        f'wrote {jsonl_path} and {md_path}.')
  return 0 if succeeded else 1


if __name__ == '__main__':
  # As launch.py does, before JAX starts: the huge-page restart (a no-op off glibc/THP
  # madvise), then the XLA flags this machine gets.
  from capjax.runtime import host_memory, xla_flags
  host_memory.restart_with_huge_pages()
  xla_flags.apply()
  sys.exit(main())
