"""`python tests/helpers/paused_launch.py [+KEY=VALUE...] ARGS...`: `launch.py ARGS...` with test
hooks (helpers.pause), for tests that kill a run or fill its disk at a chosen point:
  +pause=STEP       pause the loop after STEP until a stop signal (or +until=FILE exists)
  +hold_save=STEP   hold the write of checkpoint STEP open for good

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
from helpers import pause  # noqa: E402

options = dict(a[1:].split('=', 1) for a in sys.argv[1:] if a.startswith('+'))
if 'pause' in options:
  loop.HOOKS.append(pause.pause_after(int(options['pause']), options.get('until')))
if 'hold_save' in options:
  pause.hold_checkpoint_write(int(options['hold_save']))
sys.argv = [os.path.join(ROOT, 'launch.py'), *[a for a in sys.argv[1:] if not a.startswith('+')]]
runpy.run_path(sys.argv[0], run_name='__main__')
