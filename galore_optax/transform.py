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
from galore_optax import projector_quantization as pq
from galore_optax import refresh as refresh_lib
from galore_optax import sharding
from galore_optax import tree_utils
from galore_optax.adam import scale_by_adam_hf

# Seed of the keys handed to randomized refresh methods (folded with the step).
_REFRESH_SEED = 0x6A10


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: number of updates so far (int32); the projector is refreshed when
      `count % update_proj_gap == 0`.
    projectors: a tree shaped like the parameters: for a projected leaf a dict
      of bases ("u": (*batch, m, r) and/or "vh": (*batch, r, n)), each an
      array or, with `projector_bits`, a `QuantizedProjector`; for the others
      `optax.MaskedNode()` (no zero-size placeholder arrays, so orbax saves
      it).
    inner_state: the state of the inner transformation, which sees low-rank
      gradients for projected leaves and full gradients for the others.
    refresh_schedule: with `lazy_refresh`, a tree shaped like the parameters
      holding a `LazyRefreshState` per projected leaf (`optax.MaskedNode()`
      for the others); otherwise `optax.EmptyState()`.
  """

  count: chex.Array
  projectors: Any
  inner_state: optax.OptState
  refresh_schedule: Any = optax.EmptyState()


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


def _shape_groups(plans, indices):
  """Leaf indices grouped by (m, n, rank, sides), in first-seen order.

  Grouping turns the refresh of, say, 24 layers' q projections into one
  batched decomposition instead of 24 small ones.
  """
  groups: dict[tuple, list[int]] = {}
  for i in indices:
    v = plans[i].view
    groups.setdefault((v.m, v.n, plans[i].rank, plans[i].sides), []).append(i)
  return list(groups.values())


def _refresh_group(grads, plans, previous, members, refresh_fn, key):
  """float32 bases for the equal-shaped leaves `members`, in one call.

  `previous` holds every leaf's last bases in float32 (warm starts).
  """
  first = plans[members[0]]
  m, n, r, sides = first.view.m, first.view.n, first.rank, first.sides
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
      )
      for side in sides
  }
  bases = refresh_fn(stacked, r, sides, prev, key)
  out, offset = {}, 0
  for i in members:
    size = math.prod(plans[i].view.batch_shape)
    out[i] = {
        side: bases[side][offset : offset + size].reshape(plans[i].basis_shapes[side])
        for side in sides
    }
    offset += size
  return out


def _select_slices(take_new: jax.Array, new, old):
  """Per matrix of a stack: `new` where `take_new` (*batch,), else `old`.

  Every stored field (bases, quantized codes and scales, schedules) keeps the
  batch axes first, so one broadcast of `take_new` serves them all.
  """

  def pick(a, b):
    flags = take_new.reshape(take_new.shape + (1,) * (a.ndim - take_new.ndim))
    return jnp.where(flags, a, b)

  return jax.tree.map(pick, new, old)


class MomentRealignment(NamedTuple):
  """Maps Adam's moments into the new subspace at each refresh (LDAdam).

  With C = P_newᵀ P_old (`projection.change_of_basis`) and t the inner
  Adam's step count, bias corrections c1 = 1 − b1^t, c2 = 1 − b2^t:

    m ← C m
    v ← c2 · |(C∘C)(v / c2 − m² / c1²) + (C m)² / c1²|

  i.e. the bias-corrected second moment is split into a variance, mapped by
  the squared entries of C (the diagonal of C diag(·) Cᵀ), and the square of
  the mapped mean (Robert et al., LDAdam, the projection-aware update of the
  optimizer states; SubTrack++ adopts the same rule). Both maps are the
  identity when P_new = P_old. The inner's moments are found by name (the
  `mu` and `nu` fields of its state, e.g. `scale_by_adam_hf`,
  `optax.scale_by_adam`, or chains and wrappers holding one of them).

  Attributes:
    b1: the inner Adam's first-moment decay (for its bias correction).
    b2: the inner Adam's second-moment decay.

  References:
    Robert et al., LDAdam: Adaptive Optimization from Low-Dimensional Gradient
    Statistics, ICLR 2025. https://arxiv.org/abs/2410.16103

    Rajabi et al., SubTrack++: Gradient Subspace Tracking for Scalable LLM
    Training, 2025. https://arxiv.org/abs/2502.01586
  """

  b1: float = 0.9
  b2: float = 0.999


def _resolve_realignment(value) -> Optional[MomentRealignment]:
  if value is None or value is False:
    return None
  if value is True:
    return MomentRealignment()
  if not isinstance(value, MomentRealignment):
    raise TypeError(
        f"realign_moments={value!r}: pass None, True or "
        "go.MomentRealignment(b1=..., b2=...) with the inner Adam's decays."
    )
  for name in ("b1", "b2"):
    if not 0 <= getattr(value, name) < 1:
      raise ValueError(
          f"realign_moments.{name} must be in [0, 1), got {getattr(value, name)!r}."
      )
  return value


def _path_entry_name(entry) -> Optional[str]:
  for attr in ("name", "key"):  # NamedTuple fields; dict and nnx State keys
    value = getattr(entry, attr, None)
    if isinstance(value, str):
      return value
  return None


class _MomentSlots(NamedTuple):
  """Where the inner state's Adam moments sit among its flattened leaves."""

  mu: list  # flat index of each parameter leaf's first moment
  nu: list
  count: Optional[int]  # flat index of the same state's step count, if any


def _moment_slots(inner_state, plans) -> _MomentSlots:
  """Finds the `mu`/`nu` leaves of an Adam-like inner state, or raises."""
  flat = jax.tree_util.tree_flatten_with_path(inner_state)[0]
  found: dict[str, dict[tuple, list[int]]] = {"mu": {}, "nu": {}}
  count_paths = {}
  for index, (path, _) in enumerate(flat):
    names = [_path_entry_name(e) for e in path]
    for depth, name in enumerate(names):
      if name in found:
        found[name].setdefault(tuple(path[:depth]), []).append(index)
        break
    if names and names[-1] == "count":
      count_paths[tuple(path[:-1])] = index
  hint = (
      "it works with go.scale_by_adam_hf() and optax.scale_by_adam() (alone, "
      "chained or wrapped); pass realign_moments=None for this inner."
  )
  if not found["mu"] or not found["nu"]:
    raise ValueError(
        "realign_moments: the inner state has no Adam first and second "
        f"moments (state fields named mu and nu); {hint}"
    )
  if len(found["mu"]) > 1 or len(found["nu"]) > 1:
    raise ValueError(
        "realign_moments: the inner state holds more than one set of Adam "
        f"moments, so which to realign is ambiguous; {hint}"
    )
  (parent, mu), (nu_parent, nu) = found["mu"].popitem(), found["nu"].popitem()
  if parent != nu_parent or len(mu) != len(plans) or len(nu) != len(mu):
    raise ValueError(
        "realign_moments: the inner state's mu and nu do not hold one array "
        "per parameter (quantized moments, as in 8-bit Adam, cannot be "
        f"rotated); {hint}"
    )
  for i, plan in enumerate(plans):
    if plan is None:
      continue
    for name, index in (("mu", mu[i]), ("nu", nu[i])):
      leaf = flat[index][1]
      if (
          jnp.shape(leaf) != plan.low_rank_shape
          or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
      ):
        raise ValueError(
            f"realign_moments: {plan.path}: the inner's {name} is "
            f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}, not a float array "
            f"of the low-rank shape {list(plan.low_rank_shape)} (quantized "
            f"moments, as in 8-bit Adam, cannot be rotated); {hint}"
        )
  return _MomentSlots(mu=mu, nu=nu, count=count_paths.get(parent))


def _realign_adam(m, v, c, t, config: MomentRealignment):
  """LDAdam's projection-aware map of one leaf's moments; see MomentRealignment."""
  f32 = jnp.float32
  m32, v32 = m.astype(f32), v.astype(f32)
  t = jnp.maximum(t, 1).astype(f32)  # t = 0: zero moments, any finite map
  c1 = 1.0 - jnp.power(config.b1, t)
  c2 = 1.0 - jnp.power(config.b2, t)
  new_m = projection.rebase(m32, c)
  variance = v32 / c2 - jnp.square(m32) / jnp.square(c1)
  new_v = c2 * jnp.abs(
      projection.rebase(variance, c, squared=True) + jnp.square(new_m) / jnp.square(c1)
  )
  return new_m.astype(m.dtype), new_v.astype(v.dtype)


# The axis each side's basis vectors run along, which is also the basis's
# long axis (r <= m and r <= n): projector quantization groups along it.
_VECTOR_AXIS = {projection.OUTPUT_SIDE: -2, projection.INPUT_SIDE: -1}


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
    projector_bits: Optional[int] = None,
    lazy_refresh: Union[None, bool, refresh_lib.LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
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
    projector_bits: None (bases stored as arrays), 8 or 4: bases stored
      group-quantized (Q-GaLore style; groups of 256 along each basis vector,
      float32 scale and zero point per group, two 4-bit codes per byte; see
      `projector_quantization`) and dequantized to the gradient's dtype
      where used. The refresh itself still runs in float32.
    lazy_refresh: None (every matrix refreshes every `update_proj_gap`
      steps), True or a `go.LazyRefresh(...)`: Q-GaLore's layer-adaptive
      schedule, under which each matrix's gap grows while its leading
      singular vector stays put (see `LazyRefresh`). Leaves refresh
      independently then (one `lax.cond` per leaf inside the refresh step,
      so a leaf that is not due skips its decomposition); the plain step
      is unchanged. The first gap is `update_proj_gap`.
    realign_moments: None (moments carry over a refresh unchanged, as in
      GaLore and galore-torch), True or a `go.MomentRealignment(b1, b2)`
      with the inner Adam's decays: at each refresh the inner's first and
      second moments are mapped into the new basis as in LDAdam (see
      `MomentRealignment`). Needs an inner whose state has float `mu` and
      `nu` moments; others raise a ValueError at `init`.

  Returns:
    An `optax.GradientTransformation` whose state is a `GaLoreState`.

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024. https://arxiv.org/abs/2403.03507

    Zhang et al., Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients, 2024. https://arxiv.org/abs/2407.08296

    Robert et al., LDAdam: Adaptive Optimization from Low-Dimensional Gradient
    Statistics, ICLR 2025. https://arxiv.org/abs/2410.16103

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    >>> tx = optax.chain(go.scale_by_galore(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].shape   # low-rank first moment
    (4, 16)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    >>> q = go.scale_by_galore(rank=4, projector_bits=4).init(params)
    >>> q.projectors["w"]["u"].codes.dtype   # 4-bit codes, two per byte
    dtype('uint8')
  """
  rank = _static_int(rank, "rank")
  if rank <= 0:
    raise ValueError(f"rank must be positive, got {rank}.")
  if not isinstance(update_proj_gap, jax.core.Tracer) and update_proj_gap <= 0:
    raise ValueError(f"update_proj_gap must be positive, got {update_proj_gap}.")
  projection.check_proj_type(proj_type)
  refresh_fn = refresh_lib.get_refresh_method(refresh)
  if projector_bits is not None:
    pq.check_bits(projector_bits)
    if projector_dtype is not None:
      raise ValueError(
          "projector_dtype and projector_bits both set: a quantized projector "
          "is stored as uint8 codes and dequantized to the gradient's dtype; "
          "pass only one of them."
      )
  lazy = refresh_lib.resolve_lazy_refresh(lazy_refresh)
  realign = _resolve_realignment(realign_moments)
  inner = scale_by_adam_hf() if inner is None else inner

  def plans_for(tree):
    return _plan_leaves(tree, mask, dimension_numbers, proj_type, rank)

  def basis_dtype(leaf):
    return jnp.dtype(projector_dtype or jnp.result_type(leaf))

  def encode(bases, dtype):
    """Stored form of float bases: arrays in `dtype`, or quantized."""
    if projector_bits is None:
      return {side: b.astype(dtype) for side, b in bases.items()}
    return {
        side: pq.quantize_projector(b, projector_bits, axis=_VECTOR_AXIS[side])
        for side, b in bases.items()
    }

  def decode(stored, plan, dtype):
    """Bases for use, in `dtype`, from their stored form."""
    if projector_bits is None:
      return {side: stored[side].astype(dtype) for side in plan.sides}
    return {
        side: pq.dequantize_projector(
            stored[side],
            projector_bits,
            plan.basis_shapes[side],
            axis=_VECTOR_AXIS[side],
            dtype=dtype,
        )
        for side in plan.sides
    }

  def init_projector(leaf, plan):
    if projector_bits is None:
      return {
          side: jnp.zeros(shape, basis_dtype(leaf))
          for side, shape in plan.basis_shapes.items()
      }
    return {
        side: pq.QuantizedProjector(
            *(
                jnp.zeros(s.shape, s.dtype)
                for s in pq.quantized_shapes(shape, projector_bits, _VECTOR_AXIS[side])
            )
        )
        for side, shape in plan.basis_shapes.items()
    }

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params)
    projectors, low_rank_params = [], []
    for leaf, plan in zip(leaves, plans):
      if plan is None:
        projectors.append(optax.MaskedNode())
        low_rank_params.append(leaf)
      else:
        projectors.append(init_projector(leaf, plan))
        low_rank_params.append(jnp.zeros(plan.low_rank_shape, jnp.result_type(leaf)))
    schedule = optax.EmptyState()
    if lazy is not None:
      schedule = treedef.unflatten(
          [
              optax.MaskedNode() if plan is None
              else refresh_lib.init_lazy_state(plan.view.batch_shape, update_proj_gap, lazy)
              for plan in plans
          ]
      )
    inner_state = inner.init(treedef.unflatten(low_rank_params))
    if realign is not None:
      _moment_slots(inner_state, plans)  # fail early
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projectors=treedef.unflatten(projectors),
        inner_state=inner_state,
        refresh_schedule=schedule,
    )

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    plans = plans_for(updates)
    # Plain dicts: containers such as nnx.Optimizer's State mappings would
    # otherwise differ from the freshly built ones across the lax.cond.
    stored = [
        stored if plan is None else {side: stored[side] for side in plan.sides}
        for stored, plan in zip(treedef.flatten_up_to(state.projectors), plans)
    ]
    if projector_bits is not None:
      stored = [
          x if plan is None
          else {side: tree_utils.restore_named_tuple(pq.QuantizedProjector, x[side]) for side in plan.sides}
          for x, plan in zip(stored, plans)
      ]
    projected = [i for i, plan in enumerate(plans) if plan is not None]

    if lazy is None:
      schedules = None
      refresh_now = state.count % update_proj_gap == 0
    else:
      schedules = [
          None if plan is None
          else tree_utils.restore_named_tuple(refresh_lib.LazyRefreshState, s)
          for s, plan in zip(treedef.flatten_up_to(state.refresh_schedule), plans)
      ]
      due = {i: state.count >= schedules[i].next_refresh for i in projected}
      refresh_now = jnp.any(jnp.stack([jnp.any(due[i]) for i in projected] or [False]))

    if realign is not None:
      inner_flat, inner_def = jax.tree.flatten(state.inner_state)
      slots = _moment_slots(state.inner_state, plans)
      moments = {i: (inner_flat[slots.mu[i]], inner_flat[slots.nu[i]]) for i in projected}
    else:
      moments = None

    def realigned(previous, new):
      """The moments of every projected leaf mapped from the old to the new bases."""
      t = state.count if slots.count is None else inner_flat[slots.count]
      out = {}
      for i in projected:
        # The bases actually used: quantization error included.
        c = projection.change_of_basis(decode(new[i], plans[i], jnp.float32), previous[i])
        m, v = moments[i]
        new_m, new_v = _realign_adam(m, v, c, t, realign)
        moved = due[i] if lazy is not None else jnp.ones(plans[i].view.batch_shape, bool)
        moved = moved & (t > 0)  # no moments to move before the first update
        out[i] = _select_slices(moved, (new_m, new_v), (m, v))
      return out

    def fresh():
      previous = {i: decode(stored[i], plans[i], jnp.float32) for i in projected}
      key = jax.random.fold_in(jax.random.key(_REFRESH_SEED), state.count)
      new = list(stored)
      new_schedules = None if schedules is None else list(schedules)
      if lazy is None:
        for gid, members in enumerate(_shape_groups(plans, projected)):
          bases = _refresh_group(
              leaves, plans, previous, members, refresh_fn, jax.random.fold_in(key, gid)
          )
          for i in members:
            new[i] = encode(bases[i], basis_dtype(leaves[i]))
        return new, new_schedules, None if realign is None else realigned(previous, new)
      for i in projected:
        refresh_leaf = lambda i=i: _refresh_group(
            leaves, plans, previous, [i], refresh_fn, jax.random.fold_in(key, i)
        )[i]
        bases = jax.lax.cond(jnp.any(due[i]), refresh_leaf, lambda i=i: previous[i])
        new[i] = _select_slices(due[i], encode(bases, basis_dtype(leaves[i])), stored[i])
        new_schedules[i] = refresh_lib.advance_lazy_state(
            schedules[i],
            due[i],
            refresh_lib.leading_similarity(bases, previous[i]),
            state.count,
            lazy,
        )
      return new, new_schedules, None if realign is None else realigned(previous, new)

    inner_state = state.inner_state
    if projected:
      stored, schedules, moments = jax.lax.cond(
          refresh_now,
          fresh,
          lambda: (list(stored), None if schedules is None else list(schedules), moments),
      )
      if moments is not None:
        for i, (m, v) in moments.items():
          inner_flat[slots.mu[i]], inner_flat[slots.nu[i]] = m, v
        inner_state = inner_def.unflatten(inner_flat)
    bases = list(stored)
    if projector_bits is not None:
      for i in projected:
        bases[i] = decode(stored[i], plans[i], leaves[i].dtype)

    def to_low_rank(tree_leaves):
      out = list(tree_leaves)
      for i in projected:
        out[i] = projection.project_leaf(
            tree_leaves[i], bases[i], plans[i].view
        ).astype(tree_leaves[i].dtype)
      return treedef.unflatten(out)

    # Transforms that read params (shapes for Adafactor, decay, ...) see them
    # in the same low-rank coordinates; under jit the projection is dropped
    # when the inner transform does not use it.
    low_rank_params = None if params is None else to_low_rank(
        treedef.flatten_up_to(params)
    )
    inner_updates, inner_state = inner.update(
        to_low_rank(leaves), inner_state, low_rank_params
    )
    out = treedef.flatten_up_to(inner_updates)
    for i in projected:
      out[i] = projection.project_back_leaf(
          out[i] * scale, bases[i], plans[i].view
      ).astype(leaves[i].dtype)
    if lazy is not None:
      schedule = treedef.unflatten(
          [optax.MaskedNode() if s is None else s for s in schedules]
      )
    else:
      schedule = state.refresh_schedule
    return treedef.unflatten(out), GaLoreState(
        count=optax.safe_increment(state.count),
        projectors=treedef.unflatten(stored),
        inner_state=inner_state,
        refresh_schedule=schedule,
    )

  # NNX metadata and Explicit mesh axes: projectors and low-rank moments get
  # shardings of their own shapes (a no-op without a mesh).
  return sharding.sharding_aware(
      optax.GradientTransformation(init_fn, update_fn),
      dimension_numbers=dimension_numbers,
  )
