"""What GaLore applies to a projected leaf, given the inner transform's result.

An output turns the inner update N of the low-rank gradient R = project(G)
into the full-shape update of the leaf, and may keep per-leaf state:

  stateful: bool
  init(plan, layout) -> per-leaf state (stateful outputs only)
  apply(plan, grad, low_rank_grad, inner_update, bases, scale, leaf_state)
      -> (update in the leaf's layout, leaf_state)

`ProjectBack` is GaLore's α · project_back(N).
"""

from __future__ import annotations

from typing import NamedTuple

from galore_optax import projection
from galore_optax.plan import LeafPlan


class ProjectBack(NamedTuple):
  """GaLore: the inner update projected back to full shape, times α."""

  stateful = False

  def apply(self, plan: LeafPlan, grad, low_rank_grad, inner_update, bases, scale, leaf_state):
    del low_rank_grad
    update = projection.project_back_leaf(inner_update * scale, bases, plan.view)
    return update.astype(grad.dtype), leaf_state
