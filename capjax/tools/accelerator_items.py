"""What capjax.tools.accelerator_check runs: its benchmark and training items, sized for the
device (see docs/accelerators.md)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

DTYPES = ('float32', 'bfloat16')
SHORT_DTYPE = {'float32': 'f32', 'bfloat16': 'bf16'}
QUICK_BATCH = 2  # --quick: every benchmark at this batch (compiling dominates on a CPU).
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class BenchItem:
  """One peer benchmark at one dtype and batch.

  batch_size: the batch, or 0 for the peer's own (each task's builder knows it).
  batch_scale: > 0 for a device-sized batch: this many times the peer's batch, which the same
    task's peer-batch item reports when it runs (so the peer shapes live in one place only).
  """
  task: str
  dtype: str
  batch_label: str  # 'peer', 'device' or 'quick'.
  steps: int
  warmup: int
  batch_size: int = 0
  batch_scale: int = 0

  @property
  def name(self) -> str:
    return f'{self.task}_{SHORT_DTYPE.get(self.dtype, self.dtype)}_{self.batch_label}'


@dataclasses.dataclass(frozen=True)
class TrainItem:
  """One training + evaluation run of launch.py in its own workdir under --out."""
  name: str
  task: str
  config: str  # configs/<task>.py[:args], relative to the checkout.
  overrides: tuple[str, ...]  # --config.x=y flags.
  timeout_s: float


def device_batch_scale(platform: str, memory_bytes: int | None) -> int:
  """How many times the peer's batch a device-sized benchmark runs at.

  The peer's batches (32-256) fill a CPU already, so there the device batch is the peer's and
  the check runs one batch. An accelerator's throughput keeps growing with the batch until its
  memory or compute is full; the largest peer item at 8x (ResNet50 inference on 256 images of
  224 px, a few GB) fits a 64 GB device with room for XLA's temporaries, 4x a 16 GB one. A
  device that does not report its memory gets 4x.
  """
  if platform == 'cpu':
    return 1
  if memory_bytes is None:
    return 4
  if memory_bytes >= 64 * GIB:
    return 8
  if memory_bytes >= 16 * GIB:
    return 4
  return 2


def bench_items(quick: bool, platform: str, memory_bytes: int | None,
                tasks: Sequence[str] = ('classify', 'caption', 'encode', 'greedy')
                ) -> list[BenchItem]:
  """The benchmark items, float32 first: per task its peer batch, then its device batch
  (where that differs); --quick: every task at QUICK_BATCH for 2 timed steps."""
  if quick:
    return [BenchItem(t, d, 'quick', steps=2, warmup=1, batch_size=QUICK_BATCH)
            for d in DTYPES for t in tasks]
  # A CPU step takes 0.05-3 s, an accelerator's milliseconds: more steps there for a stable
  # median in about the same time.
  steps, warmup = (10, 3) if platform == 'cpu' else (20, 5)
  scale = device_batch_scale(platform, memory_bytes)
  items = []
  for dtype in DTYPES:
    for task in tasks:
      items.append(BenchItem(task, dtype, 'peer', steps, warmup))
      if scale > 1:
        items.append(BenchItem(task, dtype, 'device', steps, warmup, batch_scale=scale))
  return items


def _schedule(steps: int, log_every: int) -> tuple[str, ...]:
  """launch.py flags for a run of `steps` steps: progress lines every `log_every` steps (the
  steady steps/s is read from them), one checkpoint at the end, no validation passes (the
  test split is evaluated once training ends)."""
  return (f'--config.train.steps={steps}', f'--config.train.log_every={log_every}',
          f'--config.train.checkpoint_every={steps}', '--config.train.eval_every=0')


def train_items(quick: bool) -> list[TrainItem]:
  """A short captioning and a short classification run (training + test-split evaluation).

  Full: the shapes defaults (model, optimizer, beam search) for a few hundred steps, on
  6,000 generated training images rather than 20,000/15,000 (generating those takes about a
  minute of CPU each). --quick: the configs' runlocal variants for 6 steps.
  """
  if quick:
    return [
        TrainItem('caption_train', 'caption', 'configs/caption.py:runlocal',
                  _schedule(6, 2) + ('--config.eval.num_samples=2',
                                     '--config.eval.attention_plots=0'), timeout_s=300),
        TrainItem('classify_train', 'classify', 'configs/classify.py:runlocal',
                  _schedule(6, 2), timeout_s=300)]
  return [
      TrainItem('caption_train', 'caption', 'configs/caption.py',
                _schedule(400, 50) + ('--config.shapes.num_train=6000',
                                      '--config.shapes.num_validation=100',
                                      '--config.shapes.num_test=500'), timeout_s=300),
      TrainItem('classify_train', 'classify', 'configs/classify.py',
                _schedule(300, 50) + ('--config.shapes30.num_train=6000',
                                      '--config.shapes30.num_validation=300',
                                      '--config.shapes30.num_test=1500'), timeout_s=300)]
