"""FRUGAL against the official code's trajectories, step for step.

tests/fixtures/frugal/ holds trajectories of the official GaloreAdamW (SVD subspace) and
CoordAdamW (random columns) of fzmushko/FRUGAL (recorded by tests/fixtures/frugal/record.py;
docs/frugal_reference.md): density 0.25, a change of subspace every 2 steps, s_p 0.5, s_i 0.3,
7 steps. With Adam reset at each change, the SVD cases do not depend on the signs of the
singular vectors, so the library's own SVD is compared with the recording (the first moments
up to the sign of each basis vector); the random columns come from torch's generator, so
their recorded choice is fed to the library's refresh.
"""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax import frugal
from galore_optax import frugal_blocks

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "frugal")
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)
BASIS = {"left": "u", "right": "vh"}


@functools.lru_cache(maxsize=None)
def fixtures():
  with open(os.path.join(FIXTURES, "trajectories.json")) as f:
    meta = json.load(f)
  return dict(np.load(os.path.join(FIXTURES, "trajectories.npz"))), meta


def make(projection, side, rule):
  h = fixtures()[1]["hyperparameters"]
  return go.frugal_adamw(
      h["lr"], density=h["density"], update_proj_gap=h["update_gap"], projection=projection,
      proj_type=side, b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
      weight_decay=h["weight_decay"], inactive_update_rule=rule,
      inactive_lr_scale=h["inactive_lr_scale"], proj_params_lr_scale=h["proj_params_lr_scale"],
      dimension_numbers=TORCH_LAYOUT)


def run(tx, init, grads):
  """Weights, stored basis and Adam moments after each step."""

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    galore = state[0].inner_states["subspace"].inner_state
    adam = galore.inner_state
    return (w, state), (w, next(iter(galore.projectors.values())), adam.mu, adam.nu)

  return jax.lax.scan(step, (init, tx.init(init)), grads)[1]


@functools.partial(jax.jit, static_argnames=("side", "rule"))
def run_svd(init, grads, side, rule):
  return run(make("svd", side, rule), init, grads)


def errors(ws, mus, nus, data, case, init, m_sign=1.0):
  params = data[f"{case}/params"]
  return {
      # the weights over the norm of their whole change; the moments over their largest entry
      "params": float(np.max(np.abs(ws - params[1:])) / np.linalg.norm(params[-1] - init)),
      "exp_avg": float(np.max(np.abs(m_sign * mus - data[f"{case}/exp_avg"]))
                       / np.max(np.abs(mus))),
      "exp_avg_sq": float(np.max(np.abs(nus - data[f"{case}/exp_avg_sq"])) / np.max(nus)),
  }


@pytest.mark.parametrize("shape", ("tall", "wide", "square"))
def test_svd_subspace_step_for_step(shape):
  data, meta = fixtures()
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  gap = meta["hyperparameters"]["update_gap"]
  worst = {}
  for side in ("left", "right"):
    for rule in ("sign_sgd", "sgd"):
      case = f"{shape}/svd/{side}/{rule}"
      ws, bases, mus, nus = map(np.asarray, run_svd(init, grads, side, rule))
      official = data[f"{case}/projectors"]
      # ±1 per basis vector (rows of Vh, columns of U), per change of subspace.
      axis = 1 if side == "right" else 0
      flips = np.stack([np.sign(np.sum(bases[t] * official[t // gap], axis=axis))
                        for t in range(len(grads))])
      m_sign = flips[:, None, :] if side == "right" else flips[:, :, None]
      worst[case] = errors(ws, mus, nus, data, case, init, m_sign)
  assert max(max(e.values()) for e in worst.values()) <= 1e-5, worst


def recorded_columns(indices, gap, n):
  """A refresh giving the official columns of the change at `step` (one-hot rows)."""

  def refresh(g, rank, sides, previous=None, key=None, *, step):
    del rank, sides, previous, key
    rows = jax.nn.one_hot(jnp.asarray(indices)[step // gap], n, dtype=jnp.float32)
    return {"vh": jnp.broadcast_to(rows, (g.shape[0],) + rows.shape)}

  refresh.reads_previous = False
  refresh.reads_step = True
  return refresh


@pytest.mark.parametrize("shape", ("tall", "wide", "square"))
def test_random_columns_step_for_step(shape, monkeypatch):
  data, meta = fixtures()
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  case = f"{shape}/random/columns/sign_sgd"
  indices = data[f"{case}/indices"]
  monkeypatch.setitem(frugal.PROJECTIONS, "random", recorded_columns(
      indices, meta["hyperparameters"]["update_gap"], init.shape[1]))
  ws, bases, mus, nus = map(np.asarray, jax.jit(
      lambda i, g: run(make("random", "right", "sign_sgd"), i, g))(init, grads))
  assert bases.shape[1] == indices.shape[1] == int(init.shape[1] * 0.25)  # ⌊n · density⌋
  err = errors(ws, mus, nus, data, case, init)
  assert max(err.values()) <= 1e-5, err


def test_random_columns_are_uniform_and_regenerable():
  """Our own draw: distinct columns, each column equally likely; stored = regenerated."""
  keys = jax.random.split(jax.random.key(3), 3000)
  bases = go.random_coordinates_refresh(jnp.zeros((3000, 5, 12)), 3, ("vh",), key=keys)["vh"]
  b = np.asarray(bases)
  assert np.all(b.sum(axis=-1) == 1) and np.all(b.sum(axis=-2) <= 1)  # 3 distinct columns
  frequency = b.sum(axis=(0, 1)) / (3000 * 3)  # each column chosen with probability 1/12
  assert np.all(np.abs(frequency - 1 / 12) <= 5 * np.sqrt(1 / 12 * 11 / 12 / 9000))
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((24, 40)), jnp.float32)}
  grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(4)]
  results = []
  for regenerate in (False, True):
    tx = go.frugal_adamw(1e-2, update_proj_gap=2, projection="random", proj_type="right",
                         regenerate_projector=regenerate)
    state, w, update = tx.init(params), params, jax.jit(tx.update)
    for g in grads:
      updates, state = update(g, state, w)
      w = optax.apply_updates(w, updates)
    results.append((w["w"], go.tree_bytes(state)))
  np.testing.assert_array_equal(np.asarray(results[0][0]), np.asarray(results[1][0]))
  assert results[1][1] < results[0][1]


def blocks_params(data, meta):
  """The fixture's module as a pytree: the projected group as a list in the official block
  order (so `jax.tree.leaves` walks it as the official code does), the rest by name."""
  model = meta["blocks_model"]
  take = lambda name: data[f"blocks/init/{name}"]
  return {"blocks": [take(n) for n in model["projected_group_in_block_order"]],
          "regular": {n: take(n) for n in model["regular_group"]}}


def blocks_grads(data, meta):
  model = meta["blocks_model"]
  take = lambda name: data[f"blocks/grads/{name}"]
  return {"blocks": [take(n) for n in model["projected_group_in_block_order"]],
          "regular": {n: take(n) for n in model["regular_group"]}}


@pytest.mark.parametrize("order, rule", (("descending", "sign_sgd"), ("random", "sgd")))
def test_blocks_step_for_step(order, rule):
  data, meta = fixtures()
  h, model = meta["hyperparameters"], meta["blocks_model"]
  case = f"blocks/{order}/{rule}"
  active = data[f"{case}/active"]
  # torch's CPU generator cannot be replayed: the random case is fed its recorded choices.
  block_order = order if order == "descending" else (
      lambda change, key, n, k: jnp.asarray(active)[change])
  tx = go.frugal_adamw(
      h["lr"], density=h["density"], update_proj_gap=h["update_gap"], projection="blocks",
      block_order=block_order, b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
      weight_decay=h["weight_decay"], inactive_update_rule=rule,
      inactive_lr_scale=h["inactive_lr_scale"], proj_params_lr_scale=h["proj_params_lr_scale"],
      projected=lambda p: {"blocks": [True] * len(p["blocks"]),
                           "regular": jax.tree.map(lambda _: False, p["regular"])})
  params, grads = blocks_params(data, meta), blocks_grads(data, meta)

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    return (w, state), (w, state[0].inner_states["subspace"].inner_state.slot)

  ws, slots = jax.jit(lambda p, g: jax.lax.scan(step, (p, tx.init(p)), g)[1])(params, grads)
  gap = h["update_gap"]
  # The active blocks: the official choice at each change.
  np.testing.assert_array_equal(np.asarray(slots)[::gap] >= 0, active)
  worst = 0.0
  names = model["projected_group_in_block_order"]
  for i, name in enumerate(names):
    official = data[f"{case}/params/{name}"]
    change = np.linalg.norm(official[-1] - official[0])
    worst = max(worst, float(np.max(np.abs(np.asarray(ws["blocks"][i]) - official[1:])) / change))
  for name in model["regular_group"]:
    official = data[f"{case}/params/{name}"]
    change = np.linalg.norm(official[-1] - official[0])
    worst = max(worst, float(np.max(np.abs(np.asarray(ws["regular"][name]) - official[1:]))
                             / change))
  assert worst <= 1e-5, worst


def test_block_orders_cover_every_tensor():
  """Fixed orders walk all N tensors in N/gcd(N, K) changes; random draws K distinct ones."""
  n, k = 12, 4
  for order in ("descending", "ascending", "mirror"):
    sets = np.stack([np.asarray(frugal_blocks.fixed_order_active(order, c, n, k))
                     for c in range(3)])
    assert np.all(sets.sum(axis=1) == k) and np.all(sets.sum(axis=0) == 1), (order, sets)
  desc = np.asarray(frugal_blocks.fixed_order_active("descending", 0, n, k))
  np.testing.assert_array_equal(np.flatnonzero(desc), [8, 9, 10, 11])  # the last first
  mirror = np.asarray(frugal_blocks.fixed_order_active("mirror", 1, n, k))
  np.testing.assert_array_equal(np.flatnonzero(mirror), [2, 3, 8, 9])
  params = [jnp.zeros((3, 2))] * 6 + [jnp.zeros((2, 5))] * 6
  tx = go.scale_by_frugal_blocks(density=1 / 3, update_proj_gap=1, block_order="random")
  state, counts = tx.init(params), np.zeros(12)
  update = jax.jit(tx.update)
  for _ in range(300):
    _, state = update(params, state)
    active = np.asarray(state.slot) >= 0
    assert active.sum() == 4
    counts += active
  # each tensor active with probability 1/3 per change
  assert np.all(np.abs(counts / 300 - 1 / 3) <= 5 * np.sqrt(1 / 3 * 2 / 3 / 300)), counts


def test_blocks_keep_moments_only_for_active_tensors():
  """State: slots for the most tensors of a shape active at once, not one per tensor."""
  layer = {"attn": {"q": jnp.zeros((64, 64)), "o": jnp.zeros((64, 64))},
           "mlp": {"up": jnp.zeros((64, 172)), "down": jnp.zeros((172, 64))}}
  params = {"layers": [layer] * 8}
  state = go.scale_by_frugal_blocks(density=0.25).init(params)
  # 32 tensors, K = 8 (two layers at a time, descending): 4 of each attention shape class
  # ((64, 64)), 2 of each MLP one.
  assert [m.shape[0] for m in state.mu] == [4, 2, 2]
  full = go.tree_bytes(optax.scale_by_adam().init(params))
  assert go.tree_bytes(state) <= full * 0.25 + 1024


def test_blocks_write_a_moment_slot_not_the_whole_buffer():
  """XLA:CPU has no bf16 dynamic-update-slice: it converts the whole buffer to float32, writes
  the slot and converts it all back, a pass over every slot for each tensor (LLaMA-1B-like:
  96 tensors of 1024², 24 slots: an update took 0.7 s, now 0.09 s). The slots are written as
  raw bits."""
  params = [jnp.zeros((64, 64), jnp.bfloat16) for _ in range(8)]
  tx = go.scale_by_frugal_blocks(density=0.5)
  state = tx.init(params)
  hlo = jax.jit(tx.update, donate_argnums=(0, 1)).lower(params, state).compile().as_text()
  writes = re.findall(r"= (\w+)\[4,64,64\]\S* dynamic-update-slice\(", hlo)
  assert len(writes) >= 2 * len(params), writes  # every tensor's first and second moment
  assert set(writes) == {"u16"}, writes


def test_frugal_refuses_what_it_does_not_do():
  # Which tensors are active is decided over the whole tree, not layer by layer.
  with pytest.raises(ValueError, match="FRUGAL's blocks"):
    go.fused_init(go.frugal_adamw(1e-3, projection="blocks"),
                  {"layers": {"w": jnp.zeros((2, 4, 4))}, "head": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match="proj_type"):
    go.frugal_adamw(1e-3, projection="blocks", proj_type="right")
  with pytest.raises(ValueError, match="block_order"):
    go.frugal_adamw(1e-3, block_order="random")
  with pytest.raises(ValueError, match="even"):
    go.frugal_adamw(1e-3, projection="blocks", block_order="mirror", density=0.5).init(
        [jnp.zeros((2, 2))] * 6)
  with pytest.raises(ValueError, match="columns"):
    go.frugal_adamw(1e-3, projection="random", proj_type="std")
  with pytest.raises(ValueError, match="inactive_update_rule"):
    go.frugal_adamw(1e-3, inactive_update_rule="same")
  with pytest.raises(ValueError, match="density"):
    go.frugal_adamw(1e-3, density=0.0)
