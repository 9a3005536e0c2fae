"""Shardings of state leaves, declared by the transform that creates them.

On a mesh with Explicit axes every array's type carries its sharding, so a
transform's `init` can read each parameter's sharding and create the state
leaves it derives from that parameter already sharded. Each transform knows
which axes of the parameter a state leaf keeps (a projector spans one side of
the matrix, a low-rank moment keeps the other, an 8-bit moment's block
scales follow its rows); this module holds the arithmetic they share:

* `Layout` is a parameter's sharding as the rules see it: per axis the mesh
  axis names it is split over, and the sizes of the mesh axes;
* `Layout.derive(shape, entries)` fits the names a state leaf inherits to its
  shape (a name that no longer divides its axis is dropped) and moves the
  parameter's unused names to the leaf's largest axis they divide, so the
  state of an FSDP parameter stays split over every device;
* `zeros(shape, dtype, layout, spec)` creates a leaf with that sharding.

Without an Explicit mesh `layout_of` returns None and `zeros` is `jnp.zeros`,
so nothing changes for unsharded code. `go.opt_state_shardings` runs `init`
under `jax.eval_shape` on an Explicit stand-in of any mesh and reads these
declarations back.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.core  # `jax` imports it but does not bind the name for type checkers
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# One entry per array axis: the mesh axis names it is split over, major first.
Entries = tuple[tuple[str, ...], ...]


def names(entry: Any) -> tuple[str, ...]:
  """The mesh axis names of one PartitionSpec entry."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def to_spec(entries: Entries) -> PartitionSpec:
  return PartitionSpec(
      *(None if not e else e[0] if len(e) == 1 else e for e in entries)
  )


class Layout(NamedTuple):
  """A parameter's sharding: per-axis mesh names and the mesh they belong to."""

  entries: Entries
  mesh: Any  # a Mesh (concrete arrays) or an AbstractMesh (traced ones)

  @property
  def sizes(self) -> Mapping[str, int]:
    return dict(self.mesh.shape)

  def merged(self, axes: Iterable[int]) -> tuple[str, ...]:
    """The names of `axes`, as one axis after a reshape that merges them."""
    return tuple(n for a in axes for n in self.entries[a])

  def shards(self, names_: Sequence[str]) -> int:
    sizes = self.sizes
    return math.prod(sizes.get(name, 1) for name in names_)

  def derive(
      self, shape: Sequence[int], entries: Entries, frozen: Iterable[int] = ()
  ) -> PartitionSpec:
    """The spec of a state leaf of `shape` that inherits `entries`.

    Per axis, the longest run of inherited names that splits it evenly is
    kept. The parameter's names left unused then go, one by one, to the
    largest axis (outside `frozen`, e.g. a rank axis) that they split evenly.
    """
    shape = tuple(shape)
    fitted = []
    for dim, axis_names in zip(shape, entries):
      kept: list[str] = []
      for name in axis_names:
        if dim % self.shards(kept + [name]) == 0:
          kept.append(name)
      fitted.append(kept)
    used = {n for e in fitted for n in e}
    frozen = set(frozen)
    order = sorted((a for a in range(len(shape)) if a not in frozen), key=lambda a: -shape[a])
    for name in (n for e in self.entries for n in e):
      if name in used or self.sizes.get(name, 1) == 1:
        continue
      for axis in order:
        if shape[axis] % self.shards(fitted[axis] + [name]) == 0:
          fitted[axis].append(name)
          used.add(name)
          break
    return to_spec(tuple(tuple(e) for e in fitted))

  def like(self, shape: Sequence[int]) -> PartitionSpec:
    """The spec of a leaf that keeps every axis of the parameter."""
    return self.derive(shape, self.entries)


def _explicit(mesh) -> bool:
  return mesh is not None and not mesh.empty and bool(getattr(mesh, "explicit_axes", ()))


def layout_of(x: Any) -> Optional[Layout]:
  """`x`'s sharding if its type carries one (an Explicit mesh), else None."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    sharding = x.sharding  # its mesh holds the devices, for eager creation
  else:
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      return None
  if not isinstance(sharding, NamedSharding) or not _explicit(sharding.mesh):
    return None
  mesh = sharding.mesh
  explicit = set(mesh.explicit_axes)
  spec = tuple(sharding.spec) + (None,) * (len(jnp.shape(x)) - len(sharding.spec))
  entries = tuple(tuple(n for n in names(e) if n in explicit) for e in spec)
  return Layout(entries, mesh)


def split_over_devices(x: Any, axes: Sequence[int]) -> bool:
  """Whether `x`'s sharding splits any of `axes` over devices (a loop over slices of such
  an axis would gather it)."""
  layout = layout_of(x)
  return bool(layout) and any(layout.entries[a] for a in axes)


def zeros(
    shape: Sequence[int],
    dtype: Any,
    layout: Optional[Layout] = None,
    spec: Optional[PartitionSpec] = None,
) -> jax.Array:
  """`jnp.zeros`, sharded by `spec` on `layout`'s mesh when there is one."""
  if layout is None or spec is None:
    return jnp.zeros(shape, dtype)
  sharding = NamedSharding(layout.mesh, spec)
  if isinstance(layout.mesh, jax.sharding.Mesh):
    return jnp.zeros(shape, dtype, device=sharding)
  return jnp.zeros(shape, dtype, out_sharding=sharding)
