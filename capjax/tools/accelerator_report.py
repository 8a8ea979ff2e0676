"""capjax.tools.accelerator_check's Markdown report and progress lines, from its rows."""
from __future__ import annotations

import datetime
from collections.abc import Sequence

from capjax.tools.accelerator_items import GIB

# Eval metrics shown in the Markdown table (the JSONL row keeps all of eval.json's numbers).
HEADLINE_METRICS = {'caption': ('exact_scene_accuracy', 'bleu_4', 'cider'),
                    'classify': ('top1_accuracy', 'top5_accuracy', 'macro_auc')}


def summary(row: dict) -> str:
  """The one progress line printed as a row is done."""
  if 'error' in row:
    return f"{row['item']}: error: {row['error']}"
  rate = row.get('examples_per_s')
  speed = f"{rate:.1f} examples/s" if rate else 'no steady rate'
  return f"{row['item']}: {speed}, {row['wall_s']:.1f} s"


def _number(value, digits: int = 1) -> str:
  return '' if value is None else f'{value:,.{digits}f}'


def _notes(row: dict) -> str:
  if 'error' in row:
    return 'error: ' + row['error'].replace('|', '\\|')
  if row['kind'] == 'train':
    metrics = row.get('eval', {})
    shown = [f'{m} {metrics[m]:.3f}' for m in HEADLINE_METRICS.get(row['task'], ())
             if m in metrics]
    return ', '.join(shown + [f"{row.get('steps')} steps"])
  if row.get('tokens_per_s'):
    return f"{row['tokens_per_s']:,.0f} tokens/s"
  return ''


def to_markdown(rows: Sequence[dict], environment: dict, command: str) -> str:
  """The check's report: what it ran on, then one table line per item."""
  env = environment
  memory = env.get('device_memory_bytes')
  lines = [
      f"# capjax accelerator check, {datetime.date.today().isoformat()}", '',
      f"`{command}`", '',
      f"- device: {env.get('n_devices', '?')} x {env.get('device_kind', '?')}"
      + (f' ({memory / GIB:.0f} GiB)' if memory else '')
      + f", backend {env.get('backend', '?')}",
      f"- jax {env.get('jax', '?')}, jaxlib {env.get('jaxlib', '?')}, "
      f"Python {env.get('python', '?')}",
      f"- host CPU: {env.get('cpu_model', '?')}", '',
      '| item | dtype | batch | step (ms) | examples/s | MFU | wall (s) | notes |',
      '|---|---|---:|---:|---:|---:|---:|---|']
  for r in rows:
    mfu = r.get('mfu')
    batch = r.get('batch_size')
    lines.append('| ' + ' | '.join([
        r['item'], r.get('dtype') or '',
        f"{batch} ({r['batch_label']})" if batch and r.get('batch_label') else _number(batch, 0),
        _number(r.get('step_ms')), _number(r.get('examples_per_s')),
        '' if mfu is None else f'{100 * mfu:.1f}%', _number(r.get('wall_s')),
        _notes(r)]) + ' |')
  return '\n'.join(lines) + '\n'
