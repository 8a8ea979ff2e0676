"""Config helpers: parsing `get_config(arg)` strings, and checking config values.

Each task states its own rules (`capjax/<task>/config.py`) with the predicates and the rules
every task shares (`COMMON`) from here; `check` applies a list of them. Messages name the
field as the user types it, `--config.train.steps=...`.
"""
from __future__ import annotations

import numbers
import os
from typing import Callable, NamedTuple

import ml_collections

from capjax.errors import UserError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "dataset=flickr8k,runlocal" against `defaults` (which fixes the types).

  A bare word means True. An unknown key is an error naming the allowed keys.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise UserError(f'Unknown config argument {key!r} in {arg!r}; allowed: '
                      f'{", ".join(sorted(defaults))}.')
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


class Rule(NamedTuple):
  """A config field, the test its value must pass, and what the value must be, in words."""
  field: str
  ok: Callable[[object], bool]
  requirement: str


def number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def whole(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_ints(v) -> bool:
  return isinstance(v, (list, tuple)) and len(v) > 0 and all(whole(x) and x > 0 for x in v)


def one_of(*choices) -> Callable[[object], bool]:
  return lambda v: v in choices


def choices(*names) -> str:
  """"'a', 'b' or 'c'": how a requirement spells a set of allowed strings."""
  quoted = [repr(n) for n in names]
  return ', '.join(quoted[:-1]) + ' or ' + quoted[-1] if len(quoted) > 1 else quoted[0]


def at_least(low) -> Callable[[object], bool]:
  return lambda v: whole(v) and v >= low


def fraction(v) -> bool:
  return number(v) and 0 <= v < 1


def non_negative(v) -> bool:
  return number(v) and v >= 0


def rules(ok: Callable[[object], bool], requirement: str, *fields: str) -> list[Rule]:
  """One Rule per field, all with the same test."""
  return [Rule(field, ok, requirement) for field in fields]


def choice_rule(field: str, *names: str) -> Rule:
  """The field must be one of `names`."""
  return Rule(field, one_of(*names), choices(*names))


WHOLE_POSITIVE = 'a whole number > 0'
UNIT_FRACTION = 'in [0, 1)'

# The rules of the fields every task's config has (train loop, optimizer, evaluation).
COMMON = [
    Rule('seed', whole, 'a whole number'),
    Rule('train.steps', at_least(0), 'a whole number > 0 (or set train.epochs)'),
    Rule('train.epochs', non_negative, 'a number >= 0 (0: use train.steps)'),
    *rules(at_least(1), WHOLE_POSITIVE, 'train.batch_size', 'train.log_every',
           'train.checkpoint_every', 'eval.batch_size', 'data.image_size'),
    Rule('train.eval_every', at_least(0), 'a whole number >= 0 (0: never)'),
    Rule('train.keep_checkpoints', at_least(1), 'a whole number >= 1'),
    choice_rule('train.nan_policy', 'stop', 'skip'),
    choice_rule('optim.name', 'adamw', 'sgd'),
    Rule('optim.learning_rate', lambda v: number(v) and v > 0, 'a number > 0'),
    *rules(at_least(0), 'a whole number >= 0', 'optim.warmup_steps', 'data.num_threads'),
    Rule('optim.final_lr_fraction', lambda v: number(v) and 0 <= v <= 1, 'in [0, 1]'),
    Rule('optim.weight_decay', non_negative, 'a number >= 0'),
    *rules(fraction, UNIT_FRACTION, 'optim.b1', 'optim.b2', 'optim.momentum', 'model.dropout'),
    Rule('optim.grad_clip_norm', non_negative, 'a number >= 0 (0: no clipping)'),
    choice_rule('eval.split', 'train', 'validation', 'test'),
    # The compute dtype; params, optimizer state, losses stay float32 (docs/mixed_precision.md).
    # No float16: its gradients underflow without loss scaling, which capjax does not do.
    choice_rule('model.dtype', 'float32', 'bfloat16'),
]

_MISSING = object()


def get(config, path: str, default=_MISSING):
  """config's value at a dotted path; `default` (or a sentinel) where there is no such field."""
  node = config
  for key in path.split('.'):
    if not hasattr(node, 'keys') or key not in node.keys():
      return default
    node = node[key]
  return node


def fail(path: str, value, requirement: str) -> UserError:
  """The error for a field whose value cannot work: names it as the user types it."""
  return UserError(f'--config.{path}={value!r} is not allowed: it must be {requirement}; '
                   f'change it in the config file or on the command line.')


def check(config, rules) -> None:
  """Raises UserError for the first rule whose field is set and fails its test. Fields the
  config does not have (or leaves None) are skipped, so one list serves every variant."""
  for path, ok, requirement in rules:
    value = get(config, path)
    if value is _MISSING or value is None:
      continue
    try:
      good = bool(ok(value))
    except TypeError:  # e.g. a string compared with a number
      good = False
    if not good:
      raise fail(path, value, requirement)


def check_common(config) -> None:
  """`COMMON`, the run's length and the data folders: what every task's validate starts with."""
  check(config, COMMON)
  train = config.train
  if not train.get('epochs') and train.get('steps', 1) <= 0:
    raise UserError(f'--config.train.steps={train.steps} must be > 0 when '
                    f'--config.train.epochs is 0; set one of them.')
  for field in ('data_dir', 'tfds_dir'):
    path = config.get(field)
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UserError(f'--config.{field}={path!r} is a file; point it at a folder.')
