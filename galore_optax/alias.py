"""Ready-made GaLore optimizers: chains of the transformations in this package.

Every alias takes the GaLore options (`go.GaLoreOptions`: rank,
update_proj_gap, scale, proj_type, mask, dimension_numbers, refresh,
projector_dtype, projector_bits, lazy_refresh, realign_moments), added to
its signature by `options.galore_optimizer`: the first six in the positions
galore-torch users know, the rest as keywords.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_optax import masking
from galore_optax import validation
from galore_optax.adafactor import add_adafactor_decayed_weights
from galore_optax.adafactor import scale_by_adafactor_hf
from galore_optax.adafactor import tree_rms
from galore_optax.adam import scale_by_adam_hf
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax.options import ADAM_8BIT, ADAM_POSITIONAL, ADAMW, EPS_8BIT
from galore_optax.options import AdamOptions, GaLoreOptions, galore_optimizer
from galore_optax.transform import galore_transform
from galore_optax.weight_decay import decay_weights_after_update

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]

NO_8BIT_REALIGNMENT = {"realign_moments": "8-bit moments are codes with block scales and cannot be rotated."}


def _is_static_zero(x) -> bool:
  # Under optax.inject_hyperparams numbers arrive as arrays: keep the term then.
  return isinstance(x, (int, float)) and x == 0


def learning_rate_and_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    *,
    before: Union[bool, MaskOrFn] = None,
    after: Union[bool, MaskOrFn] = None,
) -> list[optax.GradientTransformation]:
  """The learning rate, with decoupled weight decay on either side of it.

  Args:
    learning_rate: a float or a schedule.
    weight_decay: decay coefficient; a static 0 adds no decay transforms.
    before: leaves whose *old* weights are decayed, p·(1 − lr·wd) and then the
      step (bitsandbytes' order): a mask, True for all leaves, None for none.
    after: leaves whose *updated* weights are decayed (galore-torch's order),
      in the same form.

  Returns:
    The transforms to append to a chain after the (unscaled) step.
  """
  as_mask = lambda m: None if m is True else m
  transforms = []
  decays = not _is_static_zero(weight_decay)
  if decays and before is not None:
    transforms.append(optax.add_decayed_weights(weight_decay, as_mask(before)))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  if decays and after is not None:
    transforms.append(
        decay_weights_after_update(learning_rate, weight_decay, as_mask(after))
    )
  return transforms


def decay_after(learning_rate, adam: AdamOptions) -> list[optax.GradientTransformation]:
  """The learning rate, then galore-torch's decay of the updated weights."""
  mask = adam.weight_decay_mask
  return learning_rate_and_decay(
      learning_rate, adam.weight_decay, after=True if mask is None else mask)


def _projected_and(options: GaLoreOptions, projected: bool, other: MaskOrFn):
  """A mask callable: leaves that are (or are not) projected and in `other`."""

  def mask_fn(tree):
    flags = jax.tree.leaves(options.projected_mask(tree))
    try:
      extra = [True] * len(flags) if other is None else masking.resolve_mask(other, tree)
    except (ValueError, TypeError) as e:
      raise type(e)(f"weight_decay_mask: {e}") from None
    return jax.tree.structure(tree).unflatten(
        [f == projected and e for f, e in zip(flags, extra)]
    )

  return mask_fn


def zero_nonfinite(galore: GaLoreOptions) -> optax.GradientTransformation:
  """Sets non-finite elements of the gradients to be projected to zero.

  Before a projection: a NaN/Inf element would otherwise spread to a whole
  row of the low-rank gradient and, at a refresh, to the projector, and then
  poison whole blocks of 8-bit state for the rest of training. The other
  leaves go to the 8-bit Adam as they are, which zeroes such elements itself
  (a copy of them here would be one more full-size buffer).
  """
  zero = optax.stateless(
      lambda updates, params: jax.tree.map(
          lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), updates))
  return optax.masked(zero, galore.projected_mask)


@galore_optimizer(leading=(), options_first=("rank",), adam=("b1", "b2", "eps", "mu_dtype"))
def galore(*, galore: GaLoreOptions, adam: AdamOptions) -> optax.GradientTransformation:
  """GaLore with a low-rank Adam inside and no learning rate.

  Chain it with a learning rate (and anything else) like any optax
  transformation. The Adam is galore-torch's (`scale_by_adam_hf`).

  Args:
    {galore_options}
      `realign_moments=True` realigns with this Adam's b1 and b2.
    {adam_options}

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = optax.chain(go.galore(rank=8), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.zeros((32, 16))})
  """
  galore = galore.with_realignment_decays(adam.b1, adam.b2)
  return galore_transform(galore, scale_by_adam_hf(adam.b1, adam.b2, adam.eps, adam.mu_dtype))


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAMW)
def galore_adamw(
    learning_rate: optax.ScalarOrSchedule, *, galore: GaLoreOptions, adam: AdamOptions,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdamW`, step for step.

  Projected leaves (`mask`) get low-rank Adam moments and the projected-back
  update times `scale`; the others plain Adam. Weight decay p ← p − lr·wd·p is
  applied to the updated weights and is not scaled by `scale`, as in the
  reference.

  Args:
    learning_rate: a float or an optax schedule.
    {galore_options}
      `realign_moments=True` realigns with this optimizer's b1 and b2.
    {adam_options}

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
  galore = galore.with_realignment_decays(adam.b1, adam.b2)
  return optax.chain(
      galore_transform(galore, scale_by_adam_hf(adam.b1, adam.b2, adam.eps, adam.mu_dtype)),
      *decay_after(learning_rate, adam),
  )


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAM_8BIT, defaults=EPS_8BIT,
                  refuses=NO_8BIT_REALIGNMENT)
def galore_adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    galore: GaLoreOptions,
    adam: AdamOptions,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdamW8bit`: GaLore around bitsandbytes' 8-bit Adam.

  The low-rank moments (and the full-size moments of unprojected leaves) are
  blockwise 8-bit (`scale_by_adam_8bit`) when they have at least
  `min_8bit_size` elements, float32 otherwise; bitsandbytes applies that size
  rule to the low-rank shape too. Weight decay follows the reference per
  leaf: projected leaves decay their *updated* weights, p ← p − lr·wd·p after
  the step, never scaled by α (galore-torch's code), while the other leaves
  go through plain `bitsandbytes` AdamW8bit, which decays the old weights,
  p·(1 − lr·wd), before the step.

  Non-finite gradient elements are set to zero before the projection, so one
  NaN/Inf element neither turns a row of the low-rank gradient (or, at a
  refresh, the projector) into NaN nor poisons the 8-bit state; that step
  simply ignores it. galore-torch has no such guard (its SVD fails on
  non-finite input). Wrap with `optax.apply_if_finite` to skip such steps.

  Args:
    learning_rate: a float or an optax schedule.
    {galore_options}
    {adam_options}
    block_size: elements per quantization block (bitsandbytes: 256; the
      GaLore paper's runs: 2048).
    min_8bit_size: moments with fewer elements stay float32.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Zhao et al., GaLore, ICML 2024; `galore_torch.GaLoreAdamW8bit` 1.0;
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((256, 64)), "b": jnp.zeros(64)}
    >>> tx = go.galore_adamw8bit(1e-3, rank=16, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> state[1].inner_state.mu["w"].codes.dtype   # low-rank 8-bit moment
    dtype('uint8')
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  inner = scale_by_adam_8bit(adam.b1, adam.b2, adam.eps, block_size, min_8bit_size)
  return optax.chain(
      zero_nonfinite(galore),
      galore_transform(galore, inner),
      *learning_rate_and_decay(
          learning_rate,
          adam.weight_decay,
          before=_projected_and(galore, False, adam.weight_decay_mask),
          after=_projected_and(galore, True, adam.weight_decay_mask),
      ),
  )


_ADAFACTOR_ARGS = ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay",
                   "scale_parameter", "relative_step", "warmup_init")


@galore_optimizer(middle=_ADAFACTOR_ARGS, refuses={
    "realign_moments": "Adafactor keeps no Adam moments to rotate."})
def galore_adafactor(
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    *,
    galore: GaLoreOptions,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: Optional[float] = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: Optional[bool] = None,
    warmup_init: bool = False,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdafactor`, step for step.

  Gradients are taken to float32 and projected with float32 bases; the
  factored second moment, RMS clipping and optional first moment
  (`scale_by_adafactor_hf`) run on the low-rank gradient; the result is
  projected back times α; weight decay wd·ρ_t·p of the weights *before* the
  update is added (`add_adafactor_decayed_weights`). Unprojected leaves get
  plain Adafactor.

  The step size ρ_t with `scale_parameter` uses the RMS of the full weight
  for every leaf, projected or not, as galore-torch does (it reads the
  parameter itself, not its projection). `scale_by_galore` hands its inner
  transformation projected parameters, so the full weights' RMS is computed
  here each step and given to the inner transformation.

  Hyperparameters keep transformers'/galore-torch's names and defaults, with
  one convenience: `relative_step=None` (default) means "relative step size
  exactly when `learning_rate` is None", so ``galore_adafactor(1e-3)`` is
  galore-torch's ``GaLoreAdafactor(lr=1e-3, relative_step=False)`` (note that
  `scale_parameter` stays True, as there), and ``galore_adafactor()`` its
  default ``GaLoreAdafactor(lr=None)``.

  Args:
    learning_rate: external step size (float or schedule), or None for the
      relative step size.
    {galore_options} projector_dtype defaults to float32 here, as the
      reference projects the float32 gradient.
    eps: (eps1, eps2), see `scale_by_adafactor_hf`.
    clip_threshold: RMS clipping threshold of the (low-rank) update.
    decay_rate: second-moment decay exponent.
    beta1: first-moment decay, or None (default) for no first moment.
    weight_decay: weight decay, scaled by the step size ρ_t.
    scale_parameter: multiply ρ_t by max(eps2, RMS(weight)).
    relative_step: see above.
    warmup_init: linear warm-up of the relative step size.
    weight_decay_mask: which leaves are decayed; default all, as galore-torch.

  Returns:
    An `optax.GradientTransformation`. Its updates have the gradients' dtype.
    galore-torch adds the float32 update to a float32 copy of a bf16 weight
    and rounds once; with float32 gradients for bf16 weights
    `optax.apply_updates` does exactly that, while bf16 gradients give bf16
    updates, rounded before the sum (a difference of the order of one bf16
    ulp of the weight per step).

  References:
    Zhao et al., GaLore, ICML 2024; `galore_torch.GaLoreAdafactor` 1.0;
    Shazeer and Stern, Adafactor, 2018 (https://arxiv.org/abs/1804.04235).

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.galore_adafactor(rank=4)   # relative step size
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  if learning_rate is not None:
    validation.learning_rate(learning_rate)
  validation.non_negative(weight_decay, "weight_decay")
  validation.real(clip_threshold, "clip_threshold", low=0.0, low_open=True)
  if beta1 is not None:
    validation.decay(beta1, "beta1")
  if galore.projector_dtype is None and galore.projector_bits is None:
    galore = dataclasses.replace(galore, projector_dtype=jnp.float32)
  step_size = dict(
      learning_rate=learning_rate,
      eps=eps,
      scale_parameter=scale_parameter,
      relative_step=relative_step,
      warmup_init=warmup_init,
  )

  def build(weight_rms):
    inner = scale_by_adafactor_hf(
        clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
        param_rms=weight_rms, **step_size,
    )
    decay = [] if _is_static_zero(weight_decay) else [
        add_adafactor_decayed_weights(weight_decay, mask=weight_decay_mask, **step_size)
    ]
    return optax.chain(galore_transform(galore, inner), *decay, optax.scale(-1.0))

  build(None)  # Validates the arguments now rather than at the first update.
  return _with_weight_rms(build, scale_parameter)


def _with_weight_rms(build, scale_parameter: bool) -> optax.GradientTransformation:
  """`build(weight_rms)` run each step with the full weights' RMS.

  The chain is rebuilt per call only to close over this step's weight RMS;
  its state layout does not depend on it.
  """

  def init_fn(params):
    return build(None).init(params)

  def update_fn(updates, state, params=None):
    if scale_parameter and params is None:
      raise ValueError(
          "galore_adafactor with scale_parameter=True needs params (the step "
          "is relative to the weights' RMS): call tx.update(grads, state, "
          "params), or pass scale_parameter=False."
      )
    # Zero-size leaves are hidden from the inner transform (see scale_by_galore).
    weight_rms = None if not scale_parameter else jax.tree.map(
        lambda p, r: optax.MaskedNode() if jnp.size(p) == 0 else r, params, tree_rms(params))
    # Float gradients are taken to float32, as the reference does; others
    # (integer leaves) stay as they are, so the same leaves are projected.
    f32 = jax.tree.map(
        lambda g: g.astype(jnp.float32) if jnp.issubdtype(g.dtype, jnp.floating) else g, updates)
    new_updates, state = build(weight_rms).update(f32, state, params)
    return (
        jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), new_updates, updates),
        state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
