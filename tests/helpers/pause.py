"""A loop hook that holds a run still at a step, so a test can signal or SIGKILL it there
instead of racing a fast loop."""
import time

from absl import logging


def pause_after(step: int):
  """`capjax.train.loop` hook: after `step` (with every save finished) it waits until a stop
  signal arrives; the loop then saves and stops, or the test kills the process."""

  def hook(trainer) -> None:
    if trainer.step != step:
      return
    trainer.checkpoints.wait_until_finished()
    logging.warning('Paused after step %d; waiting for a signal.', step)
    while trainer.stop.raised is None:
      time.sleep(0.05)

  return hook
