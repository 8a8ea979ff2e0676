"""`python tests/scripts/concurrent_launches.py [ROUNDS] [--root=DIR] [--max_delay=S]`: starts
the same launch.py twice on one fresh workdir, the second after a random delay of up to S
seconds (4 by default: the first has often not reached the lock yet), ROUNDS times (20 by
default), and checks that exactly one trains (the other stops with the lock's error line),
that every checkpoint it leaves reads back and that metrics.jsonl holds each step once (two
writers would repeat steps). Prints one line per round and a summary; exit 1 on any failure.
Too slow for CI (about 30 s a round on 2 cores); the lock itself is tested in
tests/test_workdir_faults.py.
"""
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from capjax.train import logs  # noqa: E402  pylint: disable=wrong-import-position
from helpers import runs as rh  # noqa: E402  pylint: disable=wrong-import-position

ARGS = ['--config=configs/caption.py:runlocal', '--config.train.steps=14',
        '--config.train.checkpoint_every=5', '--config.train.log_every=1']


def one_round(root: str, i: int, rng: random.Random, max_delay: float) -> str:
  workdir = os.path.join(root, f'run{i}')
  cmd = [sys.executable, os.path.join(rh.ROOT, 'launch.py'), *ARGS, f'--workdir={workdir}',
         f'--config.tfds_dir={root}/tfds']
  env = rh.env(os.path.join(root, 'jax_cache'))
  delay = rng.uniform(0, max_delay)
  first = subprocess.Popen(cmd, cwd=rh.ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  second = subprocess.Popen(cmd, cwd=rh.ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  outs = [(p.wait(600), p.stderr.read()) for p in (first, second)]
  codes = sorted(rc for rc, _ in outs)
  refused = [err for rc, err in outs if rc == 2]
  problems = []
  if codes != [0, 2] or not all('is in use by another training run' in e for e in refused):
    problems.append(f'exit codes {codes}: {[e.strip()[-300:] for _, e in outs]}')
  for step in rh.checkpoint_steps(workdir):
    try:
      rh.read_state(workdir, step)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'checkpoint {step} does not read: {e}')
  steps = [r['step'] for r in logs.read_metrics(workdir) if r['split'] == 'train']
  if sorted(steps) != list(range(1, 15)):
    problems.append(f'metrics.jsonl train steps {steps}')
  verdict = 'ok' if not problems else 'FAIL ' + '; '.join(problems)
  trained = ['first', 'second'][[rc for rc, _ in outs].index(0)] if 0 in codes else 'none'
  return f'round {i}: delay {delay:.2f} s, exit codes {codes}, {trained} trained: {verdict}'


def main(argv):
  rounds = int(next((a for a in argv[1:] if not a.startswith('--')), 20))
  root = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--root=')), None)
  root = root or tempfile.mkdtemp(prefix='capjax_concurrent_')
  max_delay = float(next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--max_delay=')),
                         4))
  rh.prepare_shapes(os.path.join(root, 'tfds'))
  rng = random.Random(0)
  failed = 0
  for i in range(1, rounds + 1):
    line = one_round(root, i, rng, max_delay)
    print(line, flush=True)
    failed += 'FAIL' in line
  print(f'{rounds - failed} of {rounds} rounds: one writer, every checkpoint readable, each '
        f'step logged once.')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
