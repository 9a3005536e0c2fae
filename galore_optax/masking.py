"""Which leaves GaLore projects, and how: selectors and per-leaf dimension numbers.

Both are resolved once per trace against the flattened parameter tree, and
every error names the offending leaf by its path ("layers/0/attn/q/kernel").
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import jax
import jax.core  # `jax` imports it but does not bind the name for type checkers
import numpy as np

from galore_optax.matrix_view import DimensionNumbers

# A selector of leaves, as optax's masks: a pytree of bools like the
# parameters, or a callable(params) returning one.
MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_paths(tree: Any) -> list[str]:
  """'a/b/0/kernel' for every leaf of `tree` (dict keys, attributes, indices)."""
  return [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _structure_mismatch(name: str, got: Any, params: Any, is_leaf=None) -> ValueError:
  expected = set(leaf_paths(params))
  got_paths = {
      _path(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(got, is_leaf=is_leaf)[0]
  }
  missing = sorted(expected - got_paths)
  extra = sorted(got_paths - expected)
  detail = []
  if missing:
    detail.append(f"no entry for parameter {missing[0]!r}")
  if extra:
    detail.append(f"an entry {extra[0]!r} that is not a parameter")
  if not detail:
    detail.append("a different tree structure")
  return ValueError(
      f"{name} must have the same tree structure as the parameters, with one "
      f"entry per leaf; it has {' and '.join(detail)}. Build it with "
      f"jax.tree.map over the params, or pass a callable(params)."
  )


def _is_float_matrix(x, min_ndim: int) -> bool:
  dtype = getattr(x, "dtype", None) or np.result_type(x)
  return np.ndim(x) >= min_ndim and jax.numpy.issubdtype(dtype, jax.numpy.floating)


def default_mask(params: Any) -> Any:
  """Projects every floating-point leaf with at least two axes.

  Integer leaves (counters, indices) have no gradient to compress and are
  left to the inner transformation, as optax leaves them alone.
  """
  return jax.tree.map(lambda x: _is_float_matrix(x, 2), params)


def path_mask(pattern: str, *, min_ndim: int = 2) -> Callable[[Any], Any]:
  """A mask that projects the leaves whose path matches a regular expression.

  This is galore-torch's `target_modules` for pytrees: paths are joined with
  "/", e.g. "layers/3/attn/q_proj/kernel", and searched with `re.search`.
  Leaves with fewer than `min_ndim` axes (biases, norm scales) and leaves
  that are not floating point are never projected, as galore-torch only
  targets linear weights.

  Args:
    pattern: regular expression searched in each leaf's path.
    min_ndim: leaves with fewer axes are left out.

  Returns:
    A callable(params) -> pytree of bools, for the `projected` argument.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> params = {"attn": {"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)},
    ...           "embed": jnp.zeros((10, 4))}
    >>> go.path_mask(r"attn|mlp")(params)
    {'attn': {'b': False, 'w': True}, 'embed': False}
  """
  regex = re.compile(pattern)

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: bool(_is_float_matrix(x, min_ndim) and regex.search(_path(path))),
        params,
    )

  return mask_fn


def resolve_mask(mask: Any, params: Any, name: str = "projected") -> list[bool]:
  """The flattened per-leaf flags of `mask` (the argument `name`) for `params`.

  None is the default projection selector, every floating leaf with at least
  two axes.
  """
  if mask is None:
    mask = default_mask
  if callable(mask):
    mask = mask(params)
  treedef = jax.tree.structure(params)
  try:
    flags = treedef.flatten_up_to(mask)
  except (ValueError, TypeError):
    raise _structure_mismatch(name, mask, params) from None
  if len(flags) != treedef.num_leaves:
    raise _structure_mismatch(name, mask, params)
  for path, flag in zip(leaf_paths(params), flags):
    if isinstance(flag, jax.core.Tracer):
      raise TypeError(
          f"{name} entry for {path!r} is a traced value: a mask computed from "
          "parameter values cannot decide array shapes under jit. Build the mask "
          "from paths, shapes and dtypes (e.g. go.path_mask(...)), which are static."
      )
    if not isinstance(flag, (bool, np.bool_)) and not (
        np.ndim(flag) == 0 and np.asarray(flag).dtype == bool
    ):
      raise TypeError(
          f"{name} entry for {path!r} is {flag!r}; its leaves must be Python "
          "bools."
      )
  return [bool(f) for f in flags]


def resolve_dimension_numbers(dimension_numbers: Any, params: Any) -> list[Any]:
  """The flattened per-leaf `DimensionNumbers` (or None) for `params`."""
  n = jax.tree.structure(params).num_leaves
  if dimension_numbers is None:
    return [DimensionNumbers()] * n
  if isinstance(dimension_numbers, DimensionNumbers):
    return [dimension_numbers] * n
  if callable(dimension_numbers):
    dimension_numbers = dimension_numbers(params)
  is_leaf = lambda x: x is None or isinstance(x, DimensionNumbers)
  treedef = jax.tree.structure(params)
  try:
    flat = treedef.flatten_up_to(dimension_numbers)
  except (ValueError, TypeError):
    raise _structure_mismatch(
        "dimension_numbers", dimension_numbers, params, is_leaf
    ) from None
  return [DimensionNumbers() if d is None else d for d in flat]
