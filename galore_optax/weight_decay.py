"""Decoupled weight decay applied after the update, as galore-torch does it."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from galore_optax.masking import MaskOrFn


class DecayAfterUpdateState(NamedTuple):
  """Step count, for a learning-rate schedule."""

  count: jax.typing.ArrayLike


def decay_weights_after_update(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """Adds the decay p ← p − lr·wd·p evaluated on the *updated* parameters.

  galore-torch's `GaLoreAdamW` first applies the Adam step and then decays
  the new weights, so the final update is u − lr·wd·(p + u). This differs from
  `optax.add_decayed_weights` (decay of the old weights, scaled by the
  learning rate afterwards) by the O(lr²) term, and the decay is never scaled
  by GaLore's α. Place it after the learning rate in a chain.

  Args:
    learning_rate: the same learning rate (or schedule) as the step.
    weight_decay: decay coefficient, a number or a schedule of the step.
    mask: optional pytree of bools or callable, True where to decay.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`.

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> tx = go.decay_weights_after_update(0.1, 0.5)
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
    >>> updates   # 1 - 0.1 * 0.5 * (1 + 1)
    Array([0.9, 0.9], dtype=float32)
  """

  def init_fn(params):
    del params
    return DecayAfterUpdateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "decay_weights_after_update needs params: call tx.update(grads, "
          "state, params)."
      )
    decay = value_at(learning_rate, state.count) * value_at(weight_decay, state.count)
    new_updates = jax.tree.map(
        lambda u, p: (u - decay * (p + u)).astype(u.dtype), updates, params
    )
    return new_updates, DecayAfterUpdateState(optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def value_at(value: Any, count: chex.Numeric) -> Any:
  """A number, or a schedule's value at `count`."""
  return value(count) if callable(value) else value
