"""Conda: column-normalized Adam (Adam in the singular basis of its own first moment).

Conda keeps Adam's first moment at full size and, every T steps, takes the
complete singular basis of it (all min(m, n) vectors: a rotation, not a
low-rank projection); the second moment is kept in the rotated coordinates,
so the update is normalized along the moment's singular directions. Here it
is GaLore's core with three parts set: `rank=None` (every singular vector),
a refresh that decomposes the first moment (`FirstMomentInput`), and the
first moment carried into each new basis (`FirstMomentTransport`), which is
exact for a rotation, so the inner Adam's first moment is Conda's full one in
rotated coordinates.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from galore_optax import validation
from galore_optax import weight_decay as weight_decay_lib
from galore_optax.adam import scale_by_adam_hf
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.realignment import FirstMomentInput, FirstMomentTransport
from galore_optax.sharding import public
from galore_optax.transform import galore_transform


@public
def scale_by_conda(
    update_proj_gap: int = 2000,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  """Conda's direction, without the learning rate and weight decay.

  For each projected matrix, every `update_proj_gap` steps (0-based steps 0,
  T, 2T, …) the basis is the complete SVD basis of the first moment
  Mₜ = b1·Mₜ₋₁ + (1 − b1)·Gₜ, on the smaller side of the matrix (a square
  rotation Q); Adam runs on Q-rotated gradients with its first moment
  carried exactly into each new basis and its second moment kept as it is;
  the result is rotated back and multiplied by `scale`. Leaves that are not
  projected get the same Adam at full size (no `scale`). The Adam is
  galore-torch's, as in the official code: eps added to √v before the bias
  correction.

  Args:
    update_proj_gap: steps between refreshes of the basis (T).
    scale: the multiplier of the rotated-back update of projected leaves.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction (the official code's 1e-8).
    projected: which leaves are rotated (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh_memory_budget: bytes of float32 matrices one batched SVD may
      take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.

  Returns:
    An `optax.GradientTransformation` whose state is a `go.GaLoreState`.

  References:
    Wang et al., Conda: Column-Normalized Adam for Training Large Language
    Models Faster, 2025. https://arxiv.org/abs/2509.24218
  """
  options = GaLoreOptions(
      rank=None, update_proj_gap=update_proj_gap, scale=scale, proj_type="std",
      projected=projected, dimension_numbers=dimension_numbers, refresh="svd",
      refresh_memory_budget=refresh_memory_budget, projector_dtype=projector_dtype,
      realign_moments=FirstMomentTransport(), refresh_input=FirstMomentInput(b1))
  AdamOptions(b1=b1, b2=b2, eps=eps)  # validates them
  return galore_transform(options, scale_by_adam_hf(b1, b2, eps))


@public
def conda(
    learning_rate: optax.ScalarOrSchedule,
    update_proj_gap: int = 2000,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
) -> optax.GradientTransformation:
  """Conda, the official optimizer step for step: `scale_by_conda`, the step size, decay.

  The update of a projected matrix is lr·√(1−b2ᵏ)/(1−b1ᵏ)·scale·Qᵀ(m̃/(√ṽ + eps))
  in the rotated coordinates of the complete singular basis Q of the first
  moment (see `scale_by_conda`); then the updated weights are decayed by
  lr·wd, as in the official code (jie040109/Conda) and galore-torch. Its
  state is larger than AdamW's: a full first and second moment and a
  min(m, n)² basis per matrix (`docs/conda_reference.md`).

  At a refresh the first moment is rotated into the new basis and the second
  moment is not (the official design), so a gradient with entries many
  orders of magnitude apart (one of 1e38 among ordinary ones) can give a
  coordinate a huge step: the round-off of the large entry reaches every
  rotated coordinate, some of whose second moments are small.

  Args:
    learning_rate: a float or an optax schedule.
    update_proj_gap: steps between refreshes of the basis (T; the official
      LLaMA scripts: 2000).
    scale: the multiplier of the rotated-back update (the scripts: 0.25).
    b1: first-moment decay.
    b2: second-moment decay (the scripts: 0.99).
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are rotated (pytree of bools or a callable,
      e.g. `go.path_mask(r"attn|mlp")` as the official scripts); default
      every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh_memory_budget: bytes of float32 matrices one batched SVD may
      take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Wang et al., Conda: Column-Normalized Adam for Training Large Language
    Models Faster, 2025. https://arxiv.org/abs/2509.24218

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.conda(1e-3, update_proj_gap=10, scale=0.25)
    >>> state = tx.init(params)
    >>> state[0].projectors["w"]["u"].shape   # the complete basis of the smaller side
    (16, 16)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  return optax.chain(
      scale_by_conda(update_proj_gap, scale, b1, b2, eps, projected=projected,
                     dimension_numbers=dimension_numbers,
                     refresh_memory_budget=refresh_memory_budget,
                     projector_dtype=projector_dtype),
      *weight_decay_lib.decay_after(learning_rate, adam.weight_decay, adam.mask),
  )
