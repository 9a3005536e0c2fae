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

import optax

from galore_optax import outputs
from galore_optax import validation
from galore_optax.adam import scale_by_adam_hf, scale_by_bias_correction
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax.alias import decay_after, zero_nonfinite
from galore_optax.options import ADAM_8BIT, ADAM_POSITIONAL, ADAMW, EPS_8BIT
from galore_optax.options import AdamOptions, GaLoreOptions, galore_optimizer
from galore_optax.transform import galore_transform

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


_APOLLO = {"apollo": (ApolloOptions, ("scale_type", "proj", "scale_front", "disable_nl"))}
_MINI = {"apollo": (ApolloOptions, ("proj", "scale_front", "disable_nl"))}
_NOT_FULL = {"proj_type": "'full' keeps no channel axis for the per-channel factors"}


def _chain(galore, inner, output, learning_rate, adam: AdamOptions):
  """GaLore with `output`, then Adam's step size, the learning rate and decay."""
  return [
      galore_transform(galore, inner, output),
      scale_by_bias_correction(adam.b1, adam.b2),
      *decay_after(learning_rate, adam),
  ]


def _direction(adam: AdamOptions):
  """galore-torch's Adam without its step size: N = m / (√v + eps)."""
  return scale_by_adam_hf(adam.b1, adam.b2, adam.eps, adam.mu_dtype, bias_correction=False)


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAMW, defaults={"scale": 0.25})
def fira_adamw(
    learning_rate: optax.ScalarOrSchedule, *, galore: GaLoreOptions, adam: AdamOptions,
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
    {galore_options}
    {adam_options}

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
  if galore.proj_type == "full":
    raise ValueError(f"fira_adamw does not support proj_type='full': {_NOT_FULL['proj_type']}.")
  galore = galore.with_realignment_decays(adam.b1, adam.b2)
  return optax.chain(*_chain(galore, _direction(adam), outputs.FiraResidual(), learning_rate, adam))


def _apollo_options(galore: GaLoreOptions, owner: str, proj: str, per_channel: bool):
  """The GaLore options with APOLLO's projection, checked against APOLLO's rules."""
  if per_channel and galore.proj_type == "full":
    raise ValueError(f"{owner} with scale_type='channel' does not support proj_type='full': "
                     f"{_NOT_FULL['proj_type']}; use scale_type='tensor'.")
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
  head = [zero_nonfinite(galore)] if eight_bit else []
  return optax.chain(*head, *_chain(galore, inner, output, learning_rate, adam))


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAMW, groups=_APOLLO, defaults={"rank": 256},
                  exclude=("refresh",))
def apollo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    galore: GaLoreOptions,
    adam: AdamOptions,
    apollo: ApolloOptions,
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
  1 and lr 0.01; `apollo_mini` is rank 1 with one factor per matrix.

  Args:
    learning_rate: a float or an optax schedule.
    {galore_options} With proj='random', lazy_refresh and realign_moments
      do not apply (a random projection is no basis of the gradient's
      subspace); regenerate_projector=True stores no projector at all.
    {apollo_options}
    {adam_options}

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
  return _apollo(learning_rate, galore, adam, apollo, _direction(adam), "apollo_adamw")


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAM_8BIT, groups=_APOLLO,
                  defaults={"rank": 256, **EPS_8BIT}, exclude=("refresh",))
def apollo_adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    galore: GaLoreOptions,
    adam: AdamOptions,
    apollo: ApolloOptions,
    block_size: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  """`apollo_adamw` with bitsandbytes-style blockwise 8-bit low-rank moments.

  apollo-torch has no 8-bit-moment APOLLO; this one uses
  `scale_by_adam_8bit`'s moments and its eps placement, N = m/(√v +
  √(1−β2^t)·eps), and sets non-finite gradient elements to zero first, as
  every 8-bit optimizer here does.

  Args:
    learning_rate: a float or an optax schedule.
    {galore_options}
    {adam_options}
    {apollo_options}
    block_size: elements per quantization block.
    min_8bit_size: moments with fewer elements stay float32.

  Returns:
    An `optax.GradientTransformation`.
  """
  inner = scale_by_adam_8bit(
      adam.b1, adam.b2, adam.eps, block_size, min_8bit_size, bias_correction=False)
  return _apollo(learning_rate, galore, adam, apollo, inner, "apollo_adamw8bit", eight_bit=True)


@galore_optimizer(middle=ADAM_POSITIONAL, adam=ADAMW, groups=_MINI,
                  defaults={"rank": 1, "scale": 128.0}, exclude=("refresh",))
def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    galore: GaLoreOptions,
    adam: AdamOptions,
    apollo: ApolloOptions,
) -> optax.GradientTransformation:
  """APOLLO-Mini: rank-1 random projection, one factor per matrix, scale 128.

  `apollo_adamw` with rank 1 and scale_type='tensor': per matrix it keeps
  two moments of one row (or column) of the gradient and one limiter value,
  SGD's memory. apollo-torch's scripts use scale 128 (192 at 130M, with
  `scale_front` at 60M and 130M).

  Args:
    learning_rate: a float or an optax schedule.
    {galore_options} rank must stay 1 (for another rank use `apollo_adamw`
      with scale_type='tensor').
    {adam_options}
    {apollo_options} scale_type is 'tensor'.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> state = go.apollo_mini(1e-2).init({"w": jnp.ones((64, 32))})
    >>> state[0].inner_state.mu["w"].shape   # one row of the (out × in) gradient
    (1, 64)
  """
  if galore.rank != 1:
    raise ValueError(
        f"apollo_mini is rank 1 by definition, got rank={galore.rank}; for another "
        "rank use apollo_adamw(rank=..., scale_type='tensor')."
    )
  apollo = dataclasses.replace(apollo, scale_type="tensor")
  return _apollo(learning_rate, galore, adam, apollo, _direction(adam), "apollo_mini")
