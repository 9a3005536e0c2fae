"""Viewing an N-d parameter as a batch of (out × in) matrices.

GaLore's rules are stated on the PyTorch layout of a weight, an (out × in)
matrix. Flax kernels are (in, out), convolution kernels have several input
axes, and scanned layers add a leading layer axis. `DimensionNumbers` names
which axes play the input (reduction) and output roles; every other axis is a
batch axis with an independent projector per slice.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # typing.TypeIs is Python 3.13+; the annotation is never evaluated
  from typing_extensions import TypeIs

Axes = Union[int, Sequence[int]]


class DimensionNumbers(NamedTuple):
  """Which axes of a parameter form the (in, out) matrix GaLore projects.

  Attributes:
    reduction_axes: axis or axes contracted with the layer input (the "in"
      role; a Flax `nnx.Linear` kernel's axis -2, a PyTorch weight's axis -1).
    output_axes: axis or axes indexing the layer output (the "out" role).

  Every axis named by neither is a batch axis: a stacked (L, in, out) kernel
  gets L independent projectors.
  """

  reduction_axes: Axes = -2
  output_axes: Axes = -1


class MatrixView(NamedTuple):
  """Static description of how one leaf maps to a (*batch, m, n) matrix stack.

  `m` is the size of the output role and `n` of the input role, so the stack
  is in the PyTorch (out × in) orientation the reference's rules are stated in.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  m: int
  n: int

  @property
  def perm(self) -> tuple[int, ...]:
    """Transposes the leaf to batch + output + reduction axes."""
    return self.batch_axes + self.output_axes + self.reduction_axes

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.m, self.n)


def _is_int(x) -> TypeIs[int]:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def normalize_axes(axes: Axes, ndim: int, role: str, where: str) -> tuple[int, ...]:
  """`axes` (an int or a sequence of ints) as non-negative axes of an ndim leaf."""
  axes = (axes,) if _is_int(axes) else tuple(axes)
  if not axes:
    raise ValueError(f"{where}: {role} is empty; name at least one axis.")
  out = []
  for axis in axes:
    if not _is_int(axis) or not -ndim <= axis < ndim:
      raise ValueError(
          f"{where}: {role} axis {axis!r} is out of range for a leaf with "
          f"{ndim} axes; pass go.DimensionNumbers with axes in [-{ndim}, {ndim})."
      )
    out.append(int(axis) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{where}: {role} {axes} names an axis twice.")
  return tuple(out)


def make_view(
    shape: Sequence[int], dimension_numbers: DimensionNumbers, where: str
) -> MatrixView:
  """Validates `dimension_numbers` for a leaf of `shape` and returns its view.

  Args:
    shape: the leaf's shape.
    dimension_numbers: the leaf's `DimensionNumbers`.
    where: the leaf's path, used in error messages.

  Returns:
    The leaf's `MatrixView`.
  """
  shape = tuple(int(d) for d in shape)
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"{where}: shape {shape} has fewer than two axes, so it has no matrix "
        "to project; leave it out of `mask` (e.g. go.path_mask(...) or the "
        "default mask, which skips such leaves)."
    )
  if not isinstance(dimension_numbers, DimensionNumbers):
    raise TypeError(
        f"{where}: expected go.DimensionNumbers, got {dimension_numbers!r}."
    )
  reduction = normalize_axes(
      dimension_numbers.reduction_axes, ndim, "reduction_axes", where
  )
  output = normalize_axes(dimension_numbers.output_axes, ndim, "output_axes", where)
  if set(reduction) & set(output):
    raise ValueError(
        f"{where}: reduction_axes {dimension_numbers.reduction_axes} and "
        f"output_axes {dimension_numbers.output_axes} overlap for shape {shape}; "
        "each axis plays at most one role."
    )
  batch = tuple(a for a in range(ndim) if a not in reduction and a not in output)
  return MatrixView(
      shape=shape,
      batch_axes=batch,
      output_axes=output,
      reduction_axes=reduction,
      m=math.prod(shape[a] for a in output),
      n=math.prod(shape[a] for a in reduction),
  )


def to_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
  """Leaf → (*batch, m, n) stack (a no-op reshape for PyTorch-layout weights)."""
  return jnp.transpose(x, view.perm).reshape(view.matrix_shape)


def from_matrix(y: jax.Array, view: MatrixView) -> jax.Array:
  """(*batch, m, n) stack → leaf layout; the inverse of `to_matrix`.

  A size-1 matrix axis ((*batch, m, 1) per-row or (*batch, 1, n) per-column
  factors) comes back as size-1 axes in place of that role's axes, ready to
  broadcast against the leaf.
  """
  rows, cols = y.shape[-2:]
  sizes = {a: view.shape[a] for a in view.batch_axes}
  sizes.update({a: view.shape[a] if rows != 1 else 1 for a in view.output_axes})
  sizes.update({a: view.shape[a] if cols != 1 else 1 for a in view.reduction_axes})
  inverse = [0] * len(view.perm)
  for i, a in enumerate(view.perm):
    inverse[a] = i
  return jnp.transpose(y.reshape(tuple(sizes[a] for a in view.perm)), inverse)



def batch_first(x: jax.Array, view: MatrixView) -> tuple[jax.Array, MatrixView]:
  """The leaf as (B, *rest): its batch axes flattened in front, one slice a matrix.

  Returns the array (a free reshape when the batch axes lead, as for scanned
  layers) and the view of it, whose single batch axis can be sliced: a
  slice [i:j] viewed through `with_batch(view, j - i)` is matrices i..j-1.
  """
  nb = len(view.batch_axes)
  rest = tuple(a for a in range(len(view.shape)) if a not in view.batch_axes)
  num = math.prod(view.batch_shape)
  y = jnp.transpose(x, view.batch_axes + rest) if view.batch_axes != tuple(range(nb)) else x
  y = y.reshape((num,) + tuple(view.shape[a] for a in rest))
  position = {a: 1 + i for i, a in enumerate(rest)}
  flat = MatrixView(
      shape=(num,) + tuple(view.shape[a] for a in rest),
      batch_axes=(0,),
      output_axes=tuple(position[a] for a in view.output_axes),
      reduction_axes=tuple(position[a] for a in view.reduction_axes),
      m=view.m,
      n=view.n,
  )
  return y, flat


def from_batch_first(y: jax.Array, view: MatrixView) -> jax.Array:
  """A (B, *rest) array of `batch_first(x, view)` back in the leaf's layout."""
  nb = len(view.batch_axes)
  order = view.batch_axes + tuple(a for a in range(len(view.shape)) if a not in view.batch_axes)
  y = y.reshape(tuple(view.shape[a] for a in order))
  if view.batch_axes == tuple(range(nb)):
    return y
  inverse = [0] * len(order)
  for i, a in enumerate(order):
    inverse[a] = i
  return jnp.transpose(y, inverse)


def with_batch(view: MatrixView, size: int) -> MatrixView:
  """`view` (a `batch_first` one) for a slice of `size` matrices."""
  return view._replace(shape=(size,) + view.shape[1:])


def select_matrices(flags: jax.Array, new, old):
  """Per matrix of stacks whose batch axes lead: `new` where `flags` (*batch,), else `old`."""

  def pick(a, b):
    f = jnp.reshape(flags, jnp.shape(flags) + (1,) * (jnp.ndim(a) - jnp.ndim(flags)))
    return jnp.where(f, a, b)

  return jax.tree.map(pick, new, old)
