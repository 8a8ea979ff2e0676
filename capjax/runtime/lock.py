"""One training run per workdir: an exclusive `flock` on WORKDIR/train.lock for the run's life.

The kernel drops a flock when its holder dies however it dies (SIGKILL included), so a lock
can never outlive its process on one machine; the holder's host, pid and start time are written
into the file so that a second run can name it, and a run that finds a previous holder's line
but takes the lock knows that holder died without releasing it. The file itself is never
deleted: removing it while another process waits on it would let two runs lock two different
files of the same name.

flock is local to one machine on most network file systems (NFS locks it only on the client);
two hosts training into one shared workdir are not excluded by it.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Optional

from absl import logging

from capjax.errors import UserError

LOCK_FILE = 'train.lock'


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
          f"{holder.get('since', '?')}")


def _read_holder(fd: int) -> Optional[dict]:
  """The holder line in the lock file, or None when there is none (or it is unreadable)."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors='replace').strip()
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None


def _write_holder(fd: int, holder: Optional[dict]) -> None:
  os.ftruncate(fd, 0)
  if holder is not None:
    os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
  os.fsync(fd)


def acquire(workdir: str) -> int:
  """Locks `workdir` for this process (creating the folder); returns the lock's descriptor.

  Raises:
    UserError: another live process holds the lock, or the workdir cannot be written.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f'--workdir={workdir} cannot be written ({e.strerror or e}: '
                    f'{e.filename or path}); pick a folder you can write to.') from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd) or {}
    os.close(fd)
    raise UserError(f'--workdir={workdir} is in use by another training run ({_describe(holder)}); '
                    f'wait for it to end or stop it, or train into another --workdir '
                    f'(--mode=eval and --mode=predict work while it runs).') from None
  previous = _read_holder(fd)
  if previous is not None:
    logging.warning('Took over the lock of %s from a run that ended without releasing it (%s).',
                    workdir, _describe(previous))
  _write_holder(fd, {'host': socket.gethostname(), 'pid': os.getpid(),
                     'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')})
  return fd


def release(fd: int) -> None:
  """Clears the holder line (a clean end, not a dead holder) and unlocks."""
  try:
    _write_holder(fd, None)
  except OSError:  # A full disk cannot stop the unlock below; the next run then warns.
    pass
  finally:
    os.close(fd)  # Closing the last descriptor drops the flock.


@contextlib.contextmanager
def held(workdir: str):
  """Holds the workdir's lock for the block: process 0 takes it (it writes the checkpoints and
  metrics), and every process stops if it could not. A workdir this call created is removed
  again if the block fails while it holds nothing but the lock file (a wrong data path then
  leaves no trace)."""
  from capjax.runtime import distributed  # pylint: disable=import-outside-toplevel
  created = not os.path.exists(workdir)
  fd, error = None, None
  if distributed.is_main():
    try:
      fd = acquire(workdir)
    except UserError as e:
      error = e
  if distributed.any_process(error is not None):
    raise error or UserError(f'--workdir={workdir} could not be locked by process 0 (its '
                             f'error line says why).')
  failed = True
  try:
    yield
    failed = False
  finally:
    if fd is not None:
      release(fd)
      if failed and created and os.listdir(workdir) == [LOCK_FILE]:
        os.remove(os.path.join(workdir, LOCK_FILE))
        os.rmdir(workdir)
