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
import logging as std_logging
import os
import shutil
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from capjax.errors import UserError
from capjax.runtime import distributed

DAMAGED_DIR = 'checkpoints_damaged'


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
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=cleanup_tmp,
                                         create=True)
  with _orbax_quiet():  # Construction reads every checkpoint's metadata.
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                 options=options)


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


@contextlib.contextmanager
def _quiet_failed_reads():
  """Silences, while a checkpoint is being read, what a failed read leaves behind.

  When one array of a checkpoint fails to read, orbax closes its asyncio loop while the reads
  of the other arrays are still in flight; each of them then reports 'Event loop is closed'
  through sys.unraisablehook: dozens of tracebacks (70-104 measured for one damaged captioner
  checkpoint, every one before the restore returned) for a checkpoint that `restore_latest`
  reports in one line. Only that error is dropped, and only inside this block.

  The failed read tasks nobody awaited are logged by asyncio whenever they are garbage
  collected, which no block can bound (forcing a collection here makes orbax's unfinished
  coroutines raise anew), so that one log record stays filtered on the asyncio logger from
  the first failed read on; the filter matches nothing else.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except Exception:
    std_logging.getLogger('asyncio').addFilter(_drop_orphaned_read_tasks)  # Added once.
    raise
  finally:
    sys.unraisablehook = previous


def _drop_orphaned_read_tasks(record: std_logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of an un-awaited failed orbax array read: a task or a
  future, depending on where the read failed, naming orbax's deserialisation or tensorstore."""
  text = record.getMessage()
  orphan = text.startswith(('Task exception was never retrieved',
                            'Future exception was never retrieved'))
  return not (orphan and ('deserializ' in text or 'tensorstore_spec' in text))


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
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      with _orbax_quiet(), _quiet_failed_reads():
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # Any read failure means "not usable"; try older ones.
      failed.append((step, _reason(e)))
      continue
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
