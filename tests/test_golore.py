"""GoLore: the official golore_torch.AdamW's trajectories, and the random orthonormal bases.

tests/fixtures/golore/ holds trajectories of the official code (pkumelon/Golore,
recorded by tests/fixtures/golore/record.py; docs/golore_reference.md): 3 shapes ×
left/right × SVD, random and switching refreshes, 7 steps with refreshes at 0, 2, 4,
6. Its random bases come from torch's generator and its SVD signs from LAPACK, so
the step-for-step comparison feeds the recorded bases to the refresh (a refresh
function that reads the step); the library's own bases are checked separately.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "golore")
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)
SHAPES = ("tall", "wide", "square")
SIDES = ("left", "right")
PHASES = ("svd", "random", "switch")
BASIS = {"left": "u", "right": "vh"}  # the official (out, r) / (r, in) projector


@functools.lru_cache(maxsize=None)
def fixtures():
  with open(os.path.join(FIXTURES, "trajectories.json")) as f:
    meta = json.load(f)
  return dict(np.load(os.path.join(FIXTURES, "trajectories.npz"))), meta


def hyper():
  return fixtures()[1]["hyperparameters"]


def recorded_refresh(table, side, gap):
  """A refresh that returns the official basis of the refresh at `step`."""

  def refresh(g, rank, sides, previous=None, key=None, *, step):
    del rank, sides, previous, key
    basis = table[step // gap].astype(jnp.float32)
    return {BASIS[side]: jnp.broadcast_to(basis, (g.shape[0],) + basis.shape)}

  refresh.reads_previous = False
  refresh.reads_step = True
  return refresh


@functools.partial(jax.jit, static_argnames=("side", "persistent"))
def run_recorded(init, grads, table, side, persistent):
  """galore_adamw with the recorded bases and GoLore's first-moment transport.

  Built inside the trace, so every phase of a shape and side shares one compile.
  Returns the weights after each step and the stored moments.
  """
  h = hyper()
  tx = go.galore_adamw(
      h["lr"], rank=h["rank"], update_proj_gap=h["update_proj_gap"], scale=h["scale"],
      proj_type=side, b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
      weight_decay=h["weight_decay"], dimension_numbers=TORCH_LAYOUT,
      refresh=recorded_refresh(table, side, h["update_proj_gap"]),
      realign_moments=go.FirstMomentTransport(persistent=persistent))

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    inner = state[0].inner_state
    return (w, state), (w, inner.mu, inner.nu)

  _, (ws, mus, nus) = jax.lax.scan(step, (init, tx.init(init)), grads)
  return ws, mus, nus


def relative_to_change(got, want, start):
  """Largest entry error over the trajectory, relative to the norm of the whole change.

  The weights move by ~1e-3 over the run, so this is ~1e5 times stricter than
  the error relative to the weights (whose float32 round-off alone is ~1e-6 of
  the change here).
  """
  return float(np.max(np.abs(got - want)) / np.linalg.norm(want[-1] - start))


def relative_error(got, want):
  """Largest entry error relative to the largest entry (moments)."""
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", SIDES)
def test_official_adamw_step_for_step(shape, side):
  """go.FirstMomentTransport(persistent=False) is golore_torch.AdamW, every step."""
  data, _ = fixtures()
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  worst = {}
  for phase in PHASES:
    case = f"{shape}/{side}/{phase}"
    ws, mus, nus = run_recorded(init, grads, data[f"{case}/projectors"], side, False)
    params = data[f"{case}/params"]
    # Errors relative to the change of the weights (about 1e-3 per step), not to
    # the weights, so that a wrong update cannot hide behind a large weight.
    worst[phase] = max(
        relative_to_change(np.asarray(ws), params[1:], params[0]),
        relative_error(np.asarray(mus), data[f"{case}/exp_avg"]),
        relative_error(np.asarray(nus), data[f"{case}/exp_avg_sq"]),
    )
  assert max(worst.values()) <= 1e-5, worst


def replay_persistent(init, grads, table, side):
  """float64 NumPy: GoLore with the carried first moment stored (docs/golore_reference.md)."""
  h = hyper()
  b1, b2 = h["betas"]
  gap, lr, wd, eps, scale = (h["update_proj_gap"], h["lr"], h["weight_decay"], h["eps"],
                             h["scale"])
  w = init.astype(np.float64)
  p = m = v = None
  ws, ms = [], []
  for t, g in enumerate(grads.astype(np.float64)):
    if t % gap == 0:
      old, p = p, table[t // gap].astype(np.float64)
      if old is not None:
        m = p.T @ old @ m if side == "left" else m @ old @ p.T
    r = p.T @ g if side == "left" else g @ p.T
    if m is None:
      m, v = np.zeros_like(r), np.zeros_like(r)
    m = b1 * m + (1 - b1) * r
    v = b2 * v + (1 - b2) * r * r
    k = t + 1
    n = m / (np.sqrt(v) + eps)
    w = w - lr * np.sqrt(1 - b2**k) / (1 - b1**k) * scale * (p @ n if side == "left" else n @ p)
    w = w * (1 - lr * wd)
    ws.append(w)
    ms.append(m)
  return np.stack(ws), np.stack(ms)


@pytest.mark.parametrize("shape,side", [("tall", "right"), ("wide", "left"), ("square", "left")])
def test_persistent_transport_follows_the_recurrence(shape, side):
  """The default go.FirstMomentTransport() stores the carried moment (GoLore.py's path)."""
  data, _ = fixtures()
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  table = data[f"{shape}/{side}/switch/projectors"]
  ws, mus, _ = run_recorded(init, grads, table, side, True)
  want_w, want_m = replay_persistent(init, grads, table, side)
  assert relative_to_change(np.asarray(ws), want_w, init) <= 1e-5
  assert relative_error(np.asarray(mus), want_m) <= 1e-5
  # ... and that is not the official optimizer's trajectory: the two differ.
  official = data[f"{shape}/{side}/switch/params"][1:]
  assert relative_to_change(np.asarray(ws), official, init) > 1e-3


@functools.partial(jax.jit, static_argnames=("side", "random_from_step"))
def golore_bases(init, grads, side, random_from_step):
  """go.golore_adamw's own stored bases after each step."""
  h = hyper()
  tx = go.golore_adamw(
      h["lr"], rank=h["rank"], update_proj_gap=h["update_proj_gap"], proj_type=side,
      dimension_numbers=TORCH_LAYOUT, random_from_step=random_from_step)

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    return (optax.apply_updates(w, updates), state), state[0].projectors[BASIS[side]]

  return jax.lax.scan(step, (init, tx.init(init)), grads)[1]


def orthonormality_error(basis, side):
  q = basis if side == "left" else basis.T
  return float(np.max(np.abs(q.T @ q - np.eye(q.shape[1]))))


@pytest.mark.parametrize("shape,side", [("tall", "left"), ("wide", "right"), ("square", "right")])
def test_golore_switches_from_svd_to_random_orthonormal_bases(shape, side):
  """random_from_step=3: the refreshes at 0 and 2 are the official SVD bases (up to the
  signs of their vectors), those at 4 and 6 orthonormal and not the gradient's."""
  data, _ = fixtures()
  case = f"{shape}/{side}/switch"
  official = data[f"{case}/projectors"]
  assert data[f"{case}/refresh_random"].tolist() == [False, False, True, True]
  bases = np.asarray(golore_bases(data[f"{shape}/init"], data[f"{shape}/grads"], side, 3))
  vector_axis = 0 if side == "left" else 1  # u's columns, vh's rows
  for j, t in enumerate(data[f"{case}/refresh_steps"]):
    ours = bases[t]
    assert orthonormality_error(ours, side) <= 1e-5
    overlap = np.abs(np.sum(ours * official[j], axis=vector_axis))  # |cos| per vector
    if j < 2:
      assert np.all(overlap >= 1 - 1e-5), (t, overlap)
    else:
      assert np.all(overlap < 0.9), (t, overlap)  # a draw, not the leading vectors
    if t + 1 < len(bases):
      np.testing.assert_array_equal(bases[t + 1], ours)  # kept until the next refresh
  assert not np.array_equal(bases[4], bases[6])  # each refresh draws anew


@pytest.mark.parametrize("side,m,n", [("u", 8, 20), ("vh", 20, 8)])
def test_random_orthonormal_bases_are_uniform(side, m, n):
  """Orthonormal to round-off; E[P Pᵀ] = (r/d) I and E[P] = 0 over 4000 keys."""
  rank, draws = 2, 4000
  keys = jax.random.split(jax.random.key(7), draws)
  bases = go.random_orthonormal_refresh(
      jnp.zeros((draws, m, n)), rank, (side,), key=keys)[side]
  p = np.asarray(bases if side == "u" else jnp.swapaxes(bases, -1, -2), np.float64)
  d = p.shape[1]
  gram = np.einsum("bdr,bds->brs", p, p)
  assert np.max(np.abs(gram - np.eye(rank))) <= 2e-6
  # Each sample mean within 5 of its standard errors of the expectation (a
  # basis that favoured coordinates, or a sign, would be off by 10-100).
  within = lambda samples, expected: np.all(
      np.abs(samples.mean(0) - expected) <= 5 * samples.std(0) / np.sqrt(draws) + 1e-12)
  assert within(np.einsum("bdr,ber->bde", p, p), rank / d * np.eye(d))
  assert within(p, 0.0)
  # Same key, same basis; the gradient is never read.
  again = go.random_orthonormal_refresh(
      jnp.ones((draws, m, n)), rank, (side,), key=keys)[side]
  np.testing.assert_array_equal(np.asarray(again), np.asarray(bases))


def test_regenerated_bases_are_the_stored_ones():
  """random_from_step=0 with regenerate_projector: no bases stored, same updates."""
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((24, 40)), jnp.float32)}
  grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(5)]
  results = []
  for regenerate in (False, True):
    tx = go.golore_adamw(1e-2, rank=4, update_proj_gap=2, regenerate_projector=regenerate)
    state, w, update = tx.init(params), params, jax.jit(tx.update)
    for g in grads:
      updates, state = update(g, state, w)
      w = optax.apply_updates(w, updates)
    results.append((w["w"], state))
  np.testing.assert_array_equal(np.asarray(results[0][0]), np.asarray(results[1][0]))
  assert go.tree_bytes(results[1][1]) < go.tree_bytes(results[0][1])


def test_golore_refuses_what_cannot_apply():
  params = {"w": jnp.zeros((16, 8))}
  with pytest.raises(ValueError, match="regenerate_projector=True needs a data-independent"):
    go.golore_adamw(1e-3, random_from_step=5, regenerate_projector=True).init(params)
  with pytest.raises(ValueError, match="random_from_step"):
    go.golore_adamw(1e-3, random_from_step=-1)
  with pytest.raises(TypeError, match="persistent must be a bool"):
    go.golore_adamw(1e-3, realign_moments=go.FirstMomentTransport(persistent="yes"))
  with pytest.raises(ValueError, match="realign_moments: .*cannot be rotated"):
    go.scale_by_galore(4, inner=go.scale_by_adam_8bit(min_8bit_size=1),
                       realign_moments=go.FirstMomentTransport()).init(params)
