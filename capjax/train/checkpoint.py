"""Orbax checkpoints of the train state together with the data-iterator state.

Damaged checkpoints: orbax writes each save into a temporary folder and renames it when
complete, so a run killed mid-save leaves only a temporary folder, which the manager ignores
(and the training manager cleans up). A checkpoint damaged after that (truncated or deleted
files, a full disk, bit rot) is still listed by orbax; `restore_latest` then falls back to the
newest one that reads, says so in one log line, and, for a run that will go on training,
moves the damaged ones to `<workdir>/checkpoints_damaged/` -- orbax silently declines to save a
step that is already listed, so leaving them would make the resumed run skip those saves.
Nothing is deleted.
"""
from __future__ import annotations

import contextlib
import gc
import logging as std_logging
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from capjax.errors import UserError
from capjax.runtime import distributed

DAMAGED_DIR = 'checkpoints_damaged'
# The suffix of the folder orbax writes a checkpoint into before renaming it (orbax 0.12's
# TMP_DIR_SUFFIX, in a private module).
TMP_SUFFIX = '.orbax-checkpoint-tmp'


class _DropOrbaxRecords(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return '/orbax/' not in record.pathname


@contextlib.contextmanager
def _orbax_quiet():
  """Mutes orbax's log records while checkpoints are listed and read: it logs each damaged
  file it trips over (several lines, some at ERROR level, some for files it does not need),
  and `restore_latest` reports the outcome in one line instead."""
  logger, drop = std_logging.getLogger('absl'), _DropOrbaxRecords()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def manager(workdir: str, keep: int, async_save: bool = True,
            cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """The CheckpointManager of `<workdir>/checkpoints`.

  Args:
    workdir: the run's folder.
    keep: how many of the newest checkpoints to keep.
    async_save: save in a background thread (the next save or `wait_until_finished` waits).
    cleanup_tmp: remove temporary folders left by a save that was killed; only for the one
      process that trains in this workdir (a reader must not delete a save in progress).
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if cleanup_tmp:
    for name in unfinished_saves(directory):
      logging.warning('The write of checkpoint %s did not finish (the run was stopped while '
                      'saving it): removing it and resuming from the newest complete one.',
                      name.split('.')[0])
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=cleanup_tmp,
                                         create=True)
  with _orbax_quiet():  # Construction reads every checkpoint's metadata.
    return ocp.CheckpointManager(directory, options=options)


def complete_steps(directory: str) -> list[int]:
  """The steps of the finished checkpoints in a checkpoints folder, read without orbax (a full
  disk or a damaged folder must not stop a report from naming them)."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  except OSError:
    return []


def unfinished_saves(directory: str) -> list[str]:
  """The temporary folders of checkpoint writes that never finished (orbax writes into
  `<step>.orbax-checkpoint-tmp*` and renames it once complete), oldest step first."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  tmp = [n for n in names if TMP_SUFFIX in n and n.split('.')[0].isdigit()]
  return sorted(tmp, key=lambda n: int(n.split('.')[0]))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict,
         force: bool = False) -> bool:
  """Saves asynchronously; the next save (or `wait_until_finished`) waits for it.

  Returns whether orbax accepted the save; it declines a step it already lists, which is
  logged because it means the workdir holds a newer run than the one saving.
  """
  saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  data=ocp.args.JsonSave(data_state)),
                    force=force)
  if not saved:
    logging.warning('Checkpoint for step %d was not saved: %s already holds step %s.', step,
                    mngr.directory, mngr.latest_step())
  return saved


# After a failed read, the reads still in flight report within milliseconds: for a truncated
# captioner checkpoint on local disk, 0.5-12.4 ms after orbax raised and never more than 0.9 ms
# apart (16 restores); without waiting, 558 of 1228 reports of 6 all-damaged restores came
# after the scope. So a scope ends once none has come for QUIET_S, or after DRAIN_LIMIT_S where
# storage is slow (later reports are then printed).
QUIET_S, DRAIN_LIMIT_S = 0.05, 1.0


class _FailedReads:
  """The scope of `_quiet_failed_reads`: `failed()` marks a read that raised."""

  def __init__(self):
    self.last_report: Optional[float] = None  # The newest failure or report; None: none yet.

  def failed(self) -> None:
    self.last_report = time.monotonic()

  def hook(self, previous):
    def hook(unraisable):
      if left_by_failed_io(unraisable):
        self.failed()
        return
      previous(unraisable)
    return hook

  def drain(self) -> None:
    """Waits for the late reports of the failed reads, then collects the tasks they leave."""
    if self.last_report is None:
      return
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while time.monotonic() - self.last_report < QUIET_S and time.monotonic() < deadline:
      time.sleep(0.01)
    # asyncio logs a failed read task nobody awaited only when it is garbage collected, at
    # whatever collection comes next; one here, once the reads have ended, makes that now
    # (without it, 13 such tracebacks of 6 all-damaged restores were logged after the scope).
    gc.collect()


def left_by_failed_io(unraisable) -> bool:
  """Whether an unraisable error is one that failed orbax reads or writes leave: 'Event loop is
  closed' from an array read or write still in flight when orbax closed its loop, or the error
  an orbax coroutine raises on the GeneratorExit of being closed, suspended for good, when it
  is collected."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return (code is not None and '/orbax/' in code.co_filename and error is not None
          and isinstance(error.__cause__ or error.__context__, GeneratorExit))


@contextlib.contextmanager
def _quiet_failed_reads():
  """Silences what failed checkpoint reads leave behind, for the duration of the block.

  When one array of a checkpoint fails to read, orbax closes its asyncio loop while the reads
  of the other arrays are still in flight; each of them then reports 'Event loop is closed'
  through sys.unraisablehook from a tensorstore thread, after the failed read has raised (70-208
  tracebacks for one damaged captioner checkpoint), and asyncio logs the failed read tasks
  nobody awaited when they are collected. `restore_latest` reports it all in one line. Inside
  this block only that error and those records are dropped; the block yields a `_FailedReads`
  to mark each failure with, and if there was one it ends only after `drain`.
  """
  scope, previous = _FailedReads(), sys.unraisablehook
  asyncio_logger = std_logging.getLogger('asyncio')
  sys.unraisablehook = scope.hook(previous)
  asyncio_logger.addFilter(_drop_orphaned_read_tasks)
  try:
    with warnings.catch_warnings():
      # Read coroutines orbax created but never started, dropped when a failed read's frames
      # are freed (at the end of the `except` that caught it, or by `drain`'s collection).
      warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
      try:
        yield scope
      finally:
        scope.drain()
  finally:
    sys.unraisablehook = previous
    asyncio_logger.removeFilter(_drop_orphaned_read_tasks)


def _drop_orphaned_read_tasks(record: std_logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of a failed orbax array read nobody awaited: a task, a
  future or a gather, depending on where the read failed, whose text names orbax (its code or
  deserialisation) or tensorstore, or whose traceback runs through orbax."""
  text = record.getMessage()
  if not re.match(r'\w+ exception was never retrieved', text):
    return True
  frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
  return not (any('/orbax/' in frame.filename for frame in frames)
              or any(cue in text for cue in ('deserializ', 'tensorstore_spec', '/orbax/')))


def _reason(e: Exception, limit: int = 160) -> str:
  """An exception as one short line (tensorstore errors run to several hundred characters)."""
  text = ' '.join(str(e).split())
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> str:
  """Moves damaged checkpoints out of the manager's folder; returns where they went."""
  directory = os.fspath(mngr.directory)
  target_root = os.path.join(os.path.dirname(directory), DAMAGED_DIR)
  if distributed.is_main():
    os.makedirs(target_root, exist_ok=True)
    for step in steps:
      target, n = os.path.join(target_root, str(step)), 1
      while os.path.exists(target):  # Damaged twice at the same step: keep both.
        target, n = os.path.join(target_root, f'{step}-{n}'), n + 1
      shutil.move(os.path.join(directory, str(step)), target)
  distributed.barrier('capjax_checkpoint_set_aside')
  mngr.reload()
  return target_root


def _read_newest(mngr: ocp.CheckpointManager, abstract, reads: _FailedReads,
                 failed: list[tuple[int, str]]) -> tuple[Optional[int], Optional[dict]]:
  """(step, restored) of the newest checkpoint that reads, or (None, None); appends each one
  that does not to `failed` as (step, reason)."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      with _orbax_quiet():
        return step, mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # Any read failure means "not usable"; try older ones.
      reads.failed()
      failed.append((step, _reason(e)))
  return None, None


def restore_latest(mngr: ocp.CheckpointManager, target_state, *, set_aside: bool = False
                   ) -> Optional[tuple[Any, dict, int]]:
  """(state, data_state, step) from the newest readable checkpoint; None if there is none.

  Checkpoints that fail to read are skipped, newest first, and reported in one warning line
  once the fallback is known. With `set_aside` (a run that goes on training) those newer than
  the one restored are moved to `checkpoints_damaged/`.

  Raises:
    UserError: checkpoints exist but none can be read into `target_state` (every one damaged,
      or the model changed since they were written); nothing is moved then.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  failed: list[tuple[int, str]] = []
  with _quiet_failed_reads() as reads:
    step, restored = _read_newest(mngr, abstract, reads, failed)
  if restored is not None:
    if failed:
      where = ''
      if set_aside:
        where = f'; moved to {_set_aside(mngr, [s for s, _ in failed])}'
      logging.warning('Checkpoint%s %s in %s cannot be read (%s); using step %d instead%s.',
                      's' if len(failed) > 1 else '', ', '.join(str(s) for s, _ in failed),
                      mngr.directory, failed[0][1], step, where)
    return restored['state'], dict(restored['data']), step
  if failed:
    raise UserError(
        f'None of the {len(failed)} checkpoints in {mngr.directory} can be read (step '
        f'{failed[0][0]}: {failed[0][1]}); if the model config changed since they were '
        f'written use a new --workdir, otherwise move the damaged checkpoints away.')
  return None


def newest_data_state(workdir: str) -> Optional[tuple[int, dict]]:
  """(step, data state) of the newest checkpoint in `workdir` whose data state reads, without
  reading any array (so a check of what a run resumes from costs nothing and moves nothing);
  None when there is none."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not complete_steps(directory):
    return None
  mngr = manager(workdir, keep=1, async_save=False)
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        with _orbax_quiet():
          restored = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return step, dict(restored['data'])
      except Exception:  # pylint: disable=broad-except
        continue  # Damaged: the restore proper reports it; an older one may read.
  finally:
    mngr.close()
  return None


def restore_for_inference(workdir: str, model, tx, rng, *sample_inputs):
  """The newest readable train state in `workdir`, for eval/predict (no resume)."""
  from capjax.train import sharding
  from capjax.train import state as state_lib
  # Replicated over all devices, as training lays it out (and as the evaluation jit expects
  # with several processes); without shardings orbax also warns on every restore.
  template = jax.eval_shape(lambda: state_lib.create(model, tx, rng, *sample_inputs))
  template = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), template,
      sharding.replicated(sharding.make_mesh())(template))
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'{directory} does not exist: train a model with --workdir={workdir} '
                    'first.')
  mngr = manager(workdir, keep=1, async_save=False)
  try:
    restored = restore_latest(mngr, template)
  finally:
    mngr.close()
  if restored is None:
    raise UserError(f'No readable checkpoint in {directory}: train (or resume) with '
                    f'--workdir={workdir} first.')
  return restored[0]
