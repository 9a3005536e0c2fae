"""GradNormLoRP: weight-normalized gradients with a low-rank direction update.

Each projected matrix is read as a weight-normalized one, W = g ⊙ V/‖V‖, with
a magnitude g per output channel (the norm over the input axes) and a
direction V. The reparameterization lives only inside the optimizer: every
step it is rebuilt from the current weights with V = W, so the model is left
unchanged. At V = W the weight-norm chain rule gives

  ∂g = Σ ∇W ⊙ V̂            (V̂ = W/g, summed over the norm axes)
  ∂V = ∇W − V̂ ⊙ ∂g          (the tangential part; the factor g/‖V‖ is 1),

∂V goes through GaLore (`scale_by_galore`: low-rank moments) and ∂g through
the same inner optimizer at full size, and the new weight is g' ⊙ V'/‖V'‖.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union, cast

import jax
import jax.numpy as jnp
import optax

from galore_optax import axis_specs
from galore_optax import masking
from galore_optax import matrix_view
from galore_optax import nonfinite
from galore_optax import parts
from galore_optax import projection
from galore_optax import tree_utils
from galore_optax.adam import scale_by_adam_hf
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax import validation
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.realignment import MomentRealignment
from galore_optax.refresh import RefreshFn
from galore_optax.schedules import LazyRefresh
from galore_optax.transform import GaLoreState, galore_transform
from galore_optax.weight_decay import value_at
from galore_optax.sharding import public



class GradNormLoRPState(NamedTuple):
  """State of `gradnorm_lorp`.

  Attributes:
    count: number of updates so far (int32), for a learning-rate schedule.
    galore_state: the `scale_by_galore` state: projectors and low-rank inner
      moments of the direction gradients ∂V of projected leaves, full-size
      inner moments of the other leaves (their plain AdamW).
    magnitude_state: the inner optimizer's state for the magnitude gradients
      ∂g, float32, shaped like the parameters with the norm axes reduced to
      size 1; `optax.MaskedNode()` for leaves that are not projected.
  """

  count: jax.typing.ArrayLike
  galore_state: GaLoreState
  magnitude_state: optax.OptState


def _check_norm_axis(norm_axis: Any) -> None:
  if norm_axis is None:
    return
  axes = (norm_axis,) if isinstance(norm_axis, int) else norm_axis
  if (
      isinstance(norm_axis, (str, bytes))
      or not isinstance(axes, Sequence)
      or not axes
      or any(isinstance(a, bool) or not isinstance(a, int) for a in axes)
  ):
    raise TypeError(
        f"norm_axis={norm_axis!r} must be None (each leaf's reduction axes), an "
        "int or a non-empty tuple of ints naming the axes the magnitude is the "
        "norm over."
    )


def _norm_axes(plan, norm_axis) -> tuple[int, ...]:
  """The axes one leaf's magnitude is the norm over.

  Magnitudes are per output channel and per slice of a stack: the norm runs
  over the reduction (input) axes by default, and never over a batch axis,
  which would tie the magnitudes of different layers together.
  """
  view = plan.view
  if norm_axis is None:
    return tuple(sorted(view.reduction_axes))
  axes = matrix_view.normalize_axes(norm_axis, len(view.shape), "norm_axis", plan.path)
  if set(axes) & set(view.batch_axes):
    raise ValueError(
        f"{plan.path}: norm_axis={norm_axis!r} includes batch axes "
        f"{sorted(view.batch_axes)} of shape {view.shape} (stacked layers get one "
        "magnitude per slice); name reduction or output axes only, or leave "
        "norm_axis=None."
    )
  return tuple(sorted(axes))


def _init_magnitude(leaf, axes):
  """Zeros of the magnitude's shape, sharded like the axes it keeps."""
  shape = _magnitude_shape(jnp.shape(leaf), axes)
  layout = axis_specs.layout_of(leaf)
  spec = None
  if layout is not None:
    entries = tuple(() if a in axes else e for a, e in enumerate(layout.entries))
    spec = layout.derive(shape, entries)
  return axis_specs.zeros(shape, jnp.float32, layout, spec)


def _magnitude_shape(shape, axes):
  return tuple(1 if a in axes else d for a, d in enumerate(shape))


def _safe_divide(x, norm):
  """x / norm, and 0 where the norm is exactly 0 (no 0/0 NaN).

  A NaN or infinite norm is not zero: its NaN goes through, so a non-finite
  value can never turn into a finite but zeroed weight.
  """
  zero = norm == 0
  return jnp.where(zero, 0.0, x / jnp.where(zero, 1.0, norm))


class _Split(NamedTuple):
  """One leaf's magnitude split, float32, reduced over the norm axes.

  Only these small per-row values are kept between the split and the new
  weights: V, V̂ and ∂V are recomputed from W and ∇W where they are used, so
  no full-size float32 copy of the weights lives through the GaLore update.
  """

  magnitude: jax.Array  # g = ‖W‖
  grad_norm: jax.Array  # ‖∇W‖
  magnitude_grad: Any  # ∂g = Σ ∇W ⊙ V̂


def _row_norms(x, axes):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def _direction(w, grad, split: _Split):
  """V: W itself where g > 0; where a row is exactly zero it has no direction
  and takes the unit steepest-descent direction −∇W/‖∇W‖ instead."""
  return jnp.where(split.magnitude > 0, w, _safe_divide(-grad, split.grad_norm))


def _unit_direction(w, grad, split: _Split):
  """V̂ = V/‖V‖ (W/g where g > 0)."""
  return jnp.where(split.magnitude > 0, _safe_divide(w, split.magnitude),
                   _safe_divide(-grad, split.grad_norm))


def _split_gradient(w, grad, axes, w32) -> _Split:
  """Magnitude g and its gradient ∂g of one leaf (W and ∇W as stored, W also in float32).

  At a zero row the chain rule's factor g/‖V‖ is 0, so ∂V = 0 and
  ∂g = −‖∇W‖: the row grows out of zero along −∇W (zero-initialized layers
  still train).
  """
  f32 = lambda x: x.astype(jnp.float32)
  split = _Split(_row_norms(w32, axes), _row_norms(f32(grad), axes), None)
  dg = jnp.sum(f32(grad) * _unit_direction(w32, f32(grad), split), axis=axes, keepdims=True)
  # ∂g sums a row of ∇W ⊙ V̂ (|V̂| ≤ 1): for entries of 1e38 its partial sums overflow both
  # ways (inf − inf = NaN). Only then (`lax.cond`: no second full-size pass otherwise) it is
  # summed again in units of 2**k > the row's length (exact), where it cannot, and saturated
  # at the largest float32; ordinary sums are kept bit for bit.
  k = math.prod(jnp.shape(w)[a] for a in axes).bit_length()

  def in_units(w, grad):
    # From the stored leaves: a float32 operand of the cond would be a full-size array
    # kept from the backward pass until the cond runs (the 8-bit form: 48 of them at 1B).
    g = f32(grad) * 2.0**-k
    return jnp.sum(g * _unit_direction(f32(w), f32(grad), split), axis=axes,
                   keepdims=True) * 2.0**k

  dg = jax.lax.cond(jnp.all(jnp.isfinite(dg)), lambda w, grad: dg,
                    lambda w, grad: jnp.where(jnp.isfinite(dg), dg,
                                              projection.saturated(in_units(w, grad))),
                    w, grad)
  return split._replace(magnitude_grad=dg)


def _direction_grad(w, grad, split: _Split):
  """∂V = ∇W − V̂ ∂g, and 0 on zero rows."""
  # V̂ again, not the one ∂g was summed from: XLA would keep that full-size float32 array from
  # the backward pass until this runs (the 8-bit form at 1B: one per matrix, 2 GiB). The
  # barrier on the per-row values makes this a different expression, with the same values.
  split = jax.lax.optimization_barrier(split)
  # Both terms are finite; their difference may overflow to ±inf (never NaN): saturate it.
  d = grad - _unit_direction(w, grad, split) * split.magnitude_grad
  return jnp.where(split.magnitude > 0, projection.saturated(d), 0.0)


@public
def gradnorm_lorp(
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
    inner: Optional[optax.GradientTransformation] = None,
    norm_axis: Optional[Union[int, Sequence[int]]] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
) -> optax.GradientTransformation:
  """GradNormLoRP: gradient weight-normalized low-rank projection.

  For each projected leaf (`projected`), with W the current weight and the norm
  over `norm_axis` (per output channel by default):

  1. g = ‖W‖, V = W, V̂ = W/g;
  2. ∂g = Σ ∇W ⊙ V̂ and ∂V = ∇W − V̂ ⊙ ∂g (the exact gradients of the
     loss with respect to g and V of W = g ⊙ V/‖V‖, at V = W);
  3. u_V = scale_by_galore(∂V): projected, run through `inner` with low-rank
     moments, projected back, times `scale`; u_g = inner(∂g) at full size;
  4. V' = V − lr·u_V, g' = g − lr·u_g, W' = g' ⊙ V'/‖V'‖;
  5. decoupled weight decay of the new weight, W' ← (1 − lr·wd)·W' (which
     only shrinks the magnitude);
  6. the update returned is W' − W, so `optax.apply_updates` gives W'.

  Leaves that are not projected get plain AdamW with `inner`, exactly as in
  `galore_adamw`. Since g' ⊙ V'/‖V'‖ is not linear in the gradient, this is a
  complete optimizer (learning rate included), not a chainable scaling; it
  needs `params` in `update`.

  Compared with GaLore on W, the gradient is split into a magnitude part,
  kept full-rank (one number per channel), and a direction part orthogonal to
  each row of W, which alone is compressed; the weight's row norms change
  only through g. Magnitude moments are float32 and cost O(out) per matrix.

  Rows that are exactly zero have no direction: they take the unit
  steepest-descent direction −∇W/‖∇W‖ and grow out of zero along it, so
  zero-initialized layers train (with step size lr in norm, not per entry).

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection of ∂V (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, multiplies the projected-back direction update only (not the
      magnitude update or the weight decay).
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full' (the paper's
      two-sided projection).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v (galore-torch's placement).
    weight_decay: decoupled weight decay of the updated weights, a number
      or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: the leaves that are weight-normalized and projected; default
      every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    inner: the optimizer run on the low-rank ∂V, on ∂g and on unprojected
      gradients; default galore-torch's Adam (`scale_by_adam_hf(b1, b2,
      eps, mu_dtype)`). `go.scale_by_adam_8bit()` gives 8-bit states.
    norm_axis: axes the magnitude is the norm over: None for each leaf's
      reduction (input) axes, i.e. one magnitude per output channel, or an
      int / tuple of ints for every projected leaf (never a batch axis).
    mu_dtype: optional dtype of the first moment of the default `inner`.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.
    realign_moments: None, True (this optimizer's b1 and b2) or a
      `go.MomentRealignment`: realigns the direction moments.

  Returns:
    An `optax.GradientTransformation` whose state is a `GradNormLoRPState`
    and whose `update` requires `params`.

  References:
    Huang, Shen, Zhu, Rudinac, Kanoulas, Gradient Weight-normalized Low-rank
    Projection for Efficient LLM Training, AAAI 2025.
    https://arxiv.org/abs/2412.19616;
    Salimans and Kingma, Weight Normalization, 2016.
    https://arxiv.org/abs/1602.07868

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_optax.gradnorm import gradnorm_lorp
    >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 16)),
    ...           "b": jnp.zeros(16)}
    >>> tx = gradnorm_lorp(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> state.galore_state.inner_state.mu["w"].shape   # low-rank ∂V moment
    (4, 32)
    >>> state.magnitude_state.mu["w"].shape            # one g per output
    (1, 16)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  validation.learning_rate(learning_rate)
  _check_norm_axis(norm_axis)
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals()).with_realignment_decays(b1, b2)
  if inner is None:
    inner = scale_by_adam_hf(b1, b2, eps, mu_dtype)
  elif not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"inner must be an optax.GradientTransformation (e.g. "
        f"go.scale_by_adam_8bit()), got {type(inner).__name__}."
    )
  return _weight_normalized(learning_rate, galore, inner, norm_axis, adam)


def _weight_normalized(
    learning_rate, opts, inner, norm_axis, adam: AdamOptions, zero_nonfinite_grads=False,
    convert_weights_apart=False,
) -> optax.GradientTransformation:
  """GradNormLoRP's transformation; see `gradnorm_lorp` (and `_weight_in_float32` for
  `convert_weights_apart`)."""
  galore = galore_transform(opts, inner)
  weight_decay, decay_mask = adam.weight_decay, adam.mask
  decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def norm_axes(plans):
    return [None if p is None else _norm_axes(p, norm_axis) for p in plans]

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    magnitudes = [
        optax.MaskedNode() if axes is None else _init_magnitude(leaf, axes)
        for leaf, axes in zip(leaves, norm_axes(parts.plan(opts, params)))
    ]
    return GradNormLoRPState(
        count=jnp.zeros([], jnp.int32),
        galore_state=cast(GaLoreState, galore.init(params)),
        magnitude_state=inner.init(treedef.unflatten(magnitudes)),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "gradnorm_lorp needs the current weights to split the gradient into "
          "magnitude and direction: call tx.update(grads, state, params)."
      )
    grads, treedef = jax.tree.flatten(updates)
    weights = treedef.flatten_up_to(params)
    _check_shapes(masking.leaf_paths(updates), grads, weights)
    if zero_nonfinite_grads:
      grads = [nonfinite.zeros_for_nonfinite(g) for g in grads]
    plans = parts.plan(opts, updates)
    axes = norm_axes(plans)
    # 1. W = g ⊙ V/‖V‖ at V = W: magnitude and direction gradients.
    f32 = lambda x: x.astype(jnp.float32)
    # Read in float32 (a stack: as stored, converted where each expression reads it).
    weights32 = [w if p is None else _weight_in_float32(w, g, p, convert_weights_apart)
                 for w, g, p in zip(weights, grads, plans)]
    split = [None if a is None else _split_by_slices(w, g, a) if _slices(p, w)
             else _split_gradient(w, g, a, w32)
             for g, w, w32, a, p in zip(grads, weights, weights32, axes, plans)]
    directions = [g if s is None else _direction_grad(w, f32(g), s).astype(g.dtype)
                  for g, w, s in zip(grads, weights32, split)]
    direction_params = [w if s is None else _direction(w32, f32(g), s).astype(w.dtype)
                        for g, w, w32, s in zip(grads, weights, weights32, split)]
    magnitude_grads = [optax.MaskedNode() if s is None else s.magnitude_grad for s in split]
    # 2. GaLore on the direction, the inner optimizer on the magnitude.
    galore_out, galore_state = galore.update(
        treedef.unflatten(directions), state.galore_state, treedef.unflatten(direction_params)
    )
    magnitude_out, magnitude_state = inner.update(
        treedef.unflatten(magnitude_grads), state.magnitude_state
    )
    # 3. The new weights, as updates.
    lr = value_at(learning_rate, state.count)
    wd = value_at(weight_decay, state.count)
    decayed = [True] * len(grads) if decay_mask is None else masking.resolve_mask(
        decay_mask, params, "mask")
    out = [
        _new_weight_update(
            g, w, a, s, u, mu, lr, lr * wd if decays and d else None)
        for g, w, a, s, u, mu, d in zip(
            grads, weights32, axes, split, treedef.flatten_up_to(galore_out),
            treedef.flatten_up_to(magnitude_out), decayed)
    ]
    return treedef.unflatten(out), GradNormLoRPState(
        count=optax.safe_increment(state.count),
        galore_state=cast(GaLoreState, galore_state),
        magnitude_state=magnitude_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _weight_in_float32(w, grad, plan, apart: bool):
  """A projected weight for the update to read in float32.

  A single layer's weight is converted as usual: it shares the backward pass's
  own conversion, while a separate one, which depends only on the weights,
  XLA:CPU's default scheduler makes for every layer at the start of the step
  and keeps until the update (LLaMA-7B per-layer: 11.3 GiB more). With `apart`
  (the 8-bit form) it is converted apart, once its gradient exists: XLA:CPU's
  memory scheduler runs that form's update after the whole backward pass, and
  a shared conversion then kept every layer's float32 weights from the forward
  pass to the end of the backward (LLaMA-1B: planned peak 9.75 GiB, 9.09
  apart; 7B 43.40, 43.38; the default scheduler's within 0.02 either way; the
  float form's 7B default-scheduler peak would rise by 0.12, so it shares). A
  stack of layers (leading batch axis) stays as stored, waiting for its
  gradient (`tree_utils.after`), and is converted where each expression reads
  it: a float32 stack made apart from the forward pass's lived through the
  update of every leaf at once under XLA:CPU's default scheduler (1B: 4.5
  GiB), and one shared with the forward's (a scan converts its whole stack
  before the loop) until the update had read it (LLaMA-7B, memory scheduler:
  3.8 GiB). Its norms are summed a slice at a time (`_split_by_slices`).
  """
  if _slices(plan, w):
    return tree_utils.after(w, grad)
  if plan.view.batch_shape:  # a stack on another axis, or split over devices: converted whole
    return tree_utils.float32_apart(tree_utils.after(w, grad))
  return tree_utils.float32_apart(tree_utils.after(w, grad)) if apart else w.astype(jnp.float32)


def _slices(plan, w) -> bool:
  """Whether a leaf's split is taken a slice of its leading stack axis at a time (not where
  that axis is split over devices: slicing it would gather it)."""
  return plan.view.batch_axes[:1] == (0,) and not axis_specs.split_over_devices(w, (0,))


def _split_by_slices(w, grad, axes) -> _Split:
  """`_split_gradient` of a stack, one slice of its leading axis at a time.

  XLA:CPU's reductions read a materialized operand: summed whole, every
  stack's float32 weights (and ∇W ⊙ V̂) would exist at once. The loop slices
  the stored bits (`tree_utils.bits`), so no float32 copy of a whole stack is
  made for it either. XLA:CPU copies the weights' bits out for the loop; that
  copy waits for the gradient (`tree_utils.after`), or the default scheduler
  makes it at the start of the step.
  """
  inner = tuple(a - 1 for a in axes)

  def one(b):
    w1, g1 = tree_utils.from_bits(b[0], w.dtype), tree_utils.from_bits(b[1], grad.dtype)
    return _split_gradient(w1, g1, inner, w1.astype(jnp.float32))

  return jax.lax.map(one, (tree_utils.after(tree_utils.bits(w), grad), tree_utils.bits(grad)))


def _check_shapes(paths, grads, weights) -> None:
  for path, grad, w in zip(paths, grads, weights):
    if jnp.shape(grad) != jnp.shape(w):
      raise ValueError(
          f"{path}: gradient shape {jnp.shape(grad)} differs from the "
          f"parameter's {jnp.shape(w)}; pass the params the gradients are of."
      )


def _new_weight_update(grad, w, axes, split, direction_update, magnitude_update, lr, decay):
  """W' − W for one leaf: W' = g' ⊙ V'/‖V'‖ (plain AdamW for unprojected leaves)."""
  if axes is None:
    # Plain AdamW, as galore_adamw: decay evaluated on the updated weights.
    u = -lr * direction_update.astype(jnp.float32)
    if decay is not None:
      u = u - decay * (w.astype(jnp.float32) + u)
    return u.astype(grad.dtype)
  g = split.magnitude
  f32 = lambda x: x.astype(jnp.float32)
  v_new = _direction(f32(w), f32(grad), split) - lr * f32(direction_update)
  g_new = g - lr * magnitude_update
  if decay is not None:
    g_new = (1.0 - decay) * g_new
  v_norm = jnp.sqrt(jnp.sum(jnp.square(v_new), axis=axes, keepdims=True))
  w_new = g_new * _safe_divide(v_new, v_norm)
  return (w_new - w.astype(jnp.float32)).astype(grad.dtype)


@public
def gradnorm_lorp8bit(
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
    norm_axis: Optional[Union[int, Sequence[int]]] = None,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
) -> optax.GradientTransformation:
  """`gradnorm_lorp` with bitsandbytes-style blockwise 8-bit Adam states.

  The inner optimizer is `scale_by_adam_8bit(b1, b2, eps, block_size,
  min_8bit_size)`: the low-rank direction moments, the magnitude moments and
  the moments of unprojected leaves are 8-bit where a state tensor has at
  least `min_8bit_size` elements (in practice the low-rank moments and large
  unprojected leaves such as embeddings) and float32 otherwise. As in the
  other 8-bit optimizers, non-finite gradient elements are set to zero
  before anything else, so one NaN cannot poison the projector or a block of
  8-bit state (wrap with `optax.apply_if_finite` to skip such steps).

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection of ∂V (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, multiplies the projected-back direction update only (not the
      magnitude update or the weight decay).
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full' (the paper's
      two-sided projection).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v inside the bias correction (bitsandbytes' 1e-8).
    weight_decay: decoupled weight decay of the updated weights, a number
      or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: the leaves that are weight-normalized and projected; default
      every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    norm_axis: see `gradnorm_lorp`.
    block_size: elements per quantization block. A static int.
    min_8bit_size: state tensors with fewer elements stay float32. A static
      int.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.

  Returns:
    An `optax.GradientTransformation` (state `GradNormLoRPState`) whose
    `update` requires `params`.

  References:
    Huang et al., GradNormLoRP, AAAI 2025 (https://arxiv.org/abs/2412.19616);
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from galore_optax.gradnorm import gradnorm_lorp8bit
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 256))}
    >>> tx = gradnorm_lorp8bit(1e-2, rank=16)
    >>> state = tx.init(params)
    >>> state.galore_state.inner_state.mu["w"].codes.dtype
    dtype('uint8')
    >>> updates, state = tx.update(params, state, params)
  """
  validation.learning_rate(learning_rate)
  _check_norm_axis(norm_axis)
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals())
  inner = scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size)
  return _weight_normalized(
      learning_rate, galore, inner, norm_axis, adam, zero_nonfinite_grads=True,
      convert_weights_apart=True)
