"""Ready-made optimizers: chains of the transformations in this package."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import chex
import optax

from galore_optax.adam import scale_by_adam_hf
from galore_optax.transform import scale_by_galore
from galore_optax.weight_decay import decay_weights_after_update

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _is_static_zero(x) -> bool:
  # Under optax.inject_hyperparams numbers arrive as arrays: keep the term then.
  return isinstance(x, (int, float)) and x == 0


def galore(
    rank: int = 128,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    **galore_kwargs,
) -> optax.GradientTransformation:
  """GaLore with a low-rank Adam inside and no learning rate.

  Chain it with a learning rate (and anything else) like any optax
  transformation. The Adam is galore-torch's (`scale_by_adam_hf`).

  Args:
    rank: projection rank.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's eps, added before bias correction.
    mu_dtype: optional dtype of the first moment.
    **galore_kwargs: keyword arguments of `scale_by_galore` (update_proj_gap,
      scale, proj_type, mask, dimension_numbers, refresh, projector_dtype).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = optax.chain(go.galore(rank=8), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.zeros((32, 16))})
  """
  return scale_by_galore(
      rank, inner=scale_by_adam_hf(b1, b2, eps, mu_dtype), **galore_kwargs
  )


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: Union[int, chex.Array] = 200,
    scale: Union[float, chex.Array] = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    dimension_numbers: Optional[Any] = None,
    *,
    refresh: str = "svd",
    projector_dtype: Optional[Any] = None,
    mu_dtype: Optional[Any] = None,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdamW`, step for step.

  Projected leaves (`mask`) get low-rank Adam moments and the projected-back
  update times `scale`; the others plain Adam. Weight decay p ← p − lr·wd·p is
  applied to the updated weights and is not scaled by `scale`, as in the
  reference.

  Args:
    learning_rate: a float or an optax schedule.
    rank: projection rank (clamped to each matrix's smaller side).
    update_proj_gap: steps between projector refreshes.
    scale: α, the multiplier of the projected-back update (paper: 0.25).
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's eps, added to sqrt(v) before bias correction.
    weight_decay: decoupled weight decay, applied after the update.
    mask: which leaves are projected (pytree of bools or callable); default
      every leaf with at least two axes. See `path_mask`.
    dimension_numbers: see `scale_by_galore`.
    refresh: projector refresh method, see `scale_by_galore`.
    projector_dtype: dtype the projectors are stored in.
    mu_dtype: optional dtype of the first moment.
    weight_decay_mask: which leaves are decayed; default all, as galore-torch.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Zhao et al., GaLore, ICML 2024; `galore_torch.GaLoreAdamW` 1.0.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.galore_adamw(1e-3, rank=4, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  transforms = [
      galore(
          rank,
          b1=b1,
          b2=b2,
          eps=eps,
          mu_dtype=mu_dtype,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          mask=mask,
          dimension_numbers=dimension_numbers,
          refresh=refresh,
          projector_dtype=projector_dtype,
      ),
      optax.scale_by_learning_rate(learning_rate),
  ]
  if not _is_static_zero(weight_decay):
    transforms.append(
        decay_weights_after_update(learning_rate, weight_decay, weight_decay_mask)
    )
  return optax.chain(*transforms)
