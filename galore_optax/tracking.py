"""How a projector moves between refreshes: subspace tracking.

A refresh recomputes a basis from scratch when the schedule says so. A tracker
instead moves each projected leaf's bases a little at every other step, from
that step's gradient, after the update has used them:

  init(plan, layout, dtype) -> per-leaf state
  advance(plan, grad, bases, state, count, dtype) -> (bases, state)

where `dtype` is the dtype the bases are stored in, `bases` the leaf's bases
as stored, decoded to float32 ({side: (*batch, …)}), `grad` the leaf's
gradient and `count` the GaLore step count.
`OnlinePCA` is Online Subspace Descent's tracker.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from galore_optax import axis_specs
from galore_optax import matrix_view
from galore_optax import refresh as refresh_lib
from galore_optax import validation
from galore_optax.plan import LeafPlan
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE


def official_projector_optimizer() -> optax.GradientTransformation:
  """`torch.optim.AdamW`'s defaults without the learning rate: OSD's projector optimizer.

  Adam with eps 1e-8 after the bias correction, and decoupled weight decay 0.01
  (torch decays P by lr·0.01 before the Adam step: the same update).
  """
  return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.add_decayed_weights(0.01))


def online_pca_gradient(basis: jax.Array, g: jax.Array, side: str) -> jax.Array:
  """∂/∂P of ‖Ĝ − Ĝ PᵀP‖²_F (input side, P = Vh) or ‖Ĝ − P Pᵀ Ĝ‖²_F (output side, P = U).

  Ĝ = G/‖G‖_F per matrix. For the input side, with A = G Pᵀ and B = Aᵀ G, the
  gradient is 2 (PPᵀ B − 2B + AᵀA P) / ‖G‖²_F: what autograd gives for the loss,
  for any P (orthonormal or not), without forming an m × n or n × n matrix. The
  output side is the same on the transposes. A zero gradient gives zero (the
  official code divides by ‖G‖ = 0 and gets NaN for good).

  Args:
    basis: (*batch, r, n) input-side or (*batch, m, r) output-side basis, float32.
    g: (*batch, m, n) gradient matrices.
    side: `INPUT_SIDE` or `OUTPUT_SIDE`.

  Returns:
    The gradient, shaped like `basis`, float32.
  """
  return _online_pca_gradient(basis, g, side, jnp.max(jnp.abs(g)))


def _online_pca_gradient(basis, g, side, amax):
  """`online_pca_gradient`, given max |G| over every entry of `g`."""
  t = lambda x: jnp.swapaxes(x, -1, -2)
  if side == OUTPUT_SIDE:
    return t(_online_pca_gradient(t(basis), t(g), INPUT_SIDE, amax))
  p = basis.astype(jnp.float32)
  # The loss does not depend on the scale of G, but ‖G‖² and AᵀG overflow float32
  # for entries of ~1e15 and more, and underflow for tiny ones: such matrices are
  # first scaled by a power of two (`refresh.rescaled`, exact), under a cond so
  # that ordinary ones are read as they are, without a float32 copy.
  amax = amax.astype(jnp.float32)
  ordinary = (amax <= 2.0**_PLAIN_EXPONENT) & (amax >= 2.0**-_PLAIN_EXPONENT)
  return jax.lax.cond(ordinary | ~jnp.isfinite(amax), _pca_gradient,
                      lambda p, g: _pca_gradient(p, refresh_lib.rescaled(g)), p, g)


_PLAIN_EXPONENT = 24  # as `refresh.rescaled`: entries in [2**-24, 2**24] are left alone


def _pca_gradient(p, g):
  """`online_pca_gradient` of the input side, for a G whose products do not overflow."""
  t = lambda x: jnp.swapaxes(x, -1, -2)
  a = jnp.matmul(g, t(p).astype(g.dtype), preferred_element_type=jnp.float32)  # (m, r)
  b = jnp.matmul(t(a).astype(g.dtype), g, preferred_element_type=jnp.float32)  # (r, n)
  norm2 = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=(-2, -1), keepdims=True)
  grad = 2.0 * ((p @ t(p)) @ b - 2.0 * b + (t(a) @ a) @ p)
  return jnp.where(norm2 > 0, grad / jnp.where(norm2 > 0, norm2, 1.0), 0.0)


class OnlinePCA(NamedTuple):
  """Online Subspace Descent: one optimizer step on the online-PCA loss per step.

  After each step t that did not refresh it, every basis P takes one step of
  `optimizer` on the gradient of ‖Ĝ − PPᵀĜ‖² (Ĝ = Gₜ/‖Gₜ‖, the step's
  gradient; `online_pca_gradient`), with step size `learning_rate` (a number
  or a schedule of t): P ← P − η(t) · optimizer(∇). P is not
  re-orthonormalized, as in the official code. The Adam moments are not
  touched when P moves.

  Attributes:
    optimizer: an optax transformation without a learning rate, applied to
      the loss's gradient; None is the official `continuous` projector's
      `torch.optim.AdamW` (`official_projector_optimizer`).
      `optax.identity()` gives `continuous_sgd`; `optax.scale_by_lion(0.9,
      0.99)` gives `continuous_lion`.
    learning_rate: η, a number or a schedule of the step t (the official
      code: lrₜ / (lr₀ · update_proj_gap)).

  References:
    Liang et al., Memory-Efficient LLM Training with Online Subspace
    Descent, NeurIPS 2024. https://arxiv.org/abs/2408.12857
  """

  optimizer: Optional[optax.GradientTransformation] = None
  learning_rate: Any = 1.0 / 200

  def _optimizer(self) -> optax.GradientTransformation:
    return official_projector_optimizer() if self.optimizer is None else self.optimizer

  def init(self, plan: LeafPlan, layout, dtype) -> optax.OptState:
    """The projector optimizer's state, in the bases' stored dtype (as the official
    code keeps it in the parameters' dtype)."""
    bases = {side: axis_specs.zeros(shape, dtype, layout,
                                    layout and plan.basis_spec(side, layout))
             for side, shape in plan.basis_shapes.items()}
    return self._optimizer().init(bases)

  def advance(self, plan: LeafPlan, grad, bases: dict, state, count, dtype):
    g = matrix_view.to_matrix(grad, plan.view)
    as_stored = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
    # The maximum of the leaf as stored: of its matrix view (a Flax kernel's transpose),
    # XLA:CPU's reduction read a float32 copy of the whole leaf, made for every leaf at once
    # (LLaMA-7B stacked: 2.5 GiB over the target).
    amax = jnp.max(jnp.abs(grad))
    grads = {side: _online_pca_gradient(bases[side], g, side, amax) for side in bases}
    step, new_state = self._optimizer().update(as_stored(grads), state, as_stored(bases))
    # Each state leaf keeps its dtype (optax would promote a bf16 state to float32).
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
    lr = self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate
    return jax.tree.map(lambda p, u: p - lr * u.astype(jnp.float32), bases, step), new_state


def check_tracking(tracking, proj_type: str) -> None:
  """Raises unless `tracking` is None or an `OnlinePCA` that can apply."""
  if tracking is None:
    return
  if not isinstance(tracking, OnlinePCA):
    raise TypeError(f"tracking={tracking!r}: pass None or go.OnlinePCA(optimizer=..., "
                    "learning_rate=...).")
  if proj_type == "full":
    raise ValueError("tracking=OnlinePCA(...) moves one basis per matrix; proj_type='full' "
                     "keeps two. Use 'std', 'reverse_std', 'left' or 'right'.")
  optimizer = tracking.optimizer
  if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(f"OnlinePCA(optimizer={optimizer!r}): pass an optax "
                    "GradientTransformation without a learning rate, e.g. optax.identity().")
  if not callable(tracking.learning_rate):
    validation.non_negative(tracking.learning_rate, "OnlinePCA.learning_rate")
