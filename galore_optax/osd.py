"""Online Subspace Descent (Liang et al., NeurIPS 2024).

GaLore's low-rank AdamW whose projector is computed by an SVD once, at the
first step, and from then on moved by one optimizer step per step on the
online-PCA loss of that step's gradient (`tracking.OnlinePCA`), instead of an
SVD every T steps.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from galore_optax import validation
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.alias import galore_adamw_chain
from galore_optax.sharding import public
from galore_optax.tracking import OnlinePCA


@public
def osd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    projector_learning_rate: optax.ScalarOrSchedule = 1.0 / 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    projector_optimizer: Optional[optax.GradientTransformation] = None,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  """Online Subspace Descent's AdamW: GaLore with a projector moved by online PCA.

  At step 0 each projected matrix's basis is the SVD of its gradient, as in
  GaLore. After every later step t, the basis P takes one step of
  `projector_optimizer` on the gradient of the online-PCA loss
  ‖Ĝₜ − PPᵀĜₜ‖² (Ĝₜ = Gₜ/‖Gₜ‖_F), with step size
  `projector_learning_rate`: P is never recomputed, and never
  re-orthonormalized. The Adam moments are kept as they are when P moves.
  Everything else is `galore_adamw` (galore-torch's Adam, eps before the
  bias correction, `scale`, decay of the updated weights by lr·wd).

  The official code (kyleliang919/Online-Subspace-Descent, `proj_type=
  "continuous"`) runs this step for step with `projector_optimizer=None`
  (its `torch.optim.AdamW`) and `projector_learning_rate` set to
  lrₜ/(lr₀ · update_proj_gap): the official `update_proj_gap` is the
  inverse of the projector's learning rate, with the weights' schedule
  multiplier (`docs/osd_reference.md`).

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    projector_learning_rate: η, the projector's step size, a number or a
      schedule of the step (the official default: 1/update_proj_gap).
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std' (the official choice: the input side for m ≥ n),
      'reverse_std', 'left' or 'right'; not 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projector_optimizer: an optax transformation without a learning rate
      for the projector's step; None is the official AdamW (Adam, eps 1e-8,
      decoupled decay 0.01). `optax.identity()` is the official
      `continuous_sgd`, `optax.scale_by_lion(0.9, 0.99)` `continuous_lion`.
    projected: which leaves are projected (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    mu_dtype: optional dtype of the first moment.
    refresh_memory_budget: bytes of float32 matrices one batched SVD (step
      0) may take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's (the
      projector step is computed in float32 and stored in it).

  Returns:
    An `optax.GradientTransformation`.

  References:
    Liang et al., Memory-Efficient LLM Training with Online Subspace
    Descent, NeurIPS 2024. https://arxiv.org/abs/2408.12857

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)) + jnp.eye(32, 16), "b": jnp.zeros(16)}
    >>> tx = go.osd_adamw(1e-3, rank=4, projector_learning_rate=0.1)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for step in range(3):
    ...   updates, state = tx.update(grads, state, params)
    >>> int(state[0].tracking_state["w"][0].count)   # projector steps after step 0
    2
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  tracker = OnlinePCA(optimizer=projector_optimizer, learning_rate=projector_learning_rate)
  galore_options = GaLoreOptions.from_arguments(
      locals(), update_proj_gap=None, tracking=tracker)
  return galore_adamw_chain(galore_options, adam, learning_rate)
