"""The refresh of due projectors, in calls of bounded memory.

A refresh decomposes float32 copies of gradient matrices. Copying every
equal-shaped gradient of a model at once (all 128 attention matrices of
LLaMA-7B: 8 GiB) would cost more than the optimizer state saves, so the
matrices go through the refresh method in `plan.refresh_batches`: whole
equal-shaped leaves together while they fit in `refresh_memory_budget`
bytes, and a larger stacked leaf in a loop over equal slices of its stack
(on CPU, where LAPACK sees one matrix at a time anyway, one matrix a call).
Each batch has its own `lax.cond`, so a gradient is read only by the batch
that needs it, and its new bases are written into the stored projectors in
place. Bases are bit-identical whatever the budget: every matrix keeps its
own PRNG key, and on CPU every method sees one matrix at a time anyway
(`refresh.one_matrix_at_a_time_on_cpu`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from galore_optax import matrix_view
from galore_optax import parts
from galore_optax import refresh as refresh_lib
from galore_optax import tree_utils
from galore_optax.plan import LeafPlan, RefreshBatch, refresh_batches


def refresh_due(grads, todo, stored, sched, count, due, options, source=None, moment=None):
  """Stored projectors (and schedules) after refreshing the due matrices.

  Args:
    grads: the flat list of gradient leaves.
    todo: the `LeafPlan`s of the projected leaves.
    stored: the flat list of stored projectors (MaskedNode where none).
    sched: the flat list of per-leaf schedule states (MaskedNode where none).
    count: the GaLore step count.
    due: {leaf index: bool, scalar or (*batch,)}: the matrices due now.
    options: the `GaLoreOptions`.
    source: None, or `source(plan, grad)` giving the leaf-shaped matrix to
      decompose instead of the gradient (evaluated inside each batch's
      `lax.cond`, so only at refreshes).
    moment: None, or `moment(plan)` giving the leaf-shaped float32 first
      moment, for a refresh method that reads it (`reads_moment`): it gets
      it as `previous["moment"]`, (B, m, n) like the gradients.

  Returns:
    The new `stored` and `sched` lists.
  """
  # A batched schedule refreshes every leaf at once, so equal shapes can
  # share calls; a per-leaf one decides leaf by leaf. On CPU every matrix is
  # decomposed alone (`refresh.one_matrix_at_a_time_on_cpu`), so batching
  # would only hold more float32 copies at once: one matrix a call there. On
  # a mesh every device decomposes its share of each call's matrices.
  mesh = _refresh_mesh()
  devices = 1 if mesh is None else mesh.size
  run = lambda budget, pack: lambda: refresh_in_batches(
      refresh_batches(todo, budget, pack=pack, devices=devices),
      grads, stored, sched, count, due, options, mesh, source, moment)
  return jax.lax.platform_dependent(
      cpu=run(0, False if mesh is None else parts.schedule(options).batched),
      default=run(parts.refresh_budget_bytes(options), parts.schedule(options).batched))


def _refresh_mesh():
  """The mesh of the surrounding computation if it has several devices, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def refresh_in_batches(batches, grads, stored, sched, count, due, options, mesh=None,
                       source=None, moment=None):
  """`refresh_due` with the given `plan.RefreshBatch`es (on any platform).

  With a `mesh`, each call's matrices are spread over its devices.
  """
  schedule = parts.schedule(options)
  independent = (source is None and moment is None
                 and refresh_lib.data_independent(parts.refresh_fn(options)))
  stored, sched = list(stored), list(sched)
  for batch in batches:
    idx = [p.index for p in batch.plans]

    def compute(g, s, sc, batch=batch, idx=idx):
      if source is not None:
        # In the gradient's dtype, as the first moment of its parameter would be.
        g = [source(p, g_j).astype(g_j.dtype) for p, g_j in zip(batch.plans, g)]
      moments = None if moment is None else [moment(p) for p in batch.plans]
      if batch.looped:
        new = [_refresh_looped(batch, g[0], s[0], due[idx[0]], count, options, mesh,
                               None if moments is None else moments[0])]
      else:
        new = _refresh_packed(batch, g, s, [due[i] for i in idx], count, options, mesh,
                              moments)
      if schedule.stateful:
        storage = parts.storage(options)
        sc = [
            schedule.advance(
                sc_j, due[p.index], storage.decode(n, p, jnp.float32),
                storage.decode(s_j, p, jnp.float32), count)
            for p, n, s_j, sc_j in zip(batch.plans, new, s, sc)
        ]
      return new, sc

    any_due = jnp.any(jnp.stack([jnp.any(due[i]) for i in idx]))
    if independent:
      # Tied to the batch's gradient (its stored bases are, `parts.ties_stored_bases`): else
      # XLA:CPU's default scheduler runs a refresh that reads none during the backward pass,
      # its new bases and the copies of the old ones held until the update (GoLore, LLaMA-1B
      # stacked: 1 GiB).
      any_due = tree_utils.after(any_due, grads[idx[0]])
    new, new_sched = jax.lax.cond(
        any_due, compute, lambda g, s, sc: (s, sc),
        [grads[i] for i in idx], [stored[i] for i in idx], [sched[i] for i in idx])
    for i, s, sc in zip(idx, new, new_sched):
      stored[i], sched[i] = s, sc
  return stored, sched


def _refresh_packed(batch: RefreshBatch, grads, stored, due, count, options, mesh,
                    moments=None) -> list:
  """New stored projectors of whole leaves, decomposed in one batched call."""
  plans = batch.plans
  first = plans[0]
  m, n = first.view.m, first.view.n
  concat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
  matrices = concat([
      _method_input(options, matrix_view.to_matrix(g, p.view).reshape(-1, m, n))
      for p, g in zip(plans, grads)
  ])
  previous = None
  if parts.reads_previous(options):
    old = [parts.storage(options).decode(s, p, jnp.float32) for p, s in zip(plans, stored)]
    previous = {side: concat([o[side].reshape((-1,) + o[side].shape[-2:]) for o in old])
                for side in first.sides}
  if moments is not None:
    previous = dict(previous or {}, moment=concat([
        matrix_view.to_matrix(x, p.view).reshape(-1, m, n) for p, x in zip(plans, moments)]))
  keys = concat([
      refresh_lib.matrix_keys(p.index, jnp.full((p.num_matrices,), count, jnp.int32),
                              num_matrices=p.num_matrices)
      for p in plans
  ])
  bases = _decompose(options, matrices, first, previous, keys, count, mesh)
  out, offset = [], 0
  for p, g, s, d in zip(plans, grads, stored, due):
    mine = {side: b[offset : offset + p.num_matrices].reshape(p.basis_shapes[side])
            for side, b in bases.items()}
    offset += p.num_matrices
    out.append(_encode(mine, p, g.dtype, count, d, s, options))
  return out


def _refresh_looped(batch: RefreshBatch, grad, stored, due, count, options, mesh,
                    moment=None):
  """New stored projectors of one stacked leaf, `batch.size` matrices a call.

  A `fori_loop` over equal slices of the stack: each reads its slice of the
  gradient and writes its slice of the stored projector in place, so only
  one slice's float32 copy and decomposition exist at a time.
  """
  (plan,) = batch.plans
  size, total = batch.size, plan.num_matrices
  flat_grad, flat_view = matrix_view.batch_first(grad, plan.view)
  flat_moment = None if moment is None else matrix_view.batch_first(moment, plan.view)[0]
  part = plan._replace(view=matrix_view.with_batch(flat_view, size))
  nb = len(plan.batch_shape)
  flatten = lambda a: a.reshape((total,) + a.shape[nb:])
  flat_due = jnp.broadcast_to(due, plan.batch_shape).reshape(total)
  reads_previous = parts.reads_previous(options)
  take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, size)

  def body(j, flat_stored):
    start = j * size
    matrices = _method_input(options, matrix_view.to_matrix(take(flat_grad, start), part.view))
    old = jax.tree.map(lambda a: take(a, start), flat_stored)
    previous = parts.storage(options).decode(old, part, jnp.float32) if reads_previous else None
    if flat_moment is not None:
      previous = dict(previous or {},
                      moment=matrix_view.to_matrix(take(flat_moment, start), part.view))
    keys = refresh_lib.matrix_keys(
        plan.index, jnp.full((size,), count, jnp.int32), first=start,
        num_matrices=plan.num_matrices)
    bases = _decompose(options, matrices, plan, previous, keys, count, mesh)
    new = _encode(bases, part, grad.dtype, count, take(flat_due, start), old, options)
    return jax.tree.map(lambda a, v: tree_utils.write_slice(a, v, start), flat_stored, new)

  flat_stored = jax.lax.fori_loop(0, total // size, body, jax.tree.map(flatten, stored))
  return jax.tree.map(lambda a, s: a.reshape(s.shape), flat_stored, stored)


def _method_input(options, matrices):
  """Gradient matrices as the refresh method takes them: float32, or as stored for a method
  that converts them itself (`converts_gradient`, where a conditional would otherwise be given
  a float32 copy beside the method's own)."""
  if getattr(parts.refresh_fn(options), "converts_gradient", False):
    return matrices
  return matrices.astype(jnp.float32)


def _encode(bases, plan: LeafPlan, leaf_dtype, count, due, old, options):
  """`bases` in stored form; where the schedule is per matrix, only where due."""
  new = parts.storage(options).encode(bases, plan, leaf_dtype, count)
  if parts.schedule(options).batched:  # every matrix is due under the batch's cond
    return new
  return matrix_view.select_matrices(due, new, old)


def _decompose(options, matrices, plan: LeafPlan, previous, keys, count, mesh=None) -> dict:
  """The refresh method's bases of the sides `plan` keeps (a user's may return more).

  With a `mesh`, the (B, m, n) stack is padded with zero matrices to a
  multiple of its devices and split over all of them (`shard_map`): each
  device decomposes B / devices matrices, not all B, and no gradient is
  gathered whole on every device (GaLore 2's distributed refresh).
  """
  refresh = parts.refresh_fn(options)
  method = refresh_lib.one_matrix_at_a_time_on_cpu(refresh)
  reads_step = getattr(refresh, "reads_step", False)

  def call(g, p, k, step):
    bases = method(g, plan.rank, plan.sides, p, k, **({"step": step} if reads_step else {}))
    return {s: b for s, b in bases.items() if s in plan.sides}

  if mesh is None:
    return call(matrices, previous, keys, count)
  total = matrices.shape[0]
  pad = -total % mesh.size
  padded = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
  if pad:  # the padding's keys are never used for a kept basis
    keys = jnp.concatenate([keys] + [keys[:1]] * pad)
  spread = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  everywhere = jax.sharding.PartitionSpec()
  bases = jax.shard_map(call, mesh=mesh, in_specs=(spread, spread, spread, everywhere),
                        out_specs=spread, check_vma=False)(
      padded(matrices), jax.tree.map(padded, previous), keys, count)
  return jax.tree.map(lambda b: b[:total], bases)
