"""Degenerate leaves that every GaLore optimizer must take: a matrix smaller than the rank,
a 1×1 matrix, a scalar, a one-element vector and a zero-size matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def initial_params():
  """The tiny leaves, ones (the scalar 0.5) and a (0, 4) matrix; "w" is (3, 2)."""
  return {
      "w": jnp.ones((3, 2)),
      "one": jnp.ones((1, 1)),
      "s": jnp.asarray(0.5),
      "v": jnp.ones((1,)),
      "empty": jnp.zeros((0, 4)),
  }


def nonempty_matrices(tree):
  """A `projected` mask: the matrices with at least one entry."""
  return jax.tree.map(lambda x: x.ndim == 2 and x.size > 0, tree)


def assert_two_steps_go_down(tx, state, params):
  """Two steps of all-ones gradients: the zero-size leaf keeps its shape, every other leaf
  stays finite and moves below its start (1, or 0.5 for the scalar)."""
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(tx.update)
  for _ in range(2):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert params["empty"].shape == (0, 4)
  for k in ("w", "one", "s", "v"):
    value = np.asarray(params[k])
    assert np.all(np.isfinite(value)) and np.all(value < 1.0), (k, value)
