"""The real caption data sets' names, importable without TFDS: configs/caption.py chooses
from them, and a mistyped flag should fail before TFDS is imported. Each has a reader in this
package and a builder config in caption_tfds.py."""
CAPTION_DATASETS = ('flickr8k', 'coco', 'own')
