"""Pytree helpers: sizes of array trees, NamedTuples back from nnx State."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of `tree`.

  Works on concrete arrays and on `jax.ShapeDtypeStruct`s, so the optimizer
  state of a model too large to allocate can be sized with
  `go.tree_bytes(jax.eval_shape(tx.init, params))`. Leaves without a shape
  and dtype (None, `optax.MaskedNode`, Python scalars) count as 0.

  Args:
    tree: any pytree.

  Returns:
    The number of bytes, as a Python int.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> go.tree_bytes({"a": jnp.zeros((4, 4)), "b": jnp.zeros(3, jnp.uint8)})
    67
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
      total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  return total


def restore_named_tuple(cls, stored: Any) -> Any:
  """`stored` as a `cls` NamedTuple when it holds exactly `cls`'s fields.

  `nnx.Optimizer` writes the state back through `nnx.state`, which turns a
  NamedTuple stored per parameter (a quantized moment, a factored moment, a
  quantized projector) into a State mapping of its fields. Rebuilding the
  NamedTuple lets `isinstance` checks and both `lax.cond` branches see one
  structure. Anything else is returned unchanged.
  """
  if isinstance(stored, cls):
    return stored
  if isinstance(stored, Mapping) and set(stored.keys()) == set(cls._fields):
    return cls(**{field: stored[field] for field in cls._fields})
  return stored
