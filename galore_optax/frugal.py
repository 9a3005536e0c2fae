"""FRUGAL: Adam on a subspace, a state-free update outside it (Zmushko et al., ICML 2025).

Each projected matrix keeps Adam's state only on a subspace (its leading
singular vectors, or random columns) at a `density`; the rest of its gradient
gets signSGD or SGD, with no state; at each change of subspace Adam starts
again (zero moments, bias correction from step 1). Built from the core's
parts: a rank per matrix from the density, the SVD or the random-coordinates
refresh, `realignment.ResetMoments`, and the output `outputs.StateFreeResidual`.
Leaves that are not projected get plain Adam, never reset.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import jax
import jax.core  # `jax` imports it but does not bind the name for type checkers
import optax

from galore_optax import frugal_blocks
from galore_optax import masking
from galore_optax import parts
from galore_optax import validation
from galore_optax import weight_decay as weight_decay_lib
from galore_optax.masking import MaskOrFn
from galore_optax.options import AdamOptions, GaLoreOptions
from galore_optax.outputs import INACTIVE_RULES, StateFreeResidual
from galore_optax.projection import INPUT_SIDE
from galore_optax.realignment import ResetMoments
from galore_optax.sharding import public
from galore_optax.transform import galore_transform

# FRUGAL's subspaces: its GaloreAdamW (leading singular vectors) and CoordAdamW (RandK);
# "blocks" (BlockAdamW, whole tensors) is `frugal_blocks`.
PROJECTIONS = {"svd": "svd", "random": "random_coordinates"}


def density_rank(density: float, projection: str):
  """`rank(m, n, sides)` of the official code: the kept side's size times `density`.

  The SVD rounds it (Python's round, half to even; min(m, n) for 'full'); the
  random coordinates floor it, as the official code does. At least 1.
  """

  def rank(m: int, n: int, sides) -> int:
    # The input side keeps n columns' worth, the output side m rows', 'full' the smaller.
    dim = min(m, n) if len(sides) == 2 else (n if sides == (INPUT_SIDE,) else m)
    count = round(density * dim) if projection == "svd" else math.floor(dim * density)
    return max(1, int(count))

  return rank


def _no_subspace_options(**given) -> None:
  """Blocks keep whole tensors: the options that shape a subspace do not apply."""
  for name, (value, default) in given.items():
    if value is not default and value != default:
      raise ValueError(
          f"{name}={value!r} shapes a subspace of a matrix; projection='blocks' keeps "
          f"whole tensors and takes no {name} (leave it at its default, {default!r}).")


@public
def scale_by_frugal(
    density: float = 0.25,
    update_proj_gap: int = 200,
    projection: str = "svd",
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    inactive_update_rule: str = "sign_sgd",
    inactive_lr_scale: float = 1.0,
    proj_params_lr_scale: float = 1.0,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    regenerate_projector: bool = False,
    block_order: Union[str, frugal_blocks.BlockOrderFn] = "descending",
    seed: int = 0,
) -> optax.GradientTransformation:
  """FRUGAL's direction, without the learning rate and weight decay.

  For a projected matrix G with subspace P (chosen at 0-based steps 0, T,
  2T, …, Adam's moments and step count then reset): the direction is
  s_p · (project_back(adam(PᵀG)) + s_i · φ(G − project_back(PᵀG))) with
  φ = sign (`"sign_sgd"`) or the identity (`"sgd"`), s_p =
  `proj_params_lr_scale`, s_i = `inactive_lr_scale`; Adam is torch's (eps
  after the bias correction). Other leaves: Adam at full size, never reset.

  Args:
    density: the fraction of the kept side in the subspace: r = round(density
      · side) singular vectors, or ⌊side · density⌋ coordinates; at least 1.
    update_proj_gap: steps between changes of subspace (the official
      `update_gap`).
    projection: "svd" (the leading singular vectors of the gradient, the
      official GaloreAdamW), "random" (random columns or rows, RandK) or
      "blocks" (whole tensors, the official BlockAdamW: K = round(N · density)
      of the N projected leaves get Adam, the others only the state-free rule;
      `go.scale_by_frugal_blocks`).
    proj_type: the side: 'std', 'reverse_std', 'left', 'right' or 'full'
      with "svd"; 'right' (columns, the official default) or 'left' (rows)
      with "random".
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v̂, after the bias correction.
    inactive_update_rule: "sign_sgd" or "sgd", the rule outside the subspace.
    inactive_lr_scale: s_i, the step of the state-free part relative to the
      subspace's.
    proj_params_lr_scale: s_p, the step of the projected leaves relative to
      the learning rate (both parts).
    projected: which leaves are projected (pytree of bools or a callable);
      default every floating leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh_memory_budget: bytes of float32 matrices one batched SVD may
      take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    regenerate_projector: with "random" only: store no bases, only the step
      of each change, and draw the coordinates again from their keys.
    block_order: with "blocks": which leaves become active at each change,
      in `jax.tree.leaves` order: "descending" (the official pre-training
      scripts: the last leaves first), "ascending", "mirror", "random", or a
      function (change index, key, N, K) -> bool (N,).
    seed: with "blocks" and a random order: the key's seed.

  Returns:
    An `optax.GradientTransformation`: an `optax.partition` of the projected
    leaves (a `go.GaLoreState`, or a `go.FrugalBlocksState` with "blocks")
    and the others (`optax.ScaleByAdamState`).

  References:
    Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training, ICML 2025. https://arxiv.org/abs/2411.07837
  """
  validation.choice(projection, "projection", tuple(PROJECTIONS) + ("blocks",))
  validation.choice(inactive_update_rule, "inactive_update_rule", INACTIVE_RULES)
  if isinstance(density, jax.core.Tracer):
    raise TypeError("density sets array shapes and must be a static Python float; with "
                    "optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap', "
                    "'density').")
  # Blocks may have none active (the official 7B script: density 0, signSGD everywhere).
  density = float(validation.real(density, "density", low=0.0, high=1.0,
                                  low_open=projection != "blocks"))
  validation.real(inactive_lr_scale, "inactive_lr_scale", low=0.0)
  adam = lambda: optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if projection == "blocks":
    _no_subspace_options(proj_type=(proj_type, "std"), dimension_numbers=(dimension_numbers, None),
                         refresh_memory_budget=(refresh_memory_budget, None),
                         projector_dtype=(projector_dtype, None),
                         regenerate_projector=(regenerate_projector, False))
    blocks = frugal_blocks.scale_by_frugal_blocks(
        density, update_proj_gap, block_order, b1, b2, eps,
        inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
        proj_params_lr_scale=proj_params_lr_scale, seed=seed)

    def block_labels(params):
      flags = masking.resolve_mask(projected, params)
      return jax.tree.structure(params).unflatten(["subspace" if f else "full" for f in flags])

    return optax.partition({"subspace": blocks, "full": adam()}, block_labels)
  if projection == "random" and proj_type not in ("right", "left"):
    raise ValueError(
        f"proj_type={proj_type!r} with projection='random': random coordinates are columns "
        "(proj_type='right', the official default) or rows ('left').")
  AdamOptions(b1=b1, b2=b2, eps=eps)  # validates them
  if not isinstance(block_order, str) or block_order != "descending":
    raise ValueError(f"block_order={block_order!r} chooses whole tensors: it needs "
                     "projection='blocks'.")
  options = GaLoreOptions(
      rank=density_rank(density, projection), update_proj_gap=update_proj_gap,
      scale=proj_params_lr_scale, proj_type=proj_type, projected=projected,
      dimension_numbers=dimension_numbers, refresh=PROJECTIONS[projection],
      refresh_memory_budget=refresh_memory_budget, projector_dtype=projector_dtype,
      regenerate_projector=regenerate_projector, realign_moments=ResetMoments())
  subspace = galore_transform(options, adam(),
                              StateFreeResidual(inactive_update_rule, inactive_lr_scale))

  def labels(params):
    flags = parts.projected_mask(options, params)
    return jax.tree.map(lambda f: "subspace" if f else "full", flags)

  return optax.partition({"subspace": subspace, "full": adam()}, labels)


@public
def frugal_adamw(
    learning_rate: optax.ScalarOrSchedule,
    density: float = 0.25,
    update_proj_gap: int = 200,
    projection: str = "svd",
    proj_type: str = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    inactive_update_rule: str = "sign_sgd",
    inactive_lr_scale: float = 1.0,
    proj_params_lr_scale: float = 1.0,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    regenerate_projector: bool = False,
    block_order: Union[str, frugal_blocks.BlockOrderFn] = "descending",
    seed: int = 0,
) -> optax.GradientTransformation:
  """FRUGAL's AdamW (the official GaloreAdamW / CoordAdamW / BlockAdamW), step for step.

  `scale_by_frugal`, then decoupled weight decay of the *old* weights,
  p·(1 − lr·wd), on every leaf in `mask` (as torch's AdamW and the official
  code), and the learning rate. Defaults follow the official pre-training
  scripts (density 0.25, eps 1e-8, no weight decay; their `update_gap` is
  200 up to 1B).

  Args:
    learning_rate: a float or an optax schedule.
    density: the fraction of each kept side in the subspace.
    update_proj_gap: steps between changes of subspace.
    projection: "svd", "random" (columns or rows) or "blocks" (whole
      tensors, what the official pre-training scripts run).
    proj_type: the side; with "random", 'right' (columns) or 'left' (rows).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v̂, after the bias correction.
    weight_decay: decoupled weight decay of the old weights, a number or an
      optax schedule.
    mask: the weight-decay mask, as in `optax.adamw`; default all leaves.
    inactive_update_rule: "sign_sgd" or "sgd" outside the subspace.
    inactive_lr_scale: the state-free part's step relative to the subspace's.
    proj_params_lr_scale: the projected leaves' step relative to the
      learning rate.
    projected: which leaves are projected; default every floating leaf with
      at least two axes.
    dimension_numbers: a `go.DimensionNumbers`, a pytree of them or a
      callable; default Flax's (in, out) layout.
    refresh_memory_budget: bytes of float32 matrices one batched SVD may
      take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    regenerate_projector: with "random": store only the step of each change.
    block_order: with "blocks": "descending" (the scripts'), "ascending",
      "mirror", "random" or a function; see `scale_by_frugal`.
    seed: with "blocks" and a random order: the key's seed.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training, ICML 2025. https://arxiv.org/abs/2411.07837

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    >>> tx = go.frugal_adamw(1e-3, density=0.25, projection="random", proj_type="right")
    >>> state = tx.init(params)
    >>> state[0].inner_states["subspace"].inner_state.projectors["w"]["vh"].shape
    (8, 32)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  """
  validation.learning_rate(learning_rate)
  adam = AdamOptions.from_arguments(locals())
  return optax.chain(
      scale_by_frugal(
          density, update_proj_gap, projection, proj_type, b1, b2, eps,
          inactive_update_rule=inactive_update_rule, inactive_lr_scale=inactive_lr_scale,
          proj_params_lr_scale=proj_params_lr_scale, projected=projected,
          dimension_numbers=dimension_numbers, refresh_memory_budget=refresh_memory_budget,
          projector_dtype=projector_dtype, regenerate_projector=regenerate_projector,
          block_order=block_order, seed=seed),
      *weight_decay_lib.learning_rate_and_decay(
          learning_rate, adam.weight_decay, before=True if mask is None else mask),
  )
