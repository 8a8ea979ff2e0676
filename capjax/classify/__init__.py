"""Classification. `task.py` is the task's side of `capjax.tasks.Task`; data.py (splits,
classify_meta.json), pipeline.py (grain, augmentation), steps.py (pure train/eval steps),
evaluate.py, predict.py, config.py (the config's rules) and bench.py (peer benchmark) are its
parts.
"""
