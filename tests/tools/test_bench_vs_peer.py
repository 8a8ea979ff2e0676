"""scripts/bench_vs_peer.py's table: per-round ratios, medians and the MFU range."""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    'bench_vs_peer', os.path.join(HERE, '..', '..', 'scripts', 'bench_vs_peer.py'))
bench_vs_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_vs_peer)


def _rows(task, ours, peers, mfus):
  return [(i + 1, task, {'examples_per_s': o, 'mfu': m}, {'examples_per_s': p})
          for i, (o, p, m) in enumerate(zip(ours, peers, mfus))]


def test_table_gives_each_rounds_ratio_and_the_medians():
  rows = (_rows('classify', [60.0, 70.0, 66.0], [66.0, 70.0, 60.0], [0.4, 0.5, 0.45])
          + _rows('greedy', [700.0, 600.0, 650.0], [500.0, 500.0, 500.0], [None, None, None]))
  lines = bench_vs_peer.table(rows, ['classify', 'greedy']).splitlines()
  assert lines[0].startswith('| task |') and len(lines) == 4
  # capjax median 66, peer median 66; ratios 60/66, 70/70, 66/60 -> median 1.00.
  assert lines[2] == '| classify | 66.0 | 66.0 | 0.91, 1.00, 1.10; **1.00** | 0.40-0.50 |'
  assert lines[3] == '| greedy | 650.0 | 500.0 | 1.40, 1.20, 1.30; **1.30** | - |'
