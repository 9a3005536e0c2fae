"""Adam as galore-torch's `GaLoreAdamW` (and transformers' `AdamW`) computes it.

It differs from `optax.scale_by_adam` in where eps enters: eps is added to
sqrt(v) *before* bias correction, and the bias corrections are folded into the
step size, lr·sqrt(1−β2^t)/(1−β1^t). With `optax.scale_by_adam` the same eps
would be scaled by sqrt(1−β2^t), which matters early in training and on the
small entries of low-rank gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax


class ScaleByAdamHFState(NamedTuple):
  """State of `scale_by_adam_hf`: step count and the two moments."""

  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with eps outside the bias correction.

  update = sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps). Moments are stored in
  the gradient's dtype (or `mu_dtype` for the first) and updated in float32.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to sqrt(v) before bias correction (galore-torch default 1e-6).
    mu_dtype: optional dtype of the first moment.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Kingma and Ba, Adam, 2014; the placement of eps follows
    `transformers.AdamW` and `galore_torch.GaLoreAdamW`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = optax.chain(go.scale_by_adam_hf(), optax.scale(-1e-3))
    >>> params = jnp.ones(3)
    >>> updates, _ = tx.update(jnp.ones(3), tx.init(params))
    >>> updates.round(6)
    Array([-0.001, -0.001, -0.001], dtype=float32)
  """

  def init_fn(params):
    return ScaleByAdamHFState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    step_scale = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)

    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1.0 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(
        lambda g, v: b2 * f32(v) + (1.0 - b2) * jnp.square(f32(g)), updates, state.nu
    )
    new_updates = jax.tree.map(
        lambda g, m, v: (step_scale * (m / (jnp.sqrt(v) + eps))).astype(g.dtype),
        updates,
        mu,
        nu,
    )
    mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, state.mu)
    nu = jax.tree.map(lambda new, old: new.astype(old.dtype), nu, state.nu)
    return new_updates, ScaleByAdamHFState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
