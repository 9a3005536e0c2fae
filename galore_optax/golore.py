"""GoLore: GaLore with random orthonormal projectors (He et al., ICML 2025).

GoLore is GaLore's low-rank AdamW with two parts swapped: the refresh draws
a basis uniformly from the orthonormal ones instead of taking the gradient's
leading singular vectors (from a chosen step on, before which it is the
SVD), and each refresh carries the first moment into the new basis.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import optax

from galore_optax import refresh as refresh_lib
from galore_optax import validation
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.realignment import FirstMomentTransport, MomentRealignment
from galore_optax.alias import galore_adamw_chain
from galore_optax.sharding import public


def golore_refresh(random_from_step) -> Union[str, refresh_lib.RefreshFn]:
  """GoLore's refresh: the SVD before `random_from_step`, random orthonormal from it."""
  if isinstance(random_from_step, int) and random_from_step == 0:
    return "random_orthonormal"  # by name, so that regenerate_projector can apply
  return refresh_lib.switch_refresh(random_from_step, "svd", "random_orthonormal")


@public
def golore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    random_from_step: int = 0,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    realign_moments: Union[None, bool, MomentRealignment,
                           FirstMomentTransport] = FirstMomentTransport(),  # noqa: B008 (immutable)
) -> optax.GradientTransformation:
  """GoLore's AdamW: GaLore whose projectors are random orthonormal bases.

  Each refresh at a 0-based step t ≥ `random_from_step` draws every
  matrix's basis uniformly from the orthonormal ones (the Q factor of a
  Gaussian matrix, `refresh="random_orthonormal"`); earlier refreshes take
  the SVD of the gradient, as GaLore. At every refresh after the first, the
  first moment is carried into the new basis, m ← P_newᵀ P_old m, and the
  second moment is kept. Everything else is `galore_adamw`: galore-torch's
  Adam (eps 1e-6 before the bias correction), the projected-back update
  times `scale`, and decay of the updated weights by lr·wd.

  The official code (pkumelon/Golore) switches at `rand_epoch` and keeps
  the carried moment for the refresh step only (`golore_torch.AdamW`);
  pass `realign_moments=go.FirstMomentTransport(persistent=False)` for
  that trajectory step for step. `docs/golore_reference.md` gives the
  details and where the paper differs.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    random_from_step: the first step whose refresh draws at random (an
      int ≥ 0; the official `rand_epoch`). 0, the paper's GoLore, never
      computes an SVD.
    projected: which leaves are projected (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    mu_dtype: optional dtype of the first moment.
    refresh_memory_budget: bytes of float32 matrices one batched SVD may
      take (before `random_from_step`); None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: bases stored group-quantized.
    regenerate_projector: with `random_from_step=0` only: store no bases,
      draw them again from their keys each step.
    realign_moments: what a refresh does to the moments:
      `go.FirstMomentTransport()` (the default, GoLore's), None (kept as
      they are, GaLore's), True or a `go.MomentRealignment` (LDAdam's).

  Returns:
    An `optax.GradientTransformation`.

  References:
    He et al., Subspace Optimization for Large Language Models with
    Convergence Guarantees, ICML 2025. https://arxiv.org/abs/2410.11289

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.golore_adamw(1e-3, rank=4, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> u = state[0].projectors["w"]["u"]       # a random orthonormal basis
    >>> bool(jnp.allclose(u.T @ u, jnp.eye(4), atol=1e-5))
    True
  """
  validation.learning_rate(learning_rate)
  random_from_step = validation.positive_int(random_from_step, "random_from_step", minimum=0)
  adam = AdamOptions.from_arguments(locals())
  galore_options = GaLoreOptions.from_arguments(
      locals(), refresh=golore_refresh(random_from_step)).with_realignment_decays(b1, b2)
  return galore_adamw_chain(galore_options, adam, learning_rate)
