"""What every task's input pipeline shares: each process's share of a batch, the
checkpointable grain iterator, and reading a whole random-access source."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import grain
import jax

from capjax.data.images import load_image
from capjax.data.reading import DataError
from capjax.errors import UserError


def text(x) -> str:
  """A TFDS text feature (bytes) or a plain string, as str."""
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def local_batch_size(batch_size: int) -> int:
  """This process's share of a global batch (each process loads only its own rows)."""
  if batch_size % jax.process_count():
    raise UserError(f'--config.train.batch_size={batch_size} must be divisible by the '
                    f'number of processes ({jax.process_count()}).')
  return batch_size // jax.process_count()


def iterate(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 4):
  """A checkpointable iterator that prepares batches on background threads."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def read_all(source: Sequence[dict], field: Callable[[int, dict], object],
             chunk: int = 512) -> Iterator:
  """`field(index, example)` for every example of `source` in order, read in chunks
  (`__getitems__` when the source has it: one array_record read per chunk)."""
  get_many = getattr(source, '__getitems__', None)
  for start in range(0, len(source), chunk):
    idx = list(range(start, min(start + chunk, len(source))))
    examples = get_many(idx) if get_many else [source[i] for i in idx]
    yield from (field(i, e) for i, e in zip(idx, examples))


def load_image_files(paths: Sequence[str], size: int) -> tuple[list[dict], list[tuple]]:
  """Decodes each file at size x size for prediction.

  Returns ([{'path'} or {'path', 'error'}] in `paths` order, [(index into that list, uint8
  image)] for the files that could be read): a bad file costs its own entry only.
  """
  results, ready = [], []
  for path in paths:
    try:
      ready.append((len(results), load_image(path, size=(size, size))))
      results.append({'path': path})
    except DataError as e:
      results.append({'path': path, 'error': str(e)})
  return results, ready
