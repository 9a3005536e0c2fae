"""What a projector refresh does to the inner optimizer's state.

By default nothing: GaLore and galore-torch carry the moments over into the
new basis unchanged. `MomentRealignment` maps Adam's moments into the new
subspace instead (LDAdam); `FirstMomentTransport` maps the first moment only
(GoLore); `RootTransport` maps both as COAP's `restore_state` does. A
realignment has these methods:

  check(inner_state, plans)            raises at `init` if it cannot apply
  apply(inner_state, plans, previous, new, moved, count) -> inner_state
  restore(updated, before, plans, moved, count) -> inner_state
                                       (only where a `restores` attribute is True)

where `previous(plan)` and `new(plan)` give a projected leaf's float32 bases
before and after the refresh (as stored, so quantization error is
included), `moved` flags the matrices that were refreshed (by flat index)
and `count` is the GaLore step count. `apply` runs at every step, before
the inner update, and changes a leaf only where it moved, under a
`lax.cond` of its own (`_where_moved`): a conditional over the whole state
would hold every leaf's float32 temporaries at once (GoLore at LLaMA-7B:
1.19 GiB more than the step's target). `restore`, where a realignment has
it, runs after that update, given the inner state before `apply`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from galore_optax import matrix_view
from galore_optax import projection


def _where_moved(flags, compute, *operands):
  """`compute(*operands)` if any matrix of the leaf moved (`flags`), else the operands."""
  return jax.lax.cond(jnp.any(flags), compute, lambda *ops: ops, *operands)


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

  def check(self, inner_state, plans) -> None:
    _moment_slots(inner_state, plans)

  def apply(self, inner_state, plans, previous, new, moved, count):
    flat, treedef = jax.tree.flatten(inner_state)
    slots = _moment_slots(inner_state, plans)
    # The inner Adam's own count, else GaLore's (they agree unless wrapped).
    t = flat[slots.count] if slots.count is not None else count
    for plan in plans:
      if plan is None:
        continue
      i = plan.index
      # No moments to move before the first update.
      flags = jnp.broadcast_to(moved[i] & (t > 0), plan.batch_shape)

      def realigned(m, v, plan=plan, flags=flags):
        c = projection.change_of_basis(new(plan), previous(plan))
        new_m, new_v = _realign_adam(m, v, c, t, self)
        return (matrix_view.select_matrices(flags, new_m, m),
                matrix_view.select_matrices(flags, new_v, v))

      flat[slots.mu[i]], flat[slots.nu[i]] = _where_moved(
          flags, realigned, flat[slots.mu[i]], flat[slots.nu[i]])
    return treedef.unflatten(flat)


class FirstMomentTransport(NamedTuple):
  """Carries Adam's first moment into the new basis at each refresh (GoLore).

  With C = P_newᵀ P_old (`projection.change_of_basis`): m ← C m; the second
  moment is left as it is. This is GoLore's official code, where the two
  paths that carry the moment differ in whether the carried moment is kept:

  * `persistent=True` (the default): it replaces the stored moment, as the
    official ReLoRA-style training (`GoLore.py`, the repository's README)
    does.
  * `persistent=False`: official `golore_torch.AdamW` (what `Go_pt.sh`
    runs): C m is used for the refresh step's update only, and the stored
    moment keeps its value from before the refresh step (neither decayed
    nor given that step's gradient), to be read in the new basis from the
    next step on. `docs/golore_reference.md` calls this a likely bug; it is
    here for step-for-step parity.

  Needs float `mu`/`nu` moments in the inner state, as `MomentRealignment`.

  Attributes:
    persistent: whether the carried first moment is stored.

  References:
    He et al., Subspace Optimization for Large Language Models with
    Convergence Guarantees (GoLore), ICML 2025.
    https://arxiv.org/abs/2410.11289
  """

  persistent: bool = True

  def check(self, inner_state, plans) -> None:
    _moment_slots(inner_state, plans)

  def apply(self, inner_state, plans, previous, new, moved, count):
    flat, treedef = jax.tree.flatten(inner_state)
    slots = _moment_slots(inner_state, plans)
    for plan in plans:
      if plan is None:
        continue
      flags = _after_first_refresh(moved[plan.index], count, plan)

      def carried(m, plan=plan, flags=flags):
        c = projection.change_of_basis(new(plan), previous(plan))
        moved_m = projection.rebase(m.astype(jnp.float32), c).astype(m.dtype)
        return (matrix_view.select_matrices(flags, moved_m, m),)

      j = slots.mu[plan.index]
      (flat[j],) = _where_moved(flags, carried, flat[j])
    return treedef.unflatten(flat)

  @property
  def restores(self) -> bool:
    """Whether the refresh step's inner update is followed by `restore`."""
    return not self.persistent

  def restore(self, updated, before, plans, moved, count):
    """The stored first moments of the matrices moved now, as before `apply`."""
    flat, treedef = jax.tree.flatten(updated)
    old = jax.tree.leaves(before)
    slots = _moment_slots(updated, plans)
    for plan in plans:
      if plan is None:
        continue
      j = slots.mu[plan.index]
      flags = _after_first_refresh(moved[plan.index], count, plan)
      flat[j] = jax.lax.cond(
          jnp.any(flags), lambda kept, stored, flags=flags: matrix_view.select_matrices(
              flags, kept, stored), lambda kept, stored: stored, old[j], flat[j])
    return treedef.unflatten(flat)


class RootTransport(NamedTuple):
  """Carries both Adam moments into the new basis at each change (COAP's `restore_state`).

  With C = P_newᵀ P_old (`projection.change_of_basis`):

    m ← C m
    v ← (C √v)²

  the second moment carried as the square of its carried square root, as
  the official `restore_state=True` does (bytedance/coap): both moments are
  lifted with the old basis and lowered with the new one. Unlike
  `MomentRealignment` it is not bias-aware, and √v does not change sign
  with a flipped basis vector, so the carried v depends on each vector's
  sign (`docs/coap_reference.md`). Every change after the first is carried:
  COAP's correlation steps and its recalibrations.

  Needs float `mu`/`nu` moments in the inner state, as `MomentRealignment`.

  References:
    Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware
    Gradient Projection, CVPR 2025. https://arxiv.org/abs/2412.00071
  """

  def check(self, inner_state, plans) -> None:
    _moment_slots(inner_state, plans)

  def apply(self, inner_state, plans, previous, new, moved, count):
    flat, treedef = jax.tree.flatten(inner_state)
    slots = _moment_slots(inner_state, plans)
    big = float(jnp.finfo(jnp.float32).max)
    for plan in plans:
      if plan is None:
        continue
      flags = _after_first_refresh(moved[plan.index], count, plan)

      def carried(m, v, plan=plan, flags=flags):
        c = projection.change_of_basis(new(plan), previous(plan))
        new_m = _rebase_saturated(m.astype(jnp.float32), c)
        # √v of an infinite v saturated, so that C √v stays finite.
        root = projection.rebase(jnp.minimum(jnp.sqrt(v.astype(jnp.float32)), big**0.5), c)
        new_v = jnp.minimum(jnp.square(root), big)
        return (matrix_view.select_matrices(flags, new_m.astype(m.dtype), m),
                matrix_view.select_matrices(flags, new_v.astype(v.dtype), v))

      mu, nu = slots.mu[plan.index], slots.nu[plan.index]
      flat[mu], flat[nu] = _where_moved(flags, carried, flat[mu], flat[nu])
    return treedef.unflatten(flat)


class ResetMoments(NamedTuple):
  """At each refresh, the inner Adam starts again: zero moments, step count 0 (FRUGAL).

  The moments of the old subspace say nothing about the new one, so FRUGAL
  drops them, and Adam's bias correction restarts with them. The inner's
  step count is shared by all its leaves: use it where every leaf of the
  inner refreshes together (FRUGAL's optimizer runs its unprojected leaves
  through another transformation).
  """

  def check(self, inner_state, plans) -> None:
    _moment_slots(inner_state, plans)

  def apply(self, inner_state, plans, previous, new, moved, count):
    del previous, new, count
    flat, treedef = jax.tree.flatten(inner_state)
    slots = _moment_slots(inner_state, plans)
    any_moved = False
    for plan in plans:
      if plan is None:
        continue
      flags = jnp.broadcast_to(moved[plan.index], plan.batch_shape)
      any_moved = any_moved | jnp.any(flags)
      mu, nu = slots.mu[plan.index], slots.nu[plan.index]
      flat[mu], flat[nu] = _where_moved(flags, lambda *moments, flags=flags: tuple(
          matrix_view.select_matrices(flags, jnp.zeros_like(x), x) for x in moments),
          flat[mu], flat[nu])
    if slots.count is not None:
      flat[slots.count] = jnp.where(any_moved, jnp.zeros_like(flat[slots.count]),
                                    flat[slots.count])
    return treedef.unflatten(flat)


class FirstMomentInput(NamedTuple):
  """A refresh decomposes the first moment, not the gradient (Conda).

  What is decomposed at step t is Mₜ = b1 · project_back(m) + (1 − b1) · Gₜ,
  the full-size first moment the inner Adam is about to hold, with m its
  first moment and the bases before the refresh. With `rank=None` (every
  singular vector) project_back is exact, so Mₜ is Conda's full first
  moment; at step 0, m = 0 and Mₜ ∝ Gₜ.

  Attributes:
    b1: the inner Adam's first-moment decay.
  """

  b1: float = 0.9

  def check(self, inner_state, plans) -> None:
    _moment_slots(inner_state, plans)

  def source(self, inner_state, plans, decode_old):
    """`source(plan, grad)`: the leaf-shaped float32 matrix a refresh decomposes.

    `decode_old(plan)` gives the leaf's float32 bases before the refresh; it
    is called inside the refresh's `lax.cond`, as is the product.
    """
    lifted = lifted_first_moment(inner_state, plans, decode_old)
    return lambda plan, grad: self.b1 * lifted(plan) + (1 - self.b1) * grad.astype(jnp.float32)


def lifted_first_moment(inner_state, plans, decode_old):
  """`moment(plan)`: the inner Adam's first moment projected back to the leaf's shape with the
  bases before the refresh (float32), for a refresh method that reads it (COAP)."""
  flat = jax.tree.leaves(inner_state)
  slots = _moment_slots(inner_state, plans)

  def of(plan):
    m = flat[slots.mu[plan.index]].astype(jnp.float32)
    return projection.project_back_leaf(m, decode_old(plan), plan.view).astype(jnp.float32)

  return of


def _after_first_refresh(moved, count, plan):
  """Matrices refreshed now that had a basis before (every refresh but step 0's)."""
  return jnp.broadcast_to(moved & (count > 0), plan.batch_shape)


def _path_entry_name(entry) -> Optional[str]:
  for attr in ("name", "key"):  # NamedTuple fields; dict keys
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
  for plan in plans:
    if plan is None:
      continue
    for name, index in (("mu", mu[plan.index]), ("nu", nu[plan.index])):
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
  new_m = _rebase_saturated(m32, c)
  big = float(jnp.finfo(f32).max)
  variance = v32 / c2 - jnp.square(m32) / jnp.square(c1)
  # An infinite v or m² leaves an unknown, huge variance (inf − inf = NaN):
  # saturated, since (C∘C)'s zeros times inf would be NaN too. NaN stays NaN.
  huge = jnp.isinf(v32) | jnp.isinf(jnp.square(m32) / jnp.square(c1))
  variance = jnp.where(huge, big, variance)
  new_v = c2 * jnp.abs(
      projection.rebase(variance, c, squared=True) + jnp.square(new_m) / jnp.square(c1)
  )
  return new_m.astype(m.dtype), new_v.astype(v.dtype)


def _rebase_saturated(m32, c):
  """C m in float32, saturated where a plain product overflows.

  Moments of a huge gradient (1e38: m near 3.4e38, v = inf): C m's partial
  sums can overflow both ways (inf − inf = NaN), so where the plain map is
  not finite, it is redone in units of 2**k > 8 × the rank (exact), saturated.
  """
  new_m = projection.rebase(m32, c)
  k = max(m32.shape[-2:]).bit_length() + 3
  big = float(jnp.finfo(jnp.float32).max)
  rescaled = jnp.clip(projection.rebase(m32 * 2.0**-k, c) * 2.0**k, -big, big)
  return jnp.where(jnp.isfinite(new_m), new_m, rescaled)


def realignment_for(realign_moments):
  """The realignment the `realign_moments` option asks for (None: none)."""
  if realign_moments is None or realign_moments is False:
    return None
  if realign_moments is True:
    return MomentRealignment()
  return realign_moments
