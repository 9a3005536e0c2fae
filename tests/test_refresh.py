"""Projector refresh methods: exact SVD, randomized range finder, warm power iteration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import galore_optax as go
from galore_optax import projection

METHODS = {"svd": go.svd_refresh, "randomized": go.randomized_refresh(), "power": go.power_refresh()}


def gapped_matrix(batch, m, n, rank, seed=0, gap=100.0):
  """A stack of matrices whose spectrum drops by `gap` after `rank` values."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  out = []
  for _ in range(batch):
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = np.where(np.arange(k) < rank, 1.0 + rng.random(k), rng.random(k) / gap)
    out.append((u * s) @ v.T)
  return jnp.asarray(np.stack(out), jnp.float32)


def captured(g, bases):
  return float(jnp.sum(projection.project(g, bases) ** 2) / jnp.sum(g**2))


ZEROS = lambda b, m, n, r: {"u": jnp.zeros((b, m, r)), "vh": jnp.zeros((b, r, n))}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("m,n", [(40, 24), (24, 40)])
def test_orthonormal_canonical_and_energy(method, m, n):
  r = 6
  g = gapped_matrix(3, m, n, r)
  key = jax.random.key(0)
  bases = jax.jit(lambda g, p: METHODS[method](g, r, ("u", "vh"), p, key))(g, ZEROS(3, m, n, r))
  exact = go.svd_refresh(g, r, ("u", "vh"))
  u, vh = bases["u"], bases["vh"]
  eye = np.broadcast_to(np.eye(r), (3, r, r))
  np.testing.assert_allclose(jnp.swapaxes(u, -1, -2) @ u, eye, atol=1e-5)
  np.testing.assert_allclose(vh @ jnp.swapaxes(vh, -1, -2), eye, atol=1e-5)
  np.testing.assert_array_equal(go.canonical_signs(u, axis=-2), u)
  np.testing.assert_array_equal(go.canonical_signs(vh, axis=-1), vh)
  for side in ("u", "vh"):
    one = {side: bases[side]}
    assert captured(g, one) >= 0.999 * captured(g, {side: exact[side]})
  # With a spectral gap the fast methods find the exact vectors (same signs).
  np.testing.assert_allclose(u, exact["u"], atol=2e-3)
  np.testing.assert_allclose(vh, exact["vh"], atol=2e-3)


@pytest.mark.parametrize("side", ["u", "vh"])
def test_warm_start_equals_cold_when_subspace_does_not_move(side):
  r = 5
  g = gapped_matrix(2, 30, 20, r, seed=3)
  exact = go.svd_refresh(g, r, (side,))
  warm = go.power_refresh()(g, r, (side,), exact, jax.random.key(1))
  cold = go.power_refresh()(g, r, (side,), {side: jnp.zeros_like(exact[side])}, jax.random.key(1))
  np.testing.assert_allclose(warm[side], exact[side], atol=1e-4)
  np.testing.assert_allclose(cold[side], exact[side], atol=1e-3)


@pytest.mark.parametrize("method", ["randomized", "power"])
def test_in_galore_under_jit_with_stable_shapes(method):
  params = {
      "a": jnp.zeros((16, 24)), "b": jnp.zeros((16, 24)), "stack": jnp.zeros((3, 16, 24)),
      "bias": jnp.zeros(24),
  }
  tx = go.galore_adamw(1e-2, rank=4, update_proj_gap=2, refresh=method)
  state0 = state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(5):
    grads = {k: jax.random.normal(jax.random.key(t), v.shape) for k, v in params.items()}
    updates, state = step(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)


def test_refresh_callable_and_bad_name():
  tx = go.scale_by_galore(rank=2, refresh=go.randomized_refresh(oversample=4, power_iters=2))
  tx.update({"w": jnp.ones((8, 6))}, tx.init({"w": jnp.ones((8, 6))}))
  with pytest.raises(ValueError, match="refresh='qr' is unknown"):
    go.scale_by_galore(refresh="qr")
