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
from typing import Any

import jax
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


def static_int(value: Any, name: str, *, minimum: int = 1) -> int:
  """A Python int >= `minimum` that fixes array shapes (so never traced)."""
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
  if value < minimum:
    raise ValueError(f"{name} must be {_at_least(minimum)}, got {value!r}.")
  return int(value)


def _at_least(minimum: int) -> str:
  return "positive" if minimum == 1 else f"an int >= {minimum}"


def positive_int(value: Any, name: str, *, minimum: int = 1) -> Any:
  """An int >= `minimum`, or an integer array (inject_hyperparams) kept as is."""
  if hasattr(value, "dtype") and np.ndim(value) == 0:
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer, got a {value.dtype} array.")
    if not _is_traced(value) and int(value) < minimum:
      raise ValueError(f"{name} must be {_at_least(minimum)}, got {int(value)}.")
    return value
  return static_int(value, name, minimum=minimum)


def real(
    value: Any, name: str, *, low=None, high=None, low_open=False, high_open=False
) -> Any:
  """A finite real number in [low, high] (open ends where asked)."""
  if _is_traced(value):
    return value
  x = _concrete_scalar(value, name)
  if isinstance(x, complex) or not math.isfinite(x):
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


def learning_rate(value: Any, name: str = "learning_rate") -> Any:
  """A non-negative finite number, or a schedule (a callable of the step)."""
  if callable(value):
    return value
  return non_negative(value, name)


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
