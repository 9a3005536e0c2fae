"""Ready-made optimizers: chains of the transformations in this package."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from galore_optax import masking
from galore_optax import sharding
from galore_optax.adafactor import add_adafactor_decayed_weights
from galore_optax.adafactor import tree_rms
from galore_optax.adafactor import scale_by_adafactor_hf
from galore_optax.adam import scale_by_adam_hf
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax.refresh import LazyRefresh
from galore_optax.transform import MomentRealignment
from galore_optax.transform import scale_by_galore
from galore_optax.weight_decay import decay_weights_after_update

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _is_static_zero(x) -> bool:
  # Under optax.inject_hyperparams numbers arrive as arrays: keep the term then.
  return isinstance(x, (int, float)) and x == 0


def _learning_rate_and_decay(
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


def _and_masks(projection_mask: MaskOrFn, projected: bool, other: MaskOrFn):
  """A mask callable: leaves that are (or are not) projected and in `other`."""

  def mask_fn(tree):
    flags = masking.resolve_mask(projection_mask, tree)
    try:
      extra = (
          [True] * len(flags) if other is None else masking.resolve_mask(other, tree)
      )
    except (ValueError, TypeError) as e:
      raise type(e)(f"weight_decay_mask: {e}") from None
    return jax.tree.structure(tree).unflatten(
        [f == projected and e for f, e in zip(flags, extra)]
    )

  return mask_fn


def _zero_nonfinite() -> optax.GradientTransformation:
  # Zeroed before the projection: a NaN/Inf element would otherwise spread to
  # a whole row of the low-rank gradient and, at a refresh, to the projector.
  return optax.stateless(
      lambda updates, params: jax.tree.map(
          lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), updates
      )
  )


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
      scale, proj_type, mask, dimension_numbers, refresh, projector_dtype,
      projector_bits, lazy_refresh, realign_moments). `realign_moments=True`
      realigns with this Adam's b1 and b2.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = optax.chain(go.galore(rank=8), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.zeros((32, 16))})
  """
  if galore_kwargs.get("realign_moments") is True:
    galore_kwargs["realign_moments"] = MomentRealignment(b1=b1, b2=b2)
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
    projector_bits: Optional[int] = None,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
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
    projector_bits: None, 8 or 4: group-quantized projectors (Q-GaLore
      style), see `scale_by_galore`.
    lazy_refresh: Q-GaLore's per-matrix lazy refresh, see `scale_by_galore`.
    realign_moments: True (or a `MomentRealignment`) maps the moments into
      the new subspace at each refresh (LDAdam), see `scale_by_galore`.
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
  tx = optax.chain(
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
          projector_bits=projector_bits,
          lazy_refresh=lazy_refresh,
          realign_moments=realign_moments,
      ),
      *_learning_rate_and_decay(
          learning_rate, weight_decay, after=True if weight_decay_mask is None else weight_decay_mask
      ),
  )
  # NNX metadata and Explicit mesh axes for the whole chain (no-op otherwise).
  return sharding.sharding_aware(tx, dimension_numbers=dimension_numbers)


def galore_adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: Union[int, chex.Array] = 200,
    scale: Union[float, chex.Array] = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    dimension_numbers: Optional[Any] = None,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    refresh: str = "svd",
    projector_dtype: Optional[Any] = None,
    projector_bits: Optional[int] = None,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    weight_decay_mask: MaskOrFn = None,
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
    rank: projection rank (clamped to each matrix's smaller side).
    update_proj_gap: steps between projector refreshes.
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to sqrt(v) inside the bias correction, as bitsandbytes.
    weight_decay: decoupled weight decay (see above for its placement).
    mask: which leaves are projected (pytree of bools or callable); default
      every leaf with at least two axes. See `path_mask`.
    dimension_numbers: see `scale_by_galore`.
    block_size: elements per quantization block (bitsandbytes: 256; the
      GaLore paper's runs: 2048).
    min_8bit_size: moments with fewer elements stay float32.
    refresh: projector refresh method, see `scale_by_galore`.
    projector_dtype: dtype the projectors are stored in.
    projector_bits: None, 8 or 4: group-quantized projectors (Q-GaLore
      style), see `scale_by_galore`; with 8-bit moments a bf16 projector is
      as large as the moments.
    lazy_refresh: Q-GaLore's per-matrix lazy refresh, see `scale_by_galore`.
      (8-bit moments cannot be realigned, so there is no realign_moments.)
    weight_decay_mask: which leaves are decayed; default all, as galore-torch.

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
  tx = optax.chain(
      _zero_nonfinite(),
      scale_by_galore(
          rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          inner=scale_by_adam_8bit(
              b1=b1,
              b2=b2,
              eps=eps,
              block_size=block_size,
              min_8bit_size=min_8bit_size,
          ),
          mask=mask,
          dimension_numbers=dimension_numbers,
          refresh=refresh,
          projector_dtype=projector_dtype,
          projector_bits=projector_bits,
          lazy_refresh=lazy_refresh,
      ),
      *_learning_rate_and_decay(
          learning_rate,
          weight_decay,
          before=_and_masks(mask, False, weight_decay_mask),
          after=_and_masks(mask, True, weight_decay_mask),
      ),
  )
  # NNX metadata and Explicit mesh axes for the whole chain (no-op otherwise).
  return sharding.sharding_aware(tx, dimension_numbers=dimension_numbers)


def galore_adafactor(
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    rank: int = 128,
    update_proj_gap: Union[int, chex.Array] = 200,
    scale: Union[float, chex.Array] = 1.0,
    proj_type: str = "std",
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: Optional[float] = None,
    weight_decay: float = 0.0,
    scale_parameter: bool = True,
    relative_step: Optional[bool] = None,
    warmup_init: bool = False,
    mask: MaskOrFn = None,
    dimension_numbers: Optional[Any] = None,
    *,
    refresh: str = "svd",
    projector_dtype: Optional[Any] = None,
    projector_bits: Optional[int] = None,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
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
    rank: projection rank (clamped to each matrix's smaller side).
    update_proj_gap: steps between projector refreshes.
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    eps: (eps1, eps2), see `scale_by_adafactor_hf`.
    clip_threshold: RMS clipping threshold of the (low-rank) update.
    decay_rate: second-moment decay exponent.
    beta1: first-moment decay, or None (default) for no first moment.
    weight_decay: weight decay, scaled by the step size ρ_t.
    scale_parameter: multiply ρ_t by max(eps2, RMS(weight)).
    relative_step: see above.
    warmup_init: linear warm-up of the relative step size.
    mask: which leaves are projected (pytree of bools or callable); default
      every leaf with at least two axes. See `path_mask`.
    dimension_numbers: see `scale_by_galore`.
    refresh: projector refresh method, see `scale_by_galore`.
    projector_dtype: dtype the projectors are stored in; None means
      float32, as the reference, which projects the float32 gradient.
    projector_bits: None, 8 or 4: group-quantized projectors, dequantized to
      float32 on use (see `scale_by_galore`); excludes `projector_dtype`.
    lazy_refresh: Q-GaLore's per-matrix lazy refresh, see `scale_by_galore`.
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
  adafactor_kw = dict(
      learning_rate=learning_rate,
      eps=eps,
      scale_parameter=scale_parameter,
      relative_step=relative_step,
      warmup_init=warmup_init,
  )

  def build(weight_rms):
    return optax.chain(
        scale_by_galore(
            rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            inner=scale_by_adafactor_hf(
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                beta1=beta1,
                param_rms=weight_rms,
                **adafactor_kw,
            ),
            mask=mask,
            dimension_numbers=dimension_numbers,
            refresh=refresh,
            # Not a default argument: optax.inject_hyperparams would take the
            # callable jnp.float32 for a schedule.
            projector_dtype=projector_dtype
            or (None if projector_bits else jnp.float32),
            projector_bits=projector_bits,
            lazy_refresh=lazy_refresh,
        ),
        *(
            []
            if _is_static_zero(weight_decay)
            else [
                add_adafactor_decayed_weights(
                    weight_decay, mask=weight_decay_mask, **adafactor_kw
                )
            ]
        ),
        optax.scale(-1.0),
    )

  build(None)  # Validates the arguments now rather than at the first update.

  def init_fn(params):
    return build(None).init(params)

  def update_fn(updates, state, params=None):
    if scale_parameter and params is None:
      raise ValueError(
          "galore_adafactor with scale_parameter=True needs params (the step "
          "is relative to the weights' RMS): call tx.update(grads, state, "
          "params), or pass scale_parameter=False."
      )
    # The chain is rebuilt per call only to close over this step's weight RMS;
    # its state layout does not depend on it.
    weight_rms = tree_rms(params) if scale_parameter else None
    f32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), updates)
    new_updates, state = build(weight_rms).update(f32, state, params)
    return (
        jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), new_updates, updates),
        state,
    )

  # Around the whole update: the weights' RMS computed here feeds the inner
  # Adafactor, so both must see the same mesh axes (see `sharding_aware`).
  return sharding.sharding_aware(
      optax.GradientTransformation(init_fn, update_fn),
      dimension_numbers=dimension_numbers,
  )
