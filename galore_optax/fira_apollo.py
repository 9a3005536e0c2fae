"""Fira and APOLLO: GaLore's low-rank Adam, a full-rank update.

Both keep the moments of R = project(G) and use the low-rank Adam direction
N = m / (√v + eps) only to measure how Adam would rescale each channel:

* Fira (Chen et al., 2024) applies α · project_back(N) plus the part of the
  gradient the projection drops, rescaled per channel by ‖N‖/‖R‖;
* APOLLO (Zhu et al., MLSys 2025) applies the whole gradient rescaled by
  ‖N‖/‖R‖ per channel (or per matrix: APOLLO-Mini), with a random
  projection that needs no SVD.

Both then take GaLore-AdamW's step size lr·√(1−β2^t)/(1−β1^t) on the whole
direction and decay the updated weights by lr·wd, as the reference packages
fira 1.0.2 and apollo-torch 1.0.3 do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import optax

from galore_optax import outputs
from galore_optax import validation
from galore_optax.adam import scale_by_adam_hf, scale_by_bias_correction
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax import nonfinite
from galore_optax import parts
from galore_optax import weight_decay as weight_decay_lib
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.realignment import MomentRealignment
from galore_optax.refresh import RefreshFn
from galore_optax.schedules import LazyRefresh
from galore_optax.transform import galore_transform
from galore_optax.sharding import public

PROJ_METHODS = {"random": "random", "svd": "svd"}
SCALE_TYPES = ("channel", "tensor")


@dataclasses.dataclass(frozen=True)
class ApolloOptions:
  """APOLLO's own options, with apollo-torch's names.

  Attributes:
    scale_type: 'channel' (a factor per index of the kept axis) or 'tensor'
      (one per matrix).
    proj: 'random' (APOLLO's Gaussian projection) or 'svd' (GaLore's, for
      comparison).
    scale_front: multiply by √scale before the limiter (the limiter compares
      norms, so only rounding differs).
    disable_nl: no norm-growth limiter (and no limiter state).
  """

  scale_type: str = "channel"
  proj: str = "random"
  scale_front: bool = False
  disable_nl: bool = False

  def __post_init__(self):
    validation.choice(self.scale_type, "scale_type", SCALE_TYPES)
    validation.choice(self.proj, "proj", tuple(PROJ_METHODS))
    validation.choice(self.scale_front, "scale_front", (True, False))
    validation.choice(self.disable_nl, "disable_nl", (True, False))

  @classmethod
  def from_arguments(cls, arguments, **overrides) -> ApolloOptions:
    """The APOLLO options among a factory's `arguments` (its `locals()`), validated."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in arguments.items() if k in names}, **overrides)


_NOT_FULL = "'full' keeps no channel axis for the per-channel factors"


def _chain(galore, inner, output, learning_rate, adam: AdamOptions):
  """GaLore with `output`, then Adam's step size, the learning rate and decay."""
  return [
      galore_transform(galore, inner, output),
      scale_by_bias_correction(adam.b1, adam.b2),
      *weight_decay_lib.decay_after(learning_rate, adam.weight_decay, adam.mask),
  ]


def fira_chain(galore, adam: AdamOptions, output, learning_rate):
  """Fira's chain: GaLore with galore-torch's Adam direction and `output` (a residual that
  reads N before the step size), then the step size, the learning rate and the decay."""
  return _chain(galore, _direction(adam), output, learning_rate, adam)


def _direction(adam: AdamOptions):
  """galore-torch's Adam without its step size: N = m / (√v + eps)."""
  return scale_by_adam_hf(adam.b1, adam.b2, adam.eps, adam.mu_dtype, bias_correction=False)


@public
def fira_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
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
  """Fira: GaLore plus the rescaled, limited residual (fira 1.0.2's `FiraAdamW`).

  For each projected matrix, with R = project(G), N = m/(√v + eps) its
  low-rank Adam direction and φ = ‖N‖/(‖R‖ + 1e-8) per channel (an index of
  the axis the projection keeps):

    S = limiter((G − α·project_back(R)) ⊙ φ)
    D = α·project_back(N) + S
    W ← W − lr·√(1−β2^t)/(1−β1^t)·D, then W ← W − lr·wd·W.

  α is `scale` (the reference's alpha; its scripts use 0.25 up to 350M and
  0.0625 for 1B and 7B). The limiter keeps ‖S‖ from growing by more than
  1.01× per step (one float per matrix in the state). Unprojected leaves get
  GaLore-AdamW's Adam.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projector refreshes (T).
    scale: α, the reference's alpha (0.25 by default, as fira's scripts).
    proj_type: 'std', 'reverse_std', 'left' or 'right' ('full' keeps no
      channel axis for the per-channel factors).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v (galore-torch's placement).
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    mu_dtype: optional dtype of the first moment.
    refresh: 'svd', 'randomized', 'power', 'random' or a refresh function.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized bases.
    regenerate_projector: with refresh='random', store no bases.
    lazy_refresh: None, True or a `go.LazyRefresh`.
    realign_moments: None, True (this optimizer's b1 and b2) or a
      `go.MomentRealignment`.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Chen et al., Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint?, 2024. https://arxiv.org/abs/2410.01623

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.fira_adamw(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> state[0].output_state["w"]   # the limiter: no norm stored yet
    Array(-1., dtype=float32)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  """
  validation.learning_rate(learning_rate)
  if proj_type == "full":
    raise ValueError(f"fira_adamw does not support proj_type='full': {_NOT_FULL}.")
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals()).with_realignment_decays(b1, b2)
  return optax.chain(*fira_chain(galore, adam, outputs.FiraResidual(), learning_rate))


def _apollo_options(galore: GaLoreOptions, owner: str, proj: str, per_channel: bool):
  """The GaLore options with APOLLO's projection, checked against APOLLO's rules."""
  if per_channel and galore.proj_type == "full":
    raise ValueError(f"{owner} with scale_type='channel' does not support proj_type='full': "
                     f"{_NOT_FULL}; use scale_type='tensor'.")
  if proj == "random":
    for option in ("lazy_refresh", "realign_moments"):
      if getattr(galore, option) not in (None, False):
        raise ValueError(
            f"{owner} with proj='random' does not support {option}: a random "
            "projection is not a basis of the gradient's subspace (use proj='svd')."
        )
  return dataclasses.replace(galore, refresh=PROJ_METHODS[proj])


def _apollo(learning_rate, galore, adam, apollo: ApolloOptions, inner, owner, eight_bit=False):
  per_channel = apollo.scale_type == "channel"
  galore = _apollo_options(galore, owner, apollo.proj, per_channel)
  output = outputs.ApolloScaling(
      per_channel=per_channel, scale_front=apollo.scale_front, limit=not apollo.disable_nl)
  head = [nonfinite.zero_nonfinite(lambda tree: parts.projected_mask(galore, tree))
          ] if eight_bit else []
  return optax.chain(*head, *_chain(galore, inner, output, learning_rate, adam))


@public
def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
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
    scale_type: str = "channel",
    proj: str = "random",
    scale_front: bool = False,
    disable_nl: bool = False,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
) -> optax.GradientTransformation:
  """APOLLO: the gradient scaled by what the low-rank Adam says (apollo-torch 1.0.3).

  For each projected matrix, with R = project(G) through a random Gaussian
  projection (entries N(0, 1/r), drawn anew at steps 0, T, 2T, …; no SVD)
  and N = m/(√v + eps) its low-rank Adam direction:

    φ = ‖N‖/(‖R‖ + 1e-8) per channel ('channel') or per matrix ('tensor')
    D = limiter(φ ⊙ G) · √scale        (√scale first with `scale_front`)
    W ← W − lr·√(1−β2^t)/(1−β1^t)·D, then W ← W − lr·wd·W.

  Only the low-rank moments and one limiter value per matrix are stored.
  APOLLO's scripts use rank 1/4 of the hidden size (256 from 350M up), scale
  1 and lr 0.01; `apollo_mini` is rank 1 with one factor per matrix. The
  projection is chosen by `proj`, so there is no `refresh` argument.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projection redraws (T).
    scale: APOLLO's scale; the update is multiplied by √scale.
    proj_type: 'std', 'reverse_std', 'left', 'right' or, with
      scale_type='tensor', 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v (galore-torch's placement).
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    scale_type: 'channel' (a factor per index of the kept axis) or 'tensor'
      (one per matrix).
    proj: 'random' (APOLLO's Gaussian projection) or 'svd' (GaLore's).
    scale_front: multiply by √scale before the limiter.
    disable_nl: no norm-growth limiter (and no limiter state).
    mu_dtype: optional dtype of the first moment.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the projections are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized projections.
    regenerate_projector: store no projection, draw it again each step
      from its keys (proj='random').
    lazy_refresh: None, True or a `go.LazyRefresh` (proj='svd' only).
    realign_moments: None, True or a `go.MomentRealignment` (proj='svd'
      only: a random projection is no basis of the gradient's subspace).

  Returns:
    An `optax.GradientTransformation`.

  References:
    Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, MLSys 2025.
    https://arxiv.org/abs/2412.05270

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = go.apollo_adamw(1e-2, rank=8)
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].shape   # low-rank moments only: r × in
    (8, 64)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals()).with_realignment_decays(b1, b2)
  apollo = ApolloOptions.from_arguments(locals())
  return _apollo(learning_rate, galore, adam, apollo, _direction(adam), "apollo_adamw")


@public
def apollo_adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
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
    scale_type: str = "channel",
    proj: str = "random",
    scale_front: bool = False,
    disable_nl: bool = False,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
) -> optax.GradientTransformation:
  """`apollo_adamw` with bitsandbytes-style blockwise 8-bit low-rank moments.

  apollo-torch has no 8-bit-moment APOLLO; this one uses
  `scale_by_adam_8bit`'s moments and its eps placement, N = m/(√v +
  √(1−β2^t)·eps), and sets non-finite gradient elements to zero first, as
  every 8-bit optimizer here does. 8-bit moments cannot be rotated, so there
  is no `realign_moments`.

  Args:
    learning_rate: a float or an optax schedule.
    rank: rank of the projection (a static int), clamped to each matrix.
    update_proj_gap: steps between projection redraws (T).
    scale: APOLLO's scale; the update is multiplied by √scale.
    proj_type: 'std', 'reverse_std', 'left', 'right' or, with
      scale_type='tensor', 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v inside the bias correction (bitsandbytes' 1e-8).
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    scale_type: 'channel' (a factor per index of the kept axis) or 'tensor'
      (one per matrix).
    proj: 'random' (APOLLO's Gaussian projection) or 'svd' (GaLore's).
    scale_front: multiply by √scale before the limiter.
    disable_nl: no norm-growth limiter (and no limiter state).
    block_size: elements per quantization block. A static int.
    min_8bit_size: moments with fewer elements stay float32. A static int.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the projections are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized projections.
    regenerate_projector: store no projection, draw it again each step.
    lazy_refresh: None, True or a `go.LazyRefresh` (proj='svd' only).

  Returns:
    An `optax.GradientTransformation`.
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals())
  apollo = ApolloOptions.from_arguments(locals())
  inner = scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size, bias_correction=False)
  return _apollo(learning_rate, galore, adam, apollo, inner, "apollo_adamw8bit", eight_bit=True)


@public
def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    update_proj_gap: int = 200,
    scale: float = 128.0,
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    proj: str = "random",
    scale_front: bool = False,
    disable_nl: bool = False,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment] = None,
) -> optax.GradientTransformation:
  """APOLLO-Mini: rank-1 random projection, one factor per matrix, scale 128.

  `apollo_adamw` with rank 1 and scale_type='tensor': per matrix it keeps
  two moments of one row (or column) of the gradient and one limiter value,
  SGD's memory. apollo-torch's scripts use scale 128 (192 at 130M, with
  `scale_front` at 60M and 130M). For another rank use `apollo_adamw` with
  scale_type='tensor'.

  Args:
    learning_rate: a float or an optax schedule.
    update_proj_gap: steps between projection redraws (T).
    scale: APOLLO's scale; the update is multiplied by √scale.
    proj_type: 'std', 'reverse_std', 'left', 'right' or 'full'.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v (galore-torch's placement).
    weight_decay: decoupled weight decay, a number or an optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    proj: 'random' (APOLLO's Gaussian projection) or 'svd' (GaLore's).
    scale_front: multiply by √scale before the limiter.
    disable_nl: no norm-growth limiter (and no limiter state).
    mu_dtype: optional dtype of the first moment.
    refresh_memory_budget: bytes one batched decomposition may take.
    projector_dtype: dtype the projections are stored in; default the leaf's.
    projector_bits: None, 8 or 4: group-quantized projections.
    regenerate_projector: store no projection, draw it again each step.
    lazy_refresh: None, True or a `go.LazyRefresh` (proj='svd' only).
    realign_moments: None, True or a `go.MomentRealignment` (proj='svd'
      only).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> state = go.apollo_mini(1e-2).init({"w": jnp.ones((64, 32))})
    >>> state[0].inner_state.mu["w"].shape   # one row of the (out × in) gradient
    (1, 64)
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  galore = GaLoreOptions.from_arguments(locals(), rank=1).with_realignment_decays(b1, b2)
  apollo = ApolloOptions.from_arguments(locals(), scale_type="tensor")
  return _apollo(learning_rate, galore, adam, apollo, _direction(adam), "apollo_mini")
