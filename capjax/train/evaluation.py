"""Running a jitted evaluation step over a whole data set: the sums every task reports from."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax

from capjax.train import sharding


def batch_sums(eval_fn: Callable, dataset: Iterable[dict], mesh, *, inputs: Sequence[str],
               outputs: Sequence[str]) -> dict[str, float]:
  """Sums `eval_fn(state-bound batch)[name]` over every batch of `dataset`, on the host.

  `eval_fn(batch)` sees only the `inputs` entries of each batch, put on `mesh`; it returns
  per-batch sums (padding rows already weighted out), so the totals are exact whatever the
  batch size. Names in `outputs` start at 0.0 (an empty data set sums to zeros).
  """
  totals = dict.fromkeys(outputs, 0.0)
  for batch in dataset:
    out = jax.device_get(eval_fn(sharding.put_batch({k: batch[k] for k in inputs}, mesh)))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return totals
