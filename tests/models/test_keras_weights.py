"""Keras legacy .h5 weights <-> Flax variables: exact placement, strictness, clear errors, download.

Fixture files are written here in Keras's on-disk layouts by hand-written code that does not use
`save_keras_h5`, so the reader is checked against the layout, not against our own writer.
"""
import io
import hashlib
import urllib.error
import urllib.request

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capjax.data.reading import DataError
from capjax.models import keras_weights, resnet, xception

TINY = resnet.ResNetTiny()
# Keras's weight names per layer kind, in Keras's order, with the Flax variable each one is.
_KERAS_WEIGHTS = {
    'conv': [('kernel', ('params', 'kernel')), ('bias', ('params', 'bias'))],
    'conv_nobias': [('kernel', ('params', 'kernel'))],
    'bn': [('gamma', ('params', 'scale')), ('beta', ('params', 'bias')),
           ('moving_mean', ('batch_stats', 'mean')), ('moving_variance', ('batch_stats', 'var'))],
    'sep': [('depthwise_kernel', ('params', 'depthwise', 'kernel')),
            ('pointwise_kernel', ('params', 'pointwise', 'kernel'))],
}
# The names Keras 1 gave the same weights (Keras's real Xception file uses these).
_KERAS1 = {'conv_nobias': ('convolution2d', ['W']),
           'bn': ('batchnormalization', ['gamma', 'beta', 'running_mean', 'running_std']),
           'sep': ('separableconvolution2d', ['depthwise_kernel', 'pointwise_kernel'])}


def _random_variables(arch, seed=0):
  """Distinct random values for every variable of `arch` (so any misplacement shows)."""
  rng = np.random.default_rng(seed)
  shapes = keras_weights.variable_shapes(arch)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)


def _kind(variables, layer):
  params = variables['params'][layer]
  if layer in variables['batch_stats']:
    return 'bn'
  if 'depthwise' in params:
    return 'sep'
  return 'conv' if 'bias' in params else 'conv_nobias'


def _keras_value(variables, layer, flax_path):
  collection, *keys = flax_path
  value = variables[collection][layer]
  for k in keys:
    value = value[k]
  value = np.asarray(value)
  if keys[0] == 'depthwise':  # Flax (kh, kw, 1, C) -> Keras (kh, kw, C, 1)
    value = np.transpose(value, (0, 1, 3, 2))
  return value


def _bytes(strings):
  """A fixed-length bytes array: how Keras 2 stored name lists in attributes."""
  return np.array([s.encode() if isinstance(s, str) else s for s in strings], dtype='S')


def _text(values):
  return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _write_keras2(path, variables, layers, *, order=None, extra_layers=()):
  """A file in the layout of Keras 2's `save_weights` (and the ResNet50 notop file)."""
  with h5py.File(path, 'w') as f:
    names = list(order or layers)
    for name in names:
      group = f.create_group(name)
      weights = _KERAS_WEIGHTS[_kind(variables, name)]
      group.attrs['weight_names'] = _bytes([f'{name}/{w}:0' for w, _ in weights])
      for w, flax_path in weights:
        group.create_dataset(f'{name}/{w}:0', data=_keras_value(variables, name, flax_path))
    for name in extra_layers:  # weightless layers (input, padding, ReLU) are listed too
      f.create_group(name).attrs['weight_names'] = np.array([], dtype='S1')
    f.attrs['layer_names'] = _bytes(list(extra_layers) + names)
    f.attrs['keras_version'] = b'2.2.4'
    f.attrs['backend'] = b'tensorflow'


def _write_keras1(path, variables, layers):
  """Layers auto-named in creation order, flat 'name_W:0' datasets, as Keras's Xception file."""
  counts = {}
  with h5py.File(path, 'w') as f:
    names = []
    for layer in layers:
      kind = _kind(variables, layer)
      prefix, suffixes = _KERAS1[kind]
      counts[prefix] = counts.get(prefix, 0) + 1
      name = f'{prefix}_{counts[prefix]}'
      names.append(name)
      group = f.create_group(name)
      weight_names = [f'{name}_{s}:0' for s in suffixes]
      group.attrs['weight_names'] = _bytes(weight_names)
      for w, (_, flax_path) in zip(weight_names, _KERAS_WEIGHTS[kind]):
        group.create_dataset(w, data=_keras_value(variables, layer, flax_path))
    f.attrs['layer_names'] = _bytes(names)


def _assert_same(loaded, expected):
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded)[0],
                          jax.tree.leaves(expected)):
    assert a.dtype == jnp.float32, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
  variables = _random_variables(TINY)
  path = tmp_path_factory.mktemp('tiny') / 'tiny.h5'
  _write_keras2(path, variables, resnet.keras_layer_names(TINY.stage_sizes))
  return path, variables


@pytest.mark.parametrize('arch', ['resnet50', 'xception'])
def test_keras2_layout_file_loads_every_weight_into_its_flax_variable(tmp_path, arch):
  variables = _random_variables(arch)
  names = (resnet.keras_layer_names() if arch == 'resnet50' else xception.keras_layer_names())
  path = tmp_path / 'w.h5'
  _write_keras2(path, variables, names, extra_layers=('input_1', 'conv1_pad', 'pool1_pool'))
  _assert_same(keras_weights.load_keras_h5(path, arch), variables)
  # And save_keras_h5 writes what Keras and this loader read: the same file, value for value.
  keras_weights.save_keras_h5(variables, tmp_path / 'ours.h5', arch)
  with h5py.File(path) as theirs, h5py.File(tmp_path / 'ours.h5') as ours:
    assert _text(ours.attrs['layer_names']) == names
    for name in names:
      assert _text(ours[name].attrs['weight_names']) == _text(theirs[name].attrs['weight_names'])
      for w in _text(ours[name].attrs['weight_names']):
        np.testing.assert_array_equal(ours[name][w], theirs[name][w])


def test_xception_file_with_keras1_auto_names_loads_by_position(tmp_path):
  variables = _random_variables('xception', seed=1)
  _write_keras1(tmp_path / 'k1.h5', variables, xception.keras_layer_names())
  _assert_same(keras_weights.load_keras_h5(tmp_path / 'k1.h5', 'xception'), variables)


def test_named_layers_load_by_name_whatever_their_order_in_the_file(tmp_path, tiny_file):
  _, variables = tiny_file
  names = resnet.keras_layer_names(TINY.stage_sizes)
  _write_keras2(tmp_path / 'r.h5', variables, names, order=names[::-1])
  _assert_same(keras_weights.load_keras_h5(tmp_path / 'r.h5', TINY), variables)


def test_whole_model_file_and_chunked_layer_names_are_read(tmp_path, tiny_file):
  path, variables = tiny_file
  whole = tmp_path / 'model.h5'
  with h5py.File(path) as src, h5py.File(whole, 'w') as dst:
    src.copy(src['/'], dst, 'model_weights')
    names = list(dst['model_weights'].attrs['layer_names'])
    del dst['model_weights'].attrs['layer_names']  # as Keras splits attributes over 64 kB
    dst['model_weights'].attrs['layer_names0'] = _bytes(names[:5])
    dst['model_weights'].attrs['layer_names1'] = _bytes(names[5:])
  _assert_same(keras_weights.load_keras_h5(whole, TINY), variables)


def _edit_copy(src, dst, edit):
  with h5py.File(src) as f, h5py.File(dst, 'w') as g:
    for k in f:
      f.copy(f[k], g, k)
    for k, v in f.attrs.items():
      g.attrs[k] = v
    edit(g)


def test_shape_mismatch_raises_one_sentence_naming_file_layer_and_shapes(tmp_path, tiny_file):
  def shrink(g):
    del g['conv2_block1_2_conv/conv2_block1_2_conv/kernel:0']
    g['conv2_block1_2_conv'].create_dataset('conv2_block1_2_conv/kernel:0',
                                            data=np.zeros((3, 3, 8, 4), np.float32))
  _edit_copy(tiny_file[0], tmp_path / 'bad.h5', shrink)
  with pytest.raises(DataError) as e:
    keras_weights.load_keras_h5(tmp_path / 'bad.h5', TINY)
  message = str(e.value)
  for part in ('bad.h5', "'conv2_block1_2_conv'", '(3, 3, 8, 4)', '(3, 3, 8, 8)'):
    assert part in message
  assert '\n' not in message and isinstance(e.value, ValueError)


@pytest.mark.parametrize('edit, words', [
    (lambda g: _drop_layer(g, 'conv5_block1_3_bn'), ['33 layers with weights', 'has 34']),
    (lambda g: _add_dense(g), ['35 layers with weights', 'notop']),
    (lambda g: g['conv1_bn'].attrs.__setitem__(
        'weight_names', _bytes(['conv1_bn/gamma:0', 'conv1_bn/beta:0', 'conv1_bn/moving_mean:0'])),
     ["'conv1_bn' has 3 weights", 'has 4']),
    (lambda g: g['conv1_bn'].attrs.__setitem__(
        'weight_names', _bytes(['conv1_bn/moving_variance:0', 'conv1_bn/beta:0',
                                'conv1_bn/moving_mean:0', 'conv1_bn/gamma:0'])),
     ["'conv1_bn/moving_variance:0'", "'gamma'"]),
    (lambda g: g['conv1_conv'].attrs.__setitem__(
        'weight_names', _bytes(['conv1_conv/kernel:0', 'conv1_conv/missing/bias:0'])),
     ['does not contain it']),
], ids=['missing_layer', 'extra_layer', 'missing_weight', 'reordered_weights', 'absent_dataset'])
def test_files_that_do_not_fit_exactly_are_refused(tmp_path, tiny_file, edit, words):
  _edit_copy(tiny_file[0], tmp_path / 'bad.h5', edit)
  with pytest.raises(DataError) as e:
    keras_weights.load_keras_h5(tmp_path / 'bad.h5', TINY)
  assert all(w in str(e.value) for w in words), str(e.value)


def _drop_layer(g, name):
  del g[name]
  g.attrs['layer_names'] = _bytes([n for n in _text(g.attrs['layer_names']) if n != name])


def _add_dense(g):
  group = g.create_group('predictions')
  group.attrs['weight_names'] = _bytes(['predictions/kernel:0', 'predictions/bias:0'])
  group.create_dataset('predictions/kernel:0', data=np.zeros((256, 10), np.float32))
  group.create_dataset('predictions/bias:0', data=np.zeros((10,), np.float32))
  g.attrs['layer_names'] = _bytes(_text(g.attrs['layer_names']) + ['predictions'])


def test_unreadable_inputs_raise_data_errors(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    keras_weights.load_keras_h5(tmp_path / 'nope.h5', TINY)
  (tmp_path / 'text.h5').write_text('not hdf5')
  with pytest.raises(DataError, match='cannot be read as an HDF5 file'):
    keras_weights.load_keras_h5(tmp_path / 'text.h5', TINY)
  with h5py.File(tmp_path / 'plain.h5', 'w') as f:
    f['x'] = np.zeros(3)
  with pytest.raises(DataError, match='not a Keras .h5 weights file'):
    keras_weights.load_keras_h5(tmp_path / 'plain.h5', TINY)


def test_save_refuses_variables_of_another_model(tmp_path):
  with pytest.raises(ValueError, match='structure and shapes of resnet50'):
    keras_weights.save_keras_h5(_random_variables(TINY), tmp_path / 'x.h5', 'resnet50')


def test_depthwise_kernel_conversion_computes_kerass_depthwise_conv():
  # Keras/TF: out[..., c * M + m] = sum over the window of x[..., c] * k[..., c, m].
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 5, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  expected = np.zeros((1, 3, 3, 6), np.float32)
  for i in range(3):
    for j in range(3):
      window = x[0, i:i + 3, j:j + 3, :]  # (3, 3, C)
      expected[0, i, j] = np.einsum('hwc,hwcm->cm', window, k).reshape(-1)
  flax_k = keras_weights.depthwise_keras_to_flax(k)
  assert flax_k.shape == (3, 3, 1, 6)
  got = jax.lax.conv_general_dilated(x, flax_k, (1, 1), 'VALID', feature_group_count=3,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision='highest')
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(keras_weights.depthwise_flax_to_keras(flax_k, multiplier=2), k)


def _offline(*args, **kwargs):
  raise urllib.error.URLError('no network')


def test_fetch_uses_the_cached_file_without_network(tmp_path, monkeypatch):
  monkeypatch.setattr(urllib.request, 'urlopen', _offline)
  cached = tmp_path / 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'
  cached.write_bytes(b'cached')
  assert keras_weights.fetch_keras_weights('resnet50', tmp_path) == str(cached)


def test_fetch_offline_says_to_download_by_hand_and_leaves_no_file(tmp_path, monkeypatch):
  monkeypatch.setattr(urllib.request, 'urlopen', _offline)
  with pytest.raises(DataError) as e:
    keras_weights.fetch_keras_weights('xception', tmp_path / 'cache')
  url = keras_weights.KERAS_NOTOP_WEIGHTS['xception'][0]
  assert url in str(e.value) and 'by hand' in str(e.value) and '\n' not in str(e.value)
  assert not list((tmp_path / 'cache').iterdir())


def test_fetch_keeps_a_download_only_when_its_md5_matches(tmp_path, monkeypatch):
  content = b'pretend weights'
  monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: io.BytesIO(content))
  with pytest.raises(DataError, match='MD5'):
    keras_weights.fetch_keras_weights('resnet50', tmp_path)
  assert not list(tmp_path.iterdir())
  url = keras_weights.KERAS_NOTOP_WEIGHTS['resnet50'][0]
  monkeypatch.setitem(keras_weights.KERAS_NOTOP_WEIGHTS, 'resnet50',
                      (url, hashlib.md5(content).hexdigest()))
  path = keras_weights.fetch_keras_weights('resnet50', tmp_path)
  assert open(path, 'rb').read() == content and path.endswith(url.rsplit('/', 1)[1])
