"""Group quantization of GaLore projectors to 8 or 4 bits (Q-GaLore style).

A projector's basis vectors (the columns of U, the rows of Vh) are cut along
their length into groups of `group_size` consecutive entries. Each group keeps
a float32 scale and zero point (its minimum) and every entry is stored as the
uint8 index of the nearest of 2**bits evenly spaced levels between the group's
minimum and maximum:

  x ≈ code · scale + zero_point,   scale = (max − min) / (2**bits − 1),

so the round-trip error of an entry is at most scale / 2. With 4 bits two
codes share one uint8 (the first in the low nibble), so the codes take half
the bytes of 8-bit ones.

Layout, for `x` of shape S quantized along `axis` (length L):

* G = ceil(L / group_size) groups of equal size g = ceil(L / G) (so at most
  `group_size`, and exactly `group_size` when it divides L), g rounded up to
  even for 4 bits; the axis is padded, repeating its last entry (which leaves
  every group's range unchanged), to G · g entries;
* ``codes.shape == S[:axis] + (G, g * bits // 8) + S[axis + 1:]``;
* ``scale.shape == zero_point.shape == S[:axis] + (G,) + S[axis + 1:]``.

Every other axis is kept in place, so the leading batch axes of a stacked
projector stay leading and a per-slice `jnp.where` can select between two
quantized projectors. No array is ever zero-sized.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

DEFAULT_GROUP_SIZE = 256
SUPPORTED_BITS = (4, 8)


class QuantizedProjector(NamedTuple):
  """A group-quantized array; see the module docstring for the layout.

  Attributes:
    codes: uint8 level indices (two per byte for 4 bits).
    scale: float32 step between levels, one per group.
    zero_point: float32 value of level 0 (the group minimum), one per group.
  """

  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array


def check_bits(bits) -> None:
  """Raises a ValueError unless `bits` is a supported code width."""
  if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
    raise ValueError(
        f"projector_bits={bits!r} is not supported; use None (no quantization), "
        "8 or 4."
    )


def _group_size(length: int, bits: int, group_size: int) -> int:
  # Balanced groups: as few as `group_size` allows, of equal length, so the
  # padding is under one entry per group instead of up to a whole group.
  n_groups = math.ceil(length / group_size)
  g = math.ceil(length / n_groups)
  if bits == 4 and g % 2:
    g += 1  # two codes per byte
  return g


def quantized_shapes(
    shape: Sequence[int], bits: int, axis: int, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedProjector:
  """Shapes (as `jax.ShapeDtypeStruct`s) of `quantize_projector`'s output."""
  check_bits(bits)
  shape = tuple(shape)
  a = axis % len(shape)
  g = _group_size(shape[a], bits, group_size)
  n_groups = math.ceil(shape[a] / g)
  head, tail = shape[:a], shape[a + 1 :]
  # A QuantizedProjector holding shapes rather than arrays (Any: its fields are typed as arrays).
  per_group: Any = jax.ShapeDtypeStruct(head + (n_groups,) + tail, jnp.float32)
  codes: Any = jax.ShapeDtypeStruct(head + (n_groups, g * bits // 8) + tail, jnp.uint8)
  return QuantizedProjector(codes=codes, scale=per_group, zero_point=per_group)


def quantize_projector(
    x: jax.Array, bits: int, axis: int = -1, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedProjector:
  """Quantizes `x` in groups of `group_size` entries along `axis`.

  Args:
    x: a float array (a stack of bases).
    bits: 8 or 4.
    axis: the axis the groups run along (the basis vectors' length).
    group_size: most entries per group; shorter axes form a single group.

  Returns:
    A `QuantizedProjector`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from galore_optax import projector_quantization as pq
    >>> x = jax.random.normal(jax.random.key(0), (4, 300))
    >>> q = pq.quantize_projector(x, bits=4, axis=-1)
    >>> q.codes.shape, q.codes.dtype, q.scale.shape  # 2 groups of 150 codes
    ((4, 2, 75), dtype('uint8'), (4, 2))
    >>> y = pq.dequantize_projector(q, 4, x.shape, axis=-1)
    >>> bool(jnp.max(jnp.abs(x - y)) <= jnp.max(q.scale) / 2 + 1e-6)
    True
  """
  check_bits(bits)
  x = jnp.asarray(x, jnp.float32)
  a = axis % x.ndim
  length = x.shape[a]
  g = _group_size(length, bits, group_size)
  n_groups = math.ceil(length / g)
  pad = n_groups * g - length
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[a] = (0, pad)
    x = jnp.pad(x, widths, mode="edge")
  head, tail = x.shape[:a], x.shape[a + 1 :]
  grouped = x.reshape(head + (n_groups, g) + tail)
  lo = jnp.min(grouped, axis=a + 1, keepdims=True)
  hi = jnp.max(grouped, axis=a + 1, keepdims=True)
  levels = 2**bits - 1
  scale = (hi - lo) / levels
  # A constant group (e.g. the zero basis before the first refresh) has no
  # range: every entry gets code 0 and dequantizes to the minimum exactly.
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round((grouped - lo) / safe), 0, levels).astype(jnp.uint8)
  if bits == 4:
    pairs = codes.reshape(head + (n_groups, g // 2, 2) + tail)
    low = jax.lax.index_in_dim(pairs, 0, axis=a + 2, keepdims=False)
    high = jax.lax.index_in_dim(pairs, 1, axis=a + 2, keepdims=False)
    codes = low | (high << 4)
  return QuantizedProjector(
      codes=codes,
      scale=jnp.squeeze(scale, a + 1),
      zero_point=jnp.squeeze(lo, a + 1),
  )


def dequantize_projector(
    q: QuantizedProjector,
    bits: int,
    shape: Sequence[int],
    axis: int = -1,
    dtype=jnp.float32,
) -> jax.Array:
  """The array `quantize_projector` encoded, in `dtype`.

  Args:
    q: the `QuantizedProjector`.
    bits: the `bits` it was quantized with.
    shape: the original array's shape (the padding is dropped).
    axis: the `axis` it was quantized along.
    dtype: dtype of the result.

  Returns:
    An array of `shape` and `dtype`.
  """
  check_bits(bits)
  shape = tuple(shape)
  a = axis % len(shape)
  codes = q.codes
  if bits == 4:
    codes = jnp.stack([codes & 0x0F, codes >> 4], axis=a + 2)
    codes = codes.reshape(codes.shape[: a + 1] + (-1,) + codes.shape[a + 3 :])
  values = codes.astype(jnp.float32) * jnp.expand_dims(q.scale, a + 1)
  values = values + jnp.expand_dims(q.zero_point, a + 1)
  n_groups, g = values.shape[a], values.shape[a + 1]
  values = values.reshape(values.shape[:a] + (n_groups * g,) + values.shape[a + 2 :])
  if n_groups * g != shape[a]:
    values = jax.lax.slice_in_dim(values, 0, shape[a], axis=a)
  return values.astype(dtype)
