"""A disk that fills up during a run: one line (which file, how much space is left, what to do)
instead of a traceback.

Nothing valid is lost to it: orbax writes each checkpoint into a temporary folder and renames
it only once complete (an incomplete one is never listed, and the next run removes it), and
metrics.jsonl's reader skips a line cut short. So the same command, once space is freed,
resumes from the newest complete checkpoint exactly as after a kill.
"""
from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import re
import shutil
import sys
from typing import Optional

from absl import logging as absl_logging

from capjax.errors import UserError
from capjax.train import checkpoint

_NO_SPACE = 'No space left on device'


def _no_space_errors(error: Optional[BaseException]) -> list[BaseException]:
  """The errors in `error`'s chain that say the device is full. Python's own writes raise
  OSError(ENOSPC); orbax's go through tensorstore, whose errors only say it in words."""
  found, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or _NO_SPACE in str(error):
      found.append(error)
    error = error.__cause__ or error.__context__
  return found


def _file_of(errors: list[BaseException], workdir: str, report: str = '') -> str:
  """The file a failed write was for: an OSError's own, else the first path under the workdir
  that an error's text (or orbax's report of it) names, else the workdir."""
  root = os.path.abspath(workdir)
  for error in errors:
    if getattr(error, 'filename', None):
      return str(error.filename)
  for text in [*map(str, errors), report]:
    match = re.search(re.escape(root) + r'[^\s"\'\]\):]*', text)
    if match:
      return match.group(0)
  return workdir


def _free_bytes(path: str) -> Optional[int]:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def message(errors: list[BaseException], workdir: str, report: str = '') -> str:
  """The one line for writes that failed because the device of `workdir` is full; `report`
  is orbax's log of the failure, if any."""
  path = _file_of(errors, workdir, report)
  free = _free_bytes(path)
  free_text = 'unknown' if free is None else f'{free / 2**20:.1f} MiB'
  step = max(checkpoint.complete_steps(os.path.join(workdir, 'checkpoints')), default=None)
  kept = (f'the checkpoint at step {step} is complete' if step is not None else
          'no checkpoint had been completed yet')
  return (f'No space left on the device to write {path} ({free_text} free there); {kept}. '
          f'Free some space (or lower --config.train.keep_checkpoints) and re-run the same '
          f'command: it resumes from the newest complete checkpoint.')


class _Silenced:
  """What orbax leaves behind when its writes fail for lack of space, dropped for the block of
  `reported` (the UserError says it in one line): its writer threads each log the error with a
  traceback (over 250 lines for one checkpoint), and its writes still in flight report
  through sys.unraisablehook what `checkpoint.left_by_failed_io` recognises. The latter are
  dropped only after such a log record, so nothing else is ever hidden."""

  def __init__(self, previous_hook):
    self.previous_hook, self.full = previous_hook, False
    self.first_report = ''  # The text of the first record dropped.

  def log_filter(self, record: std_logging.LogRecord) -> bool:
    """Drops orbax's records of the failure, and asyncio's of its write tasks nobody awaited;
    keeps the first one's text, which names the file."""
    if record.levelno < std_logging.WARNING or not (
        '/orbax/' in record.pathname or record.name == 'asyncio'):
      return True
    text = record.getMessage()
    if record.exc_info:
      text += std_logging.Formatter().formatException(record.exc_info)
    if _NO_SPACE not in text:
      return True
    self.full = True
    self.first_report = self.first_report or text
    return False

  def unraisable_hook(self, unraisable) -> None:
    if not (self.full and checkpoint.left_by_failed_io(unraisable)):
      self.previous_hook(unraisable)


@contextlib.contextmanager
def reported(workdir: str):
  """Turns a failed write for lack of space, inside the block, into one UserError line."""
  handler = absl_logging.get_absl_handler()
  silenced = _Silenced(sys.unraisablehook)
  handler.addFilter(silenced.log_filter)
  sys.unraisablehook = silenced.unraisable_hook
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    errors = _no_space_errors(e)
    if not errors:
      raise
    silenced.full = True
    raise UserError(message(errors, workdir, silenced.first_report)) from e
  finally:
    if not silenced.full:  # Once full, orbax's threads go on reporting it as the process exits.
      handler.removeFilter(silenced.log_filter)
      sys.unraisablehook = silenced.previous_hook
