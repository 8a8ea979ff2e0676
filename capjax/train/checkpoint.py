"""Orbax checkpoints of the train state together with the data-iterator state."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                         enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict,
         force: bool = False) -> None:
  """Saves asynchronously; the next save (or `wait_until_finished`) waits for it."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)),
            force=force)


def restore_latest(mngr: ocp.CheckpointManager, target_state
                   ) -> Optional[tuple[Any, dict, int]]:
  """(state, data_state, step) from the newest readable checkpoint, else None.

  A checkpoint that fails to read (cut short by a kill, damaged on disk) is
  skipped with one warning line and left in place, and the next older one is tried.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # Any read failure means "not usable"; try older ones.
      logging.warning('Checkpoint at step %d in %s cannot be read (%s: %s); trying an '
                      'older one.', step, mngr.directory, type(e).__name__,
                      str(e).splitlines()[0] if str(e) else '')
      continue
    return restored['state'], dict(restored['data']), step
  return None


def restore_for_inference(workdir: str, model, tx, rng, *sample_inputs):
  """The newest readable train state in `workdir`, for eval/predict (no resume)."""
  from capjax.errors import UserError
  from capjax.train import state as state_lib
  template = jax.eval_shape(lambda: state_lib.create(model, tx, rng, *sample_inputs))
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'{directory} does not exist: train a model with --workdir={workdir} '
                    'first.')
  mngr = manager(workdir, keep=1, async_save=False)
  restored = restore_latest(mngr, template)
  mngr.close()
  if restored is None:
    raise UserError(f'No readable checkpoint in {directory}: train (or resume) with '
                    f'--workdir={workdir} first.')
  return restored[0]
