"""Pytree helpers: sizes of array trees, even chunks of them, weights read in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def float32_apart(x: jax.Array) -> jax.Array:
  """A floating `x` in float32, converted apart from any other conversion of it.

  XLA:CPU's dots take float32 operands, so a forward pass converts each bf16
  weight, and a scan over stacked layers converts a whole stack before its
  loop. An update's `w.astype(float32)` is the same expression: XLA merges the
  two and keeps the forward's converted stack alive until the update has read
  it. A bfloat16 is converted here from its bits (exact: it is the upper half
  of the float32), which XLA does not take for a conversion. Other dtypes go
  behind an optimization barrier, which XLA:CPU removes before it merges
  equal expressions: for them the conversion may still be shared. The result
  depends only on `x`: a scheduler may make it as soon as `x` exists.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    upper = bits(x).astype(jnp.uint32)
    return from_bits(jax.lax.shift_left(upper, jnp.uint32(16)), jnp.float32)
  return jax.lax.optimization_barrier(x).astype(jnp.float32)


def bits(x: jax.Array) -> jax.Array:
  """`x`'s raw bits, as unsigned integers of its width (floats only; others as they are).

  XLA:CPU has no bf16 slicing of its own: a loop that slices a 16-bit float
  array is given a float32 copy of the whole array, made before the loop
  (loop-invariant) and kept through it. A loop that slices the bits and
  converts each slice back (`from_bits`) holds no such copy.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))


def from_bits(b: jax.Array, dtype: Any) -> jax.Array:
  """The inverse of `bits`: `b` read as `dtype`."""
  return b if b.dtype == jnp.dtype(dtype) else jax.lax.bitcast_convert_type(b, dtype)


def _is_narrow_float(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def slicing_bits(x: jax.Array) -> jax.Array:
  """`x` as a loop should slice it: a float narrower than float32 as its raw bits
  (`bits`), any other array as it is (a float32 array's bits could be a copy of it).
  `from_bits(slice, x.dtype)` reads a slice back."""
  x = jnp.asarray(x)
  return bits(x) if _is_narrow_float(x.dtype) else x


def read_slice(a: jax.Array, i: Any) -> jax.Array:
  """`a[i]` for a traced index `i`; a float narrower than float32 read as raw bits."""
  return from_bits(jax.lax.dynamic_index_in_dim(slicing_bits(a), i, keepdims=False), a.dtype)


def write_slice(a: jax.Array, update: jax.Array, start: Any) -> jax.Array:
  """`a` with `update` written at `start` along its first axis; a float narrower than
  float32 as raw bits.

  XLA:CPU has no bf16 slice write of its own: it converts the whole array to
  float32, writes the slice and converts it back, a pass over all of `a` for
  each write. Written as bits, the write touches the slice alone (in place
  where `a` is not read otherwise). Other dtypes are written as they are (a
  float32 array's bits could be a copy of it).
  """
  update = update.astype(a.dtype)
  if not _is_narrow_float(a.dtype):
    return jax.lax.dynamic_update_slice_in_dim(a, update, start, 0)
  written = jax.lax.dynamic_update_slice_in_dim(bits(a), bits(update), start, 0)
  return from_bits(written, a.dtype)


def after(x: jax.Array, dependency: jax.Array) -> jax.Array:
  """`x` (floats, integers, booleans), bit for bit, made on CPU only once `dependency` exists.

  XLA:CPU's default scheduler runs an operation as soon as its operands
  exist, so what is derived from state alone (a stored basis's float32
  copy, a refresh that reads no gradient) is made at the start of an update,
  or during the backward pass, for every leaf at once, and held until the
  leaf's own work needs it. On CPU `x`'s bits are or-ed with an integer zero
  computed from `dependency` (the bits of |d| where d = 0, else 0), which
  XLA cannot fold: on the bits, as float arithmetic on XLA:CPU would flush
  subnormals and rewrite NaN payloads. It fuses into whatever reads `x`.
  Other platforms' schedulers weigh memory; there `x` is returned as it is.
  """
  x = jnp.asarray(x)
  kinds = (jnp.floating, jnp.integer, jnp.bool_)
  if not jnp.size(dependency) or not any(jnp.issubdtype(x.dtype, k) for k in kinds):
    return x
  d = jnp.asarray(dependency)[(0,) * jnp.ndim(dependency)]
  return jax.lax.platform_dependent(x, d, cpu=_tied, default=lambda x, d: x)


def _tied(x: jax.Array, d: jax.Array) -> jax.Array:
  """`after` on CPU: `x`, or-ed with a zero XLA cannot see is zero."""
  if not jnp.issubdtype(d.dtype, jnp.floating):
    d = d.astype(jnp.float32)
  zero = jnp.where(d == 0, bits(jnp.abs(d)), 0)
  if x.dtype == jnp.bool_:
    return x | (zero != 0)
  x_bits = bits(x)
  return from_bits(x_bits | zero.astype(x_bits.dtype), x.dtype)


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
