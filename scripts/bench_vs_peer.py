"""capjax against the PyTorch peer (../shared/bench/torch_peer.py) in alternating rounds.

  python scripts/bench_vs_peer.py --torch_python=/tmp/torchenv/bin/python --rounds=3 \
      --out=/tmp/rounds.jsonl

Each round runs every task once through capjax (launch.py --mode=bench) and then once through the
peer, so both see the same moments of a noisy machine; the table gives each round's ratio and the
medians. Every JSON line (capjax's and the peer's) is kept in --out. Standard library only.
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ('classify', 'caption', 'encode', 'greedy')
STEPS = {'classify': 5, 'caption': 10, 'encode': 5, 'greedy': 10}  # README's loop.


def _json_lines(cmd: list[str]) -> list[dict]:
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f'error: {" ".join(cmd[:3])} failed (exit {out.returncode}): '
             f'{out.stderr.strip().splitlines()[-1:]}')
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]


def run_round(task: str, args) -> tuple[dict, dict]:
  ours = _json_lines([sys.executable, 'launch.py', f'--config=configs/bench.py:task={task}',
                      '--mode=bench', f'--config.bench.steps={STEPS[task]}',
                      '--config.bench.warmup=2', f'--config.bench.dtype={args.dtype}'])[-1]
  peer = _json_lines([args.torch_python, str(args.peer), f'--task={task}',
                      f'--steps={STEPS[task]}', f'--dtype={args.dtype}'])[-1]
  return ours, peer


def table(rows: list[tuple[int, str, dict, dict]], tasks) -> str:
  """Markdown: per task, the medians of both, each round's ratio and the median ratio."""
  lines = ['| task | capjax (median) | peer (median) | capjax / peer per round; median | '
           'capjax MFU |', '|---|---|---|---|---|']
  for task in tasks:
    mine = [(o, p) for _, t, o, p in rows if t == task]
    ratios = [o['examples_per_s'] / p['examples_per_s'] for o, p in mine]
    mfus = [o['mfu'] for o, _ in mine if o.get('mfu')]
    mfu = f'{min(mfus):.2f}-{max(mfus):.2f}' if mfus else '-'
    lines.append(
        f'| {task} | {statistics.median(o["examples_per_s"] for o, _ in mine):.1f} | '
        f'{statistics.median(p["examples_per_s"] for _, p in mine):.1f} | '
        f'{", ".join(f"{r:.2f}" for r in ratios)}; **{statistics.median(ratios):.2f}** | {mfu} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch_python', required=True, help='Python of a venv with torch.')
  parser.add_argument('--peer', default=str(ROOT.parent / 'shared/bench/torch_peer.py'))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--out', default=None, help='JSONL file for every result line.')
  args = parser.parse_args()
  tasks = args.tasks.split(',')
  rows = []
  for round_ in range(1, args.rounds + 1):
    for task in tasks:
      ours, peer = run_round(task, args)
      rows.append((round_, task, ours, peer))
      print(f'round {round_} {task}: capjax {ours["examples_per_s"]:.1f}, peer '
            f'{peer["examples_per_s"]:.1f} ({ours["examples_per_s"] / peer["examples_per_s"]:.2f}x)',
            flush=True)
      if args.out:
        with open(args.out, 'a') as f:
          for row in (ours, peer):
            f.write(json.dumps({'round': round_, **row}) + '\n')
  print(table(rows, tasks))


if __name__ == '__main__':
  main()
