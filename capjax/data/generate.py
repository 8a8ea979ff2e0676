"""What the generated data sets' TFDS builders share: their config, preparing one, and
rendering examples on every core in index order."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
from typing import Callable, Iterator, TypeVar

import tensorflow_datasets as tfds
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


@dataclasses.dataclass
class GeneratedConfig(tfds.core.BuilderConfig):
  """Everything a generated data set's contents depend on (the renderer aside)."""
  image_size: int = 64
  num_train: int = 0
  num_validation: int = 0
  num_test: int = 0
  seed: int = 0


def generated_config(image_size: int, num_train: int, num_validation: int, num_test: int,
                     seed: int) -> GeneratedConfig:
  """A config whose name encodes every parameter, so each variant is cached apart."""
  name = f'{image_size}px_{num_train}-{num_validation}-{num_test}_seed{seed}'
  return GeneratedConfig(name=name, image_size=image_size, num_train=num_train,
                         num_validation=num_validation, num_test=num_test, seed=seed)


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder], data_dir: str | None,
            download_config: tfds.download.DownloadConfig | None = None, **params):
  """Generates `builder_cls`'s data set for `params` (generated_config's arguments) once, into
  `data_dir` (TFDS default when None); a no-op when it is already on disk."""
  config = generated_config(**params)
  if config.name in builder_cls.builder_configs:  # TFDS wants registered ones by name.
    config = config.name
  builder = builder_cls(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=download_config)
  return builder
