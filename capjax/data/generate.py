"""Rendering generated examples on every core, in index order."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from typing import Callable, Iterator, TypeVar

from absl import logging

T = TypeVar('T')

# Below this many examples, starting worker processes (each imports numpy and matplotlib,
# about a second) costs more than rendering them here.
MIN_PARALLEL = 2000


def ordered_map(render: Callable[[int], T], count: int,
                workers: int | None = None) -> Iterator[T]:
  """render(0), ..., render(count - 1), computed by worker processes when count is large.

  `render` must be picklable (a module-level function or a functools.partial of one) and
  deterministic in its index, so the result is the same however many workers run it.
  Workers are spawned, not forked: the parent has JAX's threads running, and a fork copies
  their locks mid-use. A spawned worker re-imports the main script, so without one on disk
  (`python -`), or when the workers cannot start, everything is rendered here instead.
  """
  workers = workers or min(os.cpu_count() or 1, 8)
  main_file = getattr(sys.modules.get('__main__'), '__file__', None)
  if count < MIN_PARALLEL or workers < 2 or (main_file and not os.path.isfile(main_file)):
    yield from map(render, range(count))
    return
  context = multiprocessing.get_context('spawn')
  done = 0
  try:
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      for result in pool.map(render, range(count), chunksize=200):
        yield result
        done += 1
  except concurrent.futures.process.BrokenProcessPool:
    logging.warning('Worker processes failed to start (is the main script guarded by '
                    "`if __name__ == '__main__'`?); rendering in this process.")
    yield from map(render, range(done, count))
