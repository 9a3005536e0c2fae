"""Adam as galore-torch's `GaLoreAdamW` (and transformers' `AdamW`) computes it.

It differs from `optax.scale_by_adam` in where eps enters: eps is added to
sqrt(v) *before* bias correction, and the bias corrections are folded into the
step size, lr·sqrt(1−β2^t)/(1−β1^t). With `optax.scale_by_adam` the same eps
would be scaled by sqrt(1−β2^t), which matters early in training and on the
small entries of low-rank gradients.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax


class ScaleByAdamHFState(NamedTuple):
  """State of `scale_by_adam_hf`: step count and the two moments."""

  count: jax.typing.ArrayLike
  mu: optax.Updates
  nu: optax.Updates


def _wide_range(dtype) -> bool:
  """Whether `dtype` has float32's exponent range (float32, bfloat16; not float16)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return True
  return jnp.finfo(dtype).maxexp >= jnp.finfo(jnp.float32).maxexp


def scale_by_adam_hf(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with eps outside the bias correction.

  update = sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps). Moments are stored in
  the gradient's dtype (or `mu_dtype` for the first) and updated in float32.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to sqrt(v) before bias correction (galore-torch default 1e-6).
    mu_dtype: optional dtype of the first moment.
    bias_correction: False returns the direction m / (sqrt(v) + eps) alone,
      for a `scale_by_bias_correction` later in the chain (Fira and APOLLO
      read the direction before the step size).

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
    check_real(params, "scale_by_adam_hf")
    return ScaleByAdamHFState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    step_scale = bias_correction_scale(b1, b2, count) if bias_correction else 1.0

    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1.0 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(
        lambda g, v: b2 * f32(v) + (1.0 - b2) * jnp.square(f32(g)), updates, state.nu
    )
    stored_mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, state.mu)
    stored_nu = jax.tree.map(lambda new, old: new.astype(old.dtype), nu, state.nu)
    # The direction reads the moments as stored (rounded to their dtype, as
    # galore-torch's in-place moments are), so each old moment has one
    # reader, the write of the new one, which XLA then does in place; read
    # by both, every old moment would be copied first. Not float16 moments:
    # their range underflows the second moment of a small gradient (1e-4²).
    read = lambda new, kept: kept if _wide_range(kept.dtype) else new
    new_updates = jax.tree.map(
        lambda g, m, v: (step_scale * (f32(m) / (jnp.sqrt(f32(v)) + eps))).astype(g.dtype),
        updates,
        jax.tree.map(read, mu, stored_mu),
        jax.tree.map(read, nu, stored_nu),
    )
    return new_updates, ScaleByAdamHFState(count=count, mu=stored_mu, nu=stored_nu)

  return optax.GradientTransformation(init_fn, update_fn)


def check_real(params, owner: str) -> None:
  """Raises, naming the leaf, for complex leaves (this Adam is real-only)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise ValueError(
          f"{jax.tree_util.keystr(path)}: {owner} works on real numbers and would drop "
          f"the imaginary part of this {jnp.result_type(leaf)} leaf; split it into real "
          "and imaginary parameters, or use optax.scale_by_adam for it."
      )


def _one_minus_power(b, t) -> chex.Array:
  """1 − b^t as −expm1(t · log b), accurate in float32.

  Rounding b^t first loses digits: for b = 0.999 at t = 1, float32 gives
  1 − b^t with a relative error of 1.3e-5 (the references compute it in
  float64), which then differs from the (1 − b) in the moment updates.
  """
  log_b = math.log(b) if isinstance(b, (int, float)) else jnp.log(jnp.asarray(b, jnp.float32))
  return -jnp.expm1(t * log_b)


def bias_correction_scale(b1, b2, count) -> chex.Array:
  """sqrt(1 − b2^t) / (1 − b1^t) at the 1-based step `count`."""
  t = jnp.asarray(count).astype(jnp.float32)
  return jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)


class ScaleByBiasCorrectionState(NamedTuple):
  """Step count of `scale_by_bias_correction`."""

  count: jax.typing.ArrayLike


def scale_by_bias_correction(b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """Multiplies updates by Adam's step-size factor sqrt(1 − b2^t) / (1 − b1^t).

  With `scale_by_adam_hf(bias_correction=False)` earlier in a chain this
  completes galore-torch's Adam step; transformations in between (Fira's
  residual, APOLLO's scaled gradient) see the direction before the step size.

  Args:
    b1: the Adam's first-moment decay.
    b2: the Adam's second-moment decay.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = go.scale_by_bias_correction(0.9, 0.999)
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    >>> updates.round(4)   # sqrt(0.001) / 0.1 at the first step
    Array([0.3162, 0.3162], dtype=float32)
  """

  def init_fn(params):
    del params
    return ScaleByBiasCorrectionState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    factor = bias_correction_scale(b1, b2, count)
    updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    return updates, ScaleByBiasCorrectionState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)
