"""What sits beside the tasks: step benchmarks (bench), FLOP counting (flops), comparison of
finished runs (compare: `python -m capjax.tools.compare`) and the figures (plots).
"""
