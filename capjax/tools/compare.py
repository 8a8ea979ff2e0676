"""Side-by-side comparison of finished runs: a Markdown table, a CSV and a bar chart.

    python -m capjax.tools.compare --out=runs/compare runs/resnet runs/xception

Each workdir must hold `run.json` (written by training: task, model, num_params, train_time_s,
dataset) and `eval.json` (flat metric keys, written by evaluation).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Sequence

from capjax.errors import UserError
from capjax.tools import plots

INFO_COLUMNS = ('workdir', 'task', 'dataset', 'model', 'num_params', 'train_time_s')
TASK_METRICS = {
    'classify': ('top1_accuracy', 'top5_accuracy', 'loss', 'macro_auc', 'micro_auc'),
    'caption': ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'cider', 'rouge_l', 'token_accuracy',
                'loss', 'meteor', 'cosine_similarity'),
}
# Columns only when some run has them: METEOR needs Java; cosine came later than some runs.
OPTIONAL_METRICS = ('meteor', 'cosine_similarity')
NOT_PLOTTED = ('loss',)  # not on the 0..1-ish scale of the others, and lower is better
_HEADERS = {'workdir': 'workdir', 'num_params': 'parameters', 'train_time_s': 'train time'}


def _read_json(path: str, what_to_do: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise UserError(f'{path} does not exist; {what_to_do}.') from None
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path} is not readable JSON ({e}); {what_to_do}.') from None
  if not isinstance(data, dict):
    raise UserError(f'{path} must hold a JSON object; {what_to_do}.')
  return data


def _number(value) -> float | None:
  """A finite number, or None for anything else (missing, text, nested, nan)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def load_run(workdir: str) -> dict:
  """One comparison row: run.json's info columns plus eval.json's metrics for its task."""
  workdir = os.path.normpath(workdir)
  metrics = _read_json(os.path.join(workdir, 'eval.json'),
                       f'run evaluation for {workdir} first (--mode=eval)')
  info = _read_json(os.path.join(workdir, 'run.json'),
                    f'train in {workdir} first, as training writes run.json')
  task = info.get('task')
  if task not in TASK_METRICS:
    raise UserError(f"{os.path.join(workdir, 'run.json')} has task {task!r}; expected one of "
                     f'{sorted(TASK_METRICS)}.')
  row = {'workdir': os.path.basename(workdir) or workdir, 'task': task,
         'dataset': info.get('dataset'), 'model': info.get('model'),
         'num_params': _number(info.get('num_params')),
         'train_time_s': _number(info.get('train_time_s'))}
  if row['num_params'] is not None:
    row['num_params'] = int(row['num_params'])
  for name in TASK_METRICS[task]:
    row[name] = _number(metrics.get(name))
  return row


def _metric_columns(rows: Sequence[dict]) -> list[str]:
  columns = []
  for task in TASK_METRICS:  # fixed task order, so a mixed table always looks the same
    if any(r['task'] == task for r in rows):
      columns += [m for m in TASK_METRICS[task] if m not in columns]
  return [c for c in columns
          if c not in OPTIONAL_METRICS or any(r.get(c) is not None for r in rows)]


def _format_params(n: int) -> str:
  for scale, suffix in ((1e9, 'B'), (1e6, 'M'), (1e3, 'K')):
    if n >= scale:
      return f'{n / scale:.2f}{suffix}'
  return str(n)


def _format_duration(seconds: float) -> str:
  if seconds < 60:
    return f'{seconds:.1f}s'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h {minutes:02d}m' if hours else f'{minutes}m {secs:02d}s'


def _cell(column: str, value) -> str:
  if value is None:
    return ''
  if column == 'num_params':
    return _format_params(value)
  if column == 'train_time_s':
    return _format_duration(value)
  if isinstance(value, float):
    return f'{value:.4f}'
  return str(value).replace('|', '\\|')


def to_markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A GitHub Markdown table; blank cells for values a run does not have."""
  lines = ['| ' + ' | '.join(_HEADERS.get(c, c) for c in columns) + ' |',
           '|' + '|'.join('---' if c in ('workdir', 'task', 'dataset', 'model') else '---:'
                          for c in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(c, row.get(c)) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def compare_workdirs(workdirs: Sequence[str], out_prefix: str) -> list[dict]:
  """Writes out_prefix.md, .csv and .png comparing the runs; returns the table rows.

  Rows hold the info columns (workdir name, task, dataset, model, num_params, train_time_s)
  and the metrics of every task present, None where a run lacks one. Raises ValueError naming
  the file when a workdir has no valid eval.json or run.json (errors.UserError, a ValueError).
  """
  if not workdirs:
    raise UserError('Give at least one workdir to compare.')
  rows = [load_run(w) for w in workdirs]
  names = [r['workdir'] for r in rows]
  if len(set(names)) < len(names):  # e.g. runs/a/final vs runs/b/final: show the paths instead
    for row, workdir in zip(rows, workdirs):
      row['workdir'] = os.path.normpath(workdir)
  metric_columns = _metric_columns(rows)
  columns = list(INFO_COLUMNS) + metric_columns
  rows = [{c: row.get(c) for c in columns} for row in rows]

  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  with open(out_prefix + '.md', 'w') as f:
    f.write(to_markdown(rows, columns))
  with open(out_prefix + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: '' if v is None else v for c, v in row.items()} for row in rows)
  plotted = [c for c in metric_columns
             if c not in NOT_PLOTTED and any(r[c] is not None for r in rows)]
  plots.plot_bars(rows, plotted or metric_columns, out_prefix + '.png', label_key='workdir',
                  title='Model comparison')
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: `python -m capjax.tools.compare --out=PREFIX DIR1 DIR2 ...`; argv excludes the program name."""
  parser = argparse.ArgumentParser(prog='python -m capjax.tools.compare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='output prefix: writes PREFIX.{md,csv,png}')
  parser.add_argument('workdirs', nargs='+', help='workdirs holding run.json and eval.json')
  args = parser.parse_args(argv)
  try:
    rows = compare_workdirs(args.workdirs, args.out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)  # a user mistake: one sentence, no traceback
    return 2
  with open(args.out + '.md') as f:
    print(f.read(), end='')
  print(f'Wrote {args.out}.md, {args.out}.csv and {args.out}.png ({len(rows)} runs).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
