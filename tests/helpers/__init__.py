"""What the tests share: generated data-set layouts (layouts), starting and inspecting runs
(runs), and the loop hook that pauses a run for a test (pause, paused_launch.py)."""
