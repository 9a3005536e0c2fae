"""Moment realignment at a refresh (LDAdam's projection-aware Adam states)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import projection
from galore_optax.adam import scale_by_adam_hf
from galore_optax.adam_8bit import scale_by_adam_8bit
from galore_optax.realignment import MomentRealignment, _realign_adam
from galore_optax.transform import scale_by_galore

RNG = np.random.default_rng(0)


def orthonormal(m, r):
  return np.linalg.qr(RNG.standard_normal((m, r)))[0].astype(np.float32)


def ldadam_numpy(m, v, c_u, t, b1, b2):
  """LDAdam's rule written out for the output side: m' = C m, v' as in the paper."""
  c1, c2 = 1 - b1**t, 1 - b2**t
  new_m = c_u @ m
  new_v = c2 * np.abs((c_u * c_u) @ (v / c2 - m**2 / c1**2) + new_m**2 / c1**2)
  return new_m, new_v


def moments(shape):
  m = RNG.standard_normal(shape).astype(np.float32) * 0.1
  v = (m**2 + RNG.random(shape).astype(np.float32) * 0.01) * 0.5
  return m, v


@pytest.mark.parametrize("sides", [("u",), ("vh",), ("u", "vh")])
def test_identity_when_the_basis_does_not_change(sides):
  p = {"u": jnp.asarray(orthonormal(30, 4)), "vh": jnp.asarray(orthonormal(20, 4).T)}
  p = {side: p[side] for side in sides}
  c = projection.change_of_basis(p, p)
  shape = (4 if "u" in sides else 30, 4 if "vh" in sides else 20)
  m, v = moments(shape)
  new_m, new_v = _realign_adam(jnp.asarray(m), jnp.asarray(v), c, jnp.asarray(7), MomentRealignment())
  np.testing.assert_allclose(new_m, m, atol=1e-6)
  np.testing.assert_allclose(new_v, v, rtol=1e-4, atol=1e-8)


def test_rotation_inside_the_subspace_keeps_the_full_momentum():
  old = orthonormal(30, 4)
  rotation = orthonormal(4, 4)
  new = old @ rotation  # same subspace, rotated basis
  c = projection.change_of_basis({"u": jnp.asarray(new)}, {"u": jnp.asarray(old)})
  np.testing.assert_allclose(c["u"], rotation.T, atol=1e-6)
  m, v = moments((4, 20))
  t, config = 5, MomentRealignment(b1=0.9, b2=0.99)
  new_m, new_v = _realign_adam(jnp.asarray(m), jnp.asarray(v), c, jnp.asarray(t), config)
  # m' = C m, so the projected-back momentum is unchanged
  np.testing.assert_allclose(new @ np.asarray(new_m), old @ m, atol=1e-5)
  want_m, want_v = ldadam_numpy(m, v, rotation.T, t, config.b1, config.b2)
  np.testing.assert_allclose(new_m, want_m, atol=1e-6)
  np.testing.assert_allclose(new_v, want_v, rtol=1e-4, atol=1e-8)


def test_signed_permutation_permutes_both_moments():
  """Swapping (and flipping) basis vectors swaps the coordinates' statistics."""
  old = orthonormal(24, 3)
  perm = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], np.float32)
  new_vh = (old @ perm).T  # input side: Vh_new = (P_old perm)ᵀ
  c = projection.change_of_basis({"vh": jnp.asarray(new_vh)}, {"vh": jnp.asarray(old.T)})
  m, v = moments((10, 3))
  new_m, new_v = _realign_adam(jnp.asarray(m), jnp.asarray(v), c, jnp.asarray(3), MomentRealignment())
  np.testing.assert_allclose(new_m, m @ perm, atol=1e-6)
  np.testing.assert_allclose(new_v, v @ np.abs(perm), rtol=1e-4, atol=1e-8)


def two_direction_gradient(swap, noise_seed):
  """(out=32 × in=16) gradient with singular vectors a, b; `swap` reorders them."""
  rng = np.random.default_rng(noise_seed)
  left = np.linalg.qr(np.random.default_rng(1).standard_normal((32, 2)))[0]
  right = np.linalg.qr(np.random.default_rng(2).standard_normal((16, 2)))[0]
  s = [1.0, 3.0] if swap else [3.0, 1.0]
  g = (left * s) @ right.T + 1e-4 * rng.standard_normal((32, 16))
  return jnp.asarray(g.T, jnp.float32)  # Flax layout (in, out)


@pytest.mark.parametrize("inner_name", ["hf", "optax"])
def test_in_galore_a_swapped_subspace_maps_the_moments(inner_name):
  b1, b2 = 0.8, 0.95
  inner = scale_by_adam_hf(b1, b2) if inner_name == "hf" else optax.scale_by_adam(b1, b2)
  params = {"w": jnp.zeros((16, 32)), "b": jnp.zeros(3)}
  tx = scale_by_galore(
      rank=2, update_proj_gap=3, inner=inner, realign_moments=MomentRealignment(b1, b2)
  )
  plain = scale_by_galore(rank=2, update_proj_gap=3, inner=inner)
  step = jax.jit(tx.update)
  state = tx.init(params)
  grads = [two_direction_gradient(t >= 3, t) for t in range(4)]
  for t in range(3):
    _, state = step({"w": grads[t], "b": jnp.ones(3)}, state)
  # in=16 < out=32: the input side, low-rank moments (out, r) = (32, 2)
  old_vh = state.projectors["w"]["vh"]
  m_old, v_old = state.inner_state.mu["w"], state.inner_state.nu["w"]
  _, new_state = step({"w": grads[3], "b": jnp.ones(3)}, state)
  new_vh = new_state.projectors["w"]["vh"]
  c = np.asarray(new_vh @ old_vh.T)
  np.testing.assert_allclose(np.abs(c), [[0, 1], [1, 0]], atol=1e-3)  # the swap
  r_new = np.asarray(grads[3].T @ new_vh.T)  # this step's low-rank gradient
  want_m, want_v = ldadam_numpy(np.asarray(m_old).T, np.asarray(v_old).T, c, 3, b1, b2)
  np.testing.assert_allclose(
      new_state.inner_state.mu["w"], b1 * want_m.T + (1 - b1) * r_new, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
      new_state.inner_state.nu["w"], b2 * want_v.T + (1 - b2) * r_new**2, rtol=1e-4, atol=1e-7
  )
  # unprojected leaves and the schedule of the plain transform are untouched
  _, plain_state = jax.jit(plain.update)({"w": grads[3], "b": jnp.ones(3)}, state)
  chex.assert_trees_all_close(new_state.inner_state.mu["b"], plain_state.inner_state.mu["b"])
  assert not np.allclose(new_state.inner_state.mu["w"], plain_state.inner_state.mu["w"], atol=1e-3)


def test_lazy_quantized_realignment_under_jit_single_trace():
  params = {"w": jnp.zeros((2, 16, 32)), "b": jnp.zeros(3)}
  tx = scale_by_galore(
      rank=2, update_proj_gap=2, projector_bits=8, lazy_refresh=True,
      inner=optax.inject_hyperparams(optax.adam)(learning_rate=1.0), realign_moments=True,
  )
  traces = []

  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state)

  step = jax.jit(step)
  state0 = state = tx.init(params)
  for t in range(5):
    grads = {"w": jax.random.normal(jax.random.key(t), (2, 16, 32)), "b": jnp.ones(3)}
    updates, state = step(grads, state)
  assert len(traces) == 1
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "inner, match",
    [
        (optax.scale_by_lion(), "no Adam first and second moments"),
        (optax.chain(optax.scale_by_adam(), optax.scale_by_adam()), "more than one set"),
        (scale_by_adam_8bit(min_8bit_size=1), "quantized moments"),
    ],
)
def test_inners_that_cannot_be_realigned_raise_at_init(inner, match):
  tx = scale_by_galore(rank=2, inner=inner, realign_moments=True)
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.zeros((64, 96))})


def test_bad_realignment_argument():
  with pytest.raises(TypeError, match="realign_moments="):
    scale_by_galore(rank=2, realign_moments="ldadam")
  with pytest.raises(ValueError, match="realign_moments.b2"):
    scale_by_galore(rank=2, realign_moments=MomentRealignment(b2=1.0))


def _run(tx, params, steps=6):
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = params
  for t in range(steps):
    grads = {"w": jnp.asarray(RNG_STEPS[t]), "b": jnp.ones(6)}
    updates, state = step(grads, state, out)
    out = optax.apply_updates(out, updates)
  return out, state


RNG_STEPS = np.random.default_rng(7).standard_normal((6, 10, 6)).astype(np.float32)


def test_galore_adamw_takes_lazy_refresh_and_realignment_with_its_own_decays():
  import galore_optax as go

  params = {"w": jnp.ones((10, 6)), "b": jnp.zeros(6)}
  options = dict(rank=2, update_proj_gap=2, lazy_refresh=go.LazyRefresh(queue_size=2))
  alias = go.galore_adamw(1e-2, b1=0.8, b2=0.95, realign_moments=True, **options)
  manual = optax.chain(
      go.galore(b1=0.8, b2=0.95, realign_moments=go.MomentRealignment(0.8, 0.95), **options),
      optax.scale_by_learning_rate(1e-2),
  )
  plain = go.galore_adamw(1e-2, b1=0.8, b2=0.95, **options)
  got, state = _run(alias, params)
  want, _ = _run(manual, params)
  without, _ = _run(plain, params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got["w"], without["w"], atol=1e-6)  # realignment did act
  assert jax.tree.leaves(state[0].refresh_schedule)  # lazy schedules are in the state


@pytest.mark.parametrize("name", ["galore_adamw8bit", "galore_adafactor"])
def test_other_aliases_take_lazy_refresh(name):
  import galore_optax as go

  params = {"w": jnp.ones((10, 6)), "b": jnp.zeros(6)}
  tx = getattr(go, name)(1e-2, rank=2, update_proj_gap=2, lazy_refresh=True)
  _, state = _run(tx, params)
  galore_state = next(
      s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "refresh_schedule"))
      if hasattr(s, "refresh_schedule")
  )
  # Six steps at gap 2: refreshes at 0, 2 and 4 (the default queue of five
  # similarities is not full yet, so the gap has not grown).
  schedule = galore_state.refresh_schedule["w"]
  assert int(schedule.next_refresh) == 6 and int(schedule.gap) == 2
  assert int(schedule.filled) == 2
