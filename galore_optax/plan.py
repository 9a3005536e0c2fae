"""Per-leaf plans: which leaves are projected, how, and where their state lives.

A `LeafPlan` holds the static facts of one projected leaf, derived from its
shape when a transformation is traced: how it is viewed as a stack of
(out × in) matrices, which side(s) the projection keeps, the rank, and from
those the shapes of its bases and of its low-rank gradient. Because the plan
knows the role of every axis, it is also where the shardings of that leaf's
state are declared (`basis_spec`, `low_rank_spec`, `per_matrix_spec`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from galore_optax import axis_specs
from galore_optax import tree_utils
from galore_optax import masking
from galore_optax import matrix_view
from galore_optax import projection
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE


class LeafPlan(NamedTuple):
  """Static facts of one projected leaf."""

  index: int  # position among the flattened parameter leaves
  path: str
  view: matrix_view.MatrixView
  sides: tuple[str, ...]
  rank: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return self.view.batch_shape

  @property
  def num_matrices(self) -> int:
    return math.prod(self.view.batch_shape)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    v = self.view
    return projection.low_rank_shape(v.batch_shape, v.m, v.n, self.rank, self.sides)

  @property
  def basis_shapes(self) -> dict[str, tuple[int, ...]]:
    v = self.view
    return projection.basis_shapes(v.batch_shape, v.m, v.n, self.rank, self.sides)

  @property
  def group_key(self) -> tuple:
    """Plans with equal keys refresh together in one batched decomposition."""
    return (self.view.m, self.view.n, self.rank, self.sides)

  # Shardings. `layout` is the parameter's (see `axis_specs.layout_of`).

  def _role_entries(self, layout: axis_specs.Layout):
    batch = tuple(layout.entries[a] for a in self.view.batch_axes)
    return batch, layout.merged(self.view.output_axes), layout.merged(self.view.reduction_axes)

  def basis_spec(self, side: str, layout: axis_specs.Layout) -> PartitionSpec:
    """u (*batch, m, r) like the output axes, vh (*batch, r, n) like the input
    axes; the rank axis is replicated, so any rank works."""
    batch, out_e, in_e = self._role_entries(layout)
    nb = len(batch)
    if side == OUTPUT_SIDE:
      entries, rank_axis = batch + (out_e, ()), nb + 1
    else:
      entries, rank_axis = batch + ((), in_e), nb
    return layout.derive(self.basis_shapes[side], entries, frozen={rank_axis})

  def low_rank_spec(self, layout: axis_specs.Layout) -> PartitionSpec:
    """The low-rank gradient keeps the sharding of the axis it keeps."""
    batch, out_e, in_e = self._role_entries(layout)
    nb = len(batch)
    rows = () if OUTPUT_SIDE in self.sides else out_e
    cols = () if INPUT_SIDE in self.sides else in_e
    frozen = {nb} if OUTPUT_SIDE in self.sides else set()
    if INPUT_SIDE in self.sides:
      frozen.add(nb + 1)
    return layout.derive(self.low_rank_shape, batch + (rows, cols), frozen=frozen)

  def per_matrix_spec(self, layout: axis_specs.Layout, trailing: int = 0) -> PartitionSpec:
    """A (*batch, *trailing) leaf with one entry per matrix: batch axes kept."""
    batch, _, _ = self._role_entries(layout)
    shape = self.batch_shape + (1,) * trailing
    return layout.derive(shape, batch + ((),) * trailing)


def _is_float(leaf) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _check_projectable(leaf, where: str) -> None:
  dtype = jnp.result_type(leaf)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(
        f"{where}: complex leaves ({dtype}) are not supported by GaLore's "
        "projection (it would drop the imaginary part); leave the leaf out of "
        "`projected`, or split it into real and imaginary parameters."
    )
  if not _is_float(leaf):
    raise ValueError(
        f"{where}: a {dtype} leaf cannot be projected (it has no gradient to "
        "compress); leave it out of `projected`."
    )


def plan_leaves(
    tree: Any,
    *,
    rank: Any,
    proj_type: str,
    projected: Any,
    dimension_numbers: Any,
) -> list[Optional[LeafPlan]]:
  """A `LeafPlan` per projected leaf of `tree`, None for the others.

  Zero-size leaves are never projected (they have nothing to compress). The
  default selector also skips leaves that are not floating point; an
  explicit `projected` that selects one raises a ValueError naming it.
  """
  flags = masking.resolve_mask(projected, tree)
  dims = masking.resolve_dimension_numbers(dimension_numbers, tree)
  plans = []
  leaves = jax.tree.leaves(tree)
  for index, (path, leaf, flag, dn) in enumerate(
      zip(masking.leaf_paths(tree), leaves, flags, dims)):
    shape = tuple(jnp.shape(leaf))
    if not flag or math.prod(shape) == 0:
      plans.append(None)
      continue
    where = path or "<root>"
    _check_projectable(leaf, where)
    view = matrix_view.make_view(shape, dn, where)
    sides = projection.sides_for(proj_type, view.m, view.n)
    plans.append(
        LeafPlan(
            index=index,
            path=where,
            view=view,
            sides=sides,
            rank=projection.effective_rank(rank, view.m, view.n, sides),
        )
    )
  return plans


def projected(plans: Sequence[Optional[LeafPlan]]) -> list[LeafPlan]:
  return [p for p in plans if p is not None]


class RefreshBatch(NamedTuple):
  """Projected leaves whose matrices a refresh decomposes together.

  Either whole equal-shaped leaves in one batched call (`size` = all their
  matrices), or one stacked leaf in calls of `size` matrices each.
  """

  plans: tuple[LeafPlan, ...]
  size: int  # matrices per decomposition call

  @property
  def looped(self) -> bool:
    return self.size < sum(p.num_matrices for p in self.plans)


def refresh_batches(
    plans: Sequence[LeafPlan], budget_bytes: int, pack: bool = True, devices: int = 1
) -> list[RefreshBatch]:
  """The refresh's calls: at most `budget_bytes` of float32 matrices per device in each.

  With `pack`, equal-shaped leaves share calls (24 layers' q projections in
  one batched decomposition when they fit); without, each leaf has its own.
  A stacked leaf larger than the budget is decomposed in equal calls of as
  many matrices as fit (at least one per device, whatever the budget).
  """
  batches = []
  for group in shape_groups(plans) if pack else [[p] for p in plans]:
    fit = devices * max(1, budget_bytes // (4 * group[0].view.m * group[0].view.n))
    current: list[LeafPlan] = []
    for plan in group:
      if plan.num_matrices > fit:
        batches.append(RefreshBatch((plan,), tree_utils.even_chunk(plan.num_matrices, fit)))
        continue
      if sum(p.num_matrices for p in current) + plan.num_matrices > fit:
        batches.append(RefreshBatch(tuple(current), sum(p.num_matrices for p in current)))
        current = []
      current.append(plan)
    if current:
      batches.append(RefreshBatch(tuple(current), sum(p.num_matrices for p in current)))
  return batches


def shape_groups(plans: Sequence[LeafPlan]) -> list[list[LeafPlan]]:
  """Plans grouped by `group_key`, in first-seen order.

  Grouping turns the refresh of, say, 24 layers' q projections into one
  batched decomposition instead of 24 small ones.
  """
  groups: dict[tuple, list[LeafPlan]] = {}
  for plan in plans:
    groups.setdefault(plan.group_key, []).append(plan)
  return list(groups.values())
