"""Argument checks shared by every public optimizer and transformation.

Each check returns the value (normalized where that is safe, e.g. a NumPy
integer to a Python int) or raises a TypeError/ValueError that names the
argument, what it got and what it accepts. Values that arrive as arrays, as
`optax.inject_hyperparams` passes them, are range-checked when concrete and
passed through when traced.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.core  # `jax` imports it but does not bind the name for type checkers
import jax.numpy as jnp
import numpy as np


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _concrete_scalar(value, name: str):
  """A Python number for `value` (a number or a concrete 0-d array)."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be a number, got the bool {value!r}.")
  if isinstance(value, numbers.Number):
    return value
  if hasattr(value, "shape") and np.ndim(value) == 0 and not _is_traced(value):
    return np.asarray(value).item()
  raise TypeError(f"{name} must be a number, got {value!r}.")


# Values that can be stored in an int32 array (a step count, a gap compared
# with it, what `optax.inject_hyperparams` makes of an int): 1 … 2**31 − 1.
INT32_MAX = 2**31 - 1


def static_int(
    value: Any, name: str, *, minimum: int = 1, maximum: Optional[int] = None
) -> int:
  """A Python int in [`minimum`, `maximum`] that fixes array shapes (so never traced)."""
  if _is_traced(value):
    raise TypeError(
        f"{name} sets array shapes and must be a static Python int; with "
        f"optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap', "
        f"...) naming it."
    )
  if hasattr(value, "dtype") and np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer):
    value = int(value)  # a concrete integer array, as inject_hyperparams makes
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  _check_int_range(int(value), name, minimum, maximum)
  return int(value)


def _check_int_range(value: int, name: str, minimum: int, maximum: Optional[int]) -> None:
  if value < minimum:
    raise ValueError(f"{name} must be {_at_least(minimum)}, got {value!r}.")
  if maximum is not None and value > maximum:
    why = " (it is stored in an int32 array)" if maximum == INT32_MAX else ""
    raise ValueError(
        f"{name}={value!r} is out of range: it must be an int in "
        f"[{minimum}, {maximum}]{why}.")


def _at_least(minimum: int) -> str:
  return "positive" if minimum == 1 else f"an int >= {minimum}"


def positive_int(
    value: Any, name: str, *, minimum: int = 1, maximum: Optional[int] = INT32_MAX
) -> Any:
  """An int in [`minimum`, `maximum`], or an integer array (inject_hyperparams) kept as is.

  Such a value may be stored in an int32 array (`optax.inject_hyperparams`
  makes one of it, and `update_proj_gap` is one), so by default it is at most
  2**31 − 1: beyond that jax raises a bare OverflowError, or wraps around.
  Pass ``maximum=None`` for one that is only ever a Python int.
  """
  if hasattr(value, "dtype") and np.ndim(value) == 0:
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer, got a {value.dtype} array.")
    if not _is_traced(value):
      _check_int_range(int(value), name, minimum, maximum)
    return value
  return static_int(value, name, minimum=minimum, maximum=maximum)


def real(
    value: Any, name: str, *, low=None, high=None, low_open=False, high_open=False
) -> Any:
  """A finite real number in [low, high] (open ends where asked)."""
  if _is_traced(value):
    return value
  x = _concrete_scalar(value, name)
  if not isinstance(x, numbers.Real) or not math.isfinite(x):
    raise ValueError(f"{name} must be a finite real number, got {value!r}.")
  too_low = low is not None and (x <= low if low_open else x < low)
  too_high = high is not None and (x >= high if high_open else x > high)
  if too_low or too_high:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")
  return value


def decay(value: Any, name: str) -> Any:
  """A moment decay rate in [0, 1)."""
  return real(value, name, low=0.0, high=1.0, high_open=True)


def non_negative(value: Any, name: str) -> Any:
  return real(value, name, low=0.0)


def scalar_or_schedule(value: Any, name: str) -> Any:
  """A non-negative finite number, or a schedule (a callable of the step)."""
  if callable(value):
    return value
  return non_negative(value, name)


def learning_rate(value: Any) -> Any:
  return scalar_or_schedule(value, "learning_rate")


def float_dtype(value: Any, name: str) -> Any:
  """None or a floating-point dtype."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{name} must be a dtype such as jnp.float32, got {value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name}={dtype} is not a floating-point dtype: bases stored as "
        f"{dtype} would be rounded to zero. Use jnp.float32, jnp.bfloat16 or "
        "jnp.float16, or projector_bits=8/4 for quantized bases."
    )
  return value


def choice(value: Any, name: str, allowed) -> Any:
  """One of `allowed`, of the same type (8.0 is not the int 8)."""
  if not any(type(value) is type(a) and value == a for a in allowed):
    raise ValueError(
        f"{name}={value!r} is not supported; use one of "
        f"{', '.join(repr(a) for a in allowed)}."
    )
  return value
