"""Helpers for configs/*.py: parsing `get_config(arg)` strings like "k=v,k=v,runlocal"."""
from __future__ import annotations

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
