"""How projector bases are stored between refreshes.

A storage turns the float32 bases a refresh computes into their stored form
and back:

  init(plan, leaf, layout) -> stored zeros (sharded like the bases)
  basis_dtype(leaf_dtype) -> the dtype a leaf's bases are stored or used in
  encode(bases, plan, leaf_dtype, count) -> stored   (count: the refresh step)
  decode(stored, plan, dtype) -> {side: (*batch, …) array in dtype}

`PlainStorage` keeps arrays in a float dtype (the gradient's by default);
`QuantizedStorage` keeps Q-GaLore-style group-quantized codes (see
`projector_quantization`); `RegeneratedStorage` keeps only the step of each
matrix's last refresh and redraws a random projection from its keys where it
is used. Every stored field keeps the batch axes first, so a per-matrix
`jnp.where` can choose between two stored projectors.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from galore_optax import axis_specs
from galore_optax import projector_quantization as pq
from galore_optax import refresh as refresh_lib
from galore_optax.plan import LeafPlan
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE

# The axis each side's basis vectors run along, which is also the basis's
# long axis (r <= m and r <= n): projector quantization groups along it.
VECTOR_AXIS = {OUTPUT_SIDE: -2, INPUT_SIDE: -1}


class PlainStorage(NamedTuple):
  """Bases stored as arrays of `dtype` (None: the parameter's dtype)."""

  dtype: Optional[Any] = None

  def basis_dtype(self, leaf_dtype):
    """The dtype the bases of a leaf of `leaf_dtype` are stored in."""
    return jnp.dtype(self.dtype or leaf_dtype)

  def init(self, plan: LeafPlan, leaf, layout) -> dict:
    dtype = self.basis_dtype(jnp.result_type(leaf))
    return {
        side: axis_specs.zeros(
            shape, dtype, layout, layout and plan.basis_spec(side, layout)
        )
        for side, shape in plan.basis_shapes.items()
    }

  def encode(self, bases: dict, plan: LeafPlan, leaf_dtype, count=None) -> dict:
    del plan, count
    return {side: b.astype(self.basis_dtype(leaf_dtype)) for side, b in bases.items()}

  def decode(self, stored: dict, plan: LeafPlan, dtype) -> dict:
    return {side: stored[side].astype(dtype) for side in plan.sides}


class QuantizedStorage(NamedTuple):
  """Bases stored as 8- or 4-bit group-quantized codes (Q-GaLore)."""

  bits: int

  def basis_dtype(self, leaf_dtype):
    """The dtype the bases of a leaf of `leaf_dtype` are used in (their codes are uint8)."""
    return jnp.dtype(leaf_dtype)

  def init(self, plan: LeafPlan, leaf, layout) -> dict:
    del leaf
    stored = {}
    for side, shape in plan.basis_shapes.items():
      shapes = pq.quantized_shapes(shape, self.bits, VECTOR_AXIS[side])
      specs = (None,) * 3
      if layout is not None:
        specs = _quantized_specs(plan.basis_spec(side, layout), shapes, side, layout)
      stored[side] = pq.QuantizedProjector(
          *(axis_specs.zeros(s.shape, s.dtype, layout, spec) for s, spec in zip(shapes, specs))
      )
    return stored

  def encode(self, bases: dict, plan: LeafPlan, leaf_dtype, count=None) -> dict:
    del plan, leaf_dtype, count
    return {
        side: pq.quantize_projector(b, self.bits, axis=VECTOR_AXIS[side])
        for side, b in bases.items()
    }

  def decode(self, stored: dict, plan: LeafPlan, dtype) -> dict:
    return {
        side: pq.dequantize_projector(
            stored[side],
            self.bits,
            plan.basis_shapes[side],
            axis=VECTOR_AXIS[side],
            dtype=dtype,
        )
        for side in plan.sides
    }


class RegeneratedStorage(NamedTuple):
  """Nothing but the step of each matrix's last refresh (int32 per matrix).

  For data-independent refresh methods (APOLLO's random projection): the
  bases are drawn again from the same keys wherever they are used, so the
  projector costs 4 bytes per matrix instead of r·(m or n) values.
  """

  regenerate: Any  # (keys, batch_shape, m, n, rank, sides) -> bases
  dtype: Optional[Any] = None

  def basis_dtype(self, leaf_dtype):
    """The dtype the bases of a leaf of `leaf_dtype` are drawn in."""
    return jnp.dtype(self.dtype or leaf_dtype)

  def init(self, plan: LeafPlan, leaf, layout) -> dict:
    del leaf
    spec = layout and plan.per_matrix_spec(layout)
    return {"refreshed_at": axis_specs.zeros(plan.batch_shape, jnp.int32, layout, spec)}

  def encode(self, bases: dict, plan: LeafPlan, leaf_dtype, count: jax.typing.ArrayLike) -> dict:
    del bases, leaf_dtype  # what is stored is the refresh step, `count`
    return {"refreshed_at": jnp.full(plan.batch_shape, count, jnp.int32)}

  def decode(self, stored: dict, plan: LeafPlan, dtype) -> dict:
    steps = stored["refreshed_at"].reshape(-1)
    keys = refresh_lib.matrix_keys(plan.index, steps, num_matrices=plan.num_matrices)
    v = plan.view
    bases = self.regenerate(keys, (steps.shape[0],), v.m, v.n, plan.rank, plan.sides)
    return {
        side: b.reshape(plan.basis_shapes[side]).astype(self.dtype or dtype)
        for side, b in bases.items()
    }


def _quantized_specs(basis_spec, shapes: pq.QuantizedProjector, side, layout):
  """Codes and group statistics split like the basis: the groups axis takes
  the vector axis' names, the codes within a group stay whole."""
  ndim = len(shapes.scale.shape)
  entries = tuple(axis_specs.names(e) for e in basis_spec) + ((),) * (ndim - len(basis_spec))
  a = VECTOR_AXIS[side] % ndim
  grouped = entries[:a] + (entries[a], ()) + entries[a + 1 :]
  codes = layout.derive(shapes.codes.shape, grouped)
  per_group = layout.derive(shapes.scale.shape, entries)
  return codes, per_group, per_group


def storage_for(projector_dtype, projector_bits, regenerate=None):
  """The storage the `projector_dtype` / `projector_bits` options ask for.

  `regenerate`, the refresh method's `regenerate` function when the options
  ask to store nothing, selects `RegeneratedStorage`.
  """
  if regenerate is not None:
    return RegeneratedStorage(regenerate, projector_dtype)
  if projector_bits is None:
    return PlainStorage(projector_dtype)
  return QuantizedStorage(projector_bits)
