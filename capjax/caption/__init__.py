"""Captioning: CNN encoder -> LSTM decoder. `task.py` is the task's side of
`capjax.tasks.Task`; data.py (splits, vocabulary, what each split feeds the model), pipeline.py
(grain), steps.py (pure train/eval steps), decoding.py (greedy/beam), evaluate.py, predict.py,
config.py (the config's rules) and bench.py (peer benchmarks) are its parts.
"""
