"""GaLore: gradient low-rank projection as an optax GradientTransformation.

`scale_by_galore`'s update is the paper's Algorithm 1 and nothing else. Each
way to vary a step is a part chosen by the options, with one interface:

* how bases are computed: `refresh` (svd, randomized, power, a function);
* how they are stored: `projector_storage` (a float dtype, or int8/int4);
* when each leaf refreshes: `schedules` (every T steps, or lazily);
* what a refresh does to the inner state: `realignment` (nothing, LDAdam);
* what is applied: `outputs` (α · project_back(N)).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from galore_optax import axis_specs
from galore_optax import inspection
from galore_optax import masking
from galore_optax import outputs
from galore_optax import parts
from galore_optax import plan as plan_lib
from galore_optax import projection
from galore_optax import realignment as realignment_lib
from galore_optax import refresh_step
from galore_optax import tree_utils
from galore_optax.adam import scale_by_adam_hf
from galore_optax.options import GaLoreOptions
from galore_optax.realignment import FirstMomentTransport, MomentRealignment
from galore_optax.refresh import RefreshFn
from galore_optax.schedules import LazyRefresh
from galore_optax.tracking import OnlinePCA
from galore_optax.masking import MaskOrFn
from galore_optax.sharding import public


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`.

  Attributes:
    count: number of updates so far (int32).
    projectors: a tree shaped like the parameters: for a projected leaf a dict
      of stored bases ("u": (*batch, m, r) and/or "vh": (*batch, r, n)), each
      an array or, with `projector_bits`, a `QuantizedProjector`; for the
      others `optax.MaskedNode()` (no zero-size placeholders, so orbax saves
      it).
    inner_state: the state of the inner transformation, which sees low-rank
      gradients for projected leaves and full gradients for the others.
    refresh_schedule: with `lazy_refresh`, a tree shaped like the parameters
      holding a `LazyRefreshState` per projected leaf (`optax.MaskedNode()`
      for the others); otherwise `optax.EmptyState()`.
    output_state: per projected leaf, the state of a stateful output (e.g.
      a norm-growth limiter); otherwise `optax.EmptyState()`.
    tracking_state: with `tracking`, per projected leaf the tracker's state
      (e.g. the optimizer state of Online Subspace Descent's projector
      step); otherwise `optax.EmptyState()`.
  """

  count: jax.typing.ArrayLike
  projectors: Any
  inner_state: optax.OptState
  refresh_schedule: Any = optax.EmptyState()
  output_state: Any = optax.EmptyState()
  tracking_state: Any = optax.EmptyState()


@public
def scale_by_galore(
    rank: int = 128,
    *,
    update_proj_gap: Optional[int] = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    inner: Optional[optax.GradientTransformation] = None,
    projected: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: Union[str, RefreshFn] = "svd",
    refresh_memory_budget: Optional[int] = None,
    projector_dtype: Optional[jax.typing.DTypeLike] = None,
    projector_bits: Optional[int] = None,
    regenerate_projector: bool = False,
    lazy_refresh: Union[None, bool, LazyRefresh] = None,
    realign_moments: Union[None, bool, MomentRealignment, FirstMomentTransport] = None,
    tracking: Optional[OnlinePCA] = None,
) -> optax.GradientTransformation:
  """Runs `inner` on low-rank projections of the gradients (GaLore).

  For each projected leaf, viewed as a stack of (out × in) matrices G, when
  the schedule says so (0-based steps 0, T, 2T, … by default) the projector
  P is refreshed from the current gradient; each step the low-rank gradient
  R = project(G) goes through `inner` (whose moments are therefore low-rank),
  and the result is projected back and multiplied by `scale`. Leaves that are
  not projected go through the same `inner` at full size, in the same state.
  There is no weight decay here (chain `optax.add_decayed_weights`). Each
  option is described in full in `galore_optax.options.GaLoreOptions`.

  Args:
    rank: rank of the projection, a static int; clamped to the smaller side
      of each matrix.
    update_proj_gap: steps between projector refreshes (T); None refreshes
      at step 0 only.
    scale: α, the multiplier of the projected-back update.
    proj_type: 'std' (compress the smaller side, as galore-torch),
      'reverse_std', 'left' (output side), 'right' (input side) or 'full'.
    inner: transformation run on the low-rank gradients; default the Adam of
      galore-torch's `GaLoreAdamW` (`scale_by_adam_hf`). If `params` are
      given it receives them projected like the gradients (PᵀW).
    projected: which leaves are projected: a pytree of bools or a
      callable(params) returning one (see `go.path_mask`); default every
      floating-point leaf with at least two axes.
    dimension_numbers: a `go.DimensionNumbers` for every leaf, a pytree of
      them or a callable(params); default Flax's (in, out) layout.
    refresh: how bases are computed: 'svd', 'randomized', 'power', 'random'
      or a function such as `go.randomized_refresh(16)`.
    refresh_memory_budget: bytes of float32 gradient matrices one batched
      decomposition may take; None is 256 MiB.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None, 8 or 4: bases stored group-quantized.
    regenerate_projector: with refresh='random', store no bases and draw
      them again each step.
    lazy_refresh: None, True or a `go.LazyRefresh`: Q-GaLore's adaptive gap.
    realign_moments: None, True or a `go.MomentRealignment` (LDAdam's moment
      realignment at each refresh), or a `go.FirstMomentTransport` (GoLore's);
      both need float `mu`/`nu` moments in `inner`.
    tracking: None, or a `go.OnlinePCA` that moves the bases after every
      step that did not refresh them (Online Subspace Descent).

  Returns:
    An `optax.GradientTransformation` whose state is a `GaLoreState`. Under
    an Explicit mesh, `init` creates the state sharded (see `go.sharding`).

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024. https://arxiv.org/abs/2403.03507

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    >>> tx = optax.chain(go.scale_by_galore(rank=4), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].inner_state.mu["w"].shape   # low-rank first moment
    (4, 16)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
    >>> q = go.scale_by_galore(rank=4, projector_bits=4).init(params)
    >>> q.projectors["w"]["u"].codes.dtype   # 4-bit codes, two per byte
    dtype('uint8')
  """
  return galore_transform(GaLoreOptions.from_arguments(locals()), inner)


def galore_transform(
    options: GaLoreOptions,
    inner: Optional[optax.GradientTransformation] = None,
    output: Any = None,
) -> optax.GradientTransformation:
  """`scale_by_galore` from validated options, with a choice of output.

  Args:
    options: the GaLore options.
    inner: see `scale_by_galore`.
    output: what is applied to a projected leaf (see `outputs`); default
      `outputs.ProjectBack()`, GaLore's α · project_back(N).

  Returns:
    An `optax.GradientTransformation` whose state is a `GaLoreState`.
  """
  inner = scale_by_adam_hf() if inner is None else inner
  output = outputs.ProjectBack() if output is None else output
  schedule, storage = parts.schedule(options), parts.storage(options)
  realign, tracker = parts.realignment(options), parts.tracking(options)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    plans = parts.plan(options, params)
    layouts = [axis_specs.layout_of(x) for x in leaves]

    def per_leaf(make):
      return treedef.unflatten([
          optax.MaskedNode() if p is None else make(p, x, layout)
          for p, x, layout in zip(plans, leaves, layouts)
      ])

    # The inner transform sees zeros of the low-rank shapes, sharded like the
    # axes they keep, so whatever state it builds from them is sharded too;
    # zero-size leaves are hidden from it (no zero-size state, which orbax
    # cannot save).
    low_rank_params = treedef.unflatten(_hide_empty(leaves, [
        x if p is None else axis_specs.zeros(
            p.low_rank_shape, jnp.result_type(x), layout, layout and p.low_rank_spec(layout))
        for p, x, layout in zip(plans, leaves, layouts)
    ]))
    inner_state = inner.init(low_rank_params)
    for part in (realign, options.refresh_input):
      if part is not None and any(p is not None for p in plans):
        part.check(inner_state, plans)  # fails at init, not at a refresh
    projectors = per_leaf(storage.init)
    inspection.warn_about_plan(plans, leaves, masking.leaf_paths(params),
                               treedef.flatten_up_to(projectors), rotation=options.rank is None)
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projectors=projectors,
        inner_state=inner_state,
        refresh_schedule=per_leaf(lambda p, x, layout: schedule.init(p, layout))
        if schedule.stateful else optax.EmptyState(),
        output_state=per_leaf(lambda p, x, layout: output.init(p, layout))
        if output.stateful else optax.EmptyState(),
        tracking_state=per_leaf(lambda p, x, layout: tracker.init(
            p, layout, storage.basis_dtype(jnp.result_type(x))))
        if tracker is not None else optax.EmptyState(),
    )

  def update_fn(updates, state, params=None):
    grads, treedef = jax.tree.flatten(updates)
    plans = parts.plan(options, updates)
    todo = plan_lib.projected(plans)
    stored = _per_leaf(treedef, state.projectors, plans)
    _check_projectors(stored, plans, grads, masking.leaf_paths(updates), storage)
    sched = _per_leaf(treedef, state.refresh_schedule, plans, schedule.stateful)
    if parts.ties_stored_bases(options):
      # Read by conditionals besides the projection (refresh, realignment, tracker) or passed
      # on by a refresh that reads no gradient, the stored bases are copied by XLA. A copy of
      # the state alone, XLA:CPU's default scheduler makes it at the start of the step and
      # holds it (LLaMA-7B stacked: SubTrack++ 1.0 GiB, Conda 2.0; OSD per-layer 1.5): each
      # leaf's waits for its gradient. Not for the other methods: tied, GradNormLoRP's stacked
      # step took 9.8 GiB more, 8-bit GaLore's 0.6.
      stored = list(stored)
      for p in todo:
        stored[p.index] = jax.tree.map(
            lambda a, g=grads[p.index]: tree_utils.after(a, g), stored[p.index])
    out_state = _per_leaf(treedef, state.output_state, plans, output.stateful)
    due = {p.index: schedule.due(sched[p.index], state.count, p) for p in todo}

    # 1. Refresh the projectors that are due (each batch of them under its
    # own lax.cond: the plain step skips them).
    old = stored
    source, moment = _refresh_inputs(
        options, state.inner_state, plans, todo,
        lambda p: storage.decode(old[p.index], p, jnp.float32))
    stored, sched = refresh_step.refresh_due(grads, todo, stored, sched, state.count, due,
                                             options, source, moment)
    inner_state = state.inner_state
    if realign is not None and todo:  # each leaf under its own lax.cond (realignment.py)
      inner_state = _realign(realign, inner_state, plans, todo, old, stored, due, storage,
                             state.count)
    restore = (realign.restore if todo and isinstance(realign, FirstMomentTransport)
               and realign.restores else None)

    # 2. Project: R = PᵀG (and PᵀW for inners that read the parameters).
    bases = {p.index: storage.decode(stored[p.index], p, grads[p.index].dtype) for p in todo}

    def project(tree_leaves):
      low = list(tree_leaves)
      for p in todo:
        x = tree_leaves[p.index]
        low[p.index] = projection.project_leaf(x, bases[p.index], p.view).astype(x.dtype)
      return low

    low_rank = project(grads)
    low_params = None if params is None else treedef.unflatten(
        _hide_empty(grads, project(_per_leaf(treedef, params, plans))))

    # 3. The inner transform, with low-rank state for projected leaves.
    inner_out, inner_state = inner.update(
        treedef.unflatten(_hide_empty(grads, low_rank)), inner_state, low_params)
    if restore is not None:  # a realignment that lasts for the refresh step only
      inner_state = restore(inner_state, state.inner_state, plans, _moved(due, todo),
                            state.count)
    out = [g if jnp.size(g) == 0 else u for g, u in zip(grads, treedef.flatten_up_to(inner_out))]

    # 4. Move the bases that were not refreshed now (subspace tracking), for the next step.
    track = _per_leaf(treedef, state.tracking_state, plans, tracker is not None)
    moved = None
    if tracker is not None and todo:
      moved, track = _track(tracker, storage, todo, grads, stored, track, due, state.count)

    # 5. Back to full shape: α · project_back(N), or the output's variant. A stack's output
    # loop writes over its gradient, which the tracker reads too: the loop waits for the
    # tracker, else XLA copies the gradient for the loop, and XLA:CPU's default scheduler
    # makes the copy as soon as the gradient exists and holds it (LLaMA-1B stacked: 1.5 GiB).
    for p in todo:
      i = p.index
      out[i], out_state[i] = outputs.apply_by_slices(
          output, p, grads[i], low_rank[i], out[i], bases[i], options.scale, out_state[i],
          wait_for=None if moved is None else jax.tree.leaves(moved[i])[0])
    stored = stored if moved is None else moved
    return treedef.unflatten(out), GaLoreState(
        count=optax.safe_increment(state.count),
        projectors=treedef.unflatten(stored),
        inner_state=inner_state,
        refresh_schedule=treedef.unflatten(sched)
        if schedule.stateful else state.refresh_schedule,
        output_state=treedef.unflatten(out_state)
        if output.stateful else state.output_state,
        tracking_state=treedef.unflatten(track)
        if tracker is not None else state.tracking_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _refresh_inputs(options, inner_state, plans, todo, decode_old):
  """What a refresh reads besides the gradient: `source` (a matrix decomposed instead of
  it, Conda's first moment) and `moment` (the first moment, for COAP's refresh)."""
  source = moment = None
  if options.refresh_input is not None and todo:
    source = options.refresh_input.source(inner_state, plans, decode_old)
  if parts.reads_moment(options) and todo:
    moment = realignment_lib.lifted_first_moment(inner_state, plans, decode_old)
  return source, moment


def _track(tracker, storage, todo, grads, stored, track, due, count):
  """Stored bases and tracker states after the tracker's step, unless a refresh was due.

  With tracking the schedule is `EveryGap`, so `due` is the same for every leaf.
  """

  def advance(operands):
    moved_stored, moved_track = [], []
    for p, leaf_stored, leaf_track in zip(todo, *operands):
      bases = storage.decode(leaf_stored, p, jnp.float32)
      moved, leaf_track = tracker.advance(p, grads[p.index], bases, leaf_track, count,
                                          storage.basis_dtype(grads[p.index].dtype))
      moved_stored.append(storage.encode(moved, p, grads[p.index].dtype, count))
      moved_track.append(leaf_track)
    return moved_stored, moved_track

  idx = [p.index for p in todo]
  new_stored, new_track = jax.lax.cond(
      _any_due(due), lambda operands: operands, advance,
      ([stored[i] for i in idx], [track[i] for i in idx]))
  stored, track = list(stored), list(track)
  for i, s, t in zip(idx, new_stored, new_track):
    stored[i], track[i] = s, t
  return stored, track


def _hide_empty(leaves, values) -> list:
  """`values` with optax.MaskedNode() where the leaf has no elements."""
  return [optax.MaskedNode() if jnp.size(x) == 0 else v for x, v in zip(leaves, values)]


def _per_leaf(treedef, tree, plans, present: bool = True) -> list:
  """`tree` (shaped like the parameters) as a list; MaskedNodes if absent."""
  if not present:
    return [optax.MaskedNode()] * len(plans)
  try:
    return list(treedef.flatten_up_to(tree))
  except (ValueError, TypeError):
    raise ValueError(
        "the gradients' tree structure differs from that of the parameters (or "
        "of those the GaLore state was built for by tx.init); pass gradients "
        "of the same tree."
    ) from None


def _check_projectors(stored, plans, grads, paths, storage) -> None:
  """Raises, naming the leaf, if the state was built for other shapes."""
  for p, x, g, path in zip(plans, stored, grads, paths):
    want = None if p is None else jax.eval_shape(lambda p=p, g=g: storage.init(p, g, None))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    if (want is None) != (not jax.tree.leaves(x)) or (
        want is not None and shapes(x) != shapes(want)):
      raise ValueError(
          f"{path or '<root>'}: the gradient (shape {jnp.shape(g)}) does not fit "
          "the state, which tx.init built for other shapes or another mask; the "
          "gradients must have the shapes and dtypes of the params given to "
          "tx.init."
      )


def _any_due(due) -> jax.Array:
  return jnp.any(jnp.stack([jnp.any(d) for d in due.values()]))


def _realign(realign, inner_state, plans, todo, old, new, due, storage, count):
  """The inner state mapped from the old bases to the new, as stored (so
  quantization error is included)."""
  decode = lambda stored: lambda p: storage.decode(stored[p.index], p, jnp.float32)
  return realign.apply(inner_state, plans, decode(old), decode(new), _moved(due, todo), count)


def _moved(due, todo) -> dict:
  """Per projected leaf, which of its matrices are refreshed now, (*batch,) bools."""
  return {p.index: jnp.broadcast_to(due[p.index], p.batch_shape) for p in todo}
