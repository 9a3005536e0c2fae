"""Ready-made GaLore optimizers: chains of the transformations in this package.

Each alias writes out its arguments in optax.adamw's order and meanings
(`mask` is the weight-decay mask), with GaLore's rank, update_proj_gap,
scale and proj_type first, where galore-torch users pass them, and the
projection selector `projected` and the other GaLore options as keywords.
Their full descriptions are in `galore_optax.options.GaLoreOptions`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_optax import masking
from galore_optax import nonfinite
from galore_optax import parts
from galore_optax import validation
from galore_optax import weight_decay as weight_decay_lib
from galore_optax.adafactor import add_adafactor_decayed_weights
from galore_optax.adafactor import scale_by_adafactor_hf
from galore_optax.adafactor import tree_rms
from galore_optax.adam import scale_by_adam_hf
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.realignment import MomentRealignment
from galore_optax.refresh import RefreshFn
from galore_optax.schedules import LazyRefresh
from galore_optax.sharding import public
from galore_optax.transform import galore_transform


def _projected_and(options: GaLoreOptions, projected: bool, other: MaskOrFn):
  """A mask callable: leaves that are (or are not) projected and in `other`."""

  def mask_fn(tree):
    flags = jax.tree.leaves(parts.projected_mask(options, tree))
    extra = [True] * len(flags) if other is None else masking.resolve_mask(other, tree, "mask")
    return jax.tree.structure(tree).unflatten(
        [f == projected and e for f, e in zip(flags, extra)]
    )

  return mask_fn


@public
def galore(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
) -> optax.GradientTransformation:
  """GaLore with a low-rank Adam inside and no learning rate.

  Chain it with a learning rate (and anything else) like any optax
  transformation. The Adam is galore-torch's (`scale_by_adam_hf`). There is
  no weight decay here, so `projected` is the only selector.

  Args:
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction (galore-torch's placement;
      optax.adam's default is 1e-8).
    mu_dtype: optional dtype of the first moment.
    projected: which leaves are projected (pytree of bools or callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.
    realign_moments: None, True (this Adam's b1 and b2) or a
      `go.MomentRealignment`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = optax.chain(go.galore(rank=8), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({"w": jnp.zeros((32, 16))})
  """
  adam = AdamOptions.from_arguments(locals())
  galore_options = GaLoreOptions.from_arguments(locals()).with_realignment_decays(b1, b2)
  return galore_transform(galore_options, scale_by_adam_hf(b1, b2, eps, mu_dtype))


def galore_adamw_chain(galore_options: GaLoreOptions, adam: AdamOptions,
                       learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """galore-torch's GaLoreAdamW from validated options: GaLore around its Adam, the learning
  rate, then the decay of the updated weights. The family members that change only GaLore's
  parts (refresh, realignment, tracking) are this chain with other options."""
  return optax.chain(
      galore_transform(galore_options,
                       scale_by_adam_hf(adam.b1, adam.b2, adam.eps, adam.mu_dtype)),
      *weight_decay_lib.decay_after(learning_rate, adam.weight_decay, adam.mask),
  )


@public
def galore_adamw(
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
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdamW`, step for step.

  Projected leaves (`projected`) get low-rank Adam moments and the
  projected-back update times `scale`; the others plain Adam. Weight decay
  p ← p − lr·wd·p is applied to the updated weights and is not scaled by
  `scale`, as in the reference. Defaults differ from `optax.adamw`'s where
  galore-torch's do: eps 1e-6 (added to √v before the bias correction) and
  no weight decay.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T): each matrix is
      refreshed at 0-based steps 0, T, 2T, … from the current gradient.
    scale: α, the multiplier of the projected-back update (the paper: 0.25).
    proj_type: 'std' (compress the smaller side, as galore-torch),
      'reverse_std', 'left' (output side), 'right' (input side) or 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v before the bias correction.
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`: a pytree of bools or a
      callable(params) returning one; default every leaf is decayed.
    projected: which leaves are projected (pytree of bools or a callable,
      e.g. `go.path_mask(r"attn|mlp")`); default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout, other axes batch axes.
    mu_dtype: optional dtype of the first moment.
    refresh: how bases are computed: 'svd' (exact), 'randomized', 'power',
      'random' or a refresh function such as `go.randomized_refresh(16)`.
    refresh_memory_budget: bytes of float32 matrices one batched
      decomposition may take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: bases stored group-quantized (Q-GaLore).
    regenerate_projector: with refresh='random', store no bases and draw
      them again each step.
    lazy_refresh: None, True or a `go.LazyRefresh`: Q-GaLore's adaptive gap.
    realign_moments: None, True (with this optimizer's b1 and b2) or a
      `go.MomentRealignment`: LDAdam's realignment at each refresh.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Zhao et al., GaLore, ICML 2024; `galore_torch.GaLoreAdamW` 1.0.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> decay_matrices = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    >>> tx = go.galore_adamw(1e-3, rank=4, weight_decay=0.01, mask=decay_matrices)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  galore_options = GaLoreOptions.from_arguments(locals()).with_realignment_decays(b1, b2)
  return galore_adamw_chain(galore_options, adam, learning_rate)


@public
def galore_adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdamW8bit`: GaLore around bitsandbytes' 8-bit Adam.

  The low-rank moments (and the full-size moments of unprojected leaves) are
  blockwise 8-bit (`scale_by_adam_8bit`) when they have at least
  `min_8bit_size` elements, float32 otherwise; bitsandbytes applies that size
  rule to the low-rank shape too. Weight decay follows the reference per
  leaf: projected leaves decay their *updated* weights, p ← p − lr·wd·p after
  the step, never scaled by α (galore-torch's code), while the other leaves
  go through plain `bitsandbytes` AdamW8bit, which decays the old weights,
  p·(1 − lr·wd), before the step. eps defaults to bitsandbytes' 1e-8 and is
  added inside, m/(√v + √(1−β2^t)·eps). 8-bit moments cannot be rotated, so
  there is no `realign_moments`.

  Non-finite gradient elements are set to zero before the projection, so one
  NaN/Inf element neither turns a row of the low-rank gradient (or, at a
  refresh, the projector) into NaN nor poisons the 8-bit state; that step
  simply ignores it. galore-torch has no such guard (its SVD fails on
  non-finite input). Wrap with `optax.apply_if_finite` to skip such steps.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v inside the bias correction (bitsandbytes' placement).
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    block_size: elements per quantization block (bitsandbytes: 256; the
      GaLore paper's runs: 2048). A static int.
    min_8bit_size: moments with fewer elements stay float32. A static int.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.

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
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  galore_options = GaLoreOptions.from_arguments(locals())
  inner = scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size)
  return optax.chain(
      nonfinite.zero_nonfinite(lambda tree: parts.projected_mask(galore_options, tree)),
      galore_transform(galore_options, inner),
      *weight_decay_lib.learning_rate_and_decay(
          learning_rate,
          weight_decay,
          before=_projected_and(galore_options, False, adam.mask),
          after=_projected_and(galore_options, True, adam.mask),
      ),
  )


@public
def galore_adafactor(
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
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
    *,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
) -> optax.GradientTransformation:
  """galore-torch's `GaLoreAdafactor`, step for step.

  Gradients are taken to float32 and projected with float32 bases; the
  factored second moment, RMS clipping and optional first moment
  (`scale_by_adafactor_hf`) run on the low-rank gradient; the result is
  projected back times α; weight decay wd·ρ_t·p of the weights *before* the
  update is added (`add_adafactor_decayed_weights`). Unprojected leaves get
  plain Adafactor. Adafactor keeps no Adam moments, so there is no
  `realign_moments`.

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
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
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
    mask: the weight-decay mask (pytree of bools or callable); default all
      leaves, as galore-torch.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; None is float32 here
      (unless `projector_bits`), as the reference projects the float32
      gradient.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.

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
  galore = GaLoreOptions.from_arguments(locals())
  if projector_dtype is None and projector_bits is None:
    galore = dataclasses.replace(galore, projector_dtype=jnp.float32)
  if learning_rate is not None:
    validation.learning_rate(learning_rate)
  validation.non_negative(weight_decay, "weight_decay")
  validation.real(clip_threshold, "clip_threshold", low=0.0, low_open=True)
  if beta1 is not None:
    validation.decay(beta1, "beta1")
  # The step size ρ_t, shared by the update and the decay.
  step_size: dict[str, Any] = dict(
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
    decay = [] if weight_decay_lib.is_static_zero(weight_decay) else [
        add_adafactor_decayed_weights(weight_decay, mask=mask, **step_size)
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
    if params is not None:
      # The weights' RMS is a reduction of their float32 values. Behind a barrier that
      # conversion is made inside the reduction, not merged with the forward pass's: a scan
      # converts a whole stack of layers before its loop, and a merged conversion would keep
      # that float32 stack alive until here (LLaMA-7B, stacked: 3.8 GiB at the step's peak).
      params = jax.tree.map(jax.lax.optimization_barrier, params)
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
