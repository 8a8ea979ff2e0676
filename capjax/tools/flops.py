"""Model FLOPs of a jitted function: every matmul and convolution in its jaxpr.

XLA's cost analysis counts the body of a while loop once, whatever its trip count, so for
a step with a `lax.scan` (an LSTM over 20 tokens, a decoder's 20 steps) it undercounts by
about the trip count. This walks the jaxpr instead, multiplies a scan body by its length,
and counts the multiply-adds of `dot_general` and `conv_general_dilated` (2 FLOPs each), the
operations MFU is conventionally measured on; elementwise work is left out.
"""
from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _dot_flops(eqn) -> int:
  lhs, _ = (v.aval for v in eqn.invars)
  (contract_lhs, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract_lhs)


def _conv_flops(eqn) -> int:
  _, rhs = (v.aval for v in eqn.invars)
  dn = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  kernel_in = rhs.shape[dn.rhs_spec[1]]  # Input features per group.
  kernel_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
  return 2 * math.prod(out.shape) * kernel_in * kernel_spatial


def sub_jaxprs(eqn):
  """The programs nested in `eqn` (scan and cond bodies, pjit, custom_vjp rules, remat)."""
  for value in eqn.params.values():
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(v, jex_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex_core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of `jaxpr`, loops counted once per iteration."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * jaxpr_flops(eqn.params['jaxpr'].jaxpr)
    elif name == 'cond':  # Only one branch runs: count the costliest.
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params['branches'])
    else:  # pjit, custom_jvp/vjp, remat, while (trip count unknown: once) ...
      total += sum(jaxpr_flops(sub) for sub in sub_jaxprs(eqn))
  return total


def model_flops(fn, *args) -> int:
  """FLOPs of one call of `fn(*args)` (matmuls and convolutions, loops unrolled)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
