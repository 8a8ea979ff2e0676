"""models/catalog.py and data/catalog.py: the names config files choose from, without JAX."""
import subprocess
import sys

import ml_collections

from helpers import runs as rh
from capjax.data import caption_tfds, catalog as data_catalog
from capjax.models import catalog, encoders


def test_every_catalog_encoder_builds_and_the_keras_table_names_the_same_backbones():
  assert tuple(encoders.KERAS_BACKBONES) == catalog.KERAS_BACKBONES
  assert set(catalog.INPUT_SIZE) == set(catalog.ENCODERS)
  for name in catalog.ENCODERS:
    model = ml_collections.ConfigDict(dict(encoder=name, widths=(8,), strides=(1,), norm=True))
    assert encoders.build_encoder(model) is not None
  assert caption_tfds.DATASETS == data_catalog.CAPTION_DATASETS


def test_config_files_load_without_importing_jax_or_tfds():
  """So a mistyped --config flag fails at once, not after seconds of imports."""
  code = ('import sys; sys.path.insert(0, "configs"); import caption, classify; '
          'caption.get_config("dataset=flickr8k"); classify.get_config(None); '
          'print(sorted(m for m in ("jax", "flax", "tensorflow_datasets") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=rh.ROOT, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == '[]'
