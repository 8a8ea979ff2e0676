"""The classification config's rules (configs/classify.py is its schema): checked before any
data is read, so the layers below trust the values they are given."""
from __future__ import annotations

import dataclasses

from capjax import configlib
from capjax.classify.pipeline import Augment
from capjax.configlib import (UNIT_FRACTION, WHOLE_POSITIVE, Rule, at_least, choice_rule,
                              fraction, non_negative, rules)
from capjax.errors import UserError
from capjax.models import classifier

DATASETS = ('shapes30', 'tiny_imagenet30', 'image_folder')
CROPS = ('pad', 'resized', 'none')
# Architecture fields that override the preset config.model.name where they are set.
OVERRIDES = classifier.ARCH_FIELDS

RULES = [
    choice_rule('dataset', *DATASETS),
    Rule('train.label_smoothing', fraction, UNIT_FRACTION),
    Rule('data.stats_max_images', at_least(1), WHOLE_POSITIVE),
    choice_rule('model.name', *classifier.PRESETS),
    choice_rule('model.conv', 'flax', 'layers'),
    choice_rule('augment.crop', *CROPS),
    Rule('augment.crop_padding', at_least(0), 'a whole number >= 0'),
    *rules(non_negative, 'a number >= 0 (0: off)', 'augment.mixup_alpha',
           'augment.cutmix_alpha'),
]


def validate(config) -> None:
  """Raises UserError naming the first field of a classify config that cannot work."""
  configlib.check_common(config)
  configlib.check(config, RULES)
  known = {f.name for f in dataclasses.fields(Augment)}
  unknown = sorted(set(config.augment.keys()) - known)
  if unknown:
    raise UserError(f'--config.augment has unknown fields {unknown} (known: {sorted(known)}); '
                    f'remove them from the config file.')
  fields = getattr(classifier.PRESETS[config.model.name], 'func',
                   classifier.PRESETS[config.model.name]).__dataclass_fields__
  for key in OVERRIDES:
    if config.model.get(key) and key not in fields:
      raise UserError(f'--config.model.{key} does not apply to --config.model.name='
                      f'{config.model.name}; leave it unset (0 or ()).')
  check_progressive_sizes(config.data.get('progressive_sizes', ()), config.data.image_size)


def check_progressive_sizes(progressive_sizes, image_size: int) -> None:
  """(start_fraction, size) pairs: fractions rising from 0 and below 1, sizes in
  8..image_size (see pipeline.size_schedule)."""
  if not progressive_sizes:
    return
  starts = [float(f) for f, _ in progressive_sizes]
  sizes = [int(z) for _, z in progressive_sizes]
  field = f'--config.data.progressive_sizes={tuple(map(tuple, progressive_sizes))}'
  if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1:
    raise UserError(f'{field}: start fractions must rise from 0 and stay below 1.')
  if min(sizes) < 8 or max(sizes) > image_size:
    raise UserError(f'{field}: sizes {sizes} must lie between 8 and '
                    f'--config.data.image_size={image_size}.')
