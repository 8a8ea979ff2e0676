"""A train step sharded over 4 host devices equals the same step on 1 device."""
import os
import subprocess
import sys
import textwrap

from helpers import runs as rh

SCRIPT = textwrap.dedent('''
    import functools
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update('jax_numpy_rank_promotion', 'raise')
    from capjax.models import cnn, decoder
    from capjax.models.captioner import Captioner
    from capjax.train import sharding, state as state_lib
    from capjax.caption import steps

    assert len(jax.devices()) == 4, jax.devices()
    model = Captioner(cnn.CaptionEncoderTiny(), decoder.InjectDecoder(13, 8, 16))
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8),
             'tokens': rng.integers(1, 13, (8, 10)).astype(np.int32)}

    def run(devices):
      mesh = sharding.make_mesh(devices)
      state = state_lib.create(model, optax.adamw(1e-2), jax.random.key(0),
                               batch['image'][:1], batch['tokens'][:1],
                               mesh_shardings=sharding.replicated(mesh))
      state_sh = sharding.replicated(mesh)(state)
      step = jax.jit(steps.caption_train_step,
                     in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
                     out_shardings=(state_sh, None), donate_argnums=0)
      for _ in range(2):
        state, metrics = step(state, sharding.put_batch(batch, mesh), jax.random.key(1))
      assert len(state.params['decoder']['out']['kernel'].sharding.device_set) == len(devices)
      return jax.device_get((state.params, metrics))

    p4, m4 = run(jax.devices())
    p1, m1 = run(jax.devices()[:1])
    np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)
    print('SHARDED_OK', float(m4['loss']))
''')


def test_four_device_data_parallel_step_equals_one_device_step():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600,
                       cwd=rh.ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SHARDED_OK' in out.stdout
