"""The one function launch.py calls: checks the config and workdir, then runs a mode.

Everything a user can get wrong (a config value, a workdir, a data path) is checked here, in
the task's config rules or in the readers before the workdir is written to, and raised as a
`UserError` whose message names the field or file and what to do; launch.py prints it as one
line. Every task is reached through `capjax.tasks`.
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import logging

from capjax import tasks
from capjax.errors import UserError
from capjax.runtime import workdir as workdir_lib

MODES = ('train', 'eval', 'predict', 'bench')


def validate(config) -> None:
  """Raises UserError naming the first config field whose value cannot work."""
  tasks.get(config.get('task') if hasattr(config, 'get') else None).validate(config)


def train_and_evaluate(task: tasks.Task, config, workdir: str, splits: tasks.Splits) -> dict:
  """Trains on the train split (resuming from `workdir` if it can), then evaluates on
  config.eval.split; returns the eval metrics ({} when training was interrupted)."""
  from capjax.tools import plots  # pylint: disable=import-outside-toplevel
  from capjax.train import loop, state as state_lib  # pylint: disable=import-outside-toplevel
  workdir_lib.save_config(config, workdir)
  job, trained = task.training_job(config, workdir, splits)
  outcome = loop.train(job, config, workdir)
  if outcome.interrupted:
    return {}
  workdir_lib.write_run_info(workdir, task=task.NAME, dataset=config.dataset,
                             num_params=state_lib.num_params(outcome.state),
                             train_time_s=outcome.train_time_s, steps=outcome.step,
                             batch_size=config.train.batch_size, **task.run_info(config))
  plots.plot_curves(workdir_lib.curves(workdir, task.CURVES),
                    os.path.join(workdir, workdir_lib.CURVES_FILE), title=task.NAME)
  trained.state = outcome.state
  return task.evaluate(config, workdir, trained, splits)


def evaluate_workdir(config, workdir: str) -> dict:
  """`--mode=eval`: scores the workdir's newest checkpoint on config.eval.split (reading only
  that split, which training prepared)."""
  task = tasks.get(config.task)
  splits = task.load_splits(config, (config.eval.split,))
  return task.evaluate(config, workdir, task.restore_trained(config, workdir), splits)


def predict(workdir: str, paths) -> list[dict]:
  """`--mode=predict`: prints one line per image (its prediction, or why it could not be
  read) and returns the task's results.

  Raises:
    UserError: no images were given, the workdir is not a trained run, or no image could be
      read (the message names the first bad file).
  """
  if not paths:
    raise UserError('--images is empty: pass image files, e.g. --images=a.jpg,b.png.')
  config = workdir_lib.load_config(workdir)
  task = tasks.get(config.get('task'))
  results = task.predict(config, workdir, paths)
  bad = [r for r in results if 'error' in r]
  if len(bad) == len(results):
    raise UserError(bad[0]['error'] if len(bad) == 1 else
                    f'None of the {len(bad)} images could be read; the first: '
                    f'{bad[0]["error"]}')
  for r in results:
    print(f"{r['path']}\t{'error: ' + r['error'] if 'error' in r else task.describe(r)}")
  if bad:
    print(f'{len(bad)} of {len(results)} images could not be read (see the error lines).')
  return results


def _bench(config, workdir: str | None) -> None:
  """--mode=bench: one JSON line per benchmark on stdout, also appended to
  WORKDIR/bench.jsonl when a workdir is given."""
  if config is None:
    raise UserError('--mode=bench needs --config (configs/bench.py:task=..., or a task config '
                    'such as configs/caption.py to time its own train step).')
  if config.get('task') != 'bench':
    validate(config)
  import json  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  from capjax.tools import bench  # pylint: disable=import-outside-toplevel
  rows = bench.main(config)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'bench.jsonl'), 'a') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)


def _check_workdir(workdir: str, mode: str) -> None:
  """Refuses a workdir that cannot work, before anything is written into it."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file; pass a folder (it is created if missing).')
  if mode == 'train':
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UserError(f'--workdir={workdir} cannot be written ({parent} is not writable); '
                      f'pick a folder you can write to.')
  elif not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'--workdir={workdir} holds no checkpoints; train first with '
                    f'--mode=train --workdir={workdir}.')


def _log_filter(record: std_logging.LogRecord) -> bool:
  """capjax's INFO lines on process 0; everything else (libraries -- orbax logs every save --
  and the other processes, which would repeat process 0) only from WARNING up."""
  import jax
  if record.levelno >= std_logging.WARNING:
    return True
  return '/capjax/' in record.pathname and jax.process_index() == 0


def main(config, workdir: str, mode: str, images=()) -> None:
  """Runs `mode` ('train', 'eval', 'predict', 'bench') for `config` in `workdir`."""
  if mode not in MODES:
    raise UserError(f'--mode={mode} is unknown; use one of {", ".join(MODES)}.')
  logging.get_absl_handler().addFilter(_log_filter)
  if mode == 'bench' or (config is not None and config.get('task') == 'bench'):
    _bench(config, workdir)
    return
  if not workdir:
    raise UserError('--workdir is required.')
  if mode == 'predict':
    predict(workdir, images)
    return
  if config is None:
    raise UserError('--config is required for --mode=train/eval (e.g. '
                    '--config=configs/caption.py).')
  validate(config)  # Before the slow imports below, so a typo fails in a second.
  _check_workdir(workdir, mode)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  from capjax.runtime import distributed, lock
  from capjax.train import disk_full
  if mode == 'eval':
    evaluate_workdir(config, workdir)
    return
  task = tasks.get(config.task)
  task.check_start(config, workdir)
  # The lock first, so a second run on this workdir stops before it touches anything (data
  # included); with several processes process 0 prepares the data set before the others read it.
  with lock.held(workdir), disk_full.reported(workdir):
    with distributed.main_process_first('capjax_prepare_data'):
      splits = task.load_splits(config)
    train_and_evaluate(task, config, workdir, splits)
