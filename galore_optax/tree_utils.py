"""Pytree helpers: sizes of array trees, and even chunks of them."""

from __future__ import annotations

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


def even_chunk(count: int, at_most: int) -> int:
  """The largest chunk size, at most `at_most` (at least 1), that splits `count` items evenly."""
  return max(d for d in range(1, max(1, min(count, at_most)) + 1) if count % d == 0)
