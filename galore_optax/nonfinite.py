"""Non-finite gradient elements set to zero: the 8-bit optimizers' policy, in one place.

A NaN or infinite element would otherwise spread: to a whole row of a
low-rank gradient and, at a refresh, to the projector; to a whole block of
8-bit state (its scale becomes non-finite) for the rest of training. The
8-bit optimizers treat such an element as zero, so that step ignores it;
`optax.apply_if_finite` skips such steps entirely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from galore_optax.masking import MaskOrFn


def zeros_for_nonfinite(x: jax.Array) -> jax.Array:
  """`x` with its NaN and infinite elements set to zero.

  The result is kept in `x`'s dtype by a barrier: fused with the float32
  conversion a projection makes of it, the copy would be float32 and, read
  again by a full-rank output (APOLLO's scaled gradient), would wait at twice
  the gradient's size for the weights' update.
  """
  return jax.lax.optimization_barrier(jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)))


def zero_nonfinite(mask: MaskOrFn = None) -> optax.GradientTransformation:
  """Sets the non-finite elements of the updates in `mask` (default all) to zero.

  The 8-bit optimizers apply it to the leaves they project, before the
  projection; the others go to the 8-bit Adam as they are, which zeroes such
  elements itself (a copy of them here would be one more full-size buffer).
  """
  zero = optax.stateless(lambda updates, params: jax.tree.map(zeros_for_nonfinite, updates))
  return zero if mask is None else optax.masked(zero, mask)
