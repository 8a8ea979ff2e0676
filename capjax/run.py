"""The one function launch.py calls: dispatches a mode to a task."""
from __future__ import annotations

import logging as std_logging

from absl import logging

from capjax.errors import UserError


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  """Keeps capjax's INFO lines; libraries (orbax logs every save) need WARNING."""
  return record.levelno >= std_logging.WARNING or '/capjax/' in record.pathname


def main(config, workdir: str, mode: str, images=()) -> None:
  """Runs `mode` ('train', 'eval', 'predict') for `config` in `workdir`."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  logging.get_absl_handler().addFilter(_quiet_libraries)
  if mode == 'predict':
    from capjax import predict
    predict.main(workdir, images)
    return
  if config is None:
    raise UserError('--config is required for --mode=train/eval (e.g. '
                    '--config=configs/caption.py).')
  if config.task == 'caption':
    from capjax import caption_task as task
  elif config.task == 'classify':
    from capjax import classify_task as task
  else:
    raise UserError(f'config.task={config.task!r} is unknown.')
  if mode == 'train':
    task.train_and_evaluate(config, workdir)
  else:
    task.evaluate_workdir(config, workdir)
