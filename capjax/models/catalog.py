"""The caption encoders' names and input sizes, importable without JAX.

Config files choose from these; keeping them here, apart from the modules, lets a mistyped flag
fail before JAX or flax is imported. `capjax.models.encoders` builds each name.
"""
SMALL_CNNS = ('shapes_cnn', 'cnn', 'tiny_cnn')  # Trained from scratch (models/cnn.py).
# Keras-layout backbones that take Keras .h5 weights; frozen on photos (their features are
# cached once). resnet_tiny has resnet50's naming and BatchNorm at a fraction of the cost (tests).
KERAS_BACKBONES = ('resnet50', 'xception', 'resnet_tiny')
ENCODERS = SMALL_CNNS + KERAS_BACKBONES
# The side each encoder is fed at on the real data sets (configs/caption.py's default
# config.data.image_size): the small CNNs' 128 px (32 for the test-sized one), the Keras
# backbones' own defaults.
INPUT_SIZE = {'shapes_cnn': 128, 'cnn': 128, 'tiny_cnn': 32,
              'resnet50': 224, 'xception': 299, 'resnet_tiny': 32}
