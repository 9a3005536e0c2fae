"""Which side of a gradient matrix GaLore compresses, and the projections.

All functions work on (*batch, m, n) stacks in the PyTorch (out × in)
orientation (see `matrix_view`). A basis is a dict holding
  "u":  (*batch, m, r) — output side, the leading left singular vectors U_r;
  "vh": (*batch, r, n) — input side, the leading right singular vectors Vh_r;
or both for the two-sided "full" projection.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from galore_optax import matrix_view
from galore_optax import tree_utils

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
OUTPUT_SIDE = "u"
INPUT_SIDE = "vh"


def check_proj_type(proj_type: str) -> None:
  if proj_type not in PROJ_TYPES:
    raise ValueError(
        f"proj_type={proj_type!r} is unknown; use one of {', '.join(PROJ_TYPES)}."
    )


def sides_for(proj_type: str, m: int, n: int) -> tuple[str, ...]:
  """The basis (or bases) kept for an (m × n) = (out × in) gradient.

  'std' compresses the smaller side, as galore-torch does: a tall or square
  matrix (out >= in) keeps Vh_r and its low-rank gradient is out × r; a wide one
  keeps U_r and its low-rank gradient is r × in. 'reverse_std' is the opposite,
  'right'/'left' force the input/output side, 'full' keeps both.
  """
  if proj_type == "std":
    return (INPUT_SIDE,) if m >= n else (OUTPUT_SIDE,)
  if proj_type == "reverse_std":
    return (OUTPUT_SIDE,) if m >= n else (INPUT_SIDE,)
  if proj_type == "right":
    return (INPUT_SIDE,)
  if proj_type == "left":
    return (OUTPUT_SIDE,)
  if proj_type == "full":
    return (OUTPUT_SIDE, INPUT_SIDE)
  raise ValueError(f"proj_type={proj_type!r} is unknown.")


def effective_rank(rank: Any, m: int, n: int, sides: tuple[str, ...] = ()) -> int:
  """The rank actually used: a thin SVD has at most min(m, n) vectors.

  `rank` is an int, None (all of them) or a callable `rank(m, n, sides)`
  giving a matrix's own rank (FRUGAL's density).
  """
  if callable(rank):
    rank = rank(m, n, sides)
  return min(m, n) if rank is None else min(int(rank), m, n)


def basis_shapes(
    batch_shape: tuple[int, ...], m: int, n: int, r: int, sides: tuple[str, ...]
) -> dict[str, tuple[int, ...]]:
  shapes = {OUTPUT_SIDE: batch_shape + (m, r), INPUT_SIDE: batch_shape + (r, n)}
  return {side: shapes[side] for side in sides}


def low_rank_shape(
    batch_shape: tuple[int, ...], m: int, n: int, r: int, sides: tuple[str, ...]
) -> tuple[int, ...]:
  rows = r if OUTPUT_SIDE in sides else m
  cols = r if INPUT_SIDE in sides else n
  return batch_shape + (rows, cols)


def _accumulating(dtype) -> jnp.dtype:
  """The dtype products of `dtype` operands accumulate in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _accumulated(product, a: jax.Array) -> jax.Array:
  """`product(preferred_element_type)` in `a`'s dtype, accumulated in float32.

  Off the CPU the product is asked for in float32 and rounded: a GPU
  multiplies bf16 operands as they are. XLA:CPU cannot run every bf16 × bf16
  → f32 product (its generic dot kernel has none), so there the product is
  taken in the operands' dtype, which it computes by widening them: the same
  rounded result.
  """
  wide = lambda: product(_accumulating(a.dtype)).astype(a.dtype)
  narrow = lambda: product(None)
  if a.dtype == _accumulating(a.dtype):
    return narrow()
  return jax.lax.platform_dependent(cpu=narrow, default=wide)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b, both of one dtype, accumulated in float32 and rounded to it."""
  return _accumulated(lambda t: jnp.matmul(a, b, preferred_element_type=t), a)


def saturated(r: jax.Array) -> jax.Array:
  """`r` with ±inf replaced by the dtype's largest finite values (NaN stays)."""
  big = jnp.finfo(r.dtype).max
  return jnp.clip(r, -big, big)


def _without_overflow(product, basis: jax.Array, n: int, x: jax.Array) -> jax.Array:
  """`product(basis)`, linear in `basis` (vectors of `n` entries) and in `x`.

  A finite `x` can project to values beyond float32 (a row of 64 entries of
  1e38), and a dot product's partial sums can then overflow both ways,
  inf − inf = NaN, which no later step can repair. No partial sum can
  overflow while max|x| · 2**k fits the dtype, where 2**k exceeds any basis
  vector's L1 norm (≤ 8n, also for APOLLO's Gaussian ones). Past that bound
  (or for a non-finite `x`) the product is taken with the basis times 2**-k
  and the result times 2**k, saturated at the largest finite value; powers of
  two are exact, so the two forms agree wherever both are finite. The bound
  is checked under `lax.cond` rather than scaling every product: a scaled
  basis is a second copy of it beside the one the projection back reads
  (XLA:CPU converts both to float32 for its dot, one stacked basis each).
  Under `jax.vmap` of the update the condition is batched and both products
  run (a select): the same results at twice the projection's cost. float16
  operands, whose range 2**-k would leave, are only saturated (accumulated in
  float32, their sums cannot overflow).
  """
  if jnp.finfo(basis.dtype).maxexp < 128:
    return saturated(product(basis))
  k = int(n).bit_length() + 3
  bound = jnp.asarray(jnp.finfo(x.dtype).max, jnp.float32) * 2.0**-k
  fits = jnp.max(jnp.abs(x)).astype(jnp.float32) <= bound
  return jax.lax.cond(fits, product, lambda b: saturated(product(b * 2.0**-k) * 2.0**k), basis)


def project(g: jax.Array, basis: dict[str, jax.Array]) -> jax.Array:
  """R = U_rᵀ G, G Vh_rᵀ, or U_rᵀ G Vh_rᵀ, computed in the gradient's dtype.

  Entries beyond the dtype's range saturate at its largest finite value.
  """
  if OUTPUT_SIDE in basis:
    g = _without_overflow(
        lambda u: _matmul(jnp.swapaxes(u, -1, -2), g), basis[OUTPUT_SIDE].astype(g.dtype),
        g.shape[-2], g)
  if INPUT_SIDE in basis:
    g = _without_overflow(
        lambda vh: _matmul(g, jnp.swapaxes(vh, -1, -2)), basis[INPUT_SIDE].astype(g.dtype),
        g.shape[-1], g)
  return g


def _waiting_for(basis: jax.Array, r: jax.Array) -> jax.Array:
  """A basis in `r`'s dtype for the product with `r`, widened once `r` exists.

  A basis is ready long before the update it projects back (at the start of
  the step, or, GoLore's random ones, as soon as drawn), and XLA:CPU's
  default scheduler widens it then: to `r`'s dtype here, or, for a bf16
  product, to float32 inside the product (`_accumulated`). Every leaf's
  widened copy would be held at once; tied to `r` (`tree_utils.after`),
  each is made just before its product.
  """
  if basis.dtype == r.dtype == _accumulating(r.dtype):
    return basis  # nothing to widen
  return tree_utils.after(basis.astype(r.dtype), r)


def project_back(r: jax.Array, basis: dict[str, jax.Array]) -> jax.Array:
  """The inverse map of `project` onto the full (m × n) shape."""
  if OUTPUT_SIDE in basis:
    r = jnp.matmul(_waiting_for(basis[OUTPUT_SIDE], r), r)
  if INPUT_SIDE in basis:
    r = jnp.matmul(r, _waiting_for(basis[INPUT_SIDE], r))
  return r


def change_of_basis(
    new: dict[str, jax.Array], old: dict[str, jax.Array]
) -> dict[str, jax.Array]:
  """C = P_newᵀ P_old per side, (*batch, r, r): old low-rank coordinates → new.

  For the output side P = U_r and C = U_newᵀ U_old; for the input side the
  basis is stored as Vh_r = Pᵀ, so C = Vh_new Vh_oldᵀ. A low-rank matrix
  R_old maps to `rebase(R_old, C)`, which is exact when the two bases span
  the same subspace (a rotation inside it).
  """
  c = {}
  if OUTPUT_SIDE in new:
    c[OUTPUT_SIDE] = jnp.swapaxes(new[OUTPUT_SIDE], -1, -2) @ old[OUTPUT_SIDE]
  if INPUT_SIDE in new:
    c[INPUT_SIDE] = new[INPUT_SIDE] @ jnp.swapaxes(old[INPUT_SIDE], -1, -2)
  return c


def rebase(
    r: jax.Array, c: dict[str, jax.Array], squared: bool = False
) -> jax.Array:
  """Applies `change_of_basis` matrices to low-rank coordinates.

  Output side: C R; input side: R Cᵀ; both for 'full'. With `squared` the
  elementwise squares C∘C are applied instead, which maps a diagonal of
  variances (the second-moment rule of LDAdam).
  """
  sq = (lambda a: a * a) if squared else (lambda a: a)
  if OUTPUT_SIDE in c:
    r = jnp.matmul(sq(c[OUTPUT_SIDE]), r)
  if INPUT_SIDE in c:
    r = jnp.matmul(r, jnp.swapaxes(sq(c[INPUT_SIDE]), -1, -2))
  return r


# Leaves in the Flax layout (*batch, in, out) hold the transpose of the
# (*batch, m, n) stack. The projection contracts them in place as plain
# (row-major) products and transposes only the low-rank result. The
# optimization barrier keeps XLA from folding that small transpose into the
# product: the folded form (both operands transposed) ran 3x slower on CPU
# for a 2048×5461 kernel at rank 512 (96 ms against 31 ms).


def _is_transposed_stack(view: matrix_view.MatrixView) -> bool:
  nb = len(view.batch_shape)
  return len(view.shape) == nb + 2 and view.perm == tuple(range(nb)) + (nb + 1, nb)


def _dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int, nb: int) -> jax.Array:
  """Contracts a's `a_axis` with b's `b_axis`; the leading `nb` axes are batch."""
  batch = tuple(range(nb))
  dims = (((a_axis,), (b_axis,)), (batch, batch))
  return _accumulated(lambda t: jax.lax.dot_general(a, b, dims, preferred_element_type=t), a)


def project_leaf(
    x: jax.Array, basis: dict[str, jax.Array], view: matrix_view.MatrixView
) -> jax.Array:
  """`project` of the leaf `x` viewed through `view`, (*batch, rows, cols)."""
  if not _is_transposed_stack(view):
    return project(matrix_view.to_matrix(x, view), basis)
  nb = len(view.batch_shape)
  if OUTPUT_SIDE in basis:  # U_rᵀ G = (x U_r)ᵀ: (*batch, r, n)
    r = _without_overflow(lambda u: _dot(x, u, nb + 1, nb, nb),
                          basis[OUTPUT_SIDE].astype(x.dtype), view.m, x)
    r = jnp.swapaxes(jax.lax.optimization_barrier(r), -1, -2)
    if INPUT_SIDE in basis:
      r = _without_overflow(lambda vh: _matmul(r, jnp.swapaxes(vh, -1, -2)),
                            basis[INPUT_SIDE].astype(x.dtype), view.n, r)
    return r
  # G Vh_rᵀ = (Vh_r x)ᵀ: (*batch, m, r)
  r = _without_overflow(lambda vh: _dot(vh, x, nb + 1, nb, nb),
                        basis[INPUT_SIDE].astype(x.dtype), view.n, x)
  return jnp.swapaxes(jax.lax.optimization_barrier(r), -1, -2)


def project_back_leaf(
    r: jax.Array, basis: dict[str, jax.Array], view: matrix_view.MatrixView
) -> jax.Array:
  """`project_back` of `r`, returned in the leaf layout of `view`."""
  if not _is_transposed_stack(view):
    return matrix_view.from_matrix(project_back(r, basis), view)
  nb = len(view.batch_shape)
  if OUTPUT_SIDE in basis:  # (U_r R)ᵀ = Rᵀ U_rᵀ: (*batch, n, m)
    if INPUT_SIDE in basis:
      r = jnp.matmul(r, _waiting_for(basis[INPUT_SIDE], r))
    return _dot(r, _waiting_for(basis[OUTPUT_SIDE], r), nb, nb + 1, nb)
  # (R Vh_r)ᵀ = Vh_rᵀ Rᵀ: (*batch, n, m)
  return _dot(_waiting_for(basis[INPUT_SIDE], r), r, nb, nb + 1, nb)
