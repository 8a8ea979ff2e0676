"""Throughput benchmarks at the PyTorch peer's shapes (../shared/bench/README.md).

  python launch.py --config=configs/bench.py:task=classify --mode=bench
  task= classify | caption | encode | greedy | all (or a+b)

Any task config is benchmarked the same way (its real train step and input pipeline):
  python launch.py --config=configs/caption.py --mode=bench
"""
import ml_collections

from capjax.configlib import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, task='all', conv='layers', batch_size=0)
  c = ml_collections.ConfigDict()
  c.task = 'bench'
  c.seed = 0
  c.bench = ml_collections.ConfigDict(dict(
      task=arg.task,
      conv=arg.conv,            # 'layers' (capjax.models.layers.Conv) or 'flax' (nn.Conv).
      batch_size=arg.batch_size,  # 0: the peer's batch for the task.
      steps=10, warmup=3, dtype='float32', pipeline_batches=50,
      peak_flops=0.0))          # 0: measure (CPU: best f32 GEMM via XLA or numpy; see tools/bench.py).
  return c
