"""What a GaLore transformation does with given parameters, said before a run.

`warn_about_plan` runs when a GaLore state is built (at Python time, also
under `jit` or `eval_shape`) and warns about options that silently do
nothing useful; `describe` is the per-leaf table a user checks before a long
run: which leaves are projected, their stored bases, and their state bytes
next to `optax.adamw`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import jax
import optax

from galore_optax import masking
from galore_optax import tree_utils
from galore_optax.projector_quantization import QuantizedProjector

_SHOWN = 5  # leaves named in a warning; the rest are counted


class ProjectionWarning(UserWarning):
  """GaLore options that, for these parameters, project nothing or save nothing."""


def _named(items: Sequence[str]) -> str:
  more = len(items) - _SHOWN
  return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _shape(shape) -> str:
  return "×".join(str(d) for d in shape) or "scalar"


def warn_about_plan(plans: Sequence[Any], leaves: Sequence[Any], paths: Sequence[str],
                    projectors: Sequence[Any], rotation: bool = False) -> None:
  """Warns (ProjectionWarning) where the projection does nothing useful.

  Args:
    plans: a `plan.LeafPlan` or None per leaf.
    leaves: the parameter leaves (arrays, tracers or shape structs).
    paths: their paths.
    projectors: the stored bases built for each leaf (MaskedNode if none).
    rotation: the projection keeps every singular vector on purpose
      (`rank=None`, Conda): a full-size low-rank gradient is no mistake.
  """
  sized = [path for path, x in zip(paths, leaves) if math.prod(jax.numpy.shape(x)) > 0]
  if sized and all(p is None for p in plans):
    warnings.warn(
        f"the projection selector (`projected`) selects none of the {len(sized)} parameters "
        f"({_named(sized)}): every leaf gets full-size optimizer state, as without GaLore. "
        "Check the selector: go.path_mask patterns are searched in paths like "
        "'layers/0/attn/q_proj/kernel'.",
        ProjectionWarning, stacklevel=2)
  full = []
  for p, x, path, stored in ([] if rotation else zip(plans, leaves, paths, projectors)):
    if p is not None and math.prod(p.low_rank_shape) >= math.prod(jax.numpy.shape(x)):
      full.append(
          f"{path} ({_shape(jax.numpy.shape(x))}, rank clamped to {p.rank}: low-rank gradient "
          f"{_shape(p.low_rank_shape)}, projector {tree_utils.tree_bytes(stored):,} bytes)")
  if full:
    warnings.warn(
        f"rank at or above the side it compresses, for {_named(full)}: the low-rank "
        "gradient is as large as the gradient, so these leaves' optimizer state is as "
        "large as AdamW's plus the projector. Lower `rank`, or leave them out of "
        "`projected`.",
        ProjectionWarning, stacklevel=2)


def _attribute(state: Any, param_paths: Sequence[tuple]) -> tuple[list[int], int]:
  """Bytes of `state` per parameter (by path), and the bytes of no parameter.

  A state leaf belongs to the parameter whose key path appears in its own
  (mu['w'], projectors['w']['u'], ...), the longest such path if several.
  """
  per_param = [0] * len(param_paths)
  other = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    owner = _owner(tuple(path), param_paths)
    size = tree_utils.tree_bytes(leaf)
    if owner is None:
      other += size
    else:
      per_param[owner] += size
  return per_param, other


def _owner(path: tuple, param_paths: Sequence[tuple]) -> Optional[int]:
  best, best_len = None, 0
  for i, p in enumerate(param_paths):
    n = len(p)
    if n <= best_len or n > len(path):
      continue
    if any(path[k:k + n] == p for k in range(len(path) - n + 1)):
      best, best_len = i, n
  return best


def _galore_states(state: Any) -> list[Any]:
  from galore_optax.transform import GaLoreState  # transform imports this module
  is_galore = lambda s: isinstance(s, GaLoreState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_galore) if is_galore(s)]


def _projector_text(stored: Any) -> str:
  if isinstance(stored, optax.MaskedNode) or not stored:
    return ""
  parts = []
  for side, basis in stored.items():
    if isinstance(basis, QuantizedProjector):
      parts.append(f"{side} quantized ({basis.codes.dtype} codes)")
    else:
      parts.append(f"{side} {_shape(basis.shape)} {basis.dtype}")
  return ", ".join(parts)


def describe(tx: optax.GradientTransformation, params: Any) -> str:
  """A per-leaf table of what `tx` keeps for `params`, next to AdamW.

  Builds the state abstractly (`jax.eval_shape`, nothing is allocated) and
  lists, for every parameter: its shape, whether it is projected and the
  bases stored for it (side, shape and dtype), the bytes of `tx`'s state
  that belong to it and those of `optax.adamw`'s. A state leaf belongs to
  a parameter when the parameter's path appears in its own (moments,
  projectors, limiter values); step counts and the like are totalled
  separately.

  Args:
    tx: any optax transformation, e.g. `go.galore_adamw(1e-3, rank=128)`.
    params: the parameters (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    The table as a string, to print.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros(64)}
    >>> print(go.describe(go.galore_adamw(1e-3, rank=8), params))
    parameter  shape   projected  bases           state bytes  AdamW bytes
    b          64      no                                 512          512
    w          256×64  yes        u 64×8 float32       18,432      131,072
    (other)                                                 8            4
    total                                              18,952      131,588
  """
  paths = masking.leaf_paths(params)
  keys = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = jax.tree.leaves(params)
  state = jax.eval_shape(tx.init, params)
  ours, ours_other = _attribute(state, keys)
  adamw, adamw_other = _attribute(jax.eval_shape(optax.adamw(1e-3).init, params), keys)
  bases = [""] * len(keys)
  projected = [False] * len(keys)
  for galore_state in _galore_states(state):
    stored = jax.tree.structure(params).flatten_up_to(galore_state.projectors)
    for i, s in enumerate(stored):
      if not isinstance(s, optax.MaskedNode):
        projected[i] = True
        bases[i] = _projector_text(s)
  rows = [("parameter", "shape", "projected", "bases", "state bytes", "AdamW bytes")]
  for i, (path, leaf) in enumerate(zip(paths, leaves)):
    rows.append((path or "<root>", _shape(jax.numpy.shape(leaf)), "yes" if projected[i] else "no",
                 bases[i], f"{ours[i]:,}", f"{adamw[i]:,}"))
  rows.append(("(other)", "", "", "", f"{ours_other:,}", f"{adamw_other:,}"))
  rows.append(("total", "", "", "", f"{sum(ours) + ours_other:,}",
               f"{sum(adamw) + adamw_other:,}"))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  right = {4, 5}
  line = lambda r: "  ".join(
      cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
  return "\n".join(line(r).rstrip() for r in rows)
