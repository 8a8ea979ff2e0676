"""What a run leaves in its workdir besides checkpoints: config, run info, curves."""
from __future__ import annotations

import json
import os

import jax

from capjax.errors import UserError
from capjax.train import logs

# The training curves' figure: loss and the task's accuracy, train vs validation, over steps.
# (Workdirs written before 2026-12 named it loss_curve.png for captioning.)
CURVES_FILE = 'curves.png'


def save_config(config, workdir: str) -> None:
  """config.json: what predict/eval rebuild the model from."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def load_config(workdir: str):
  """config.json as a ConfigDict; UserError when it is missing or unreadable."""
  import ml_collections
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{path} is missing: {workdir} is not a capjax workdir; train first '
                    'with --workdir pointing at it.')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:  # A config.json cut short or edited by hand.
    raise UserError(f'{path} cannot be read ({e}); point --workdir at a trained run.') from e


def write_run_info(workdir: str, **info) -> None:
  """run.json: model, parameters, train time... (what the comparison table reads)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'run.json'), 'w') as f:
      json.dump(info, f, indent=1, sort_keys=True)


def curves(workdir: str, names) -> dict:
  """{'<split>/<metric>': [(step, value)]} from metrics.jsonl, for plots.plot_curves."""
  out = {}
  for row in logs.read_metrics(workdir):
    for name in names:
      if name in row:
        out.setdefault(f"{row['split']}/{name}", []).append((row['step'], row[name]))
  return out
