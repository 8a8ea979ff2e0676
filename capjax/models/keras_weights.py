"""Keras legacy .h5 weight files <-> Flax variables of the Keras-layout backbones.

The layout (Keras's `save_weights` to .h5 before Keras 3, and every file under
keras-applications/): the root attribute `layer_names` lists every layer (weightless ones too), one
group per layer whose attribute `weight_names` lists its weights in Keras's order; each name is a
dataset path inside the group, usually nested ('conv1_conv/kernel:0' is dataset 'kernel:0' in
subgroup 'conv1_conv'). Files saved with the whole model keep all this under 'model_weights'.

Layers are matched like Keras does: Keras matches purely by position among layers with weights, in
the order of `model.layers`. We match by name wherever the file uses one of the model's explicit
Keras names (robust to files whose layer order differs), and by position for the rest (Keras's
auto-named layers, which differ between Keras versions; see `capjax.models.xception`). Weights
inside a layer are matched by position, as Keras does. Loading is strict: every weight in the file
is used, every Flax variable is filled, and every shape is checked.

Typical use:

  path = fetch_keras_weights('resnet50', '~/.cache/capjax')  # or a file downloaded by hand
  variables = load_keras_h5(path, 'resnet50')  # {'params', 'batch_stats'} for resnet.ResNet50()
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import urllib.request
from typing import Any, Callable, NamedTuple

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from capjax.data.reading import DataError
from capjax.models import resnet, xception

_BASE_URL = 'https://storage.googleapis.com/tensorflow/keras-applications/'
# name -> (URL of the notop weights, MD5 from keras.applications' `file_hash`).
KERAS_NOTOP_WEIGHTS = {
    'resnet50': (_BASE_URL + 'resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
                 '4d473c1dd8becc155b73f8504c6f6626'),
    'xception': (_BASE_URL + 'xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5',
                 'b0042744bf5b25fce3cb969f33bebb97'),
}

# Names Keras generates for unnamed layers (Keras 1: 'convolution2d_3', Keras 2/3: 'conv2d_3');
# they depend on the Keras version and session, so such layers are matched by position.
_AUTO_NAME = re.compile(r'^(conv2d|convolution2d|separable_conv2d|separableconvolution2d|'
                        r'batch_normalization|batchnormalization)(_\d+)?$')
# Last part of Keras 2/3 weight names; Keras 1 names ('convolution2d_1_W:0') end otherwise.
_KERAS_ROLES = ('kernel', 'bias', 'gamma', 'beta', 'moving_mean', 'moving_variance',
                'depthwise_kernel', 'pointwise_kernel')


def depthwise_keras_to_flax(kernel: np.ndarray) -> np.ndarray:
  """Keras depthwise kernel (kh, kw, C, M) -> Flax grouped-conv kernel (kh, kw, 1, C*M).

  Both put output channel c*M + m on input channel c, so this is a reshape, not a transpose.
  """
  kh, kw, c, m = kernel.shape
  return kernel.reshape(kh, kw, 1, c * m)


def depthwise_flax_to_keras(kernel: np.ndarray, multiplier: int = 1) -> np.ndarray:
  """Flax grouped-conv kernel (kh, kw, 1, C*M) -> Keras depthwise kernel (kh, kw, C, M)."""
  kh, kw, _, cm = kernel.shape
  return kernel.reshape(kh, kw, cm // multiplier, multiplier)


class _Weight(NamedTuple):
  """One Keras weight of a layer and where it lives in the Flax variables."""
  path: tuple[str, ...]  # ('params', layer, ..., leaf)
  keras_name: str  # Keras's weight name without the layer prefix, e.g. 'moving_mean'
  keras_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_keras: Callable[[np.ndarray], np.ndarray]


def _same(a):
  return a


def _layer_weights(name: str, template: dict) -> list[_Weight]:
  """The Keras weights of layer `name`, in Keras's order, read off the Flax variable shapes."""
  params = template['params'][name]
  if name in template.get('batch_stats', {}):
    stats = template['batch_stats'][name]
    return [_Weight(('params', name, 'scale'), 'gamma', params['scale'].shape, _same, _same),
            _Weight(('params', name, 'bias'), 'beta', params['bias'].shape, _same, _same),
            _Weight(('batch_stats', name, 'mean'), 'moving_mean', stats['mean'].shape, _same,
                    _same),
            _Weight(('batch_stats', name, 'var'), 'moving_variance', stats['var'].shape, _same,
                    _same)]
  if 'depthwise' in params:  # SeparableConv2D, depth multiplier 1
    kh, kw, _, c = params['depthwise']['kernel'].shape
    return [_Weight(('params', name, 'depthwise', 'kernel'), 'depthwise_kernel', (kh, kw, c, 1),
                    depthwise_keras_to_flax, depthwise_flax_to_keras),
            _Weight(('params', name, 'pointwise', 'kernel'), 'pointwise_kernel',
                    params['pointwise']['kernel'].shape, _same, _same)]
  # Conv2D: Keras's (kh, kw, in, out) kernel is Flax's layout already.
  weights = [_Weight(('params', name, 'kernel'), 'kernel', params['kernel'].shape, _same, _same)]
  if 'bias' in params:
    weights.append(_Weight(('params', name, 'bias'), 'bias', params['bias'].shape, _same, _same))
  return weights


def _resolve(arch) -> tuple[str, Any, list[str]]:
  """(label, module, Keras layer names in Keras order) for 'resnet50', 'xception' or a module."""
  if isinstance(arch, str):
    presets = {'resnet50': resnet.ResNet50, 'xception': xception.Xception}
    if arch not in presets:
      raise ValueError(f'unknown Keras architecture {arch!r}; expected one of {sorted(presets)}')
    label, arch = arch, presets[arch]()
  else:
    label = type(arch).__name__
  if isinstance(arch, resnet.ResNet):
    return label, arch, resnet.keras_layer_names(arch.stage_sizes)
  if isinstance(arch, xception.Xception):
    return label, arch, xception.keras_layer_names()
  raise TypeError(f'no Keras layout known for {type(arch).__name__}; use ResNet or Xception')


@functools.lru_cache(maxsize=8)
def _template(module) -> dict:
  """Shapes and dtypes of `module`'s variables, without computing anything."""
  size = xception.MIN_SIZE if isinstance(module, xception.Xception) else 32
  init = functools.partial(module.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))


def variable_shapes(arch) -> dict:
  """{'params', 'batch_stats'} of ShapeDtypeStructs for 'resnet50', 'xception' or a module."""
  return jax.tree.map(lambda leaf: leaf, _template(_resolve(arch)[1]))  # a copy of the cached


def _attr_list(obj, name: str) -> list[str]:
  """A list-of-strings attribute, joining Keras's chunks (name0, name1, ...) for long lists."""
  if name in obj.attrs:
    values = list(obj.attrs[name])
  else:
    values, i = [], 0
    while f'{name}{i}' in obj.attrs:
      values.extend(obj.attrs[f'{name}{i}'])
      i += 1
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def _weights_root(f: h5py.File, path: str):
  """The group holding `layer_names`: the file itself, or 'model_weights' in a whole-model file."""
  if _attr_list(f, 'layer_names'):
    return f
  if 'model_weights' in f and _attr_list(f['model_weights'], 'layer_names'):
    return f['model_weights']
  raise DataError(f'{path} is not a Keras .h5 weights file (it has no "layer_names" attribute); '
                  'pass a file saved by Keras, such as the keras-applications notop weights.')


def _pair_layers(file_names: list[str], model_names: list[str]) -> list[tuple[str, str]]:
  """(file layer, model layer) pairs: by explicit name where possible, else by position."""
  explicit = {n for n in model_names if not _AUTO_NAME.match(n)}
  named = {n for n in file_names if n in explicit}
  rest_file = [n for n in file_names if n not in named]
  rest_model = [n for n in model_names if n not in named]
  if rest_file:
    logging.info('Matching %d Keras layers by position (e.g. file %r -> model %r).',
                 len(rest_file), rest_file[0], rest_model[0])
  by_position = dict(zip(rest_file, rest_model))
  return [(n, n if n in named else by_position[n]) for n in file_names]


def load_keras_h5(path: str | os.PathLike, arch) -> dict:
  """Reads a Keras legacy .h5 weights file into Flax variables for a Keras-layout backbone.

  Args:
    path: the .h5 file, e.g. from `fetch_keras_weights`.
    arch: 'resnet50', 'xception', or a `ResNet` / `Xception` module (e.g. a tiny test preset).

  Returns:
    {'params': ..., 'batch_stats': ...} with exactly the structure, shapes and dtypes of
    `module.init(...)`, as jax arrays.

  Raises:
    DataError (a ValueError): a one-sentence message naming the file, and the layer and the
      expected and actual shapes where they disagree.
  """
  path = os.fspath(path)
  label, module, model_names = _resolve(arch)
  template = _template(module)
  specs = {name: _layer_weights(name, template) for name in model_names}
  if not os.path.isfile(path):
    raise DataError(f'Keras weights file {path} does not exist; check the path, or get the file '
                    'with capjax.models.keras_weights.fetch_keras_weights.')
  flat = {}
  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise DataError(f'{path} cannot be read as an HDF5 file ({e}); download it again.') from None
  with f:
    root = _weights_root(f, path)
    layers = [(n, _attr_list(root[n], 'weight_names')) for n in _attr_list(root, 'layer_names')]
    layers = [(n, w) for n, w in layers if w]  # Keras also lists weightless layers (ReLU, pads)
    if len({n for n, _ in layers}) != len(layers):
      raise DataError(f'{path} lists a layer twice in "layer_names"; the file is damaged, '
                      'download it again.')
    if len(layers) != len(model_names):
      raise DataError(
          f'{path} has {len(layers)} layers with weights but {label} has {len(model_names)}; '
          f'pass the notop (include_top=False) weights of {label}.')
    weight_names = dict(layers)
    for file_layer, layer in _pair_layers([n for n, _ in layers], model_names):
      names, expected = weight_names[file_layer], specs[layer]
      if len(names) != len(expected):
        raise DataError(
            f'{path}: layer {file_layer!r} has {len(names)} weights {names}, but {label} layer '
            f'{layer!r} has {len(expected)} ({[w.keras_name for w in expected]}).')
      for name, spec in zip(names, expected):
        # Keras 2+ names end in the weight's role; a different role means reordered weights.
        role = name.split('/')[-1].split(':')[0]
        if role in _KERAS_ROLES and role != spec.keras_name:
          raise DataError(f'{path}: layer {file_layer!r} has weight {name!r} where {label} layer '
                          f'{layer!r} expects its {spec.keras_name!r}.')
        if name not in root[file_layer]:
          raise DataError(f'{path}: layer {file_layer!r} lists weight {name!r} but does not '
                          'contain it; the file is damaged, download it again.')
        value = np.asarray(root[file_layer][name])
        if value.shape != tuple(spec.keras_shape):
          raise DataError(
              f'{path}: weight {name!r} of layer {file_layer!r} has shape {value.shape}, but '
              f'{label} layer {layer!r} expects {tuple(spec.keras_shape)}.')
        flat[spec.path] = value
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for key_path, leaf in leaves:
    keras_path = tuple(k.key for k in key_path)
    spec = next(w for w in specs[keras_path[1]] if w.path == keras_path)
    out.append(jnp.asarray(spec.to_flax(flat[keras_path]), leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def save_keras_h5(variables: dict, path: str | os.PathLike, arch) -> None:
  """Writes Flax variables of a Keras-layout backbone as a Keras legacy .h5 weights file.

  The file has the layout of Keras's own notop files (nested 'layer/weight:0' datasets, layers in
  Keras's order), so `keras_model.load_weights(path)` and `load_keras_h5` both read it.

  Args:
    variables: {'params', 'batch_stats'} with the structure of `module.init(...)`.
    path: the .h5 file to write (overwritten).
    arch: 'resnet50', 'xception', or a `ResNet` / `Xception` module.
  """
  label, module, model_names = _resolve(arch)
  template = _template(module)
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted((jax.tree_util.keystr(p), tuple(np.shape(a))) for p, a in flat)
  if shapes(variables) != shapes(template):
    raise ValueError(f'variables do not have the structure and shapes of {label}; pass '
                     f'{{"params", "batch_stats"}} from its init or from load_keras_h5.')
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = np.array([n.encode('utf8') for n in model_names])
    f.attrs['backend'] = b'tensorflow'
    # Any value but '1' tells Keras's loader that no Keras-1 conversions are needed.
    f.attrs['keras_version'] = b'2.2.4'
    for layer in model_names:
      group = f.create_group(layer)
      specs = _layer_weights(layer, template)
      names = [f'{layer}/{w.keras_name}:0' for w in specs]
      group.attrs['weight_names'] = np.array([n.encode('utf8') for n in names])
      for name, spec in zip(names, specs):
        value = functools.reduce(lambda tree, k: tree[k], spec.path, variables)
        group.create_dataset(name, data=spec.to_keras(np.asarray(value, np.float32)))


def fetch_keras_weights(name: str, cache_dir: str | os.PathLike) -> str:
  """Path of Keras's ImageNet notop weights for `name`, downloading them into `cache_dir` once.

  Args:
    name: 'resnet50' or 'xception'.
    cache_dir: folder for the file; an existing file there is used without any network access.

  Raises:
    DataError: when the download fails (e.g. offline) or is incomplete; the message gives the URL
      to fetch by hand.
  """
  if name not in KERAS_NOTOP_WEIGHTS:
    raise ValueError(f'no Keras weights known for {name!r}; expected one of '
                     f'{sorted(KERAS_NOTOP_WEIGHTS)}')
  url, md5 = KERAS_NOTOP_WEIGHTS[name]
  cache_dir = os.path.expanduser(os.fspath(cache_dir))
  path = os.path.join(cache_dir, url.rsplit('/', 1)[1])
  if os.path.isfile(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  partial = f'{path}.part-{os.getpid()}'  # never leave a truncated file under the final name
  digest = hashlib.md5()
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, 'wb') as out:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
  except OSError as e:  # URLError, timeouts and HTTP errors are all OSErrors
    _remove(partial)
    raise DataError(f'Could not download the {name} weights ({getattr(e, "reason", e)}); '
                    f'download {url} by hand and pass the path of that file instead.') from None
  if digest.hexdigest() != md5:
    _remove(partial)
    raise DataError(f'The {name} weights downloaded from {url} have MD5 {digest.hexdigest()}, '
                    f'not {md5}; try again, or download that file by hand and pass its path.')
  os.replace(partial, path)
  return path


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
