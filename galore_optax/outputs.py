"""What GaLore applies to a projected leaf, given the inner transform's result.

An output turns the inner update N of the low-rank gradient R = project(G)
into the full-shape update of the leaf, and may keep per-leaf state:

  stateful: bool
  init(plan, layout) -> per-leaf state (stateful outputs only)
  apply(plan, grad, low_rank_grad, inner_update, bases, scale, leaf_state)
      -> (update in the leaf's layout, leaf_state)

`ProjectBack` is GaLore's α · project_back(N). `StateFreeResidual` adds a
state-free step on the rest of the gradient (FRUGAL). `FiraResidual` adds back the
part of the gradient the projection drops, and `ApolloScaling` applies the
full gradient scaled by what the low-rank Adam says; both read N before
Adam's step size (an inner with `bias_correction=False`, the step size later
in the chain) and guard their full-rank term with a norm-growth limiter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from galore_optax import axis_specs
from galore_optax import matrix_view
from galore_optax import projection
from galore_optax import tree_utils
from galore_optax.plan import LeafPlan
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE

# Both references: 1e-8 in the denominators of the factors and the limiter.
_NORM_EPS = 1e-8
# A stack of matrices is applied a slice at a time whose float32 matrices fit this.
SLICE_BYTES = 256 * 2**20


def apply_by_slices(output, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale,
                    leaf_state, wait_for=None):
  """`output.apply` on a stack of matrices, a slice of the stack at a time.

  Every output works matrix by matrix, so a stacked leaf (scanned layers)
  is done in a `fori_loop` over slices of its stack, each slice's update
  written over that slice of the gradient: only one slice's full-size
  temporaries (float32 copies, products) exist at a time, however many
  layers the stack holds and however the scheduler orders the leaves. A
  leaf whose float32 stack fits `SLICE_BYTES`, or whose stack axis is
  sharded, is done in one call. The loop starts once `wait_for` exists (on
  CPU, `tree_utils.after`): the result of another reader of the gradient,
  which XLA would otherwise give a copy of the gradient to keep.
  """
  total = plan.num_matrices
  per_matrix = plan.view.m * plan.view.n * 4
  size = tree_utils.even_chunk(total, max(1, SLICE_BYTES // per_matrix))
  # A stack split over devices stays whole: slicing it would gather it.
  if size == total or axis_specs.split_over_devices(grad, plan.view.batch_axes):
    return output.apply(plan, grad, low_rank_grad, inner_update, bases, scale, leaf_state)
  if wait_for is not None:  # the loop overwrites the gradient: after its other readers
    grad = tree_utils.after(grad, wait_for)
  flat_grad, flat_view = matrix_view.batch_first(grad, plan.view)
  part = plan._replace(view=matrix_view.with_batch(flat_view, size))
  nb = len(plan.batch_shape)
  flatten = lambda a: a.reshape((total,) + a.shape[nb:])
  # What the loop only reads it slices as `tree_utils.slicing_bits` gives it: XLA:CPU would
  # otherwise carry a float32 copy of each whole bf16 stack (bases, low-rank update) through it.
  read = (low_rank_grad, inner_update, bases)
  read_bits = jax.tree.map(lambda a: tree_utils.slicing_bits(flatten(a)), read)

  def body(j, carry):
    updates, state = carry
    start = j * size
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size)

    put = lambda a, v: tree_utils.write_slice(a, v, start)
    low, inner, slice_bases = jax.tree.map(
        lambda b, a: tree_utils.from_bits(take(b), a.dtype), read_bits, read)
    # The gradient's slice is read before its update overwrites it.
    update, new_state = output.apply(part, take(updates), low, inner, slice_bases, scale,
                                     jax.tree.map(take, state))
    return put(updates, update), jax.tree.map(put, state, new_state)

  updates, state = jax.lax.fori_loop(
      0, total // size, body, (flat_grad, jax.tree.map(flatten, leaf_state)))
  return (matrix_view.from_batch_first(updates, plan.view),
          jax.tree.map(lambda a, s: a.reshape(jnp.shape(s)), state, leaf_state))


class ProjectBack(NamedTuple):
  """GaLore: the inner update projected back to full shape, times α."""

  stateful = False

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    del low_rank_grad
    update = projection.project_back_leaf(inner_update * scale, bases, plan.view)
    return update.astype(grad.dtype), leaf_state


INACTIVE_RULES = ("sign_sgd", "sgd")


class StateFreeResidual(NamedTuple):
  """FRUGAL: α · project_back(N), plus a state-free step on what the subspace leaves out.

  The part of the gradient outside the subspace, F = G − project_back(R),
  gets signSGD (`rule="sign_sgd"`: sign(F)) or SGD (`"sgd"`: F), times
  `inactive_scale`; the whole is multiplied by α (FRUGAL's
  `proj_params_lr_scale`), and the learning rate comes later in the chain.
  No state and no normalization on that part: only the subspace has Adam's.

  Attributes:
    rule: "sign_sgd" or "sgd".
    inactive_scale: FRUGAL's `inactive_lr_scale`.
  """

  rule: str = "sign_sgd"
  inactive_scale: float = 1.0
  stateful = False

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    f32 = jnp.float32
    outside = grad.astype(f32) - projection.project_back_leaf(
        low_rank_grad, bases, plan.view).astype(f32)
    if self.rule == "sign_sgd":
      outside = jnp.sign(outside)
    inside = projection.project_back_leaf(inner_update, bases, plan.view).astype(f32)
    update = scale * (inside + self.inactive_scale * outside)
    return update.astype(grad.dtype), leaf_state


def _norms(x, axes):
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


def _norm_of_scaled(x, factor, axes):
  """‖x · factor‖ over `axes` (kept), for a `factor` ≥ 0 constant along the axes
  where it has size 1: per-channel reductions of `x`, no product of x's size.

  A channel whose sum of squares overflows (|x| beyond 1.8e19) is summed again in
  units of its largest |x|, so the norm overflows only where ‖x · factor‖ does.
  """
  x = x.astype(jnp.float32)
  along = tuple(a for a in axes if factor.shape[a] == 1)
  squares = jnp.sum(jnp.square(x), axis=along, keepdims=True)

  def in_units():
    peak = jnp.max(jnp.abs(x), axis=along, keepdims=True)
    unit = jnp.where(peak > 0, peak, 1.0)
    return peak * jnp.sqrt(jnp.sum(jnp.square(x / unit), axis=along, keepdims=True))

  channel = jax.lax.cond(jnp.all(jnp.isfinite(squares)), lambda: jnp.sqrt(squares), in_units)
  return _norms(factor * channel, axes)


def scaling_factor(plan: LeafPlan, low_rank_grad, inner_update, per_channel: bool):
  """‖N‖ / (‖R‖ + 1e-8): per channel of the kept axis, or per matrix.

  A channel is an index of the axis the projection keeps: a row of an
  (m × r) low-rank gradient (input side projected), a column of an (r × n)
  one (output side). Returns (*batch, m, 1), (*batch, 1, n) or (*batch, 1, 1).
  """
  if not per_channel:
    axes = (-2, -1)
  elif plan.sides == (INPUT_SIDE,):
    axes = (-1,)
  elif plan.sides == (OUTPUT_SIDE,):
    axes = (-2,)
  else:
    raise ValueError(
        f"{plan.path}: per-channel scaling needs a one-sided projection; "
        "proj_type='full' keeps no channel axis (use per-tensor scaling)."
    )
  return _norms(inner_update, axes) / (_norms(low_rank_grad, axes) + _NORM_EPS)


class NormGrowthLimiter(NamedTuple):
  """Fira's and APOLLO's limiter on a full-rank term, one value per matrix.

  With n the term's norm and p the stored value: the first step stores n;
  later the term is divided by d = max(n / (p + 1e-8), γ) / γ and n / d is
  stored, so a matrix's term grows by at most a factor γ per step.
  """

  gamma: float = 1.01

  def init(self, plan: LeafPlan, layout):
    spec = layout and plan.per_matrix_spec(layout)
    # Negative: no previous norm yet (a norm is never negative).
    return axis_specs.zeros(plan.batch_shape, jnp.float32, layout, spec) - 1.0

  def divisor(self, norm, previous):
    """What a term of norm `norm` (*batch,) is divided by, and the new state."""
    # A norm beyond float32 (its sum of squares overflowed) saturates: stored
    # as inf, the next step's ratio would be inf/inf = NaN.
    norm = projection.saturated(norm)
    ratio = jnp.maximum(norm / (previous + _NORM_EPS), self.gamma) / self.gamma
    divisor = jnp.where(previous < 0, 1.0, ratio)
    return divisor, norm / divisor

  def __call__(self, plan: LeafPlan, term, previous):
    roles = plan.view.output_axes + plan.view.reduction_axes
    divisor, stored = self.divisor(jnp.squeeze(_norms(term, roles), roles), previous)
    return term / jnp.expand_dims(divisor, roles), stored


class FiraResidual(NamedTuple):
  """Fira: α · project_back(N) plus the limited, rescaled residual.

  The residual is G − α · project_back(R) (fira 1.0.2 keeps α there too),
  multiplied per channel by ‖N‖ / ‖R‖ and passed through the limiter.
  """

  limiter: NormGrowthLimiter = NormGrowthLimiter()
  stateful = True

  def init(self, plan: LeafPlan, layout):
    return self.limiter.init(plan, layout)

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    # With d the limiter's divisor, the update α·P(N) + (G − α·P(R))·φ/d is
    # P(α·N − (α/d)·φ·R) + G·φ/d, since φ scales the channels the projection
    # keeps: one full-size product after the norm instead of two.
    view = plan.view
    roles = view.output_axes + view.reduction_axes
    phi = scaling_factor(plan, low_rank_grad, inner_update, per_channel=True)
    g = grad.astype(jnp.float32)
    # R of a huge gradient can be ±3.4e38 (saturated): project it back in units
    # of 2**k > rank, exactly, so that no partial sum overflows (inf − inf = NaN).
    k = plan.rank.bit_length() + 3
    back = projection.project_back_leaf(
        low_rank_grad.astype(jnp.float32) * 2.0**-k, bases, view) * 2.0**k
    # Differences and products of finite values saturate: inf · (φ = 0) = NaN.
    residual = projection.saturated(
        projection.saturated(g - scale * back) * matrix_view.from_matrix(phi, view))
    divisor, leaf_state = self.limiter.divisor(
        jnp.squeeze(_norms(residual, roles), roles), leaf_state)
    d = divisor[..., None, None]  # per matrix, against the (*batch, rows, cols) low-rank stack
    f32 = lambda x: x.astype(jnp.float32)
    low = scale * f32(inner_update) - (scale / d) * phi * f32(low_rank_grad)
    update = projection.project_back_leaf(low, bases, view)
    scaled_grad = projection.saturated(g * matrix_view.from_matrix(phi, view))
    update = update + scaled_grad / jnp.expand_dims(divisor, roles)
    return update.astype(grad.dtype), leaf_state


class ApolloScaling(NamedTuple):
  """APOLLO: the full gradient times ‖N‖ / ‖R‖, limited, times √scale.

  Attributes:
    per_channel: one factor per channel of the kept axis ('channel'), or one
      per matrix ('tensor').
    scale_front: multiply by √scale before the limiter instead of after.
    limit: apply the norm-growth limiter (apollo-torch's `disable_nl` off).
  """

  per_channel: bool = True
  scale_front: bool = False
  limit: bool = True
  limiter: NormGrowthLimiter = NormGrowthLimiter()

  @property
  def stateful(self) -> bool:
    return self.limit

  def init(self, plan: LeafPlan, layout):
    return self.limiter.init(plan, layout)

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    del bases
    phi = matrix_view.from_matrix(
        scaling_factor(plan, low_rank_grad, inner_update, self.per_channel), plan.view)
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    divisor = None
    if self.limit:
      # The limiter's norm from reductions of the gradient, not from the scaled
      # term: a float32 term made for its norm waits, full size, for the rest of
      # the step (the scheduler computes the limiter's new state, then the
      # weights), while the gradient it is made from is alive then anyway.
      roles = plan.view.output_axes + plan.view.reduction_axes
      factor = phi * root if self.scale_front else phi
      norm = jnp.squeeze(_norm_of_scaled(grad, factor, roles), roles)
      divisor, leaf_state = self.limiter.divisor(norm, leaf_state)
      divisor = jnp.expand_dims(divisor, roles)
    term = grad.astype(jnp.float32) * phi
    if self.scale_front:
      term = term * root
    if divisor is not None:
      term = term / divisor
    if not self.scale_front:
      term = term * root
    return term.astype(grad.dtype), leaf_state
