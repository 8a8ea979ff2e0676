"""glibc malloc settings that stop XLA:CPU from page-faulting through every large buffer.

XLA:CPU takes each output and temporary buffer from malloc on its worker threads. For a large
request glibc gives a worker thread a fresh mmap() and frees it with munmap(). The next step
then touches every page again for the first time: one page fault per 4 KB written. On the
2-core CPU this project is measured on, an elementwise op over 64 MB took 50 ms (2.6 GB/s), and
16,384 faults a call. Three settings keep freed memory in the heap for the next step:
  * one arena, so worker threads share the main heap;
  * no mmap;
  * no trimming.
With them (2026-12-02, jax 0.10.2), SimpleCNN's train step at batch 128 took 43k page faults a
step instead of 175k, and the caption benchmark's step 0-5k instead of 27k. SimpleCNN's step
went from 0.92x the PyTorch peer's speed to 1.07x (medians of three alternating rounds each).

The cost is that the process keeps its peak heap until it exits, as GPU allocators do.
"""
from __future__ import annotations

import ctypes
import os
import sys

# (mallopt parameter, value, the environment variable that sets it at glibc's start-up).
# M_TRIM_THRESHOLD's largest value is INT_MAX, since mallopt takes an int.
_SETTINGS = ((-8, 1, 'MALLOC_ARENA_MAX'),                 # M_ARENA_MAX
             (-4, 0, 'MALLOC_MMAP_MAX_'),                 # M_MMAP_MAX
             (-1, 2 ** 31 - 1, 'MALLOC_TRIM_THRESHOLD_'))  # M_TRIM_THRESHOLD


def settings_to_apply(environ) -> list[tuple[int, int]]:
  """The (parameter, value) pairs whose environment variable the user has not set."""
  return [(param, value) for param, value, name in _SETTINGS if name not in environ]


def retain_freed_memory() -> bool:
  """Applies the settings through glibc's mallopt; True if glibc accepted them all.

  Call before JAX starts its backend: threads that already have their own arena keep it. A
  setting the user gives in the environment stays as the user set it. Elsewhere than Linux,
  or with a C library that has no mallopt, it does nothing.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  results = [mallopt(param, value) for param, value in settings_to_apply(os.environ)]
  return all(r == 1 for r in results)
