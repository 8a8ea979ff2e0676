"""Transparent huge pages for glibc's malloc, so XLA:CPU stops page-faulting through its buffers.

XLA:CPU takes every output and temporary buffer from malloc. glibc serves a large request with a
fresh mmap() and returns it with munmap() when it is freed, so the next step touches every page
for the first time again: one page fault per 4 KB written. glibc's tunable `glibc.malloc.hugetlb=1`
(glibc 2.35 and later) asks the kernel for transparent huge pages on the memory malloc maps, so a
fault covers 2 MB. Measured on the 2-core CPU this project is benchmarked on (2026-12-02, jax
0.10.2, THP mode `madvise`):
  * `x * 2 + 1` over 64 MB: 16,385 faults and 33 ms a call without it, 544 and 11.5 ms with it;
  * SimpleCNN's train step at batch 128: 175k faults and 2.50 s without, 680 and 2.14 s with;
  * the LSTM caption step: 26k faults and 436 ms without, 96 and 366 ms with
(the step times are medians of three processes each). Median peak RSS grew by 11 MB (SimpleCNN,
1.17 GB) and 34 MB (caption, 0.70 GB).

glibc reads tunables only as a process starts, hence `restart_with_huge_pages`, which launch.py
calls first thing. Tried before this and dropped: mallopt settings that keep freed memory in the
heap (one arena, no mmap, no trimming). They were about as fast (2.01 s and 415 ms in the same
rounds), but the heap fragmented: the SimpleCNN benchmark's peak RSS went from 1.16 GB to
1.8-4.6 GB, and a 32 MB buffer still faulted on every call for stretches of 5-10 calls in some
processes.
"""
from __future__ import annotations

import os
import sys

from capjax.runtime import machine

_TUNABLE = 'glibc.malloc.hugetlb'
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def glibc_version() -> tuple[int, ...] | None:
  """(2, 36) for glibc 2.36; None for another C library or operating system."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    return tuple(int(part) for part in version.split('.')[:2]) if name == 'glibc' else None
  except (AttributeError, OSError, TypeError, ValueError):
    return None


def selected_mode(sysfs_text: str) -> str | None:
  """The bracketed choice in a sysfs file such as 'always [madvise] never'."""
  chosen = [word[1:-1] for word in sysfs_text.split() if word.startswith('[')]
  return chosen[0] if chosen else None


def transparent_huge_page_mode() -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'); None where there is no such file."""
  try:
    with open(_THP_ENABLED) as f:
      return selected_mode(f.read())
  except OSError:
    return None


def huge_page_environment(environ, glibc: tuple[int, ...] | None,
                          thp_mode: str | None) -> dict[str, str] | None:
  """The environment to restart with, or None when a restart would change nothing.

  Only THP mode `madvise` needs the tunable (`always` gives huge pages anyway, `never` none at
  all). A `glibc.malloc.hugetlb` the user already put in GLIBC_TUNABLES stays as they set it, and
  it also marks a process that has restarted once.
  """
  if glibc is None or glibc < (2, 35) or thp_mode != 'madvise':
    return None
  tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  if any(t.split('=')[0] == _TUNABLE for t in tunables):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join([*tunables, f'{_TUNABLE}=1'])}


def restart_with_huge_pages() -> None:
  """Re-executes this Python program, with its arguments, under `glibc.malloc.hugetlb=1`.

  Returns without doing anything where that would change nothing (see huge_page_environment),
  and where JAX is going to run on a GPU or TPU: there XLA's big buffers live on the device.
  Call it first in a program's main module: nothing done before it survives the restart.
  """
  if machine.this_platform() != 'cpu':
    return
  env = huge_page_environment(os.environ, glibc_version(), transparent_huge_page_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
