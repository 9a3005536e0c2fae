"""Adafactor as galore-torch's `GaLoreAdafactor` (and transformers' `Adafactor`).

This differs from `optax.adafactor` in several places that change the numbers:
every leaf with at least two axes is factored (no minimum size), eps1 is added
to g² before the row/column means, the second-moment decay is 1 − t^decay_rate
from the first step, the update is clipped by its own RMS over the whole leaf,
the step size (relative or external) multiplies the update *before* the
optional first moment, and weight decay is scaled by that same step size.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from galore_optax import axis_specs
from galore_optax.sharding import public


class FactoredMoment(NamedTuple):
  """Factored second moment of a leaf with at least two axes.

  Attributes:
    row: running mean of g² + eps1 over the last axis, shape (*lead, m).
    col: running mean of g² + eps1 over the second-to-last axis,
      shape (*lead, n).
  """

  row: chex.Array
  col: chex.Array


class ScaleByAdafactorHFState(NamedTuple):
  """State of `scale_by_adafactor_hf`.

  Attributes:
    count: number of updates so far (int32).
    mu: float32 first moment per leaf (of step-size-scaled updates), or None
      when `beta1` is None.
    nu: per leaf a `FactoredMoment` (leaves with at least two axes) or a
      float32 array of the leaf's shape (vectors and scalars). Zero-size
      leaves hold a (1,) placeholder so the state has no zero-size arrays.
  """

  count: jax.typing.ArrayLike
  mu: Any  # optax.Updates, or None without beta1
  nu: optax.Updates


class AddAdafactorDecayedWeightsState(NamedTuple):
  """Step count, for the relative step size or a learning-rate schedule."""

  count: jax.typing.ArrayLike


class _StepSize(NamedTuple):
  """The step size of transformers' `Adafactor._get_lr`, shared by the update
  and the weight decay so both use the same number at every step."""

  learning_rate: Optional[optax.ScalarOrSchedule]
  eps2: Any
  scale_parameter: bool
  relative_step: bool
  warmup_init: bool

  def __call__(self, count: chex.Array, rms: Optional[chex.Array]) -> chex.Array:
    """Step size at the 0-based step `count` for a leaf whose RMS is `rms`."""
    t = (count + 1).astype(jnp.float32)
    if self.relative_step:
      min_step = 1e-6 * t if self.warmup_init else 1e-2
      size = jnp.minimum(min_step, jax.lax.rsqrt(t))
    elif callable(self.learning_rate):
      size = jnp.asarray(self.learning_rate(count), jnp.float32)
    else:
      size = jnp.asarray(self.learning_rate, jnp.float32)
    if self.scale_parameter:
      assert rms is not None, "scale_parameter needs the weights' RMS"
      size = size * jnp.maximum(jnp.asarray(self.eps2, jnp.float32), rms)
    return size


def _make_step_size(
    learning_rate, eps, scale_parameter, relative_step, warmup_init
) -> _StepSize:
  """Validates the step-size options as transformers' `Adafactor` does."""
  if relative_step is None:
    relative_step = learning_rate is None
  if learning_rate is not None and relative_step:
    raise ValueError(
        "learning_rate and relative_step=True cannot be combined: the relative "
        "step replaces the learning rate. Pass learning_rate=None, or "
        "relative_step=False."
    )
  if learning_rate is None and not relative_step:
    raise ValueError(
        "relative_step=False needs a learning_rate (a float or a schedule)."
    )
  if warmup_init and not relative_step:
    raise ValueError("warmup_init=True requires relative_step=True.")
  try:
    eps1, eps2 = eps
  except (TypeError, ValueError):
    raise ValueError(
        f"eps must be a pair (eps1, eps2) = (regularizer of g², floor of the "
        f"parameter scale), e.g. (1e-30, 1e-3); got {eps!r}."
    ) from None
  del eps1
  return _StepSize(
      learning_rate, eps2, bool(scale_parameter), bool(relative_step), bool(warmup_init))


def tree_rms(tree: Any) -> Any:
  """Root mean square of every leaf, in float32 (0 for zero-size leaves)."""

  def rms(x):
    x = jnp.asarray(x)
    if x.size == 0:
      return jnp.zeros([], jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))

  return jax.tree.map(rms, tree)


def _rms_of(param_rms_tree, params, updates, needed: bool, who: str):
  """Per-leaf parameter RMS aligned with `updates` (None if not needed)."""
  if not needed:
    return jax.tree.map(lambda _: None, updates)
  if param_rms_tree is not None:
    return param_rms_tree
  if params is None:
    raise ValueError(
        f"{who} with scale_parameter=True needs params (the step is relative "
        "to their RMS): call tx.update(grads, state, params), or pass "
        "scale_parameter=False."
    )
  return tree_rms(params)


def _init_second_moment(leaf):
  shape = jnp.shape(leaf)
  if 0 in shape:
    return jnp.zeros((1,), jnp.float32)
  layout = axis_specs.layout_of(leaf)
  if len(shape) < 2:
    return axis_specs.zeros(shape, jnp.float32, layout, layout and layout.like(shape))
  # The row statistic keeps every axis but the last, the column one every
  # axis but the second to last: each keeps those axes' shardings.
  row, col = shape[:-1], shape[:-2] + shape[-1:]
  row_spec = col_spec = None
  if layout is not None:
    e = layout.entries
    row_spec, col_spec = layout.derive(row, e[:-1]), layout.derive(col, e[:-2] + e[-1:])
  return FactoredMoment(
      row=axis_specs.zeros(row, jnp.float32, layout, row_spec),
      col=axis_specs.zeros(col, jnp.float32, layout, col_spec),
  )


def _init_first_moment(leaf):
  shape = jnp.shape(leaf)
  if 0 in shape:
    return jnp.zeros((1,), jnp.float32)
  layout = axis_specs.layout_of(leaf)
  return axis_specs.zeros(shape, jnp.float32, layout, layout and layout.like(shape))


_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def _overflowed(g, row, col, clip_threshold):
  """The factored update of a matrix whose row statistics overflowed float32.

  g² is inf for a finite |g| > 1.8e19, and then mean(row) is inf: the
  update g·√(mean(row)/(row ⊗ col)) would be inf/inf = NaN. Its limit is
  what the RMS clipping makes of it: every entry of an infinite row or column
  gets 0 (as 1/√v·g does in a vector leaf), the others g/√(row ⊗ col) scaled
  to RMS `clip_threshold`; so one huge entry does not stop the rest training.
  """
  inf = jnp.isinf(row)[..., None] | jnp.isinf(col)[..., None, :]
  u = jnp.where(inf, 0.0, jax.lax.rsqrt(row)[..., None] * jax.lax.rsqrt(col)[..., None, :] * g)
  u = jnp.clip(u, -_FLOAT32_MAX, _FLOAT32_MAX)
  rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=(-2, -1), keepdims=True))
  return jnp.where(rms > 0, u * (clip_threshold / jnp.where(rms > 0, rms, 1.0)), 0.0)


@public
def scale_by_adafactor_hf(
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: Union[float, chex.Array] = 1.0,
    decay_rate: Union[float, chex.Array] = -0.8,
    beta1: Optional[Union[float, chex.Array]] = None,
    scale_parameter: bool = True,
    relative_step: Optional[bool] = None,
    warmup_init: bool = False,
    *,
    param_rms: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adafactor's step, step size included, as transformers/galore-torch.

  At step t (1-based), per leaf with gradient g, in float32:

  .. math::
    \hat\beta_2 = 1 - t^{\text{decay\_rate}}, \quad
    V = \hat\beta_2 V + (1-\hat\beta_2)(g^2 + \epsilon_1), \quad
    u = g / \sqrt{V}, \quad
    u \leftarrow \rho_t \cdot u / \max(1, \mathrm{RMS}(u) / d),

  then, with `beta1`, m = β1·m + (1−β1)·u and u = m. For leaves with at least
  two axes V is factored into row and column means over the last two axes
  (leading axes are batch axes) and rebuilt as row ⊗ col / mean(row). The step
  size ρ_t is `learning_rate` (or, with `relative_step`, min(1e-2, 1/√t), or
  min(1e-6·t, 1/√t) with `warmup_init`), times max(eps2, RMS(param)) when
  `scale_parameter`. The result already contains the step size: follow it with
  `optax.scale(-1)` (and, for weight decay, `add_adafactor_decayed_weights`
  before that), not with `scale_by_learning_rate`.

  Args:
    learning_rate: external step size (float or schedule of the 0-based step);
      must be None with `relative_step`.
    eps: (eps1, eps2): regularizer added to g², and floor of the parameter
      RMS in the step size.
    clip_threshold: the update's RMS is clipped to this value.
    decay_rate: exponent of the second-moment decay 1 − t^decay_rate.
    beta1: first-moment decay; None keeps no first moment (the default, and
      the memory-light choice).
    scale_parameter: multiply the step size by max(eps2, RMS(param)).
    relative_step: use the time-dependent step size instead of
      `learning_rate`; None means "when `learning_rate` is None".
    warmup_init: warm the relative step size up linearly (1e-6·t).
    param_rms: optional pytree of per-leaf parameter RMS values (as
      `galore_optax.adafactor.tree_rms(params)` returns) used instead of the
      RMS of `params`. Inside `scale_by_galore` this transformation sees PᵀW,
      whose RMS is not the weights'; `galore_adafactor` passes the weights'.

  Returns:
    An `optax.GradientTransformation` with a `ScaleByAdafactorHFState`.
    Updates have the gradient's dtype, the state float32. `update` needs
    `params` when `scale_parameter` is True and no `param_rms` is given.

  References:
    Shazeer and Stern, Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost, 2018 (https://arxiv.org/abs/1804.04235);
    `transformers.optimization.Adafactor` and `galore_torch.GaLoreAdafactor`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> tx = optax.chain(go.scale_by_adafactor_hf(1e-2, scale_parameter=False),
    ...                  optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["w"][0, 0], updates["b"][0]   # clipped to RMS 1, times 1e-2
    (Array(-0.01, dtype=float32), Array(-0.01, dtype=float32))
  """
  step_size = _make_step_size(
      learning_rate, eps, scale_parameter, relative_step, warmup_init
  )
  eps1 = eps[0]

  def init_fn(params):
    return ScaleByAdafactorHFState(
        count=jnp.zeros([], jnp.int32),
        mu=None if beta1 is None else jax.tree.map(_init_first_moment, params),
        nu=jax.tree.map(_init_second_moment, params),
    )

  def update_fn(updates, state, params=None):
    rms_tree = _rms_of(
        param_rms, params, updates, step_size.scale_parameter, "scale_by_adafactor_hf"
    )
    t = jnp.asarray(optax.safe_increment(state.count), jnp.float32)
    beta2t = 1.0 - jnp.power(t, jnp.asarray(decay_rate, jnp.float32))
    mus = jax.tree.map(lambda _: None, updates) if state.mu is None else state.mu

    def leaf(g, nu, mu, rms):
      if g.size == 0:
        return g, nu, mu
      gf = g.astype(jnp.float32)
      sq = jnp.square(gf) + eps1
      if isinstance(nu, FactoredMoment):
        row = beta2t * nu.row + (1.0 - beta2t) * jnp.mean(sq, axis=-1)
        col = beta2t * nu.col + (1.0 - beta2t) * jnp.mean(sq, axis=-2)
        row_mean = jnp.mean(row, axis=-1, keepdims=True)
        row_factor = jax.lax.rsqrt(row / row_mean)
        u = row_factor[..., None] * jax.lax.rsqrt(col)[..., None, :] * gf
        u = jnp.where(jnp.isinf(row_mean)[..., None], _overflowed(gf, row, col, clip_threshold), u)
        nu = FactoredMoment(row=row, col=col)
      else:
        nu = beta2t * nu + (1.0 - beta2t) * sq
        u = jax.lax.rsqrt(nu) * gf
      u_rms = jnp.sqrt(jnp.mean(jnp.square(u)))
      u = u / jnp.maximum(u_rms / clip_threshold, 1.0)
      u = step_size(state.count, rms) * u
      if mu is not None:
        assert beta1 is not None  # mu exists exactly when beta1 is given
        mu = beta1 * mu + (1.0 - beta1) * u
        u = mu
      return u.astype(g.dtype), nu, mu

    out = jax.tree.map(leaf, updates, state.nu, mus, rms_tree)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), ScaleByAdafactorHFState(
        count=optax.safe_increment(state.count),
        mu=None if state.mu is None else pick(2),
        nu=pick(1),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def add_adafactor_decayed_weights(
    weight_decay: Union[float, chex.Array],
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    scale_parameter: bool = True,
    relative_step: Optional[bool] = None,
    warmup_init: bool = False,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
  """Adds wd·ρ_t·p, Adafactor's weight decay, to the (positive) updates.

  transformers'/galore-torch's Adafactor decays p ← p − wd·ρ_t·p with the
  step size ρ_t of the same step (see `scale_by_adafactor_hf`; with
  `scale_parameter` it depends on each leaf's RMS) and evaluates it on the
  weights *before* the update. Place it after `scale_by_adafactor_hf` (or
  after a `scale_by_galore` wrapping it: the decay applies to the full weights
  and is not scaled by GaLore's α) and before `optax.scale(-1)`, with the same
  step-size options.

  Args:
    weight_decay: decay coefficient.
    learning_rate: as in `scale_by_adafactor_hf`.
    eps: as in `scale_by_adafactor_hf` (eps2 floors the parameter RMS).
    scale_parameter: as in `scale_by_adafactor_hf`.
    relative_step: as in `scale_by_adafactor_hf`.
    warmup_init: as in `scale_by_adafactor_hf`.
    mask: optional pytree of bools or callable, True where to decay.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> tx = go.add_adafactor_decayed_weights(0.5, 0.1, scale_parameter=False)
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
    >>> updates   # 1 + 0.5 * 0.1 * 1
    Array([1.05, 1.05], dtype=float32)
  """
  step_size = _make_step_size(
      learning_rate, eps, scale_parameter, relative_step, warmup_init
  )

  def init_fn(params):
    del params
    return AddAdafactorDecayedWeightsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "add_adafactor_decayed_weights needs params: call tx.update(grads, "
          "state, params)."
      )
    rms_tree = _rms_of(
        None, params, updates, step_size.scale_parameter, "add_adafactor_decayed_weights"
    )
    new_updates = jax.tree.map(
        lambda u, p, rms: (
            u + weight_decay * step_size(state.count, rms) * p.astype(jnp.float32)
        ).astype(u.dtype),
        updates,
        params,
        rms_tree,
    )
    return new_updates, AddAdafactorDecayedWeightsState(
        optax.safe_increment(state.count)
    )

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
