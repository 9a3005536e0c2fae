"""The optimizer step fused into the backward pass of scanned layers.

With `jax.grad` then `tx.update`, a scanned model's stacked gradient exists
whole, and the optimizer's float32 working copies exist for every layer at
once. PyTorch's GaLore avoids both with per-parameter hooks that update each
layer the moment its gradient is ready. `fused_scan_step` does the same in
JAX: the forward scan keeps only each layer's input; the backward is a reverse
scan that recomputes layer i (`jax.vjp`), takes its parameter gradient and at
once applies `tx.update` to layer i's slice of the parameters and of the
optimizer state, written back in place (with donation they stay in their
buffers). Only one layer's gradient exists at a time. Embeddings, final norm
and head are updated after the scan, as usual.

This needs an optimizer whose update of a layer's slice depends on nothing
but that slice (every optimizer of this package; optax's elementwise
transforms). One that reduces across leaves or layers (`clip_by_global_norm`,
`apply_if_finite`, LAMB's trust ratio of a stacked leaf, `MultiSteps`) is
refused: `fused_init` runs it once on a small probe both ways and compares.
Global-norm clipping is offered as `clip_norm=`, and skipping a step whose
gradient holds a NaN or an infinity (what `optax.apply_if_finite` does) as
`skip_nonfinite=True`: a first reverse scan sums the squared gradients, a
second applies the updates to the clipped gradients, or none of them.
"""

from __future__ import annotations

import numbers
import warnings
import weakref
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import frugal_blocks
from galore_optax import inspection
from galore_optax import refresh as refresh_lib
from galore_optax import tree_utils


class FusedState(NamedTuple):
  """State of a fused step.

  Attributes:
    layers: the optimizer state of one layer, for every layer: `tx.init` of a
      layer's slice, vmapped over the stack (so every leaf, step counts
      included, has a leading layer axis).
    rest: the optimizer state of the other parameters (`tx.init(rest)`).
    notfinite_count: steps skipped in a row for a non-finite gradient (int32;
      counted with ``skip_nonfinite=True``, as `optax.ApplyIfFiniteState`).
    total_notfinite: steps skipped in all (int32).
  """

  layers: Any
  rest: Any
  notfinite_count: Any
  total_notfinite: Any


def _split(params, layers: str):
  if not isinstance(params, dict) or layers not in params:
    raise ValueError(
        f"fused steps need params as a dict with the stacked layers under {layers!r} "
        f"(axis 0 = layer); got {type(params).__name__} with keys "
        f"{sorted(params) if isinstance(params, dict) else '–'}; pass layers=<that key>.")
  rest = {k: v for k, v in params.items() if k != layers}
  return params[layers], rest


def _num_layers(stack) -> int:
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stack)}
  size = next(iter(sizes), None)
  if len(sizes) != 1 or size is None:
    raise ValueError(
        "every leaf of the stacked layer tree needs the same leading layer axis; got "
        f"leading sizes {sorted(map(str, sizes))}.")
  return size


_COUPLED = (
    "this optimizer's update of one layer depends on other layers or leaves (a global-norm "
    "clip, apply_if_finite, MultiSteps, a trust ratio over a stacked leaf, FRUGAL's blocks): "
    "a fused step cannot apply it layer by layer. Leave it out of tx and pass clip_norm=... "
    "to fused_scan_step for global-norm clipping.")


# Updates that passed the probe (fused_init may be called again, e.g. to restore).
_PER_SLICE: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def check_per_slice(tx: optax.GradientTransformation, **extra_args) -> None:
  """Raises if `tx`'s update of one slice depends on other leaves or slices.

  Runs `tx` on a probe of two stacked leaves of two layers, once on the whole
  tree and once slice by slice (with per-slice state), and compares.
  `extra_args` go to every `tx.update` (e.g. ``learning_rate``).
  """
  try:
    if tx.update in _PER_SLICE:
      return
  except TypeError:  # an update that takes no weak reference is probed every time
    pass
  # States that couple leaves whatever the probe shows: MultiSteps (every leaf's
  # accumulation decides the step), FRUGAL's blocks (which tensors are active is
  # decided over all of them; per slice, every layer would have its own).
  coupling = (optax.MultiStepsState, frugal_blocks.FrugalBlocksState)
  if any(isinstance(s, coupling) for s in jax.tree.leaves(
      jax.eval_shape(tx.init, {"a": jnp.zeros((2, 2))}),
      is_leaf=lambda s: isinstance(s, coupling))):
    raise ValueError(_COUPLED)
  key = jax.random.key(0)
  # Two stacked leaves whose slices are matrices (so a default mask treats a
  # slice as it treats the stack) of 4096 elements (8-bit moments by default,
  # whole or sliced), three steps, the last with one NaN.
  probe = {"a": jax.random.normal(key, (2, 64, 64)), "b": jnp.ones((2, 32, 128))}
  grads = [jax.tree.map(lambda x, s=s: (s + 1.0) * jnp.cos(x * (s + 2.0)) + 0.1 * s, probe)
           for s in range(3)]
  grads[1]["b"] = grads[1]["b"] * 1e3  # a large leaf changes nothing elsewhere if per slice
  grads[2]["b"] = grads[2]["b"].at[0, 0, 0].set(jnp.nan)

  def slice_update(g, state, params, i):
    # Random refreshes draw what the whole tree would for slice i, as in a fused step.
    with refresh_lib.keys_of_whole_tree(refresh_lib.KeyContext((0, 1), i)):
      return tx.update(g, state, params, **extra_args)

  # Compiled: two traces of the update run faster than its ops one by one.
  whole_update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra_args))
  slice_update = jax.jit(slice_update)
  try:
    whole_state = tx.init(probe)
    slice_state = jax.vmap(tx.init)(probe)
    whole, sliced = [], []
    for g in grads:
      u, whole_state = whole_update(g, whole_state, probe)
      whole.append(u)
      us = []
      for i in range(2):
        take = lambda t, i=i: jax.tree.map(lambda x: x[i], t)
        u_i, s_i = slice_update(take(g), take(slice_state), take(probe), jnp.int32(i))
        slice_state = jax.tree.map(lambda x, v, i=i: x.at[i].set(v), slice_state, s_i)
        us.append(u_i)
      sliced.append(jax.tree.map(lambda *xs: jnp.stack(xs), *us))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        "this optimizer cannot be run one layer slice at a time (on a probe it raised "
        f"{type(e).__name__}: {e}); fused steps need a per-slice update.") from e
  for u, v in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced)):
    if not np.allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-6, equal_nan=True):
      raise ValueError(_COUPLED)
  try:
    _PER_SLICE.add(tx.update)
  except TypeError:
    pass


def fused_init(tx: optax.GradientTransformation, params, layers: str = "layers",
               **extra_args) -> FusedState:
  """The optimizer state of a fused step: per-layer state for the stacked layers.

  Args:
    tx: the optimizer; its update of a layer's slice must depend on nothing
      else (see the module docstring). Checked here on a small probe.
    params: a dict holding the stacked layer tree under `layers` (every leaf
      with a leading layer axis) and the other parameters.
    layers: the key of the stacked layers in `params`.
    **extra_args: keyword arguments that ``tx.update`` needs (an
      `optax.GradientTransformationExtraArgs`, e.g. ``learning_rate=1e-3``),
      example values for the probe; the step takes the real ones.

  Returns:
    A `FusedState`.

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> params = {"layers": {"w": jnp.ones((4, 16, 16))}, "head": jnp.ones((16, 8))}
    >>> state = go.fused_init(go.galore_adamw(1e-3, rank=4), params)
    >>> state.layers[0].count.shape   # one GaLore step count per layer
    (4,)
  """
  stack, rest = _split(params, layers)
  _num_layers(stack)
  jax.eval_shape(tx.init, params)  # warns (ProjectionWarning) about the whole model, once
  with warnings.catch_warnings():  # ... and not about the probe or the model's parts
    warnings.simplefilter("ignore", inspection.ProjectionWarning)
    with jax.ensure_compile_time_eval():  # on concrete arrays, also under jit or eval_shape
      check_per_slice(tx, **extra_args)
    return FusedState(layers=jax.vmap(tx.init)(stack), rest=tx.init(rest),
                      notfinite_count=jnp.zeros([], jnp.int32),
                      total_notfinite=jnp.zeros([], jnp.int32))  # two buffers: each is donated


def _whole_tree_indices(params, layers: str):
  """The flat indices, in `params`, of the leaves of its layers and of the rest."""
  marked = dict(params)
  marked[layers] = jax.tree.map(lambda _: True, params[layers])
  for key in params:
    if key != layers:
      marked[key] = jax.tree.map(lambda _: False, params[key])
  flags = jax.tree.leaves(marked)
  return (tuple(i for i, f in enumerate(flags) if f),
          tuple(i for i, f in enumerate(flags) if not f))


def _sum_squares(tree) -> jax.Array:
  # Starts from a float32 zero, not sum()'s int 0, so that an empty tree also gives an array.
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             jnp.zeros([], jnp.float32))


def fused_scan_step(
    embed_fn: Callable[[Any, Any], jax.Array],
    layer_fn: Callable[[Any, jax.Array], jax.Array],
    head_fn: Callable[[Any, jax.Array, Any], jax.Array],
    tx: optax.GradientTransformation,
    layers: str = "layers",
    clip_norm: Optional[float] = None,
    skip_nonfinite: bool = False,
) -> Callable:
  """A training step whose optimizer update runs inside the backward scan.

  With `clip_norm` or `skip_nonfinite`, a first backward pass sums the
  squared gradients (the global norm needs every layer's gradient before the
  first update); it costs one more backward pass and no gradient memory.

  Args:
    embed_fn: ``embed_fn(rest, batch) -> h``, the input of the first layer.
    layer_fn: ``layer_fn(layer_params, h) -> h``, one layer on one slice of
      the stacked layer parameters.
    head_fn: ``head_fn(rest, h, batch) -> loss``, a scalar.
    tx: the optimizer (see `fused_init`).
    layers: the key of the stacked layers in the parameters.
    clip_norm: None, or clip the whole gradient to this global norm (in
      float32) before the updates, as `optax.clip_by_global_norm`.
    skip_nonfinite: if True, a step whose gradient holds a NaN or an infinity
      changes neither the parameters nor the optimizer state, and is counted
      in the state (`FusedState.notfinite_count`, `total_notfinite`), as
      `optax.apply_if_finite` does for the usual step.

  Returns:
    ``step(params, opt_state, batch, **extra_args) -> (params, opt_state,
    loss)``, with the state from `fused_init`; ``extra_args`` go to every
    ``tx.update`` (e.g. ``learning_rate=`` for an
    `optax.GradientTransformationExtraArgs`). Jit it and donate params and
    state.

  Example:
    >>> import jax, jax.numpy as jnp, galore_optax as go
    >>> params = {"layers": {"w": 0.1 * jnp.ones((3, 8, 8))}, "out": jnp.ones((8,))}
    >>> embed = lambda rest, x: x
    >>> layer = lambda p, h: jnp.tanh(h @ p["w"])
    >>> head = lambda rest, h, x: jnp.mean((h @ rest["out"]) ** 2)
    >>> tx = go.galore_adamw(1e-2, rank=2)
    >>> step = jax.jit(go.fused_scan_step(embed, layer, head, tx), donate_argnums=(0, 1))
    >>> params, state, loss = step(params, go.fused_init(tx, params), jnp.ones((4, 8)))
  """
  if clip_norm is not None and not (isinstance(clip_norm, numbers.Real) and clip_norm > 0):
    raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}.")
  if not isinstance(skip_nonfinite, (bool, np.bool_)):
    raise ValueError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}.")
  needs_norm = clip_norm is not None or bool(skip_nonfinite)

  def step(params, opt_state: FusedState, batch, **extra_args):
    if not isinstance(opt_state, FusedState):
      raise TypeError("the optimizer state of a fused step comes from go.fused_init(tx, params).")
    stack, rest = _split(params, layers)
    count = _num_layers(stack)
    layer_leaves, rest_leaves = _whole_tree_indices(params, layers)
    h0, embed_vjp = jax.vjp(lambda r: embed_fn(r, batch), rest)
    # The scans slice and write bf16 stacks (parameters, layer inputs, state) as raw bits:
    # XLA:CPU gives a loop that slices a bf16 stack a float32 copy of all of it, and writes a
    # layer's slice through one (LLaMA-1B: 4.7 GiB of float32 parameters). The forward scan
    # still gets a 16-bit copy of the parameter stacks (XLA hoists the bit cast out of it).
    layer_at = lambda tree, i: jax.tree.map(lambda x: tree_utils.read_slice(x, i), tree)

    def forward(h, i):  # keep each layer's input only
      return layer_fn(layer_at(stack, i), h), tree_utils.slicing_bits(h)

    h_last, input_bits = jax.lax.scan(forward, h0, jnp.arange(count))
    loss, head_vjp = jax.vjp(lambda r, h: head_fn(r, h, batch), rest, h_last)
    g_rest_head, g_h = head_vjp(jnp.ones_like(loss))

    def layer_grads(i, g_h, stack):
      p_i = layer_at(stack, i)
      _, layer_vjp = jax.vjp(layer_fn, p_i, tree_utils.from_bits(input_bits[i], h0.dtype))
      g_p, g_in = layer_vjp(g_h)
      return p_i, g_p, g_in

    scale, apply = 1.0, jnp.asarray(True)
    if needs_norm:
      def norm_body(carry, i):
        g_h, total = carry
        _, g_p, g_in = layer_grads(i, g_h, stack)
        return (g_in, total + _sum_squares(g_p)), None

      (g_h0, layer_sq), _ = jax.lax.scan(
          norm_body, (g_h, jnp.zeros([], jnp.float32)), jnp.arange(count), reverse=True)
      g_rest = jax.tree.map(jnp.add, g_rest_head, embed_vjp(g_h0)[0])
      norm = jnp.sqrt(layer_sq + _sum_squares(g_rest))
      if clip_norm is not None:
        scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
      if skip_nonfinite:
        apply = jnp.isfinite(norm)

    def update_body(carry, i):
      def work(operands):
        g_h, stack, layer_state = operands
        p_i, g_p, g_in = layer_grads(i, g_h, stack)
        g_p = jax.tree.map(lambda g: (g * scale).astype(g.dtype), g_p)
        s_i = layer_at(layer_state, i)
        # Random refreshes draw what they would for layer i of the whole tree.
        with refresh_lib.keys_of_whole_tree(refresh_lib.KeyContext(layer_leaves, i)):
          u, s_i = tx.update(g_p, s_i, p_i, **extra_args)
        p_i = optax.apply_updates(p_i, u)
        # A scatter of the bits, not `tree_utils.write_slice`'s dynamic-update-slice: XLA fuses
        # the two differently with the new weights, and float32 layers keep their numerics.
        bits = tree_utils.slicing_bits
        put = lambda full, part: jax.tree.map(
            lambda x, v: tree_utils.from_bits(bits(x).at[i].set(bits(v.astype(x.dtype))), x.dtype),
            full, part)
        return g_in, put(stack, p_i), put(layer_state, s_i)

      # The per-layer work sits in a conditional: a skipped step leaves
      # everything as it was, and without one (its predicate not a constant)
      # XLA:CPU copies the whole carry each iteration.
      return jax.lax.cond(jnp.logical_and(i >= 0, apply), work, lambda ops: ops, carry), None

    (g_h0, new_stack, layer_state), _ = jax.lax.scan(
        update_body, (g_h, stack, opt_state.layers), jnp.arange(count), reverse=True)

    def update_rest(operands):
      g_h0, rest, rest_state = operands
      g_rest = jax.tree.map(jnp.add, g_rest_head, embed_vjp(g_h0)[0])
      g_rest = jax.tree.map(lambda g: (g * scale).astype(g.dtype), g_rest)
      with refresh_lib.keys_of_whole_tree(refresh_lib.KeyContext(rest_leaves)):
        u, rest_state = tx.update(g_rest, rest_state, rest, **extra_args)
      return optax.apply_updates(rest, u), rest_state

    rest, rest_state = jax.lax.cond(apply, update_rest, lambda ops: ops[1:],
                                    (g_h0, rest, opt_state.rest))
    skipped = jnp.logical_not(apply).astype(jnp.int32)
    new_state = FusedState(
        layers=layer_state, rest=rest_state,
        notfinite_count=(opt_state.notfinite_count + 1) * skipped,
        total_notfinite=opt_state.total_notfinite + skipped)
    new_params = dict(rest)
    new_params[layers] = new_stack
    return {k: new_params[k] for k in params}, new_state, loss

  return step
