"""When each projected leaf refreshes its projector.

A schedule answers, per projected leaf and step, which of its matrices are
due, and keeps whatever per-leaf state it needs:

  stateful: bool   does `init` create per-leaf state?
  batched: bool    are all due leaves due together (so equal-shaped ones can
                   share one batched decomposition)?
  init(plan, layout) -> per-leaf state (stateful schedules only)
  due(leaf_state, count, plan) -> bool, scalar or per matrix (*batch,)
  advance(leaf_state, due, new_bases, old_bases, count) -> leaf_state

`EveryGap` is GaLore's: every matrix at 0-based steps 0, T, 2T, ….
`LazySchedule` is Q-GaLore's layer-adaptive one (`LazyRefresh`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from galore_optax import axis_specs
from galore_optax import validation
from galore_optax.plan import LeafPlan
from galore_optax.projection import OUTPUT_SIDE


class EveryGap(NamedTuple):
  """Every matrix refreshes when `count % gap == 0` (GaLore, Algorithm 1).

  A gap of None refreshes at step 0 only.
  """

  gap: Any  # an int, an array under optax.inject_hyperparams, or None
  stateful = False
  batched = True

  def init(self, plan, layout):
    """No per-leaf state (`stateful` is False, so nothing stores this)."""
    del plan, layout
    return optax.MaskedNode()

  def due(self, leaf_state, count, plan):
    del leaf_state, plan
    return count == 0 if self.gap is None else count % self.gap == 0

  def advance(self, leaf_state, due, new_bases, old_bases, count):
    """Nothing to advance (`stateful` is False)."""
    del due, new_bases, old_bases, count
    return leaf_state


# Gaps and refresh steps are int32; this cap keeps `step + gap` representable.
_LARGEST_GAP = 2**30


class LazyRefresh(NamedTuple):
  """Q-GaLore's lazy refresh: a matrix whose subspace settles is refreshed less.

  At each refresh of a matrix, |cos| between its new and its previous leading
  basis vector (the first column of U, the first row of Vh; the mean of the
  two for 'full' projections) joins a queue of the last `queue_size` values.
  While the queue is full and its mean is at least `threshold`, every refresh
  multiplies that matrix's gap by `gap_growth` (rounded up, at most
  `max_gap`); the next refresh is one gap after the current one. Each matrix
  (each slice of a stacked leaf) keeps its own gap.

  The absolute value makes the test sign-blind: a flipped vector spans the
  same subspace (Q-GaLore compares signed cosines).

  Attributes:
    queue_size: similarities averaged (Q-GaLore: 5).
    threshold: mean similarity at or above which the gap grows (Q-GaLore: 0.4).
    gap_growth: factor applied to the gap (Q-GaLore: 2).
    max_gap: largest gap; None for no cap below 2**30.

  References:
    Zhang et al., Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients, 2024. https://arxiv.org/abs/2407.08296
  """

  queue_size: int = 5
  threshold: float = 0.4
  gap_growth: float = 2.0
  max_gap: Optional[int] = None


class LazyRefreshState(NamedTuple):
  """Per-matrix schedule of `LazyRefresh`; batch axes lead every field.

  Attributes:
    next_refresh: int32 (*batch,): step of the next refresh (0 before the
      first, so every matrix refreshes at step 0).
    gap: int32 (*batch,): the current gap.
    similarities: float32 (*batch, queue_size): the queue, newest last.
    filled: int32 (*batch,): how many queue entries hold similarities.
  """

  next_refresh: jax.Array
  gap: jax.Array
  similarities: jax.Array
  filled: jax.Array


def resolve_lazy_refresh(value: Any) -> Optional[LazyRefresh]:
  """A validated `LazyRefresh` from None/False (off), True (defaults) or one."""
  if value is None or value is False:
    return None
  if value is True:
    return LazyRefresh()
  if not isinstance(value, LazyRefresh):
    raise TypeError(
        f"lazy_refresh={value!r}: pass None, True or "
        "go.LazyRefresh(queue_size=..., threshold=..., gap_growth=..., max_gap=...)."
    )
  validation.static_int(value.queue_size, "lazy_refresh.queue_size")
  validation.real(value.gap_growth, "lazy_refresh.gap_growth", low=1.0)
  validation.real(
      value.threshold, "lazy_refresh.threshold (compared with |cos|)", low=0.0, high=1.0)
  if value.max_gap is not None:
    validation.static_int(value.max_gap, "lazy_refresh.max_gap")
  return value


def init_lazy_state(
    batch_shape: tuple[int, ...], update_proj_gap, config: LazyRefresh,
    layout=None, specs=(None, None),
) -> LazyRefreshState:
  per_matrix, queue = specs
  zeros = lambda shape, dtype, spec: axis_specs.zeros(shape, dtype, layout, spec)
  return LazyRefreshState(
      next_refresh=zeros(batch_shape, jnp.int32, per_matrix),
      gap=zeros(batch_shape, jnp.int32, per_matrix) + jnp.asarray(update_proj_gap, jnp.int32),
      similarities=zeros(batch_shape + (config.queue_size,), jnp.float32, queue),
      filled=zeros(batch_shape, jnp.int32, per_matrix),
  )


def leading_similarity(new: dict, old: dict) -> jax.Array:
  """|cos| of the leading basis vectors of two bases, per matrix (*batch,).

  A zero basis (before the first refresh) gives 0.
  """
  sims = []
  for side, basis in new.items():
    if side == OUTPUT_SIDE:
      a, b = basis[..., :, 0], old[side][..., :, 0]
    else:
      a, b = basis[..., 0, :], old[side][..., 0, :]
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    dot = jnp.abs(jnp.sum(a * b, axis=-1))
    sims.append(jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0))
  return sum(sims[1:], sims[0]) / len(sims)  # an array start: sum()'s own is int 0


def advance_lazy_state(
    state: LazyRefreshState,
    due: jax.Array,
    similarity: jax.Array,
    step: jax.Array,
    config: LazyRefresh,
) -> LazyRefreshState:
  """The schedule after refreshing the matrices where `due` (at `step`)."""
  # Before a matrix's first refresh there is no previous vector to compare.
  compared = due & (state.next_refresh > 0)
  queue = jnp.concatenate(
      [state.similarities[..., 1:], similarity[..., None].astype(jnp.float32)], -1
  )
  queue = jnp.where(compared[..., None], queue, state.similarities)
  filled = jnp.where(
      compared, jnp.minimum(state.filled + 1, config.queue_size), state.filled
  )
  settled = (filled == config.queue_size) & (
      jnp.mean(queue, axis=-1) >= config.threshold
  )
  cap = min(config.max_gap or _LARGEST_GAP, _LARGEST_GAP)
  grown = jnp.minimum(
      jnp.ceil(state.gap.astype(jnp.float32) * config.gap_growth), cap
  ).astype(jnp.int32)
  gap = jnp.where(compared & settled, jnp.maximum(grown, state.gap), state.gap)
  step = jnp.asarray(step, jnp.int32)
  headroom = jnp.iinfo(jnp.int32).max - step
  next_refresh = jnp.where(due, step + jnp.minimum(gap, headroom), state.next_refresh)
  return LazyRefreshState(
      next_refresh=next_refresh, gap=gap, similarities=queue, filled=filled
  )


class LazySchedule(NamedTuple):
  """Per-matrix gaps that grow while a matrix's subspace stays put."""

  first_gap: Any
  config: LazyRefresh
  stateful = True
  batched = False

  def init(self, plan: LeafPlan, layout) -> LazyRefreshState:
    specs = (None, None)
    if layout is not None:
      specs = (plan.per_matrix_spec(layout), plan.per_matrix_spec(layout, trailing=1))
    return init_lazy_state(plan.batch_shape, self.first_gap, self.config, layout, specs)

  def due(self, leaf_state: LazyRefreshState, count, plan):
    del plan
    return count >= leaf_state.next_refresh

  def advance(self, leaf_state, due, new_bases, old_bases, count):
    similarity = leading_similarity(new_bases, old_bases)
    return advance_lazy_state(leaf_state, due, similarity, count, self.config)


def schedule_for(update_proj_gap, lazy_refresh: Optional[LazyRefresh]):
  """The schedule the `update_proj_gap` / `lazy_refresh` options ask for."""
  if lazy_refresh is None:
    return EveryGap(update_proj_gap)
  return LazySchedule(update_proj_gap, lazy_refresh)
