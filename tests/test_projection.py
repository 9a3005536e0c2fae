"""Projections on leaves in their own layout equal those on the (out × in) stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galore_optax import matrix_view
from galore_optax import projection

FLAX = matrix_view.DimensionNumbers(reduction_axes=-2, output_axes=-1)
TORCH = matrix_view.DimensionNumbers(reduction_axes=-1, output_axes=-2)
# Batch axis in the middle: the leaf is neither layout, the generic path runs.
MIDDLE = matrix_view.DimensionNumbers(reduction_axes=0, output_axes=2)
RANK = 4  # of the random bases


def _orthonormal(key, shape):
  return jnp.linalg.qr(jax.random.normal(key, shape))[0]


def _leaf_and_basis(shape, dn, proj_type, seed):
  """A leaf's view and sides, random orthonormal bases of rank RANK and a Gaussian leaf."""
  view = matrix_view.make_view(shape, dn, "w")
  sides = projection.sides_for(proj_type, view.m, view.n)
  keys = jax.random.split(jax.random.key(seed), 3)
  basis = {}
  if projection.OUTPUT_SIDE in sides:
    basis["u"] = _orthonormal(keys[0], view.batch_shape + (view.m, RANK))
  if projection.INPUT_SIDE in sides:
    basis["vh"] = jnp.swapaxes(_orthonormal(keys[1], view.batch_shape + (view.n, RANK)), -1, -2)
  return view, sides, basis, jax.random.normal(keys[2], shape)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape,dn", [((12, 7), FLAX), ((7, 12), TORCH), ((3, 12, 7), FLAX),
                                      ((12, 3, 7), MIDDLE)],
                         ids=["flax", "torch", "flax-stacked", "batch-in-middle"])
def test_leaf_projection_equals_matrix_projection(shape, dn, proj_type):
  view, sides, basis, x = _leaf_and_basis(shape, dn, proj_type, seed=0)

  low = jax.jit(projection.project_leaf, static_argnums=2)(x, basis, view)
  expected = projection.project(matrix_view.to_matrix(x, view), basis)
  assert low.shape == projection.low_rank_shape(view.batch_shape, view.m, view.n, RANK, sides)
  np.testing.assert_allclose(low, expected, rtol=1e-5, atol=1e-5)

  back = jax.jit(projection.project_back_leaf, static_argnums=2)(low, basis, view)
  expected_back = matrix_view.from_matrix(projection.project_back(expected, basis), view)
  assert back.shape == shape
  np.testing.assert_allclose(back, expected_back, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape,dn", [((12, 7), FLAX), ((7, 12), TORCH), ((3, 12, 7), FLAX)],
                         ids=["flax", "torch", "flax-stacked"])
def test_projection_past_the_overflow_bound_is_the_same_product_scaled(shape, dn, proj_type):
  """Beyond max|x| · 2**k ≤ max the product is taken in units of 2**k: the same bits, scaled.

  With max|x| = 1, x · 2**123 crosses the bound (2**128 / 2**k, k ≤ 7 here) while its products
  stay finite; a power of two is exact, so both branches must give the plain result times
  2**123 exactly.
  """
  view, _, basis, x = _leaf_and_basis(shape, dn, proj_type, seed=1)
  x = x / jnp.max(jnp.abs(x))
  project = jax.jit(projection.project_leaf, static_argnums=2)
  scale = 2.0**123
  small, huge = project(x, basis, view), project(x * scale, basis, view)
  assert float(jnp.max(jnp.abs(x * scale))) > float(jnp.finfo(jnp.float32).max) * 2.0**-7
  np.testing.assert_array_equal(np.asarray(huge), np.asarray(small) * scale)
