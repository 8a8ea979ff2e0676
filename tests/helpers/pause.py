"""Test hooks that hold a run still at a chosen point, so a test can signal, SIGKILL or change
its disk there instead of racing a fast loop."""
import os
import time

from absl import logging


def pause_after(step: int, until_file: str | None = None):
  """`capjax.train.loop` hook: after `step` (with every save finished) it waits until a stop
  signal arrives (the loop then saves and stops, or the test kills the process) or, with
  `until_file`, until that file exists (the run then goes on)."""

  def hook(trainer) -> None:
    if trainer.step != step:
      return
    trainer.checkpoints.wait_until_finished()
    logging.warning('Paused after step %d; waiting for a signal.', step)
    while trainer.stop.raised is None and not (until_file and os.path.exists(until_file)):
      time.sleep(0.05)

  return hook


def hold_checkpoint_write(step: int) -> None:
  """Makes orbax stop, for good, inside the write of checkpoint `step`: its arrays are written
  into the temporary folder, which is never renamed. The test then SIGKILLs the process."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held(self):
    if self._final_path.name == str(step):  # pylint: disable=protected-access
      logging.warning('Holding the write of checkpoint %d open.', step)
      while True:
        time.sleep(1)  # Blocks orbax's writer thread, as a slow disk would.
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = held
