"""Where the library meets meshes and Flax NNX.

The transformations declare their state's shardings themselves: under an
Explicit mesh, `tx.init` creates every state leaf sharded by the rule of the
transform that owns it (`axis_specs`, `plan.LeafPlan`). This module reads
those declarations back where arrays carry no Explicit types:

* `opt_state_shardings(tx, params)` runs `tx.init` under `jax.eval_shape`
  on an Explicit stand-in of the mesh (Auto meshes, PartitionSpecs, NNX
  metadata) and returns a `NamedSharding` per state leaf;
* `sharding_aware(tx)`, the boundary every optimizer here is wrapped in
  once, gives `nnx.Optimizer` the declared spec of each state Variable (it
  would copy the parameter's onto a low-rank moment), rebuilds the state's
  own structure from the State mappings nnx hands back, and runs `update`
  under `jax.sharding.auto_axes` so XLA picks the projections' collectives.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional, ParamSpec, Union, cast

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from galore_optax import axis_specs
from galore_optax import masking


def _nnx() -> Any:
  """`flax.nnx` if the program imported it (this module never does)."""
  return sys.modules.get("flax.nnx")


def _is_variable(x) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(x, nnx.Variable)


def _metadata_spec(variable) -> Optional[PartitionSpec]:
  """A Variable's `optimizer_sharding` or `out_sharding`, logical names resolved."""
  spec = variable.get_metadata("optimizer_sharding", None) or variable.get_metadata(
      "out_sharding", None)
  if spec is None:
    return None
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  from flax.core import spmd  # pylint: disable=import-outside-toplevel

  rules = variable.get_metadata("sharding_rules", None)
  return PartitionSpec(*spmd.get_pspec(tuple(spec), rules))


def _params_and_shardings(params):
  """Pure parameters and, per leaf, its sharding (Variable metadata first)."""
  nnx = _nnx()
  if nnx is not None and isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  items, outer = jax.tree.flatten(params, is_leaf=_is_variable)
  pure, found = [], []
  for item in items:
    value = item.get_value() if _is_variable(item) else item
    declared = _metadata_spec(item) if _is_variable(item) else None
    for leaf in jax.tree.leaves(value):
      found.append(declared if declared is not None else getattr(leaf, "sharding", None))
    pure.append(value)
  return outer.unflatten(pure), found


def _spec(sharding, where: str, ndim: int, mesh) -> PartitionSpec:
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
  if len(spec) > ndim:
    raise ValueError(
        f"opt_state_shardings: {where}: partition spec {spec} has more entries "
        f"than the leaf's {ndim} axes."
    )
  unknown = sorted({n for e in spec for n in axis_specs.names(e)} - set(mesh.axis_names))
  if unknown:
    raise ValueError(
        f"opt_state_shardings: {where}: partition spec {spec} names mesh axes "
        f"{unknown} that the mesh {tuple(mesh.axis_names)} does not have; pass "
        "the mesh the parameters are sharded over (mesh=...)."
    )
  return spec


def opt_state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    shardings: Any = None,
    mesh: Optional[Union[jax.sharding.Mesh, AbstractMesh]] = None,
) -> Any:
  """The `NamedSharding` of every leaf of `tx`'s state, derived from params'.

  Use it where shardings are not part of the arrays' types (Auto meshes,
  PartitionSpecs, NNX metadata): ``jax.jit(tx.init,
  out_shardings=opt_state_shardings(tx, params))``, and as the state's
  in/out shardings of the train step. It reads what the transformations
  declare (under an Explicit mesh `jax.jit(tx.init)` gives it directly): a
  projector is sharded like the matrix axis it spans, a low-rank moment
  like the axis it keeps, batch axes keep theirs, the rank axis is
  replicated, unused mesh axes move to the largest axis they divide, 8-bit
  codes and their block scales split alike; state built like a parameter
  takes its sharding, anything else (counts) is replicated.

  Args:
    tx: the optimizer.
    params: the parameters: arrays or `jax.ShapeDtypeStruct`s with
      `NamedSharding`s, an NNX `State` or an `nnx.Module` (its `nnx.Param`s;
      a Variable's `out_sharding` metadata counts, logical names resolved by
      its `sharding_rules`).
    shardings: optional pytree like `params` of `NamedSharding`s or
      `PartitionSpec`s (the latter need a mesh), overriding params'.
    mesh: a `Mesh` (or `AbstractMesh`) for `PartitionSpec`s and unsharded
      parameters; default the mesh of the parameters' `NamedSharding`s, else
      that of `jax.set_mesh`.

  Returns:
    A pytree of `NamedSharding` with the structure of `tx.init(params)`.

  Raises:
    ValueError: naming the parameter, for a partition spec with more entries
      than the parameter has axes or a mesh axis the mesh does not have.

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
  """
  params, found = _params_and_shardings(params)
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
  mesh = mesh or next((s.mesh for s in found if isinstance(s, NamedSharding)), None)
  if mesh is None and not jax.sharding.get_abstract_mesh().empty:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None:
    raise ValueError(
        "opt_state_shardings: the parameters carry no NamedSharding; pass "
        "shardings=..., mesh=jax.make_mesh(...) or call it under jax.set_mesh."
    )
  explicit = AbstractMesh(
      tuple(mesh.axis_sizes), tuple(mesh.axis_names),
      axis_types=(AxisType.Explicit,) * len(mesh.axis_names),
  )
  abstract = [
      jax.ShapeDtypeStruct(
          np.shape(x), jax.numpy.result_type(x),
          sharding=NamedSharding(explicit, _spec(s, p or "<root>", np.ndim(x), mesh)),
      )
      for x, s, p in zip(leaves, found, paths)
  ]
  with jax.sharding.use_abstract_mesh(explicit):
    state = jax.eval_shape(tx.init, treedef.unflatten(abstract))
  def declared(x) -> PartitionSpec:
    sharding = getattr(x, "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()

  return jax.tree.map(lambda x: NamedSharding(mesh, declared(x)), state)


def _restore(template, given):
  """`given` rebuilt with `template`'s containers (NamedTuples, dicts, tuples).

  `nnx.Optimizer` stores the state through `nnx.state`, which turns every
  NamedTuple into a State mapping of its fields (and drops empty ones);
  matching by field name, key or position undoes that.
  """
  if not jax.tree.leaves(template):
    return template  # MaskedNode, EmptyState, None, empty containers
  if _is_variable(given):
    given = given.get_value()
  if isinstance(template, jax.ShapeDtypeStruct):
    return given
  container: Any = type(template)  # a NamedTuple, dict-like or sequence class
  if hasattr(template, "_fields"):
    get = (lambda f: given[f]) if isinstance(given, Mapping) else (lambda f: getattr(given, f))
    return container(**{f: _restore(getattr(template, f), get(f)) for f in template._fields})
  if isinstance(template, Mapping):
    return container({k: _restore(v, given[k]) for k, v in template.items()})
  if isinstance(template, (tuple, list)):
    return container(_restore(t, given[i]) for i, t in enumerate(template))
  children, treedef = jax.tree_util.tree_flatten(template, is_leaf=lambda x: x is not template)
  return treedef.unflatten([_restore(c, g) for c, g in zip(children, treedef.flatten_up_to(given))])


def _holds_nnx_containers(state) -> bool:
  nnx = _nnx()
  if nnx is None:
    return False
  is_container = lambda x: isinstance(x, (nnx.State, nnx.Variable))
  return any(is_container(x) for x in jax.tree.leaves(state, is_leaf=is_container))


def _as_own_state(tx, updates, state):
  """`state` in `tx`'s own containers, from the form `nnx.Optimizer` stores.

  Only called for state in nnx's containers: for any other no template is built, so
  `tx.init` is not traced in the update (under optax.inject_hyperparams its shape
  arguments are traced there).
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), updates)
  template = jax.eval_shape(tx.init, abstract)
  if jax.tree.structure(template) == jax.tree.structure(state):
    return state
  try:
    return _restore(template, state)
  except (KeyError, IndexError, AttributeError, TypeError, ValueError):
    return state  # not nnx's form of this state: the transform names what is wrong


def _key_name(key) -> Any:
  """A path entry's name, alike for a NamedTuple field, a dict key and a State key."""
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _in_containers_of(reference, tree):
  """The leaves of `tree` in the containers of `reference`, matched by path names."""
  names = lambda t: [tuple(map(_key_name, path))
                     for path, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
  by_name = dict(zip(names(tree), jax.tree.leaves(tree)))
  wanted = names(reference)
  if set(wanted) != set(by_name):
    return tree  # not the same entries: the caller's structure check names what differs
  return jax.tree.structure(reference).unflatten([by_name[n] for n in wanted])


def _nnx_state_variables(tx, params, state):
  """Every array of `state` in a Variable whose `out_sharding` is its spec."""
  owners = [v for v in jax.tree.leaves(params, is_leaf=_is_variable) if _is_variable(v)]
  if not any(_metadata_spec(v) is not None for v in owners):
    return state
  specs = opt_state_shardings(tx, params)
  variable = _nnx().Variable
  return jax.tree.map(lambda x, s: variable(x, out_sharding=tuple(s.spec)), state, specs)


def _explicit_mesh_of(tree):
  """The mesh of the first leaf typed with Explicit mesh axes, or None."""
  for leaf in jax.tree.leaves(tree):
    layout = axis_specs.layout_of(leaf)
    if layout is not None:
      return layout.mesh
  return None


def sharding_aware(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` made to work on sharded NNX models and Explicit-axes meshes.

  Every optimizer of this package is wrapped in it once (a no-op for plain
  arrays without a mesh). Wrap other transformations whose state shapes
  differ from the parameters' (e.g. `optax.contrib.galore`) before giving
  them to `nnx.Optimizer` on a sharded model; their state leaves that are
  not built like a parameter are then replicated.

  State that arrives in `nnx.Optimizer`'s containers (`nnx.State` mappings
  where `tx` keeps NamedTuples and dicts) is handed to `tx` in its own and
  returned in the containers it came in, so that wrappers choosing between
  the old and the new state (`optax.apply_if_finite`'s `lax.cond`) see one
  structure.

  Args:
    tx: any optax transformation.

  Returns:
    An `optax.GradientTransformation` (with extra-args support if `tx` has
    it) with the same state as `tx`.

  Example:
    >>> import optax, galore_optax as go
    >>> tx = go.sharding_aware(optax.contrib.galore(learning_rate=1e-3))
  """

  def init_fn(params):
    state = tx.init(_params_and_shardings(params)[0])
    return _nnx_state_variables(tx, params, state) if _nnx() is not None else state

  def update_fn(updates, state, params=None, **extra_args):
    if _holds_nnx_containers(state):
      new_updates, new_state = _update(updates, _as_own_state(tx, updates, state), params,
                                       **extra_args)
      return new_updates, _in_containers_of(state, new_state)
    return _update(updates, state, params, **extra_args)

  def _update(updates, state, params, **extra_args):
    mesh = _explicit_mesh_of((updates, state, params))
    call = lambda u, s, p: tx.update(u, s, p, **extra_args)
    if mesh is None:
      return call(updates, state, params)
    typed = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding, tree)
    # cast: jax's annotation-free auto_axes reads as possibly its one-argument decorator form
    auto_call = cast(Callable[..., Any], jax.sharding.auto_axes(
        call, axes=tuple(mesh.explicit_axes), out_sharding=(typed(updates), typed(state))))
    return auto_call(updates, state, params)

  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return optax.GradientTransformation(init_fn, update_fn)


_P = ParamSpec("_P")


def public(
    factory: Callable[_P, optax.GradientTransformation],
) -> Callable[_P, optax.GradientTransformation]:
  """Decorates an optimizer factory so that what it returns is `sharding_aware`.

  The signature is kept (for `inspect`, `help` and type checkers alike).
  """

  @functools.wraps(factory)
  def build(*args: _P.args, **kwargs: _P.kwargs) -> optax.GradientTransformation:
    return sharding_aware(factory(*args, **kwargs))

  return build
