"""Checks capjax's Keras-layout backbones and .h5 loader against Keras itself (not run by pytest).

Keras and capjax live in different virtualenvs, so this runs in steps that share a folder
($CAPJAX_KERAS_CHECK_DIR, default /tmp/capjax_keras_check, ~450 MB):

  python3.11 -m venv /tmp/kerasenv && /tmp/kerasenv/bin/pip install tensorflow-cpu h5py
  /tmp/kerasenv/bin/python tests/scripts/keras_reference_check.py keras    # Keras: weights, inputs, outputs
  .venv/bin/python         tests/scripts/keras_reference_check.py jax      # capjax: load, run, compare
  .venv/bin/python         tests/scripts/keras_reference_check.py jax64    # the same in float64
  /tmp/kerasenv/bin/python tests/scripts/keras_reference_check.py readback # Keras reads capjax's .h5

Step `keras` builds keras.applications.ResNet50 / Xception (include_top=False, weights=None),
randomises every weight (BatchNorm statistics included, so a swapped gamma/moving_variance would
show), saves them with Keras's own legacy .h5 writer, and records outputs for random uint8 images
(after Keras's own preprocess_input) in inference and training mode. For Xception it also writes
the weights under the Keras-1 auto names that Keras's real ImageNet file uses ('convolution2d_1',
'batchnormalization_1_running_std:0', ...) and checks that Keras loads that file by position.
Step `jax` loads both files with capjax, runs the same preprocessed input as Keras, and reports
max |capjax - keras| (and how far capjax's preprocessing of the uint8 images is from Keras's); it
then writes the weights back with `save_keras_h5`. Step `jax64` repeats the comparison in float64
on both sides, where rounding cannot hide a layout error. Step `readback` checks that Keras loads
capjax's file to the same weights and outputs.

Measured (Keras 3.15.1, TF 2.21 CPU; jax 0.10.2 CPU; batch 2): ResNet50 at 224x224: float32
8.4e-4 (outputs up to 13; Keras's own float32 result is 9.1e-4 from its float64 one), float64
1.3e-12. Xception at 299x299: float32 6.7e-5, float64 1.1e-13. Random weights make a chaotic
network in which float32 rounding grows ~2x every two blocks; trained weights are much tamer.
"""
import os
import sys

import numpy as np

OUT = os.environ.get('CAPJAX_KERAS_CHECK_DIR', '/tmp/capjax_keras_check')
SIZES = {'resnet50': 224, 'xception': 299}
BATCH = 2


def _keras_model(arch):
  import keras
  build = {'resnet50': keras.applications.ResNet50, 'xception': keras.applications.Xception}[arch]
  return build(include_top=False, weights=None, input_shape=(SIZES[arch], SIZES[arch], 3))


def _keras_preprocess(arch, images):
  import keras
  mod = {'resnet50': keras.applications.resnet, 'xception': keras.applications.xception}[arch]
  return mod.preprocess_input(images.astype(np.float32))


def _randomise(model, rng, calibration_images):
  """Random values for every weight, BatchNorm statistics included.

  Random statistics alone let activations grow to ~1e3 through ResNet50's 16 blocks, where float32
  rounding alone exceeds 1e-4. So the statistics are first set to those of a calibration batch
  (one training-mode pass with momentum 0), then perturbed: activations stay O(1) and no BatchNorm
  is an exact normaliser. Variances are floored because channels that ReLU leaves (almost) dead
  get a variance near 0, and dividing by sqrt(eps) amplifies float32 rounding ~300-fold, in
  Keras as much as in capjax (trained weights rarely do this).
  """
  norms = [layer for layer in model.layers if type(layer).__name__ == 'BatchNormalization']
  for layer in model.layers:
    for w in layer.weights:
      shape, kind = tuple(w.shape), w.path.split('/')[-1]
      if kind in ('kernel', 'depthwise_kernel', 'pointwise_kernel'):
        fan_in = int(np.prod(shape[:-1])) if kind != 'depthwise_kernel' else shape[0] * shape[1]
        value = rng.normal(0, np.sqrt(1.0 / fan_in), shape)
      elif kind == 'gamma':
        value = rng.uniform(0.5, 1.5, shape)
      else:  # bias, beta; BatchNorm statistics are overwritten below
        value = rng.normal(0, 0.1, shape)
      w.assign(value.astype(np.float32))
  for layer in norms:
    layer.momentum = 0.0
  model(calibration_images, training=True)
  for layer in norms:
    layer.momentum = 0.99
    var = np.maximum(np.asarray(layer.moving_variance), 0.01)
    layer.moving_mean.assign(np.asarray(layer.moving_mean)
                             + rng.normal(0, 0.1, var.shape) * np.sqrt(var))
    layer.moving_variance.assign(var * rng.uniform(0.8, 1.25, var.shape))


def _keras1_rename(src, dst):
  """Copies a legacy .h5 file under Keras-1 auto names, as in Keras's real Xception file."""
  import h5py
  kinds = {'Conv2D': ('convolution2d', {'kernel': 'W'}),
           'SeparableConv2D': ('separableconvolution2d', {}),
           'BatchNormalization': ('batchnormalization', {'moving_mean': 'running_mean',
                                                         'moving_variance': 'running_std'})}
  counts = {}
  with h5py.File(src, 'r') as f, h5py.File(dst, 'w') as g:
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
    names = [text(n) for n in f.attrs['layer_names']]
    new_names = []
    for n in names:
      weight_names = [text(w) for w in f[n].attrs['weight_names']]
      if not weight_names:
        new_names.append(n)
        g.create_group(n).attrs['weight_names'] = np.array([], dtype='S1')
        continue
      roles = [w.split('/')[-1] for w in weight_names]
      cls = ('SeparableConv2D' if 'depthwise_kernel' in roles else
             'BatchNormalization' if 'gamma' in roles else 'Conv2D')
      prefix, renames = kinds[cls]
      counts[prefix] = counts.get(prefix, 0) + 1
      new = f'{prefix}_{counts[prefix]}'
      new_names.append(new)
      group = g.create_group(new)
      new_weights = [f'{new}_{renames.get(r, r)}:0' for r in roles]
      group.attrs['weight_names'] = np.array([w.encode() for w in new_weights])
      for old, w in zip(weight_names, new_weights):
        group.create_dataset(w, data=np.asarray(f[n][old]))
    g.attrs['layer_names'] = np.array([n.encode() for n in new_names])


def step_keras():
  import h5py
  import keras
  from keras.src.legacy.saving import legacy_h5_format as legacy
  os.makedirs(OUT, exist_ok=True)
  rng = np.random.default_rng(0)
  for arch, size in SIZES.items():
    model = _keras_model(arch)
    calibration = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    _randomise(model, rng, _keras_preprocess(arch, calibration))
    path = f'{OUT}/{arch}_keras.h5'
    with h5py.File(path, 'w') as f:
      legacy.save_weights_to_hdf5_group(f, model)
    images = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    x = _keras_preprocess(arch, images)
    out = np.asarray(model(x, training=False))
    weights = [np.asarray(w) for w in model.weights]
    out_train = np.asarray(model(x, training=True))  # also moves the BatchNorm statistics
    stats = {w.path: np.asarray(w) for w in model.weights if 'moving' in w.path}
    # Both: layers take their dtype from the policy (fixed at first use), Input from floatx.
    keras.config.set_floatx('float64')
    keras.config.set_dtype_policy('float64')
    model64 = _keras_model(arch)
    keras.config.set_floatx('float32')
    keras.config.set_dtype_policy('float32')
    with h5py.File(path, 'r') as f:
      legacy.load_weights_from_hdf5_group(f, model64)
    out64 = np.asarray(model64(x.astype(np.float64), training=False))
    np.savez(f'{OUT}/{arch}_ref.npz', images=images, x=x, out=out, out64=out64, out_train=out_train,
             **{f'stat:{k}': v for k, v in stats.items()})
    print(f'{arch}: keras {keras.__version__}, input {size}x{size}, output {out.shape}, '
          f'max |output| {np.abs(out).max():.3g}, Keras float32 vs float64: '
          f'{np.abs(out - out64).max():.3g}')
    if arch == 'xception':
      k1 = f'{OUT}/xception_keras1names.h5'
      _keras1_rename(path, k1)
      fresh = _keras_model(arch)
      with h5py.File(k1, 'r') as f:
        legacy.load_weights_from_hdf5_group(f, fresh)
      same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(weights, fresh.weights))
      print(f'xception: Keras loads the Keras-1-named copy to identical weights: {same}')


def step_jax(precision='float32'):
  """Loads Keras's files with capjax and compares outputs on the same float input as Keras.

  In float64 (both sides, float32-exact weights and inputs) any difference is a layout error, not
  rounding. The preprocessing functions are compared separately, from the same uint8 images.
  """
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
  import jax
  jax.config.update('jax_default_matmul_precision', 'highest')
  jax.config.update('jax_enable_x64', precision == 'float64')
  import jax.numpy as jnp
  from capjax.models import keras_weights, resnet, xception
  dtype = jnp.dtype(precision)
  models = {'resnet50': (resnet.ResNet50(dtype=dtype), resnet.preprocess_caffe),
            'xception': (xception.Xception(dtype=dtype), xception.preprocess_tf)}
  for arch, (model, preprocess) in models.items():
    ref = np.load(f'{OUT}/{arch}_ref.npz')
    variables = keras_weights.load_keras_h5(f'{OUT}/{arch}_keras.h5', arch)
    pre_diff = np.abs(np.asarray(preprocess(jnp.asarray(ref['images']))) - ref['x']).max()
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)  # float32-exact values
    x = jnp.asarray(ref['x'], dtype)
    out = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))
    keras_out = ref['out'] if precision == 'float32' else ref['out64']
    print(f'{arch} ({SIZES[arch]}x{SIZES[arch]}, batch {BATCH}, {precision}): '
          f'max |capjax - keras| = {np.abs(out - keras_out).max():.3g} '
          f'(max |keras| {np.abs(keras_out).max():.3g}); preprocessing {pre_diff:.3g}')
    if precision == 'float64':
      continue
    out_train, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
    stat_diff = 0.0
    for key in (k for k in ref.files if k.startswith('stat:')):
      layer, role = key[5:].split('/')
      flax_value = updates['batch_stats'][layer]['mean' if role == 'moving_mean' else 'var']
      stat_diff = max(stat_diff, float(np.abs(np.asarray(flax_value) - ref[key]).max()))
    print(f'  float32 rounding for scale: max |capjax f32 - keras f64| = '
          f'{np.abs(out - ref["out64"]).max():.3g}, max |keras f32 - keras f64| = '
          f'{np.abs(ref["out"] - ref["out64"]).max():.3g}')
    print(f'  train mode: max |capjax - keras| = '
          f'{np.abs(np.asarray(out_train) - ref["out_train"]).max():.3g}; '
          f'updated BatchNorm statistics {stat_diff:.3g}')
    if arch == 'xception':
      k1 = keras_weights.load_keras_h5(f'{OUT}/xception_keras1names.h5', arch)
      same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), k1, variables))
      print(f'  capjax loads the Keras-1-named copy to identical variables: {same}')
    keras_weights.save_keras_h5(variables, f'{OUT}/{arch}_capjax.h5', arch)


def step_readback():
  import h5py
  from keras.src.legacy.saving import legacy_h5_format as legacy
  for arch in SIZES:
    ref = np.load(f'{OUT}/{arch}_ref.npz')
    original, model = _keras_model(arch), _keras_model(arch)
    with h5py.File(f'{OUT}/{arch}_keras.h5', 'r') as f:
      legacy.load_weights_from_hdf5_group(f, original)
    with h5py.File(f'{OUT}/{arch}_capjax.h5', 'r') as f:
      legacy.load_weights_from_hdf5_group(f, model)
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(original.weights, model.weights))
    out = np.asarray(model(_keras_preprocess(arch, ref['images']), training=False))
    print(f'{arch}: Keras loads capjax\'s .h5 to identical weights: {same}; '
          f'max |output - reference| = {np.abs(out - ref["out"]).max():.3g}')


if __name__ == '__main__':
  steps = {'keras': step_keras, 'jax': step_jax, 'jax64': lambda: step_jax('float64'),
           'readback': step_readback}
  if len(sys.argv) != 2 or sys.argv[1] not in steps:
    sys.exit(f'usage: {sys.argv[0]} {{{",".join(steps)}}}')
  steps[sys.argv[1]]()
