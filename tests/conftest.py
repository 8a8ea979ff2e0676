"""Test-wide settings: strict numpy semantics, so shape bugs fail loudly, and one persistent
compilation cache, so the many tiny runs (and their subprocesses) compile each program once."""
import os
import tempfile

# Set before jax is imported so subprocesses started by tests inherit it too.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'capjax_test_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
from capjax.runtime import xla_flags  # pylint: disable=wrong-import-position

xla_flags.apply()  # Tests run under the settings launch.py uses.

import jax  # pylint: disable=wrong-import-position

jax.config.update('jax_numpy_rank_promotion', 'raise')
