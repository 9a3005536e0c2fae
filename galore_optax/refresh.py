"""Projector refresh: bases of the gradient's dominant subspace.

A refresh method maps a float32 stack of gradient matrices (B, m, n) to the
bases named by `sides` ("u": (B, m, r), "vh": (B, r, n)), orthonormal and in
the project's canonical sign convention. Methods share one signature so the
transformation can swap them and batch equal-shaped matrices into one call:

  method(g, rank, sides, previous, key) -> dict[side, array]

`previous` holds the bases from the last refresh (zeros before the first),
for warm-started methods; `key` is a PRNG key for randomized ones.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from galore_optax import projection

RefreshFn = Callable[..., dict]


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each vector so that its entry of largest magnitude is positive.

  Singular vectors are defined up to sign, and LAPACK builds disagree on it;
  moments carried over a refresh depend on the sign, so the project fixes one
  convention. The first entry of largest magnitude decides on ties.

  Args:
    vectors: a stack of vectors laid along `axis` (the columns of U use
      axis=-2, the rows of Vh axis=-1).
    axis: the axis that runs along each vector.

  Returns:
    `vectors` with every vector's sign fixed.
  """
  idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  pivot = jnp.take_along_axis(vectors, idx, axis=axis)
  return vectors * jnp.where(pivot < 0, -1.0, 1.0).astype(vectors.dtype)


def _canonical_bases(u: jax.Array, vh: jax.Array, sides) -> dict[str, jax.Array]:
  bases = {}
  if projection.OUTPUT_SIDE in sides:
    bases[projection.OUTPUT_SIDE] = canonical_signs(u, axis=-2)
  if projection.INPUT_SIDE in sides:
    bases[projection.INPUT_SIDE] = canonical_signs(vh, axis=-1)
  return bases


def svd_refresh(g, rank, sides, previous=None, key=None):
  """Exact refresh: the leading singular vectors from a float32 thin SVD."""
  del previous, key
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  return _canonical_bases(u[..., :rank], vh[..., :rank, :], sides)


REFRESH_METHODS: dict[str, RefreshFn] = {
    "svd": svd_refresh,
}


def get_refresh_method(name: str) -> RefreshFn:
  try:
    return REFRESH_METHODS[name]
  except KeyError:
    raise ValueError(
        f"refresh={name!r} is unknown; use one of {', '.join(REFRESH_METHODS)}."
    ) from None
