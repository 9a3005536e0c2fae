"""Optimizer states on a device mesh: shardings derived from the parameters'.

A GaLore state holds leaves whose shapes differ from their parameter's: the
projector spans one side of the matrix and the low-rank moments keep the
other. Each such leaf gets a sharding derived from its parameter's:

* a projector ("u": (*batch, m, r), "vh": (*batch, r, n)) shares the
  sharding of the matrix axis it spans;
* a low-rank moment shares the sharding of the axis it keeps;
* batch (stacked-layer) axes keep theirs and the rank axis is replicated;
* mesh axes of the parameter that the rules above leave unused, or that no
  longer divide a shorter axis, move to the leaf's largest axis they divide
  evenly, so an FSDP-sharded state stays split over every device;
* 8-bit moments (`quantization.QuantizedArray`) shard their codes and absmax
  alike, so every block's codes sit on the device that holds its scale;
* reduced statistics (Adafactor's row and column factors, GradNormLoRP's
  per-channel magnitudes, quantized projectors' scales) keep the entries of
  the axes they keep;
* counts and other scalars are replicated.

Full-size state (moments of unprojected leaves, accumulators of
`optax.MultiSteps`, ...) simply takes its parameter's sharding. The rules are
applied by matching the state's structure against the parameters', so any
optax transformation wrapping or chained with GaLore is covered.

`opt_state_shardings` returns the shardings for `jax.jit(out_shardings=...)`.
`sharding_aware` wraps a transformation so that it also works inside Flax
NNX's `nnx.Optimizer` on sharded models and on Explicit-axes meshes; the
GaLore transformations and optimizers of this package apply it themselves.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from galore_optax import masking
from galore_optax import matrix_view
from galore_optax import projection
from galore_optax import quantization

# One entry per array axis: the mesh axis names it is split over, major first.
_Entries = tuple[tuple[str, ...], ...]

# Layouts a projected leaf is tried against when the caller does not say:
# Flax kernels (in, out) first, then PyTorch weights (out, in).
_CANDIDATE_DIMENSION_NUMBERS = (
    matrix_view.DimensionNumbers(reduction_axes=-2, output_axes=-1),
    matrix_view.DimensionNumbers(reduction_axes=-1, output_axes=-2),
)


@dataclasses.dataclass(frozen=True)
class _Ref:
  """A parameter (or a derived low-rank stand-in) as the rules see it."""

  shape: tuple[int, ...]
  entries: _Entries

  @property
  def ndim(self) -> int:
    return len(self.shape)


# ----------------------------------------------------------------------------
# Partition specs as tuples of mesh axis names.


def _names(entry: Any) -> tuple[str, ...]:
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _entries(spec: Any, ndim: int, where: str) -> _Entries:
  spec = () if spec is None else tuple(spec)
  if len(spec) > ndim:
    raise ValueError(
        f"{where}: partition spec {spec} has more entries than the leaf's "
        f"{ndim} axes."
    )
  return tuple(_names(e) for e in spec) + ((),) * (ndim - len(spec))


def _to_spec(entries: _Entries) -> PartitionSpec:
  return PartitionSpec(
      *(None if not e else e[0] if len(e) == 1 else e for e in entries)
  )


def _shards(names: Sequence[str], sizes: Optional[Mapping[str, int]]) -> int:
  if sizes is None:
    return 1
  return math.prod(sizes.get(name, 1) for name in names)


def _fit(shape, entries, sizes) -> tuple[_Entries, list[str]]:
  """Keeps, per axis, the longest run of names that splits it evenly.

  Returns the fitted entries and the names that had to be dropped.
  """
  if sizes is None:
    return tuple(entries), []
  fitted, dropped = [], []
  for dim, names in zip(shape, entries):
    kept = []
    for name in names:
      if dim % _shards(kept + [name], sizes) == 0:
        kept.append(name)
      else:
        dropped.append(name)
    fitted.append(tuple(kept))
  return tuple(fitted), dropped


def _place_leftovers(shape, entries, leftovers, sizes, frozen=()) -> _Entries:
  """Spreads unused mesh axes over the largest axes they split evenly.

  Without this an FSDP parameter sharded only on the axis a projector
  compresses would leave its low-rank moments whole on every device.
  """
  if sizes is None:
    return tuple(entries)
  entries = [list(e) for e in entries]
  used = {n for e in entries for n in e}
  order = sorted(
      (a for a in range(len(shape)) if a not in frozen), key=lambda a: -shape[a]
  )
  for name in leftovers:
    if name in used or sizes.get(name, 1) == 1:
      continue
    for axis in order:
      if shape[axis] % _shards(entries[axis] + [name], sizes) == 0:
        entries[axis].append(name)
        used.add(name)
        break
  return tuple(tuple(e) for e in entries)


def _derive(shape, entries, param_entries, sizes, frozen=()) -> _Entries:
  """Role-based entries, fitted, plus the parameter's unused mesh axes."""
  entries, _ = _fit(shape, entries, sizes)
  used = {n for e in entries for n in e}
  leftovers = [n for e in param_entries for n in e if n not in used]
  return _place_leftovers(shape, entries, leftovers, sizes, frozen)


# ----------------------------------------------------------------------------
# Per-leaf rules.


def _role_axes(ndim: int, dn: matrix_view.DimensionNumbers):
  def norm(axes):
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)

  output, reduction = norm(dn.output_axes), norm(dn.reduction_axes)
  batch = tuple(a for a in range(ndim) if a not in output and a not in reduction)
  return batch, output, reduction


def _merged(ref: _Ref, axes) -> tuple[str, ...]:
  # A reshape that merges axes keeps the layout when only the major one is
  # split; any other split is still a valid (if different) layout.
  return tuple(n for a in axes for n in ref.entries[a])


def _projected_refs(ref, dn, sides, rank, sizes):
  """Entries of the bases and the low-rank stand-in of one projected leaf."""
  batch, output, reduction = _role_axes(ref.ndim, dn)
  view = matrix_view.make_view(ref.shape, dn, "")
  batch_e = tuple(ref.entries[a] for a in batch)
  out_e, in_e = _merged(ref, output), _merged(ref, reduction)
  nb = len(batch)
  rank_axis = {projection.OUTPUT_SIDE: nb + 1, projection.INPUT_SIDE: nb}
  shapes = projection.basis_shapes(view.batch_shape, view.m, view.n, rank, sides)
  bases = {}
  for side in sides:
    role = (out_e, ()) if side == projection.OUTPUT_SIDE else ((), in_e)
    bases[side] = _Ref(
        shapes[side],
        _derive(shapes[side], batch_e + role, ref.entries, sizes, {rank_axis[side]}),
    )
  low_shape = projection.low_rank_shape(view.batch_shape, view.m, view.n, rank, sides)
  low_e = batch_e + (
      () if projection.OUTPUT_SIDE in sides else out_e,
      () if projection.INPUT_SIDE in sides else in_e,
  )
  frozen = set()
  if projection.OUTPUT_SIDE in sides:
    frozen.add(nb)
  if projection.INPUT_SIDE in sides:
    frozen.add(nb + 1)
  low = _Ref(low_shape, _derive(low_shape, low_e, ref.entries, sizes, frozen))
  return bases, low


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _replicated(x) -> _Entries:
  return ((),) * len(np.shape(x))


def _like(ref: _Ref, shape, sizes) -> _Entries:
  """Entries of a leaf found where `ref` sits in the parameter tree."""
  shape = tuple(shape)
  if shape == ref.shape:
    return ref.entries
  if len(shape) == ref.ndim and all(0 < d <= r for d, r in zip(shape, ref.shape)):
    # Per-block or per-group statistics (absmax, scales, GradNormLoRP's
    # magnitudes): a reduced copy keeps the splits that still divide, and
    # the others move to an axis they do divide.
    return _derive(shape, ref.entries, ref.entries, sizes)
  if len(shape) == ref.ndim - 1:
    # One axis reduced away (Adafactor's row and column statistics): the
    # others keep their entries. The last matching axis is taken first.
    for a in reversed(range(ref.ndim)):
      if shape == ref.shape[:a] + ref.shape[a + 1 :]:
        return _derive(shape, ref.entries[:a] + ref.entries[a + 1 :], ref.entries, sizes)
  if len(shape) == ref.ndim + 1:
    # Groups along one axis, split into (groups, codes per group) as
    # quantized projectors store their codes: the groups axis takes the
    # axis' entry (4-bit codes pack two per byte, so only the count of
    # groups is compared).
    for a in range(ref.ndim):
      if (
          shape[:a] == ref.shape[:a]
          and shape[a + 2 :] == ref.shape[a + 1 :]
          and shape[a] <= ref.shape[a]
      ):
        entries = ref.entries[:a] + (ref.entries[a], ()) + ref.entries[a + 1 :]
        return _fit(shape, entries, sizes)[0]
  return ((),) * len(shape)


def _quantized(ref: _Ref, q: quantization.QuantizedArray, sizes):
  """Codes and absmax split alike, so each block stays with its scale.

  In the last-axis layout the codes are (*lead, blocks · block_size) and the
  absmax (*lead, blocks): a split of the absmax is a split of the codes into
  whole blocks. The flat layout splits the block axis over the names of all
  the moment's axes (row-major blocks). Mesh axes that no longer divide
  their axis are moved to another axis of the absmax where they do, so the
  8-bit state of an FSDP parameter stays split over every device.
  """
  codes_shape, absmax_shape = tuple(q.codes.shape), tuple(q.absmax.shape)
  if codes_shape == ref.shape:  # last-axis layout
    entries = ref.entries
  elif len(codes_shape) == 1 and len(absmax_shape) == 1:  # flat layout
    entries = (_merged(ref, range(ref.ndim)),)
  else:
    entries = ((),) * len(absmax_shape)
  entries = _derive(absmax_shape, entries, ref.entries, sizes)
  return quantization.QuantizedArray(codes=entries, absmax=entries)


# ----------------------------------------------------------------------------
# Walking a state tree against the parameter tree.


def _children(node):
  leaves, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
  return leaves, treedef


def _is_galore_state(node) -> bool:
  fields = getattr(type(node), "_fields", ())
  return "projectors" in fields and "inner_state" in fields


class _Walker:
  """Maps a (pure) optimizer state to a tree of `_Entries` leaves."""

  def __init__(self, sizes, dimension_numbers):
    self.sizes = sizes
    self.dimension_numbers = dimension_numbers

  def walk(self, node, refs):
    if _is_galore_state(node):
      return self.galore(node, refs)
    single = isinstance(refs, _Ref)
    if isinstance(node, quantization.QuantizedArray):
      if single:
        return _quantized(refs, node, self.sizes)
      return quantization.QuantizedArray(
          _replicated(node.codes), _replicated(node.absmax)
      )
    if _is_array(node):
      return _like(refs, node.shape, self.sizes) if single else _replicated(node)
    if not single:
      treedef = jax.tree.structure(refs)
      try:
        subtrees = treedef.flatten_up_to(node)
      except (ValueError, TypeError):
        pass
      else:
        return treedef.unflatten(
            [self.walk(s, r) for s, r in zip(subtrees, treedef.flatten_up_to(refs))]
        )
    children, treedef = _children(node)
    if treedef.num_nodes == 1 and not children:
      return node  # None, MaskedNode, empty containers
    if len(children) == 1 and children[0] is node:
      return _replicated(node)  # an unknown leaf, e.g. a Python scalar
    return treedef.unflatten([self.walk(c, refs) for c in children])

  def galore(self, state, refs):
    single = isinstance(refs, _Ref)
    treedef = jax.tree.structure(refs)
    ref_list = [refs] if single else treedef.flatten_up_to(refs)
    proj_list = [state.projectors] if single else treedef.flatten_up_to(state.projectors)
    if self.dimension_numbers is None:
      dims = [None] * len(ref_list)
    else:
      dims = masking.resolve_dimension_numbers(self.dimension_numbers, refs)
    paths = [masking.path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(refs)[0]]
    proj_out, low_refs = [], []
    for ref, entry, dn, path in zip(ref_list, proj_list, dims, paths):
      if not jax.tree.leaves(entry):
        proj_out.append(entry)
        low_refs.append(ref)
        continue
      bases, low = self.projected(ref, entry, dn, path or "<root>")
      proj_out.append(bases)
      low_refs.append(low)
    fields = {}
    for name in state._fields:
      value = getattr(state, name)
      if name == "projectors":
        fields[name] = proj_out[0] if single else treedef.unflatten(proj_out)
      elif name == "inner_state":
        low_tree = low_refs[0] if single else treedef.unflatten(low_refs)
        fields[name] = self.walk(value, low_tree)
      else:
        fields[name] = self.walk(value, refs)
    return type(state)(**fields)

  def projected(self, ref, entry, dn, path):
    items = dict(entry) if isinstance(entry, Mapping) else entry._asdict()
    sides = tuple(s for s in (projection.OUTPUT_SIDE, projection.INPUT_SIDE) if s in items)
    candidates = _CANDIDATE_DIMENSION_NUMBERS if dn is None else (dn,)
    for candidate in candidates:
      try:
        view = matrix_view.make_view(ref.shape, candidate, path)
      except (ValueError, TypeError):
        continue
      rank = _fitting_rank(items, sides, view)
      if rank is None:
        continue
      bases, low = _projected_refs(ref, candidate, sides, rank, self.sizes)
      out = {}
      for key, value in items.items():
        if key in bases:
          basis = bases[key]
          out[key] = basis.entries if _is_array(value) else self.walk(value, basis)
        else:
          out[key] = self.walk(value, ref)
      return (out if type(entry) is dict else type(entry)(**out)), low
    got = jax.tree.map(np.shape, items)
    raise ValueError(
        f"{path}: the projector state {got} does not fit a parameter of shape "
        f"{ref.shape} with "
        + (f"dimension_numbers={dn}" if dn is not None else "the Flax (in, out) "
           "or PyTorch (out, in) layout")
        + "; pass the dimension_numbers given to the optimizer."
    )


def _fitting_rank(items, sides, view) -> Optional[int]:
  """The rank of the bases `items` if they fit `view`, else None.

  A basis stored as an array must have exactly the basis shape. A stored
  form of another kind (e.g. a quantized basis) must hold a leaf with the
  basis's number of axes, the batch axes in front and the rank axis in place
  (quantization only shortens the axis the basis vectors run along).
  """
  nb = len(view.batch_shape)
  rank = None
  for side in sides:
    value = items[side]
    leaves = [value] if _is_array(value) else [
        x for x in jax.tree.leaves(value) if _is_array(x)
    ]
    found = None
    for leaf in leaves:
      shape = tuple(leaf.shape)
      if len(shape) == nb + 2 and shape[:nb] == view.batch_shape:
        found = shape[-1] if side == projection.OUTPUT_SIDE else shape[-2]
        break
    if found is None or (rank is not None and found != rank):
      return None
    rank = found
  expected = projection.basis_shapes(view.batch_shape, view.m, view.n, rank, sides)
  for side in sides:
    if _is_array(items[side]) and tuple(items[side].shape) != expected[side]:
      return None
  return rank


# ----------------------------------------------------------------------------
# Public helpers.


def _sharding_of(x):
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    try:
      sharding = jax.typeof(x).sharding
    except TypeError:
      return None
  return sharding


def _nnx():
  """`flax.nnx` if the program has imported it (never imported here)."""
  return sys.modules.get("flax.nnx")


def _is_variable(x) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Variable)


def _strip_variables(tree):
  """NNX Variables replaced by their values (no-op without flax)."""
  if _nnx() is None:
    return tree
  return jax.tree.map(
      lambda v: v.get_value() if _is_variable(v) else v, tree, is_leaf=_is_variable
  )


def _metadata_spec(variable):
  """A Variable's `optimizer_sharding` or `out_sharding`, logical names resolved.

  Returns None for a Variable without sharding metadata.
  """
  spec = variable.get_metadata("optimizer_sharding", None)
  if spec is None:
    spec = variable.get_metadata("out_sharding", None)
  if spec is None:
    return None
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  from flax.core import spmd  # pylint: disable=import-outside-toplevel

  return PartitionSpec(
      *spmd.get_pspec(tuple(spec), variable.get_metadata("sharding_rules", None))
  )


def _params_and_specs(params):
  """Pure parameters, and per leaf its sharding.

  A Variable's sharding metadata wins over its value's sharding: it is what
  `nnx.Optimizer` shards the state by.
  """
  nnx = _nnx()
  if nnx is not None and isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  items, outer = jax.tree.flatten(params, is_leaf=_is_variable)
  pure, found = [], []
  for item in items:
    value = item.get_value() if _is_variable(item) else item
    declared = _metadata_spec(item) if _is_variable(item) else None
    for leaf in jax.tree.leaves(value):
      found.append(declared if declared is not None else _sharding_of(leaf))
    pure.append(value)
  return outer.unflatten(pure), found


def _context_mesh():
  mesh = jax.sharding.get_mesh()
  return None if mesh.empty else mesh


def _mesh_sizes(mesh) -> Optional[dict[str, int]]:
  return None if mesh is None else dict(mesh.shape)


def opt_state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    shardings: Any = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    dimension_numbers: Any = None,
) -> Any:
  """The `NamedSharding` of every leaf of `tx`'s state, derived from params'.

  Use it to create and keep the optimizer state sharded:
  ``jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))``, and
  as the state's in/out shardings of the train step. The rules:

  * a projector shares the sharding of the matrix axis it spans (``u``:
    the output axes, ``vh``: the input axes), a low-rank moment that of the
    axis it keeps, batch (stacked-layer) axes keep theirs, and the rank axis
    is replicated (any rank works, also one no mesh axis divides);
  * mesh axes that the rules leave unused, or that no longer divide a
    shorter axis, move to the leaf's largest axis they divide, so an FSDP
    state stays split over every device;
  * 8-bit moments split their codes and absmax alike (whole blocks per
    device); full-size state (moments of unprojected leaves, accumulators)
    takes the parameter's sharding; counts and other scalars are replicated.

  Works for any optax transformation: leaves it does not recognise are
  sharded like their parameter when they have its shape, and replicated
  otherwise.

  Args:
    tx: the optimizer.
    params: the parameters: arrays or `jax.ShapeDtypeStruct`s (e.g. from
      `jax.eval_shape`) with `NamedSharding`s, an NNX `State` or an
      `nnx.Module` (its `nnx.Param`s; a Variable with `out_sharding`
      metadata contributes that, logical names resolved by its
      `sharding_rules`, as `nnx.Optimizer` does). The result describes the
      state of the pure tree, `tx.init(params)`.
    shardings: optional pytree like `params` of `NamedSharding`s or
      `PartitionSpec`s (the latter need a mesh), overriding params'.
    mesh: a `Mesh` (or `AbstractMesh`) for `PartitionSpec`s and unsharded
      parameters; default the mesh of the parameters' `NamedSharding`s, else
      that of `jax.set_mesh`.
    dimension_numbers: the `dimension_numbers` given to GaLore, if any. By
      default each projected leaf is read in the Flax (in, out) layout (as
      GaLore does by default) or, when its state does not fit that, the
      PyTorch (out, in) one.

  Returns:
    A pytree of `NamedSharding` with the structure of `tx.init(params)`.

  Raises:
    ValueError: naming the parameter, for a partition spec with more entries
      than the parameter has axes or a mesh axis the mesh does not have, or a
      projected leaf whose state fits neither layout.

  Example:
    >>> import jax, jax.numpy as jnp, galore_optax as go
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.ones((32, 64)), NamedSharding(mesh, P("fsdp")))
    >>> tx = go.galore_adamw(1e-3, rank=5)
    >>> shardings = go.opt_state_shardings(tx, {"w": w})
    >>> shardings[0].projectors["w"]["vh"].spec   # (5, 32): the (sharded) input axis
    P(None, 'fsdp')
    >>> shardings[0].inner_state.mu["w"].spec     # (64, 5): unsharded output axis
    P(None, None)
    >>> state = jax.jit(tx.init, out_shardings=shardings)({"w": w})
  """
  params, found = _params_and_specs(params)
  leaves, treedef = jax.tree.flatten(params)
  paths = masking.leaf_paths(params)
  if shardings is not None:
    try:
      found = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError):
      raise ValueError(
          "opt_state_shardings: shardings must have the structure of params "
          f"({treedef.num_leaves} leaves: {', '.join(paths[:3])}...)."
      ) from None
  if mesh is None:
    mesh = next((s.mesh for s in found if isinstance(s, NamedSharding)), None)
  if mesh is None:
    mesh = _context_mesh()
  if mesh is None:
    raise ValueError(
        "opt_state_shardings: the parameters carry no NamedSharding; pass "
        "shardings=..., mesh=jax.make_mesh(...) or call it under jax.set_mesh."
    )
  sizes = _mesh_sizes(mesh)
  refs = []
  for path, leaf, sharding in zip(paths, leaves, found):
    where = path or "<root>"
    ndim = len(np.shape(leaf))
    if isinstance(sharding, NamedSharding):
      spec = sharding.spec
    elif isinstance(sharding, PartitionSpec):
      spec = sharding
    elif sharding is None or getattr(sharding, "is_fully_replicated", False):
      spec = PartitionSpec()
    else:
      raise TypeError(
          f"opt_state_shardings: {where} has sharding {sharding!r}; give "
          "NamedShardings or PartitionSpecs (shardings=...)."
      )
    entries = _entries(spec, ndim, f"opt_state_shardings: {where}")
    unknown = sorted({n for e in entries for n in e} - set(sizes))
    if unknown:
      raise ValueError(
          f"opt_state_shardings: {where}: partition spec {spec} names mesh "
          f"axes {unknown} that the mesh {tuple(sizes)} does not have; pass "
          "the mesh the parameters are sharded over (mesh=...)."
      )
    refs.append(_Ref(tuple(np.shape(leaf)), entries))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), params
  )
  state = jax.eval_shape(tx.init, abstract)
  walker = _Walker(sizes, dimension_numbers)
  entries = walker.walk(state, treedef.unflatten(refs))
  return _entries_to(entries, state, lambda e: NamedSharding(mesh, _to_spec(e)))


def _entries_to(entries, like, fn):
  """Maps the `_Entries` leaves (tuples) that sit where `like` has arrays."""
  treedef = jax.tree.structure(like)
  flat = treedef.flatten_up_to(entries)
  return treedef.unflatten([fn(e) for e in flat])


# ----------------------------------------------------------------------------
# NNX metadata and Explicit-axes meshes.


def _explicit_mesh_of(tree):
  """The mesh of the first leaf typed with Explicit mesh axes, or None."""
  for leaf in jax.tree.leaves(tree):
    try:
      sharding = jax.typeof(leaf).sharding
    except (TypeError, AttributeError):
      continue
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and getattr(mesh, "explicit_axes", ()):
      return mesh
  return None


def _typed_shardings(tree):
  return jax.tree.map(lambda x: jax.typeof(x).sharding, tree)


def _raw_spec(variable):
  spec = variable.get_metadata("optimizer_sharding", None)
  if spec is None:
    spec = variable.get_metadata("out_sharding", None)
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  return spec


def _variable_mesh(variables):
  for v in variables:
    mesh = v.get_metadata("mesh", None)
    if mesh is not None:
      return mesh
    spec = v.get_metadata("out_sharding", None)
    if isinstance(spec, NamedSharding):
      return spec.mesh
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _name_sizes(mesh, specs, variables) -> Optional[dict[str, int]]:
  """Shards per name, resolving logical names through the Variables' rules."""
  if mesh is None:
    return None
  sizes = dict(mesh.shape)
  from flax.core import spmd  # pylint: disable=import-outside-toplevel

  for spec, v in zip(specs, variables):
    rules = v.get_metadata("sharding_rules", None)
    for entry in spec:
      for name in entry:
        if name in sizes:
          continue
        resolved = spmd.apply_rules(PartitionSpec(name), rules)
        sizes[name] = math.prod(
            mesh.shape.get(n, 1) for e in resolved for n in _names(e)
        )
  return sizes


def _annotate_nnx_state(state, params, dimension_numbers):
  """Gives every state Variable the out_sharding of its own shape.

  `nnx.Optimizer` calls `tx.init` on a State of Variables; the state built by
  mapping over it wraps every leaf in its parameter's Variable type and
  metadata, so a low-rank moment or projector inherits the parameter's
  `out_sharding`, which is wrong for its shape (and fails to shard when the
  rank does not divide). `nnx.Optimizer` then turns each Variable into an
  `OptVariable` with the same metadata and, with eager sharding, shards its
  value by it. Here each such Variable is pushed down to the arrays it holds
  (a projector dict or an 8-bit moment holds several) and given the spec the
  rules derive, in the same names (logical names stay logical).

  Without flax, or when no parameter Variable carries sharding metadata, the
  state is returned unchanged.
  """
  if _nnx() is None:
    return state
  param_items = jax.tree.leaves(params, is_leaf=_is_variable)
  annotated = [
      v for v in param_items if _is_variable(v) and _raw_spec(v) is not None
  ]
  if not annotated:
    return state
  pure_params = _strip_variables(params)
  leaves, treedef = jax.tree.flatten(pure_params)
  # The Variable holding each pure leaf (None for plain arrays).
  owners = []
  for item in param_items:
    owners.extend([item if _is_variable(item) else None] * len(jax.tree.leaves(item)))
  specs = [
      _entries(
          _raw_spec(v) if v is not None else None,
          len(np.shape(leaf)),
          f"nnx.Optimizer state: {path or '<root>'}",
      )
      for v, leaf, path in zip(owners, leaves, masking.leaf_paths(pure_params))
  ]
  mesh = _variable_mesh(annotated)
  sizes = _name_sizes(
      mesh,
      [s for s, v in zip(specs, owners) if v is not None],
      [v for v in owners if v is not None],
  )
  refs = treedef.unflatten(
      [_Ref(tuple(np.shape(x)), s) for x, s in zip(leaves, specs)]
  )
  pure_state = _strip_variables(state)
  entries = _Walker(sizes, dimension_numbers).walk(pure_state, refs)
  flat_entries = iter(jax.tree.structure(pure_state).flatten_up_to(entries))

  def sharded(variable) -> bool:
    metadata = variable.get_metadata()
    return "out_sharding" in metadata or "optimizer_sharding" in metadata

  def rewrap(variable):
    metadata = variable.get_metadata()
    metadata.pop("optimizer_sharding", None)

    def one(x):
      metadata["out_sharding"] = tuple(_to_spec(next(flat_entries)))
      return type(variable)(x, **metadata)

    return jax.tree.map(one, variable.get_value())

  items, outer = jax.tree.flatten(state, is_leaf=_is_variable)
  rebuilt = []
  for item in items:
    if _is_variable(item) and sharded(item):
      rebuilt.append(rewrap(item))
    else:  # a plain array, or a Variable without sharding metadata
      for _ in jax.tree.leaves(item):
        next(flat_entries)
      rebuilt.append(item)
  return outer.unflatten(rebuilt)


def sharding_aware(
    tx: optax.GradientTransformation, *, dimension_numbers: Any = None
) -> optax.GradientTransformation:
  """`tx` made to work on sharded NNX models and Explicit-axes meshes.

  Two things break an optimizer whose state shapes differ from the
  parameters' (GaLore's projectors and low-rank moments, 8-bit codes,
  GradNormLoRP's magnitudes):

  * `nnx.Optimizer` copies each parameter's sharding metadata onto the
    state built from it. Here `init` gives every state Variable the
    `out_sharding` derived by `opt_state_shardings`' rules instead.
  * On a mesh with Explicit axes (the default of `jax.make_mesh`) every op
    must know its output sharding, and the projection matmuls contract
    sharded axes. Here `update` runs `tx.update` with those mesh axes made
    Auto (`jax.sharding.auto_axes`, so XLA picks the collectives) and
    returns updates sharded like the gradients and a state sharded like the
    incoming one, so the state keeps its shardings step after step.

  Without either (plain arrays, no sharding metadata, Auto axes) it calls
  `tx` as is, and it adds no operation to a traced step. The GaLore
  transformations and optimizers of this package already apply it; wrap
  other transformations whose state shapes differ from the parameters'.

  Args:
    tx: any optax transformation.
    dimension_numbers: the `dimension_numbers` given to GaLore, if any (see
      `opt_state_shardings`).

  Returns:
    An `optax.GradientTransformation` (with extra-args support if `tx` has
    it) with the same state as `tx`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, galore_optax as go
    >>> tx = go.sharding_aware(optax.chain(go.scale_by_galore(rank=3), optax.sgd(1e-3)))
    >>> params = {"w": jnp.ones((16, 8))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
  """

  def init_fn(params):
    return _annotate_nnx_state(tx.init(params), params, dimension_numbers)

  def update_fn(updates, state, params=None, **extra_args):
    mesh = _explicit_mesh_of((updates, state, params))
    call = lambda u, s, p: tx.update(u, s, p, **extra_args)
    if mesh is None:
      return call(updates, state, params)
    out_shardings = (_typed_shardings(updates), _typed_shardings(state))
    return jax.sharding.auto_axes(
        call, axes=tuple(mesh.explicit_axes), out_sharding=out_shardings
    )(updates, state, params)

  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return optax.GradientTransformation(init_fn, update_fn)
