"""Running fira 1.0.2 and apollo-torch 1.0.3 (the references) on CPU for parity tests.

Both references are pure torch and run on PyTorch-layout (out × in) weights.
The harness steps them through a given gradient sequence and returns the whole
parameter trajectory, so a JAX implementation can be compared step by step.

Two things are pinned down so that both sides see the same bases:
- SVD bases get the project's canonical signs (`reference.canonical_svd`), as
  the GaLore parity tests do for galore-torch.
- APOLLO's random projections can be *injected*: the caller passes the
  matrices (one per refresh, in the shape the reference uses) and the same
  matrices go into the JAX side. `reference_random_matrices` reproduces the
  ones apollo-torch would draw itself on CPU, which proves the injection
  changes nothing else.

Quirks of the references that the harness refuses up front (with a clear
error) rather than letting them crash or silently compute something else:
- fira 1.0.2 picks its channel axis from the low-rank gradient's shape; with
  proj_type='full', or a rank at or above the kept side, that is not the axis
  the projection keeps and the channel factors do not broadcast.
- apollo-torch 1.0.3 picks its channel axis from the *full* gradient's shape
  (rows when out >= in, columns otherwise), whichever side is projected; so
  scale_type='channel' only means "the kept axis" when proj_type projects the
  'std' side. Otherwise it crashes (rank > 1) or, at rank 1, silently computes
  a single whole-matrix factor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Required, Sequence, TypedDict, Unpack
import warnings

import numpy as np
import torch
from apollo_torch import APOLLOAdamW
from apollo_torch import random_projector
from fira import FiraAdamW

import reference

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class ReferenceRun(NamedTuple):
  """A reference run: parameters after every step, and the optimizer.

  trajectory[k][name] is parameter `name` after step k + 1, as a float32
  numpy array in PyTorch layout. `optimizer.state[tensors[name]]` holds the
  reference's state for that parameter (moments, projector, limiter norm).
  """

  trajectory: list[dict[str, np.ndarray]]
  optimizer: torch.optim.Optimizer
  tensors: dict[str, torch.nn.Parameter]


def projection_side(shape: Sequence[int], proj_type: str) -> str:
  """Which side of an (out × in) matrix the references project.

  Returns 'right' (the input side: basis r × in, low-rank gradient out × r)
  or 'left' (the output side: basis out × r, low-rank gradient r × in), or
  'full' (both). Same rule as galore-torch: 'std' projects the input side of
  a tall or square matrix and the output side of a wide one.
  """
  if proj_type not in PROJ_TYPES:
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
  out_dim, in_dim = shape
  if proj_type == "full":
    return "full"
  if proj_type in ("left", "right"):
    return proj_type
  tall = out_dim >= in_dim
  if proj_type == "std":
    return "right" if tall else "left"
  return "left" if tall else "right"


def random_projection_shape(
    shape: Sequence[int], rank: int, proj_type: str
) -> tuple[int, int]:
  """Shape of the random matrix apollo-torch draws for an (out × in) weight.

  (rank, in) for the right side, (out, rank) for the left side. Unlike an
  SVD basis it is not truncated to the matrix size: any rank is allowed.
  """
  side = projection_side(shape, proj_type)
  if side == "full":
    raise ValueError(
        "apollo-torch 1.0.3 has no random projection for proj_type='full'"
    )
  out_dim, in_dim = shape
  return (rank, in_dim) if side == "right" else (out_dim, rank)


def _ordered(
    params: dict[str, np.ndarray], projected: set[str]
) -> tuple[list[str], list[str]]:
  """Plain parameters first, then projected ones (as the official training
  scripts build their groups); APOLLO's per-parameter seeds follow this order."""
  unknown = set(projected) - set(params)
  if unknown:
    raise ValueError(f"projected names {sorted(unknown)} are not in params")
  plain = [k for k in params if k not in projected]
  lowrank = [k for k in params if k in projected]
  for k in lowrank:
    if np.ndim(params[k]) != 2:
      raise ValueError(
          f"projected parameter {k!r} must be a matrix, got shape {np.shape(params[k])}"
      )
  return plain, lowrank


def reference_random_matrices(
    params: dict[str, np.ndarray],
    projected: set[str],
    *,
    rank: int,
    proj_type: str = "std",
    refreshes: int,
) -> dict[str, list[np.ndarray]]:
  """The projection matrices apollo-torch 1.0.3 draws itself (on CPU).

  The parameter at 1-based position i of the optimizer's parameter list
  starts from seed i; refresh k draws randn(shape) from a generator seeded
  with seed_k, divides by sqrt(rank), and advances seed_{k+1} =
  next_seed(seed_k). The reference's own functions are called here.

  Returns {name: [matrix for refresh 0, 1, ...]} as float32 arrays, for the
  projected parameters, in the order `run_apollo` builds its groups.
  """
  plain, lowrank = _ordered(params, projected)
  matrices = {}
  for position, name in enumerate(plain + lowrank, start=1):
    if name not in projected:
      continue
    shape = random_projection_shape(np.shape(params[name]), rank, proj_type)
    seed, draws = position, []
    for _ in range(refreshes):
      draw = random_projector.stable_randn(shape, seed=seed, dtype=torch.float32)
      draws.append((draw / math.sqrt(rank)).numpy())
      seed = random_projector.next_seed(seed)
    matrices[name] = draws
  return matrices


class _InjectedProjector(random_projector.GradientProjector):
  """apollo-torch's random projector, handing out given matrices in turn."""

  def __init__(self, matrices: Sequence[np.ndarray], name: str, **kwargs):
    super().__init__(**kwargs)
    self._matrices = list(matrices)
    self._name = name
    self._refresh = 0

  def get_orthogonal_matrix(self, weights, rank, type, seed):
    del seed  # the given matrices replace the reference's generator
    if self._refresh >= len(self._matrices):
      raise ValueError(
          f"random_matrices[{self._name!r}] has {len(self._matrices)} matrices; refresh "
          f"{self._refresh} needs one more (one per refresh at steps 0, T, 2T, ...)"
      )
    out_dim, in_dim = weights.shape
    want = (rank, in_dim) if type == "right" else (out_dim, rank)
    matrix = np.asarray(self._matrices[self._refresh], np.float32)
    if matrix.shape != want:
      raise ValueError(
          f"random_matrices[{self._name!r}][{self._refresh}] has shape {matrix.shape}; the "
          f"{type} side of a {tuple(weights.shape)} weight at rank {rank} needs {want}"
      )
    self._refresh += 1
    # As the reference: drawn in float32, stored in the gradient's dtype.
    return torch.from_numpy(matrix.copy()).to(weights.dtype)


def _step_through(optimizer, tensors, grads, dtype, canonical_signs):
  """Applies the gradients step by step; returns the parameters after each."""
  trajectory = []
  signs = reference.canonical_svd() if canonical_signs else contextlib.nullcontext()
  with signs, reference._one_thread():  # pylint: disable=protected-access
    for step_grads in grads:
      for name, tensor in tensors.items():
        grad = torch.tensor(np.asarray(step_grads[name]), dtype=torch.float32)
        tensor.grad = grad.to(dtype)
      optimizer.step()
      trajectory.append(
          {k: t.detach().float().numpy().copy() for k, t in tensors.items()}
      )
  return trajectory


def _tensors(params, names, dtype):
  return {
      k: torch.nn.Parameter(
          torch.tensor(np.asarray(params[k]), dtype=torch.float32).to(dtype)
      )
      for k in names
  }


class AdamWSettings(TypedDict, total=False):
  """The keyword arguments run_fira and run_apollo share (defaults as in `_run_adamw`).

  lr, weight_decay, betas, eps: the AdamW constructor arguments of both references.
  dtype: torch dtype of parameters and gradients (float32 or bfloat16).
  canonical_signs: give SVD bases the project's canonical signs (False runs the
    reference's own LAPACK signs; only for checking the harness).
  """

  lr: Required[float]
  weight_decay: float
  betas: tuple[float, float]
  eps: float
  dtype: torch.dtype
  canonical_signs: bool


def _run_adamw(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    plain: list[str],
    lowrank: list[str],
    options: dict,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
    canonical_signs: bool = True,
) -> ReferenceRun:
  """Builds the parameter groups and the optimizer, and steps it through `grads`.

  `plain` and `lowrank` are the names as `_ordered` returns them; the low-rank
  group gets the keys `options`. `make_optimizer(groups, tensors, lr=, betas=,
  eps=, weight_decay=)` returns the reference optimizer over the torch `tensors`.
  """
  tensors = _tensors(params, plain + lowrank, dtype)
  groups = []
  if plain:
    groups.append({"params": [tensors[k] for k in plain]})
  if lowrank:
    groups.append({"params": [tensors[k] for k in lowrank], **options})
  optimizer = make_optimizer(groups, tensors, lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay)
  trajectory = _step_through(optimizer, tensors, grads, dtype, canonical_signs)
  return ReferenceRun(trajectory, optimizer, tensors)


def run_fira(
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    projected: set[str],
    *,
    rank: int,
    update_proj_gap: int,
    alpha: float,
    proj_type: str = "std",
    **settings: Unpack[AdamWSettings],
) -> ReferenceRun:
  """Steps fira.FiraAdamW; `projected` leaves get the Fira group.

  Args:
    params: name -> initial array, PyTorch layout (out × in) for matrices.
    grads: per step, name -> gradient (cast to `dtype` like the params).
    projected: names of the matrices in the group with rank/alpha/... .
    rank, update_proj_gap, alpha, proj_type: the Fira group's keys (fira has
      no defaults for them; its scripts use alpha 0.25, or 0.0625 at 1B+).
    **settings: lr, weight_decay, betas, eps, dtype, canonical_signs (AdamWSettings).

  Returns:
    A ReferenceRun with the trajectory after every step.
  """
  plain, lowrank = _ordered(params, projected)
  for name in lowrank:
    out_dim, in_dim = np.shape(params[name])
    side = projection_side((out_dim, in_dim), proj_type)
    if side == "full":
      raise ValueError(
          "fira 1.0.2 cannot step proj_type='full': its per-channel factors (r, 1) do not "
          "broadcast against the full gradient; use 'std', 'reverse_std', 'left' or 'right'"
      )
    # fira takes norms over the shorter axis of the low-rank gradient; that is
    # the rank axis only while rank is below the kept side.
    if side == "right":
      low_rank_shape = (out_dim, min(rank, in_dim))
    else:
      low_rank_shape = (min(rank, out_dim), in_dim)
    per_row = not low_rank_shape[0] < low_rank_shape[1]
    if per_row != (side == "right"):
      raise ValueError(
          f"rank={rank} is too large for {name!r} {out_dim}x{in_dim} with proj_type="
          f"{proj_type!r}: fira 1.0.2 would take channel norms along the kept axis"
      )
  options = {
      "rank": rank,
      "update_proj_gap": update_proj_gap,
      "alpha": alpha,
      "proj_type": proj_type,
  }

  def make_optimizer(groups, tensors, **adamw):
    del tensors
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # FiraAdamW's deprecation warning
      return FiraAdamW(groups, **adamw)

  return _run_adamw(make_optimizer, params, grads, plain, lowrank, options, **settings)


def run_apollo(
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    projected: set[str],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj: str = "random",
    proj_type: str = "std",
    scale_type: str = "channel",
    scale_front: bool = False,
    disable_nl: bool = False,
    random_matrices: dict[str, Sequence[np.ndarray]] | None = None,
    **settings: Unpack[AdamWSettings],
) -> ReferenceRun:
  """Steps apollo_torch.APOLLOAdamW; `projected` leaves get the APOLLO group.

  Args:
    params, grads, projected, **settings: as run_fira.
    rank, update_proj_gap, scale, proj, proj_type, scale_type: the APOLLO
      group's keys (no defaults in apollo-torch; APOLLO-Mini is rank 1,
      scale_type 'tensor', scale 128).
    scale_front, disable_nl: APOLLOAdamW's constructor flags.
    random_matrices: for proj='random', name -> one float32 matrix per refresh
      (steps 0, T, 2T, ...), shaped as `random_projection_shape` says (entries
      ~ N(0, 1/rank) in the reference). None lets the reference draw its own
      (`reference_random_matrices` returns those).

  Returns:
    A ReferenceRun with the trajectory after every step.
  """
  if proj not in ("random", "svd"):
    raise ValueError(f"proj must be 'random' or 'svd', got {proj!r}")
  if scale_type not in ("channel", "tensor"):
    raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")
  if random_matrices is not None and proj != "random":
    raise ValueError("random_matrices only applies to proj='random'")
  plain, lowrank = _ordered(params, projected)
  for name in lowrank:
    shape = np.shape(params[name])
    side = projection_side(shape, proj_type)
    if proj == "random" and side == "full":
      raise ValueError(
          "apollo-torch 1.0.3 has no random projection for proj_type='full'"
      )
    # apollo-torch: rows when out >= in, columns otherwise, whatever the side.
    reference_per_row = shape[0] >= shape[1]
    kept_per_row = side == "right"
    if scale_type == "channel" and (side == "full" or reference_per_row != kept_per_row):
      raise ValueError(
          f"scale_type='channel' with proj_type={proj_type!r} on {name!r} "
          f"{shape[0]}x{shape[1]}: apollo-torch 1.0.3 takes channels on the rows when "
          "out >= in and on the columns otherwise, which is not the axis this projection "
          "keeps (it crashes for rank > 1 and computes one whole-matrix factor at rank 1); "
          "use proj_type='std' or scale_type='tensor'"
      )
  if random_matrices is not None:
    missing = set(lowrank) - set(random_matrices)
    if missing:
      raise ValueError(
          f"random_matrices has no entry for projected parameters {sorted(missing)}"
      )
  options = {
      "rank": rank,
      "update_proj_gap": update_proj_gap,
      "scale": scale,
      "proj": proj,
      "proj_type": proj_type,
      "scale_type": scale_type,
  }

  def make_optimizer(groups, tensors, **adamw):
    optimizer = APOLLOAdamW(groups, **adamw, scale_front=scale_front, disable_nl=disable_nl)
    if random_matrices is not None:
      # APOLLOAdamW creates a parameter's projector on its first step unless
      # one is there already.
      for name in lowrank:
        optimizer.state[tensors[name]]["projector"] = _InjectedProjector(
            random_matrices[name], name, rank=rank, update_proj_gap=update_proj_gap,
            scale=scale, proj_type=proj_type,
        )
    return optimizer

  return _run_adamw(make_optimizer, params, grads, plain, lowrank, options, **settings)
