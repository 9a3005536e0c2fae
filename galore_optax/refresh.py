"""Projector refresh: bases of the gradient's dominant subspace.

A refresh method maps a float32 stack of gradient matrices (B, m, n) to the
bases named by `sides` ("u": (B, m, r), "vh": (B, r, n)), orthonormal and in
the project's canonical sign convention. Methods share one signature so the
transformation can swap them and batch equal-shaped matrices into one call:

  method(g, rank, sides, previous, key) -> dict[side, array]

`previous` holds the bases from the last refresh (zeros before the first),
for warm-started methods; `key` is a PRNG key for randomized ones.

`LazyRefresh` configures Q-GaLore's layer-adaptive schedule, under which a
matrix whose subspace has stopped moving is refreshed less and less often.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from galore_optax import projection
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE

RefreshFn = Callable[..., dict]


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each vector so that its entry of largest magnitude is positive.

  Singular vectors are defined up to sign, and LAPACK builds disagree on it;
  moments carried over a refresh depend on the sign, so the project fixes one
  convention. The first entry of largest magnitude decides on ties.

  Args:
    vectors: a stack of vectors laid along `axis` (the columns of U use
      axis=-2, the rows of Vh axis=-1).
    axis: the axis that runs along each vector.

  Returns:
    `vectors` with every vector's sign fixed.
  """
  idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  pivot = jnp.take_along_axis(vectors, idx, axis=axis)
  return vectors * jnp.where(pivot < 0, -1.0, 1.0).astype(vectors.dtype)


def _canonical_bases(u: jax.Array, vh: jax.Array, sides) -> dict[str, jax.Array]:
  bases = {}
  if projection.OUTPUT_SIDE in sides:
    bases[projection.OUTPUT_SIDE] = canonical_signs(u, axis=-2)
  if projection.INPUT_SIDE in sides:
    bases[projection.INPUT_SIDE] = canonical_signs(vh, axis=-1)
  return bases


def svd_refresh(g, rank, sides, previous=None, key=None):
  """Exact refresh: the leading singular vectors from a float32 thin SVD."""
  del previous, key
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  return _canonical_bases(u[..., :rank], vh[..., :rank, :], sides)


def _orthonormalize(x: jax.Array) -> jax.Array:
  return jnp.linalg.qr(x)[0]


def _rayleigh_ritz(g: jax.Array, q: jax.Array, rank: int, sides):
  """Leading singular vectors of G restricted to the range of orthonormal Q.

  B = QᵀG is (k × n); through a QR of Bᵀ the only SVD left is of a (k × k)
  matrix, which is fast on every backend (a GPU SVD of a wide matrix is not).
  """
  b = jnp.swapaxes(q, -1, -2) @ g
  q2, r2 = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
  us, _, vsh = jnp.linalg.svd(jnp.swapaxes(r2, -1, -2))
  u = q @ us[..., :rank]
  vh = vsh[..., :rank, :] @ jnp.swapaxes(q2, -1, -2)
  return _canonical_bases(u, vh, sides)


def _range_finder(g: jax.Array, omega: jax.Array, power_iters: int) -> jax.Array:
  """An orthonormal basis of range((G Gᵀ)^q G Ω).

  The sketch is re-orthonormalized before every power iteration but the
  first: one iteration amplifies the spectrum by σ³, which float32 holds for
  the leading directions that carry the energy, and skipping that QR is a
  quarter of the CPU time.
  """
  gt = jnp.swapaxes(g, -1, -2)
  q = g @ omega
  for i in range(power_iters):
    if i:
      q = _orthonormalize(q)
    q = g @ (gt @ q)
  return _orthonormalize(q)


def randomized_refresh(oversample: int = 8, power_iters: int = 1) -> RefreshFn:
  """A randomized range finder (Halko, Martinsson and Tropp, 2011).

  Sketches G with a Gaussian (n × (r + oversample)) matrix, sharpens the
  sketch with `power_iters` power iterations, then extracts the leading
  singular vectors from the small projected problem. Cost O(mn(r+p)) matmuls
  instead of a full SVD.

  Args:
    oversample: extra sketch columns, which make the leading r vectors accurate.
    power_iters: power iterations; each costs two matmuls with G.

  Returns:
    A refresh method for `scale_by_galore(refresh=...)`.
  """

  def refresh(g, rank, sides, previous=None, key=None):
    del previous
    g = g.astype(jnp.float32)
    k = min(rank + oversample, *g.shape[-2:])
    omega = jax.random.normal(key, g.shape[:-2] + (g.shape[-1], k), jnp.float32)
    return _rayleigh_ritz(g, _range_finder(g, omega, power_iters), rank, sides)

  return refresh


def power_refresh(power_iters: int = 1, oversample: int = 0) -> RefreshFn:
  """Subspace iteration warm-started from the previous projector.

  Gradients' dominant subspaces move slowly between refreshes, so a single
  iteration from the last basis recovers the new one at the cost of a few
  matmuls. Before the first refresh (a zero previous basis) it starts from a
  Gaussian sketch, as `randomized_refresh` does.

  Args:
    power_iters: subspace iterations per refresh.
    oversample: extra random columns added to the warm start.

  Returns:
    A refresh method for `scale_by_galore(refresh=...)`.
  """

  def refresh(g, rank, sides, previous=None, key=None):
    g = g.astype(jnp.float32)
    k = min(rank + oversample, *g.shape[-2:])
    n = g.shape[-1]
    cold = jax.random.normal(key, g.shape[:-2] + (n, k), jnp.float32)
    if INPUT_SIDE in previous:  # (B, r, n): its rows span the input side
      warm = jnp.swapaxes(previous[INPUT_SIDE], -1, -2)
    else:  # (B, m, r): map the output-side basis to the input side
      warm = jnp.swapaxes(g, -1, -2) @ previous[OUTPUT_SIDE]
    warm = jnp.concatenate([warm, cold[..., rank:]], axis=-1)
    started = jnp.any(warm[..., :rank] != 0, axis=(-2, -1), keepdims=True)
    omega = jnp.where(started, warm, cold)
    return _rayleigh_ritz(g, _range_finder(g, omega, power_iters), rank, sides)

  return refresh


REFRESH_METHODS: dict[str, RefreshFn] = {
    "svd": svd_refresh,
    "randomized": randomized_refresh(),
    "power": power_refresh(),
}


def get_refresh_method(method) -> RefreshFn:
  """A refresh function from its name or a callable with the refresh signature."""
  if callable(method):
    return method
  try:
    return REFRESH_METHODS[method]
  except (KeyError, TypeError):
    raise ValueError(
        f"refresh={method!r} is unknown; use one of {', '.join(REFRESH_METHODS)} "
        "or a callable such as go.randomized_refresh(oversample=8, power_iters=2)."
    ) from None


# ----------------------------------------------------------------------------
# Lazy (layer-adaptive) refresh schedule.

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
  q = value.queue_size
  if isinstance(q, bool) or not isinstance(q, int) or q < 1:
    raise ValueError(f"lazy_refresh.queue_size must be an int >= 1, got {q!r}.")
  if not value.gap_growth >= 1:
    raise ValueError(
        f"lazy_refresh.gap_growth must be >= 1, got {value.gap_growth!r}."
    )
  if not 0 <= value.threshold <= 1:
    raise ValueError(
        f"lazy_refresh.threshold is compared with |cos|; use a value in [0, 1], "
        f"got {value.threshold!r}."
    )
  m = value.max_gap
  if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
    raise ValueError(f"lazy_refresh.max_gap must be None or an int >= 1, got {m!r}.")
  return value


def init_lazy_state(
    batch_shape: tuple[int, ...], update_proj_gap, config: LazyRefresh
) -> LazyRefreshState:
  return LazyRefreshState(
      next_refresh=jnp.zeros(batch_shape, jnp.int32),
      gap=jnp.full(batch_shape, update_proj_gap, jnp.int32),
      similarities=jnp.zeros(batch_shape + (config.queue_size,), jnp.float32),
      filled=jnp.zeros(batch_shape, jnp.int32),
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
  return sum(sims) / len(sims)


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
