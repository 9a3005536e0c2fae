"""FRUGAL's blocks: Adam on a few whole tensors at a time, a state-free rule on the rest.

The official BlockAdamW (BAdam-like): of the N tensors it is given, K =
round(N · density) are *active* — Adam on the whole tensor, its moments
fresh at each change — and the others get signSGD or SGD with no state. Every
`update_proj_gap` steps another K become active, in an order: "descending"
(the official pre-training scripts: the last tensors first, so the top layers
first), "ascending", "mirror" (K/2 from the front and their mirror images from
the back) or "random".

Moments exist only for the active tensors: a tensor's moments live in a slot
of a buffer shared by the tensors of its shape and dtype, (S, *shape), with S
the most tensors of that class ever active at once (known in advance for the
fixed orders; min(K, class size) for random ones). Which slot a tensor uses
(−1: inactive) is state, so the choice is traced and one program serves every
change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.core  # `jax` imports it but does not bind the name for type checkers
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import axis_specs
from galore_optax import tree_utils
from galore_optax import validation
from galore_optax.options import AdamOptions
from galore_optax.outputs import INACTIVE_RULES
from galore_optax.sharding import public

BLOCK_ORDERS = ("descending", "ascending", "mirror", "random")
# An order of one's own: (change index, key, N, K) -> bool[N] with at most K True.
BlockOrderFn = Callable[[jax.Array, jax.Array, int, int], jax.Array]


class FrugalBlocksState(NamedTuple):
  """State of `scale_by_frugal_blocks`.

  Attributes:
    count: steps taken.
    kappa: Adam steps since the last change (bias correction restarts at 1).
    slot: int32 (N,), the moment slot of each tensor in its class, −1 inactive.
    mu: first moments, one (S, *shape) buffer per class of equal shape and dtype
      (classes never active, S = 0, have none).
    nu: second moments, likewise.
    key: the key random orders draw from (folded with the change index).
  """

  count: jax.typing.ArrayLike
  kappa: jax.Array
  slot: jax.Array
  mu: tuple
  nu: tuple
  key: jax.Array


def num_active(n: int, density: float) -> int:
  """K = round(N · density), Python's round as the official code."""
  return int(round(n * density))


def fixed_order_active(order: str, change: Any, n: int, k: int, xp=jnp):
  """The tensors active after change number `change` (0-based) of a fixed order: bool (N,).

  The official `next_block_start` arithmetic in closed form: descending
  starts at N − 1 and steps back by K, ascending starts at 0 and steps on by
  K, mirror takes K/2 from the front half at 0, K/2, … and their mirrors.
  `xp` is jnp (traced) or np (for the slot counts, in advance).
  """
  i = xp.arange(n)
  if order == "descending":
    start = (n - 1 - change * k) % n
    return (start - i) % n < k
  if order == "ascending":
    start = (change * k) % n
    return (i - start) % n < k
  half = n // 2
  start = (change * (k // 2)) % half
  front = ((i - start) % half < k // 2) & (i < half)
  mirrored = ((n - 1 - i - start) % half < k // 2) & (n - 1 - i < half)
  return front | mirrored


def _classes(leaves) -> list[list[int]]:
  """Indices of the tensors of each (shape, dtype), in order of first appearance."""
  groups: dict = {}
  for i, leaf in enumerate(leaves):
    groups.setdefault((tuple(leaf.shape), jnp.dtype(leaf.dtype)), []).append(i)
  return list(groups.values())


def _slot_counts(order, classes, n: int, k: int) -> list[int]:
  """S per class: the most tensors of a class active at once over a whole period."""
  if not k:
    return [0] * len(classes)
  if not isinstance(order, str) or order == "random":
    return [min(k, len(c)) for c in classes]
  step = k // 2 if order == "mirror" else k
  modulus = n // 2 if order == "mirror" else n
  period = modulus // math.gcd(modulus, step) if step else 1
  sets = [fixed_order_active(order, c, n, k, xp=np) for c in range(period)]
  return [max(int(s[idx].sum()) for s in sets) for idx in classes]


def _slots(leaf, count: int) -> jax.Array:
  """Zero moments for `count` tensors like `leaf`, each slot sharded as the leaf is."""
  shape = (count,) + tuple(leaf.shape)
  layout = axis_specs.layout_of(leaf)
  spec = layout and layout.derive(shape, ((),) + tuple(layout.entries), frozen=(0,))
  return axis_specs.zeros(shape, leaf.dtype, layout, spec)


def _accumulate(buffer, at, reset, decay, x):
  """(`buffer` with slot `at` set to decay · slot + (1 − decay) · x, the new slot).

  The slot reads as zero if `reset`. XLA:CPU writes a slot in place, a pass
  over that slot alone, only if the write is all its fusion does with the
  buffer (so the new slot is made apart, behind a barrier) and, for bf16,
  only as raw bits (`tree_utils.write_slice`).
  """
  current = jax.lax.dynamic_index_in_dim(buffer, at, keepdims=False)
  old = jnp.where(reset, 0.0, current.astype(jnp.float32))
  new = jax.lax.optimization_barrier((decay * old + (1 - decay) * x).astype(buffer.dtype))
  return tree_utils.write_slice(buffer, new[None], at), new


@public
def scale_by_frugal_blocks(
    density: float = 0.25,
    update_proj_gap: int = 200,
    block_order: Union[str, BlockOrderFn] = "descending",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    inactive_update_rule: str = "sign_sgd",
    inactive_lr_scale: float = 1.0,
    proj_params_lr_scale: float = 1.0,
    seed: int = 0,
) -> optax.GradientTransformation:
  """FRUGAL's block direction on every leaf it is given, without the learning rate.

  At 0-based steps 0, T, 2T, … (T = `update_proj_gap`) K = round(N ·
  density) of the N leaves become active, their moments zero and their bias
  correction restarted. An active leaf's direction is s_p · Adam(G) (torch's
  eps, after the bias correction), an inactive one's s_p · s_i · φ(G), φ = sign
  or the identity. The leaves are taken in `jax.tree.leaves` order, which is
  the order `block_order` walks.

  Args:
    density: the fraction of the leaves active at a time (K = round(N · density)).
    update_proj_gap: steps between changes.
    block_order: "descending", "ascending", "mirror" (K even) or "random";
      or a function (change index, key, N, K) -> bool (N,) with at most K True.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v̂, after the bias correction.
    inactive_update_rule: "sign_sgd" or "sgd".
    inactive_lr_scale: s_i.
    proj_params_lr_scale: s_p.
    seed: the key of the random order.

  Returns:
    An `optax.GradientTransformation` with a `FrugalBlocksState`.

  References:
    Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training, ICML 2025. https://arxiv.org/abs/2411.07837

  Example:
    >>> import jax.numpy as jnp, galore_optax as go
    >>> layers = [{"q": jnp.ones((8, 8)), "up": jnp.ones((8, 32))} for _ in range(4)]
    >>> tx = go.scale_by_frugal_blocks(density=0.25, update_proj_gap=100)
    >>> state = tx.init(layers)   # K = 2 of 8 tensors: the last layer's two first
    >>> [m.shape for m in state.mu]
    [(1, 8, 8), (1, 8, 32)]
    >>> _, state = tx.update(layers, state)
    >>> state.slot.tolist()
    [-1, -1, -1, -1, -1, -1, 0, 0]
  """
  if not callable(block_order):
    validation.choice(block_order, "block_order", BLOCK_ORDERS)
  validation.choice(inactive_update_rule, "inactive_update_rule", INACTIVE_RULES)
  gap = validation.positive_int(update_proj_gap, "update_proj_gap")
  if isinstance(density, jax.core.Tracer):
    raise TypeError("density sets how many moment slots there are: a static Python float "
                    "(with optax.inject_hyperparams: static_args=('density',)).")
  density = float(validation.real(density, "density", low=0.0, high=1.0))
  validation.real(inactive_lr_scale, "inactive_lr_scale", low=0.0)
  AdamOptions(b1=b1, b2=b2, eps=eps)  # validates them

  def plan(leaves):
    n = len(leaves)
    k = num_active(n, density)
    if block_order == "mirror" and k % 2:
      raise ValueError(
          f"block_order='mirror' takes K/2 tensors from each end, so K = round(N · density) "
          f"must be even: N = {n} tensors at density {density} give K = {k}; choose a "
          "density that makes it even, or another block_order.")
    classes = _classes(leaves)
    return n, k, classes, _slot_counts(block_order, classes, n, k)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    _, _, classes, slots = plan(leaves)
    # A class never active has no buffer (zero-size arrays do not checkpoint).
    zeros = tuple(_slots(leaves[c[0]], s) for c, s in zip(classes, slots) if s)
    return FrugalBlocksState(
        count=jnp.zeros([], jnp.int32), kappa=jnp.zeros([], jnp.int32),
        slot=jnp.full((len(leaves),), -1, jnp.int32), mu=zeros,
        nu=jax.tree.map(jnp.zeros_like, zeros),
        key=jax.random.key_data(jax.random.key(seed)))

  def choose(state, n, k, classes):
    """Slots after a change: the active tensors of each class numbered 0, 1, …"""
    change = state.count // gap
    if callable(block_order):
      active = block_order(change, state.key, n, k)
    elif block_order == "random":
      key = jax.random.fold_in(jax.random.wrap_key_data(state.key), change)
      active = jnp.zeros((n,), bool).at[jax.random.permutation(key, n)[:k]].set(True)
    else:
      active = fixed_order_active(block_order, change, n, k)
    slot = jnp.full((n,), -1, jnp.int32)
    for idx in classes:
      on = active[jnp.asarray(idx)]
      slot = slot.at[jnp.asarray(idx)].set(jnp.where(on, jnp.cumsum(on) - 1, -1))
    return slot

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    n, k, classes, slots = plan(leaves)
    changing = state.count % gap == 0
    slot = jnp.where(changing, choose(state, n, k, classes), state.slot) if k else state.slot
    kappa = jnp.where(changing, 0, state.kappa) + 1
    t = kappa.astype(jnp.float32)
    correction1, correction2 = 1 - b1**t, 1 - b2**t
    out = list(leaves)
    mus, nus = list(state.mu), list(state.nu)

    def state_free(g):
      x = g.astype(jnp.float32)
      free = x if inactive_update_rule == "sgd" else jnp.sign(x)
      return (proj_params_lr_scale * inactive_lr_scale * free).astype(g.dtype)

    def adam_in_slot(mu, nu, g, at):
      # Moments read as zero on a change: the slot's last owner may be another tensor.
      x = g.astype(jnp.float32)
      mu, m = _accumulate(mu, at, changing, b1, x)
      nu, v = _accumulate(nu, at, changing, b2, x * x)
      # The moments as stored (torch's Adam too).
      m, v = m.astype(jnp.float32), v.astype(jnp.float32)
      adam = (m / correction1) / (jnp.sqrt(v / correction2) + eps)
      return mu, nu, (proj_params_lr_scale * adam).astype(g.dtype)

    buffer = 0  # the buffers of the classes with slots, in class order
    for c, idx in enumerate(classes):
      b = buffer
      buffer += bool(slots[c])
      # The writes to a class's buffers form a chain (which tensor owns a slot is traced),
      # walked from the last leaf, the order a backward pass makes gradients in. Each tensor's
      # step is a conditional: an inactive one's leaves the buffers as they are, and an
      # active one's writes its slot in place (fused writes and reads of a slot, or a select
      # between the written buffer and the old one, are passes over, or copies of, the whole
      # buffer on XLA:CPU).
      for i in reversed(idx):
        if slots[c]:
          mus[b], nus[b], out[i] = jax.lax.cond(
              slot[i] >= 0, adam_in_slot, lambda mu, nu, g, at: (mu, nu, state_free(g)),
              mus[b], nus[b], leaves[i], jnp.maximum(slot[i], 0))
        else:
          out[i] = state_free(leaves[i])
    new_state = FrugalBlocksState(
        count=optax.safe_increment(state.count), kappa=kappa, slot=slot, mu=tuple(mus),
        nu=tuple(nus), key=state.key)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)
