"""SubTrack++: Grassmannian subspace tracking (Rajabi et al., NeurIPS 2025).

GaLore's low-rank AdamW whose projector is computed by an SVD once, at step
0, and then moved at each refresh by a geodesic step on the Grassmannian
from the projection residual (`refresh.geodesic_refresh`), with the Adam
moments realigned to the new basis (LDAdam's projection-aware rule) and
Fira's recovery scaling of the residual. Built from the core's parts: the
refresh `switch_refresh(1, "svd", geodesic_refresh(η))`, the realignment
`MomentRealignment`, and the output `FiraResidual` (or `ProjectBack`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from galore_optax import fira_apollo
from galore_optax import outputs
from galore_optax import refresh as refresh_lib
from galore_optax import validation
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.alias import galore_adamw_chain
from galore_optax.sharding import public


@public
def subtrack_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    subspace_step_size: optax.ScalarOrSchedule = 10.0,
    realign_moments: bool = True,
    recovery_scaling: bool = True,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  """SubTrack++'s AdamW: GaLore whose subspace is tracked along Grassmann geodesics.

  At step 0 each projected matrix's basis is the SVD of its gradient; at each
  later refresh (0-based steps T, 2T, …) it takes one rank-1 geodesic step of
  angle η·σ from that step's projection residual (`go.geodesic_refresh`).
  With `realign_moments` the Adam moments are mapped into the new basis at
  each refresh (LDAdam's rule, `go.MomentRealignment`); with
  `recovery_scaling` the part of the gradient the projection drops comes
  back, rescaled per channel by ‖N‖/‖R‖ and norm-limited (Fira's residual,
  α inside, as the official code). Adam as galore-torch's, the updated
  weights decayed by lr·wd.

  The official code (criticalml-uw/SubTrack) tracks only matrices projected
  on their output side (wide ones, out < in): for the input side its
  tangent is zero. Here both sides are tracked (the input side on the
  transposes). Its moment map also differs from LDAdam's (it scales the
  second moment by 1 − β₂ and maps one step early from the first basis);
  this is LDAdam's. `docs/subtrack_reference.md` gives the details.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between geodesic steps (T).
    scale: α, the multiplier of the projected-back update (the scripts: 0.25).
    proj_type: 'std', 'reverse_std', 'left' or 'right'; not 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    subspace_step_size: η of the geodesic step (the scripts' constant 10),
      or a schedule of the 0-based step of the refresh: the official
      `st_step_size_scheduler="iterative_decrease"` is
      ``lambda step: eta0 / step``.
    realign_moments: map the moments into each new basis (LDAdam).
    recovery_scaling: add the rescaled, limited residual (Fira's).
    projected: which leaves are projected (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    mu_dtype: optional dtype of the first moment.
    refresh_memory_budget: bytes of float32 matrices one batched SVD (step 0)
      may take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Rajabi et al., SubTrack++: Gradient Subspace Tracking for Scalable LLM
    Training, NeurIPS 2025. https://arxiv.org/abs/2502.01586

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)) + jnp.eye(32, 16), "b": jnp.zeros(16)}
    >>> tx = go.subtrack_adamw(1e-3, rank=4, update_proj_gap=1, subspace_step_size=0.1)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(grads, state, params)
    >>> u = state[0].projectors["w"]["u"]   # moved, and still orthonormal
    >>> bool(jnp.allclose(u.T @ u, jnp.eye(4), atol=1e-5))
    True
  """
  validation.learning_rate(learning_rate)
  if not callable(subspace_step_size):
    validation.non_negative(subspace_step_size, "subspace_step_size")
  validation.choice(realign_moments, "realign_moments", (True, False))
  validation.choice(recovery_scaling, "recovery_scaling", (True, False))
  if proj_type == "full":
    raise ValueError("subtrack_adamw tracks one basis per matrix; proj_type='full' keeps two. "
                     "Use 'std', 'reverse_std', 'left' or 'right'.")
  adam = AdamOptions.from_arguments(locals())
  tracked = refresh_lib.switch_refresh(1, "svd", refresh_lib.geodesic_refresh(subspace_step_size))
  galore = GaLoreOptions.from_arguments(
      locals(), refresh=tracked,
      realign_moments=realign_moments or None).with_realignment_decays(b1, b2)
  if recovery_scaling:
    return optax.chain(*fira_apollo.fira_chain(galore, adam, outputs.FiraResidual(),
                                               learning_rate))
  return galore_adamw_chain(galore, adam, learning_rate)
