"""The captioning config's rules (configs/caption.py is its schema): checked before any data
is read, so the layers below trust the values they are given."""
from __future__ import annotations

import os

from capjax import configlib
from capjax.configlib import (WHOLE_POSITIVE, Rule, at_least, choice_rule, non_negative,
                              rules)
from capjax.data.catalog import CAPTION_DATASETS
from capjax.errors import UserError
from capjax.models import catalog

DATASETS = ('shapes',) + CAPTION_DATASETS
DECODERS = ('inject', 'merge', 'attention')
DECODINGS = ('greedy', 'beam')
BASELINES = ('mean', 'greedy')  # Self-critical training's baselines (capjax/caption/scst.py).
# The from-scratch encoders fold config.model.patch-sized pixel tiles (models/cnn.py).
PATCH_ENCODERS = catalog.SMALL_CNNS

RULES = [
    choice_rule('dataset', *DATASETS),
    choice_rule('eval.decoding', *DECODINGS),
    Rule('eval.beam_size', at_least(1), 'a whole number >= 1'),
    Rule('eval.num_samples', at_least(0), 'a whole number >= 0'),
    Rule('data.caption_length', at_least(3), 'a whole number >= 3 (<start>, a word, <end>)'),
    *rules(at_least(1), WHOLE_POSITIVE, 'shapes.image_size', 'shapes.num_train',
           'shapes.num_validation', 'shapes.num_test', 'model.embed_dim', 'model.hidden',
           'model.attn_dim', 'model.patch'),
    Rule('vocab.min_freq', at_least(1), 'a whole number >= 1'),
    Rule('vocab.max_size', at_least(5), 'a whole number > 4 (4 special tokens)'),
    choice_rule('model.encoder', *catalog.ENCODERS),
    choice_rule('model.decoder', *DECODERS),
    *rules(non_negative, 'a number >= 0', 'eval.length_alpha', 'model.attention_reg'),
    choice_rule('model.score', 'additive', 'dot'),
    choice_rule('model.query', 'previous', 'current'),
    choice_rule('model.merge', 'add', 'concat'),
    choice_rule('model.conv', 'flax', 'layers'),
    Rule('optim.encoder_lr_scale', non_negative, 'a number >= 0 (0 freezes the encoder)'),
    Rule('model.concept_weight', non_negative, 'a number >= 0 (0: no concept head)'),
    Rule('train.label_smoothing', configlib.fraction, configlib.UNIT_FRACTION),
    *rules(lambda v: configlib.number(v) and 0 < v <= 1, 'a fraction in (0, 1] (1: no crops)',
           'data.crop_min_area', 'scst.crop_min_area'),
    Rule('train.scst_steps', at_least(0), 'a whole number >= 0 (0: no self-critical phase)'),
    Rule('scst.learning_rate', lambda v: configlib.number(v) and v > 0, 'a number > 0'),
    Rule('scst.num_samples', at_least(1), 'a whole number >= 1'),
    choice_rule('scst.baseline', *BASELINES),
    Rule('scst.bleu_weight', non_negative,
         'a number >= 0 (0: the reward is CIDEr-D alone)'),
]
# The widths and strides of the small CNNs' layers.
_SMALL_CNN_RULES = [
    Rule('model.widths', configlib.positive_ints,
         'a non-empty list of whole numbers > 0, e.g. (64, 64, 128)'),
    Rule('model.strides', configlib.positive_ints,
         'a non-empty list of whole numbers > 0, e.g. (1, 1, 2)'),
]


def image_size_field(config) -> str:
  """The field that sets the side images are fed at."""
  return 'shapes.image_size' if config.dataset == 'shapes' else 'data.image_size'


def validate(config) -> None:
  """Raises UserError naming the first field of a caption config that cannot work."""
  configlib.check_common(config)
  configlib.check(config, RULES)
  m = config.model
  if m.encoder in PATCH_ENCODERS and not m.get('encoder_init'):
    # Checked for tiny_cnn too, though it fixes its own: a malformed value is a typo anyway.
    configlib.check(config, _SMALL_CNN_RULES)
    if len(m.widths) != len(m.strides):
      raise UserError(f'--config.model.widths has {len(m.widths)} entries and '
                      f'--config.model.strides {len(m.strides)}; give one stride per width.')
    field = image_size_field(config)
    size, patch = configlib.get(config, field), int(m.get('patch', 4))
    if configlib.whole(size) and size % patch:
      raise UserError(f'--config.{field}={size} must be a multiple of {patch} for '
                      f'--config.model.encoder={m.encoder} (it folds {patch}x{patch} pixel '
                      f'tiles, --config.model.patch); use e.g. {size - size % patch or patch}.')
  scst = config.get('scst')
  if config.train.get('scst_steps') and scst is not None and (
      scst.baseline == 'mean' and scst.num_samples < 2):
    raise UserError(f'--config.scst.baseline=mean compares each sample with the mean of the '
                    f'image\'s other samples, so it needs --config.scst.num_samples >= 2 (got '
                    f'{scst.num_samples}); raise it or use --config.scst.baseline=greedy.')
  weights = m.get('encoder_weights')
  if weights and m.get('encoder_init'):
    raise UserError('--config.model.encoder_weights and --config.model.encoder_init both name '
                    'the encoder\'s starting weights; set one of them.')
  if weights and m.encoder not in catalog.KERAS_BACKBONES:
    raise UserError(f'--config.model.encoder_weights is set, but --config.model.encoder='
                    f'{m.encoder} has no Keras weights; use resnet50 or xception, or unset '
                    f'the weights.')
  if weights and not os.path.isfile(os.path.expanduser(weights)):
    raise UserError(f'--config.model.encoder_weights={weights} does not exist; give the path '
                    f'of a Keras notop .h5 file (none can be downloaded here).')
