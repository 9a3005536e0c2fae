"""What GaLore applies to a projected leaf, given the inner transform's result.

An output turns the inner update N of the low-rank gradient R = project(G)
into the full-shape update of the leaf, and may keep per-leaf state:

  stateful: bool
  init(plan, layout) -> per-leaf state (stateful outputs only)
  apply(plan, grad, low_rank_grad, inner_update, bases, scale, leaf_state)
      -> (update in the leaf's layout, leaf_state)

`ProjectBack` is GaLore's α · project_back(N). `FiraResidual` adds back the
part of the gradient the projection drops, and `ApolloScaling` applies the
full gradient scaled by what the low-rank Adam says; both read N before
Adam's step size (an inner with `bias_correction=False`, the step size later
in the chain) and guard their full-rank term with a norm-growth limiter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from galore_optax import axis_specs
from galore_optax import matrix_view
from galore_optax import projection
from galore_optax.plan import LeafPlan
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE

# Both references: 1e-8 in the denominators of the factors and the limiter.
_NORM_EPS = 1e-8


class ProjectBack(NamedTuple):
  """GaLore: the inner update projected back to full shape, times α."""

  stateful = False

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    del low_rank_grad
    update = projection.project_back_leaf(inner_update * scale, bases, plan.view)
    return update.astype(grad.dtype), leaf_state


def _norms(x, axes):
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


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

  def __call__(self, plan: LeafPlan, term, previous):
    view = plan.view
    roles = view.output_axes + view.reduction_axes
    norm = _norms(term, roles)
    prev = jnp.expand_dims(previous, roles)
    ratio = jnp.maximum(norm / (prev + _NORM_EPS), self.gamma) / self.gamma
    divisor = jnp.where(prev < 0, 1.0, ratio)
    return term / divisor, jnp.squeeze(norm / divisor, roles)


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
    view = plan.view
    phi = scaling_factor(plan, low_rank_grad, inner_update, per_channel=True)
    back = projection.project_back_leaf(low_rank_grad, bases, view).astype(jnp.float32)
    residual = (grad.astype(jnp.float32) - scale * back) * matrix_view.from_matrix(phi, view)
    residual, leaf_state = self.limiter(plan, residual, leaf_state)
    update = scale * projection.project_back_leaf(inner_update, bases, view).astype(jnp.float32)
    return (update + residual).astype(grad.dtype), leaf_state


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
    phi = scaling_factor(plan, low_rank_grad, inner_update, self.per_channel)
    term = grad.astype(jnp.float32) * matrix_view.from_matrix(phi, plan.view)
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    if self.scale_front:
      term = term * root
    if self.limit:
      term, leaf_state = self.limiter(plan, term, leaf_state)
    if not self.scale_front:
      term = term * root
    return term.astype(grad.dtype), leaf_state
