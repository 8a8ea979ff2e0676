"""`python tests/helpers/paused_launch.py STEP ARGS...`: `launch.py ARGS...` with the training
loop paused after step STEP (helpers.pause), for tests that kill a run at a chosen step.

launch.py first restarts itself once (huge pages) with the interpreter's original arguments.
This script makes that restart itself, before anything else, so the restarted process runs
this script again and installs the hook in the process that trains; launch.py's own restart
then finds nothing left to do, as in a process that has restarted once.
"""
import os
import runpy
import sys

HELPERS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HELPERS))
sys.path[:0] = [ROOT, os.path.dirname(HELPERS)]

# pylint: disable=wrong-import-position
from capjax.runtime import host_memory  # noqa: E402  Light: no JAX imported before restarting.

host_memory.restart_with_huge_pages()

from capjax.train import loop  # noqa: E402
from helpers.pause import pause_after  # noqa: E402

loop.HOOKS.append(pause_after(int(sys.argv[1])))
sys.argv = [os.path.join(ROOT, 'launch.py'), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name='__main__')
