"""The one interface between the runtime and a task, and the registry of tasks.

A task is a module (`capjax/caption/task.py`, `capjax/classify/task.py`) that provides what
`Task` lists; `run.py` (train, eval, predict) and `tools/bench.py` reach a task only through
`get(config.task)`. A new task is a package beside those two with such a module, and one line
in `_MODULES`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol, Sequence

from capjax.errors import UserError

# Task name (config.task) -> the module that implements it; imported on first use, so a
# command only pays for the task it runs.
_MODULES = {'caption': 'capjax.caption.task', 'classify': 'capjax.classify.task'}
NAMES = tuple(_MODULES)


@dataclasses.dataclass(frozen=True)
class Splits:
  """What `load_splits` returns for every task.

  Attributes:
    sources: {split name: random-access source of example dicts}.
    labels: the class names of a classification data set; () where the labels are free text
      (captioning builds its vocabulary from the train split instead).
  """
  sources: Mapping[str, Sequence[dict]]
  labels: tuple[str, ...] = ()


@dataclasses.dataclass
class Trained:
  """A task's model and its train state (None until training has run); each task adds what
  running the model needs (a vocabulary, class names and statistics...)."""
  model: Any
  state: Any = None


class Task(Protocol):
  """What a task module provides (a module satisfies this structurally)."""

  NAME: str
  CURVES: tuple[str, ...]  # metrics.jsonl names drawn in the workdir's curves.png.
  BENCH: Mapping[str, Callable]  # Peer-benchmark name -> builder (see tools/bench.py).

  def validate(self, config) -> None:
    """Raises UserError naming the first config field that cannot work."""

  def check_start(self, config, workdir: str) -> None:
    """Raises UserError, before anything is read or written, when training cannot start or
    resume in `workdir` with `config` (a file the config names is missing or unusable)."""

  def load_splits(self, config, splits: Sequence[str] | None = None) -> Splits:
    """The prepared data of config.dataset (generated or converted the first time)."""

  def training_job(self, config, workdir: str, splits: Splits) -> tuple[Any, Trained]:
    """(the loop's Job, the task's Trained without a state): what training runs and what
    evaluating its result needs besides the trained state."""

  def run_info(self, config) -> dict:
    """This task's entries of run.json (model label, image size...)."""

  def restore_trained(self, config, workdir: str) -> Trained:
    """The task's Trained (model, state and what inference needs) of the newest readable
    checkpoint in `workdir`."""

  def evaluate(self, config, workdir: str, trained: Trained, splits: Splits) -> dict:
    """Scores config.eval.split, writes eval.json and the figures; returns eval.json."""

  def predict(self, config, workdir: str, paths: Sequence[str]) -> list[dict]:
    """One dict per path, in order: {'path', 'error'} for a file that cannot be read, else
    {'path', ...the prediction}."""

  def describe(self, result: dict) -> str:
    """One readable line for a prediction that has no error."""


def get(name) -> Task:
  """The task module named `name` (config.task)."""
  if name not in _MODULES:
    raise UserError(f'--config.task={name!r} is unknown; use one of {", ".join(NAMES)}.')
  return importlib.import_module(_MODULES[name])
