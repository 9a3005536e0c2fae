"""The parts of a GaLore update that the options choose, built in one place.

`options.GaLoreOptions` declares and validates what a user asked for; this
module turns it into the parts the core runs (see `transform`): the per-leaf
plans, how bases are computed (`refresh`), stored (`projector_storage`) and
scheduled (`schedules`), what a refresh does to the inner state
(`realignment`), and how bases move between refreshes (`tracking`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from galore_optax import plan as plan_lib
from galore_optax import projector_storage
from galore_optax import realignment as realignment_lib
from galore_optax import refresh as refresh_lib
from galore_optax import schedules
from galore_optax.options import GaLoreOptions

# 256 MiB: one float32 MLP matrix of LLaMA-7B (172 MiB) per call, or four attention ones.
DEFAULT_REFRESH_BUDGET = 2**28


def plan(options: GaLoreOptions, tree: Any) -> list[Optional[plan_lib.LeafPlan]]:
  """A `plan.LeafPlan` per projected leaf of `tree` (flat order), else None."""
  return plan_lib.plan_leaves(
      tree,
      rank=options.rank,
      proj_type=options.proj_type,
      projected=options.projected,
      dimension_numbers=options.dimension_numbers,
  )


def projected_mask(options: GaLoreOptions, tree: Any) -> Any:
  """A pytree of bools like `tree`: True where a leaf is projected."""
  return jax.tree.structure(tree).unflatten([p is not None for p in plan(options, tree)])


def refresh_budget_bytes(options: GaLoreOptions) -> int:
  budget = options.refresh_memory_budget
  return DEFAULT_REFRESH_BUDGET if budget is None else budget


def refresh_fn(options: GaLoreOptions) -> refresh_lib.RefreshFn:
  return refresh_lib.get_refresh_method(options.refresh)


def storage(options: GaLoreOptions):
  """The projector storage; checked here, once `refresh` is final."""
  method = refresh_fn(options)
  regenerate = getattr(method, "regenerate", None)
  if options.regenerate_projector and (regenerate is None or options.projector_bits is not None):
    raise ValueError(
        "regenerate_projector=True needs a data-independent refresh "
        "(refresh='random' or 'random_orthonormal'; for go.golore_adamw, "
        "random_from_step=0) and no projector_bits: other bases cannot be "
        "drawn again from their keys."
    )
  return projector_storage.storage_for(
      options.projector_dtype, options.projector_bits,
      regenerate if options.regenerate_projector else None)


def schedule(options: GaLoreOptions):
  return schedules.schedule_for(options.update_proj_gap, options.lazy_refresh)


def realignment(options: GaLoreOptions):
  return realignment_lib.realignment_for(options.realign_moments)


def tracking(options: GaLoreOptions):
  """The subspace tracker (`tracking`), or None."""
  return options.tracking


def reads_previous(options: GaLoreOptions) -> bool:
  """Whether the refresh reads the previous bases (a user's function may; the built-in ones
  say)."""
  return getattr(refresh_fn(options), "reads_previous", True)


def reads_moment(options: GaLoreOptions) -> bool:
  """Whether the refresh reads the inner first moment (COAP's)."""
  return getattr(refresh_fn(options), "reads_moment", False)


def ties_stored_bases(options: GaLoreOptions) -> bool:
  """Whether an update's stored bases wait for their gradient (`transform`): where
  conditionals read them besides the projection (a refresh that starts from them or lifts a
  moment with them, a realignment, a tracker, a schedule that compares them) or a refresh
  that reads no gradient passes them on."""
  return (reads_previous(options) or reads_moment(options)
          or refresh_lib.data_independent(refresh_fn(options))
          or options.refresh_input is not None or realignment(options) is not None
          or tracking(options) is not None or schedule(options).stateful)
