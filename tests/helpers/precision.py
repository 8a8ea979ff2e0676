"""What a traced program computes in: the operand dtypes of its matmuls and convolutions, and
the dtypes of a pytree's floating-point leaves."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capjax.tools.flops import sub_jaxprs

MATMULS = ('dot_general', 'conv_general_dilated')


def matmul_operand_dtypes(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
  """(primitive, operand dtype names) of every matmul and convolution in `jaxpr` and in the
  programs nested in it (scan bodies, custom_vjp rules, pjit, cond branches)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMULS:
      out.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
    for sub in sub_jaxprs(eqn):
      out.extend(matmul_operand_dtypes(sub))
  return out


def traced_matmul_dtypes(fn, *args) -> list[tuple[str, tuple[str, ...]]]:
  """`matmul_operand_dtypes` of `fn(*args)`, traced, not run."""
  return matmul_operand_dtypes(jax.make_jaxpr(fn)(*args).jaxpr)


def not_in(dtype: str, found: list[tuple[str, tuple[str, ...]]]) -> list:
  """The matmuls of `found` with an operand of another dtype than `dtype`."""
  return [(name, dtypes) for name, dtypes in found if set(dtypes) != {dtype}]


def float_dtypes(tree) -> dict[str, str]:
  """{leaf path: dtype name} of every floating-point leaf of `tree` (arrays or numpy)."""
  return {jax.tree_util.keystr(path): str(np.asarray(leaf).dtype if not hasattr(leaf, 'dtype')
                                          else leaf.dtype)
          for path, leaf in jax.tree.leaves_with_path(tree)
          if jnp.issubdtype(getattr(leaf, 'dtype', np.asarray(leaf).dtype), jnp.floating)}
