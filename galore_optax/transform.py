"""GaLore: gradient low-rank projection as an optax GradientTransformation."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from galore_optax import masking
from galore_optax import matrix_view
from galore_optax import projection
from galore_optax import refresh as refresh_lib
from galore_optax.adam import scale_by_adam_hf

# Seed of the keys handed to randomized refresh methods (folded with the step).
_REFRESH_SEED = 0x6A10


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: number of updates so far (int32); the projector is refreshed when
      `count % update_proj_gap == 0`.
    projectors: a tree shaped like the parameters: for a projected leaf a dict
      of bases ("u": (*batch, m, r) and/or "vh": (*batch, r, n)), for the
      others `optax.MaskedNode()` (no zero-size placeholder arrays, so orbax
      saves it).
    inner_state: the state of the inner transformation, which sees low-rank
      gradients for projected leaves and full gradients for the others.
  """

  count: chex.Array
  projectors: Any
  inner_state: optax.OptState


class _LeafPlan(NamedTuple):
  """Static per-leaf facts, derived from shapes at trace time."""

  path: str
  view: matrix_view.MatrixView
  sides: tuple[str, ...]
  rank: int

  @property
  def low_rank_shape(self):
    v = self.view
    return projection.low_rank_shape(v.batch_shape, v.m, v.n, self.rank, self.sides)

  @property
  def basis_shapes(self):
    v = self.view
    return projection.basis_shapes(v.batch_shape, v.m, v.n, self.rank, self.sides)


def _static_int(value: Any, name: str) -> int:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} sets array shapes and must be a static Python int; with "
        f"optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap')."
    )
  if isinstance(value, bool) or int(value) != value:
    raise TypeError(f"{name} must be an int, got {value!r}.")
  return int(value)


def _plan_leaves(tree, mask, dimension_numbers, proj_type, rank):
  """A `_LeafPlan` per projected leaf, None for the others (flatten order)."""
  flags = masking.resolve_mask(mask, tree)
  dims = masking.resolve_dimension_numbers(dimension_numbers, tree)
  plans = []
  for (path, leaf), flag, dn in zip(
      jax.tree_util.tree_flatten_with_path(tree)[0], flags, dims
  ):
    if not flag:
      plans.append(None)
      continue
    where = masking.path_to_str(path)
    view = matrix_view.make_view(jnp.shape(leaf), dn, where)
    plans.append(
        _LeafPlan(
            path=where,
            view=view,
            sides=projection.sides_for(proj_type, view.m, view.n),
            rank=projection.effective_rank(rank, view.m, view.n),
        )
    )
  return plans


def _refresh_all(grads, plans, previous, refresh_fn, key, dtypes):
  """New bases for every projected leaf; equal-shaped matrices in one call.

  Grouping by (m, n, rank, sides) turns the refresh of, say, 24 layers' q
  projections into one batched decomposition instead of 24 small ones.
  """
  groups: dict[tuple, list[int]] = {}
  for i, plan in enumerate(plans):
    if plan is not None:
      v = plan.view
      groups.setdefault((v.m, v.n, plan.rank, plan.sides), []).append(i)
  new = list(previous)
  for gid, ((m, n, r, sides), members) in enumerate(groups.items()):
    stacked = jnp.concatenate(
        [
            matrix_view.to_matrix(grads[i], plans[i].view)
            .reshape(-1, m, n)
            .astype(jnp.float32)
            for i in members
        ]
    )
    prev = {
        side: jnp.concatenate(
            [
                previous[i][side].reshape((-1,) + previous[i][side].shape[-2:])
                for i in members
            ]
        ).astype(jnp.float32)
        for side in sides
    }
    bases = refresh_fn(stacked, r, sides, prev, jax.random.fold_in(key, gid))
    offset = 0
    for i in members:
      size = math.prod(plans[i].view.batch_shape)
      new[i] = {
          side: bases[side][offset : offset + size]
          .reshape(plans[i].basis_shapes[side])
          .astype(dtypes[i])
          for side in sides
      }
      offset += size
  return new


def scale_by_galore(
    rank: int = 128,
    *,
    update_proj_gap: Union[int, chex.Array] = 200,
    scale: Union[float, chex.Array] = 1.0,
    proj_type: str = "std",
    inner: Optional[optax.GradientTransformation] = None,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    dimension_numbers: Optional[Any] = None,
    refresh: str = "svd",
    projector_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Runs `inner` on low-rank projections of the gradients (GaLore).

  For each projected leaf, viewed as a stack of (out × in) matrices G, every
  `update_proj_gap` steps (0-based steps 0, T, 2T, …) the projector P is
  refreshed from the current gradient; each step the low-rank gradient
  R = project(G) goes through `inner` (whose moments are therefore low-rank),
  and the result is projected back and multiplied by `scale`. Leaves that are
  not projected go through the same `inner` at full size, in the same state.

  Args:
    rank: rank of the projection; clamped to the smaller side of each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: multiplier of the projected-back update (α; the paper uses 0.25).
    proj_type: 'std' (compress the smaller side, as galore-torch),
      'reverse_std', 'left' (output side), 'right' (input side) or 'full'.
    inner: transformation run on the low-rank gradients; default the Adam of
      galore-torch's `GaLoreAdamW` (`scale_by_adam_hf`). If `params` are
      given it receives them projected like the gradients (PᵀW).
    mask: pytree of bools (True = projected) or callable(params) returning
      one. Default: every leaf with at least two axes. See `path_mask`.
    dimension_numbers: a `DimensionNumbers` for every leaf, a pytree of them
      (None entries for unprojected leaves), or a callable(params) returning
      one. Default: Flax layout, reduction axis -2 and output axis -1; other
      axes are batch axes with one projector per slice.
    refresh: how the projector is recomputed: 'svd' (exact float32 SVD),
      'randomized' (randomized range finder, one power iteration), 'power'
      (subspace iteration warm-started from the previous projector), or a
      refresh function such as `go.randomized_refresh(oversample=16)`.
    projector_dtype: dtype the bases are stored in; default the leaf's dtype.

  Returns:
    An `optax.GradientTransformation` whose state is a `GaLoreState`.

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024. https://arxiv.org/abs/2403.03507

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    >>> tx = optax.chain(go.scale_by_galore(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].shape   # low-rank first moment
    (4, 16)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
  """
  rank = _static_int(rank, "rank")
  if rank <= 0:
    raise ValueError(f"rank must be positive, got {rank}.")
  if not isinstance(update_proj_gap, jax.core.Tracer) and update_proj_gap <= 0:
    raise ValueError(f"update_proj_gap must be positive, got {update_proj_gap}.")
  projection.check_proj_type(proj_type)
  refresh_fn = refresh_lib.get_refresh_method(refresh)
  inner = scale_by_adam_hf() if inner is None else inner

  def plans_for(tree):
    return _plan_leaves(tree, mask, dimension_numbers, proj_type, rank)

  def basis_dtype(leaf):
    return jnp.dtype(projector_dtype or jnp.result_type(leaf))

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params)
    projectors, low_rank_params = [], []
    for leaf, plan in zip(leaves, plans):
      if plan is None:
        projectors.append(optax.MaskedNode())
        low_rank_params.append(leaf)
      else:
        projectors.append(
            {
                side: jnp.zeros(shape, basis_dtype(leaf))
                for side, shape in plan.basis_shapes.items()
            }
        )
        low_rank_params.append(jnp.zeros(plan.low_rank_shape, jnp.result_type(leaf)))
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projectors=treedef.unflatten(projectors),
        inner_state=inner.init(treedef.unflatten(low_rank_params)),
    )

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    # Plain dicts: containers such as nnx.Optimizer's State mappings would
    # otherwise differ from the freshly built ones across the lax.cond.
    previous = [
        stored if plan is None else {side: stored[side] for side in plan.sides}
        for stored, plan in zip(treedef.flatten_up_to(state.projectors), plans)
    ]
    projected = [i for i, plan in enumerate(plans) if plan is not None]

    def fresh():
      return _refresh_all(
          leaves,
          plans,
          previous,
          refresh_fn,
          jax.random.fold_in(jax.random.key(_REFRESH_SEED), state.count),
          [basis_dtype(leaf) for leaf in leaves],
      )

    if projected:
      bases = jax.lax.cond(
          state.count % update_proj_gap == 0, fresh, lambda: list(previous)
      )
    else:
      bases = list(previous)

    def to_low_rank(tree_leaves):
      out = list(tree_leaves)
      for i in projected:
        out[i] = projection.project(
            matrix_view.to_matrix(tree_leaves[i], plans[i].view), bases[i]
        ).astype(tree_leaves[i].dtype)
      return treedef.unflatten(out)

    # Transforms that read params (shapes for Adafactor, decay, ...) see them
    # in the same low-rank coordinates; under jit the projection is dropped
    # when the inner transform does not use it.
    low_rank_params = None if params is None else to_low_rank(
        treedef.flatten_up_to(params)
    )
    inner_updates, inner_state = inner.update(
        to_low_rank(leaves), state.inner_state, low_rank_params
    )
    out = treedef.flatten_up_to(inner_updates)
    for i in projected:
      full = projection.project_back(out[i] * scale, bases[i])
      out[i] = matrix_view.from_matrix(full, plans[i].view).astype(leaves[i].dtype)
    return treedef.unflatten(out), GaLoreState(
        count=optax.safe_increment(state.count),
        projectors=treedef.unflatten(bases),
        inner_state=inner_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
