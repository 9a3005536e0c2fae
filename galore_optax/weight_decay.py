"""Decoupled weight decay: where it sits around the learning rate, and galore-torch's order.

`learning_rate_and_decay` puts the decay on either side of the learning rate
(bitsandbytes decays the old weights, galore-torch the updated ones);
`decay_weights_after_update` is galore-torch's decay of the updated weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import optax

from galore_optax import masking
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


def is_static_zero(x) -> bool:
  # Under optax.inject_hyperparams numbers arrive as arrays: keep the term then.
  return isinstance(x, (int, float)) and x == 0


def learning_rate_and_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    *,
    before: Union[bool, MaskOrFn] = None,
    after: Union[bool, MaskOrFn] = None,
) -> list[optax.GradientTransformation]:
  """The learning rate, with decoupled weight decay on either side of it.

  Args:
    learning_rate: a float or a schedule.
    weight_decay: decay coefficient or schedule; a static 0 adds no decay.
    before: leaves whose *old* weights are decayed, p·(1 − lr·wd) and then the
      step (bitsandbytes' order): a mask, True for all leaves, None for none.
    after: leaves whose *updated* weights are decayed (galore-torch's order),
      in the same form.

  Returns:
    The transforms to append to a chain after the (unscaled) step.
  """
  def as_mask(m):
    if m is True or m is None:
      return None
    # Checked against the parameters, so that a mismatch names `mask`.
    return lambda tree: jax.tree.structure(tree).unflatten(masking.resolve_mask(m, tree, "mask"))

  transforms = []
  decays = not is_static_zero(weight_decay)
  if decays and before is not None:
    transforms.append(optax.add_decayed_weights(weight_decay, as_mask(before)))
  transforms.append(optax.scale_by_learning_rate(learning_rate))
  if decays and after is not None:
    transforms.append(decay_weights_after_update(learning_rate, weight_decay, as_mask(after)))
  return transforms


def decay_after(
    learning_rate: optax.ScalarOrSchedule, weight_decay: optax.ScalarOrSchedule, mask: MaskOrFn,
) -> list[optax.GradientTransformation]:
  """The learning rate, then galore-torch's decay of the updated weights (`mask`: which)."""
  return learning_rate_and_decay(
      learning_rate, weight_decay, after=True if mask is None else mask)
