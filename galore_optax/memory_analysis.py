"""The peak memory XLA plans for a compiled step, from its buffer assignment."""

from __future__ import annotations

from typing import Any, Mapping, Optional

_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
           "temp_size_in_bytes")


def planned_peak_bytes(compiled: Any) -> Optional[int]:
  """Arguments + outputs − aliased (donated) + temporaries of a compiled program.

  What a step needs at its peak, as XLA's buffer assignment plans it, read
  without allocating anything: so the step of a model too large for this
  machine can be sized from abstract arguments (`jax.ShapeDtypeStruct`s).

  Args:
    compiled: a `jax.stages.Compiled` (``jax.jit(f).lower(...).compile()``),
      its ``memory_analysis()``, or a mapping with the same four fields.

  Returns:
    Bytes, or None where the backend gives no memory analysis.

  Example:
    >>> import jax, jax.numpy as jnp, galore_optax as go
    >>> x = jax.ShapeDtypeStruct((1024,), jnp.float32)
    >>> c = jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile()
    >>> go.planned_peak_bytes(c)   # the output is written over the donated input
    4096
  """
  analysis = compiled
  if hasattr(compiled, "memory_analysis"):
    analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  if isinstance(analysis, Mapping):
    values = [analysis.get(k) for k in _FIELDS]
  elif all(hasattr(analysis, k) for k in _FIELDS):
    values = [getattr(analysis, k) for k in _FIELDS]
  else:
    raise TypeError(
        f"planned_peak_bytes takes a compiled program, not a {type(compiled).__name__}: "
        "pass jax.jit(f).lower(...).compile() (or its memory_analysis()).")
  sizes = [int(v) for v in values if v is not None]
  if len(sizes) != len(_FIELDS):
    return None
  arguments, outputs, aliased, temporaries = sizes
  return arguments + outputs - aliased + temporaries
