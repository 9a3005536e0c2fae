"""COAP: correlation-aware gradient projection (Xiao et al., CVPR 2025).

GaLore's low-rank AdamW whose projector starts from a one-pass randomized SVD
and then, every `update_proj_gap` steps, takes one clipped gradient step on a
loss that asks the basis to reconstruct the gradient and to agree with the
first moment, with a randomized SVD warm-started from the current basis every
`reproject_factor`-th time (`refresh.coap_refresh`). Built from the core: the
refresh reads the previous bases, the step and the inner Adam's first moment.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from galore_optax import realignment
from galore_optax import refresh as refresh_lib
from galore_optax import validation
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.alias import galore_adamw_chain
from galore_optax.sharding import public


@public
def coap_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 40,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    reproject_factor: int = 5,
    restore_state: bool = False,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  """COAP's AdamW: GaLore whose projector follows the gradient and the first moment.

  At step 0 each projected matrix's basis is a one-pass randomized SVD of its
  gradient; at 0-based steps that are multiples of `update_proj_gap` · K
  (K = `reproject_factor`) the same sketch, warm-started from the current
  basis (recalibration); at the other multiples of `update_proj_gap`, one
  gradient step (size 0.1, clipped to norm 1) of the basis on
  mse(G, PPᵀG) · (1 − mean row cosine of G and the first moment projected
  back) (`go.coap_refresh`). When the basis moves, the Adam moments are kept
  as they are (`restore_state=False`, the official default and every
  official script's) or carried into the new basis (`True`: m ← C m,
  v ← (C √v)², C = P_newᵀ P_old; `go.RootTransport`). Adam as galore-torch's,
  the updated weights decayed by lr·wd. The official code
  (bytedance/coap) runs this step for step; its first sketch's test matrix
  comes from torch's generator (`docs/coap_reference.md`).

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector events (T_u; the official
      LLaMA-1B script: 40).
    scale: α, the multiplier of the projected-back update (the scripts: 0.25).
    proj_type: 'std' (the official choice), 'reverse_std', 'left' or 'right';
      not 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    reproject_factor: every K-th event recalibrates by a randomized SVD.
    restore_state: carry both moments into the new basis at every event after
      the first (needs float moments: `mu_dtype` may lower them, 8-bit ones
      are not available here).
    projected: which leaves are projected (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    mu_dtype: optional dtype of the first moment.
    projector_dtype: dtype the bases are stored in; default the leaf's.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Xiao et al., COAP: Memory-Efficient Training with Correlation-Aware
    Gradient Projection, CVPR 2025. https://arxiv.org/abs/2412.00071

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)) + jnp.eye(32, 16), "b": jnp.zeros(16)}
    >>> tx = go.coap_adamw(1e-3, rank=4, update_proj_gap=1, reproject_factor=3)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(grads, state, params)
    >>> state[0].projectors["w"]["u"].shape
    (16, 4)
  """
  validation.learning_rate(learning_rate)
  update_proj_gap = validation.positive_int(update_proj_gap, "update_proj_gap")
  reproject_factor = validation.positive_int(reproject_factor, "reproject_factor")
  if proj_type == "full":
    raise ValueError("coap_adamw moves one basis per matrix; proj_type='full' keeps two. "
                     "Use 'std', 'reverse_std', 'left' or 'right'.")
  if not isinstance(restore_state, bool):
    raise TypeError(f"restore_state must be True or False, got {restore_state!r}.")
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(
      locals(), refresh=refresh_lib.coap_refresh(update_proj_gap, reproject_factor),
      realign_moments=realignment.RootTransport() if restore_state else None)
  return galore_adamw_chain(galore, adam, learning_rate)
