"""`python tests/helpers/paused_launch.py STEP ARGS...`: `launch.py ARGS...` with the training
loop paused after step STEP (helpers.pause), for tests that kill a run at a chosen step.

launch.py restarts itself once (huge pages) with the interpreter's original arguments, which
run this script again, so the hook is installed in the process that trains.
"""
import os
import runpy
import sys

HELPERS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HELPERS))
sys.path[:0] = [ROOT, os.path.dirname(HELPERS)]

from capjax.train import loop  # noqa: E402  pylint: disable=wrong-import-position
from helpers.pause import pause_after  # noqa: E402  pylint: disable=wrong-import-position

loop.HOOKS.append(pause_after(int(sys.argv[1])))
sys.argv = [os.path.join(ROOT, 'launch.py'), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name='__main__')
