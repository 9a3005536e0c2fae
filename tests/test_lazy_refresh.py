"""Lazy (layer-adaptive, Q-GaLore) refresh: per-matrix gaps that grow when settled."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import schedules
from galore_optax.schedules import LazyRefresh
from galore_optax.transform import scale_by_galore

_rng = np.random.default_rng(0)
LEFT = np.linalg.qr(_rng.standard_normal((48, 2)))[0]
RIGHT = np.linalg.qr(_rng.standard_normal((24, 2)))[0].T


def gradient(t, settled):
  """A Flax-layout (in=24, out=48) gradient: fixed singular vectors + noise, or noise."""
  noise = np.random.default_rng(1000 + t).standard_normal((24, 48)).astype(np.float32)
  if not settled:
    return jnp.asarray(noise)
  g = (LEFT * [10.0, 5.0]) @ RIGHT  # (out × in); out >= in keeps the input side
  return jnp.asarray(g.T + 0.01 * noise, jnp.float32)


def run(tx, params, grads_for, steps):
  state = tx.init(params)
  step = jax.jit(tx.update)
  history = []
  for t in range(steps):
    _, state = step(grads_for(t), state)
    history.append(jax.tree.map(np.asarray, state))
  return state, history


def changed_steps(history, get):
  seen = [get(s) for s in history]
  return [t for t in range(1, len(seen)) if not np.array_equal(seen[t], seen[t - 1])]


CONFIG = LazyRefresh(queue_size=2, threshold=0.9, gap_growth=2.0)


def test_gap_grows_only_where_the_leading_vector_is_stable():
  params = {"settled": jnp.zeros((24, 48)), "moving": jnp.zeros((24, 48))}
  grads_for = lambda t: {
      "settled": gradient(t, True),
      "moving": gradient(t, False),
  }
  tx = scale_by_galore(rank=2, update_proj_gap=2, lazy_refresh=CONFIG)
  state, history = run(tx, params, grads_for, 20)
  sched = state.refresh_schedule
  # settled: refreshes at 0, 2 (first similarity), 4 (queue full: gap 2 -> 4,
  # next at 8), 8 (gap 8, next 16), 16 (gap 16, next 32)
  assert int(sched["settled"].gap) == 16
  assert int(sched["settled"].next_refresh) == 32
  assert changed_steps(history, lambda s: s.projectors["settled"]["vh"]) == [2, 4, 8, 16]
  assert float(jnp.min(sched["settled"].similarities)) > 0.99
  # moving: fresh noise every refresh, the gap stays
  assert int(sched["moving"].gap) == 2
  assert int(sched["moving"].next_refresh) == 20
  assert changed_steps(history, lambda s: s.projectors["moving"]["vh"]) == list(range(2, 20, 2))
  assert float(jnp.max(sched["moving"].similarities)) < 0.9


def test_stacked_slices_keep_their_own_gaps():
  params = {"w": jnp.zeros((2, 24, 48))}
  grads_for = lambda t: {
      "w": jnp.stack([gradient(t, True), gradient(t, False)])
  }
  tx = scale_by_galore(rank=2, update_proj_gap=2, lazy_refresh=CONFIG, projector_bits=8)
  state, history = run(tx, params, grads_for, 10)
  # slice 0 refreshes at 0, 2, 4 (gap 4), 8 (gap 8); slice 1 every 2 steps
  np.testing.assert_array_equal(state.refresh_schedule["w"].gap, [8, 2])
  np.testing.assert_array_equal(state.refresh_schedule["w"].next_refresh, [16, 10])
  codes = lambda i: (lambda s: s.projectors["w"]["vh"].codes[i])
  assert changed_steps(history, codes(0)) == [2, 4, 8]
  assert changed_steps(history, codes(1)) == [2, 4, 6, 8]


def test_max_gap_caps_growth():
  params = {"w": jnp.zeros((24, 48))}
  config = LazyRefresh(queue_size=1, threshold=0.9, gap_growth=3.0, max_gap=5)
  tx = scale_by_galore(rank=2, update_proj_gap=2, lazy_refresh=config)
  state, _ = run(tx, params, lambda t: {"w": gradient(t, True)}, 12)
  # refreshes at 0, 2 (gap 2 -> 5), 7 (stays 5), next at 12
  assert int(state.refresh_schedule["w"].gap) == 5
  assert int(state.refresh_schedule["w"].next_refresh) == 12


def test_unreachable_threshold_reproduces_the_fixed_schedule():
  params = {"w": jnp.zeros((2, 40, 24)), "b": jnp.zeros(3)}

  def grads_for(t):
    keys = jax.random.split(jax.random.key(t), 2)
    return {k: jax.random.normal(kk, x.shape) for (k, x), kk in zip(params.items(), keys)}

  fixed = scale_by_galore(rank=3, update_proj_gap=2)
  lazy = scale_by_galore(
      rank=3, update_proj_gap=2, lazy_refresh=LazyRefresh(queue_size=1, threshold=1.0)
  )
  sf, sl = fixed.init(params), lazy.init(params)
  assert sf.refresh_schedule == optax.EmptyState()
  fixed_step, lazy_step = jax.jit(fixed.update), jax.jit(lazy.update)
  for t in range(5):
    uf, sf = fixed_step(grads_for(t), sf)
    ul, sl = lazy_step(grads_for(t), sl)
    chex.assert_trees_all_close(uf, ul, atol=1e-6)
  chex.assert_trees_all_close(sf.projectors, sl.projectors, atol=1e-6)


def test_advance_lazy_state_window_mean():
  config = LazyRefresh(queue_size=2, threshold=0.5)
  state = schedules.init_lazy_state((3,), 10, config)
  advance = jax.jit(lambda s, due, sim, step: schedules.advance_lazy_state(s, due, sim, step, config))
  due = jnp.array([True, True, False])
  state = advance(state, due, jnp.full(3, 0.9), 0)
  # first refresh: nothing compared yet, next refresh one gap later
  np.testing.assert_array_equal(state.filled, [0, 0, 0])
  np.testing.assert_array_equal(state.next_refresh, [10, 10, 0])
  state = advance(state, due, jnp.array([0.9, 0.2, 0.9]), 10)
  state = advance(state, due, jnp.array([0.3, 0.9, 0.9]), 20)
  # queues [0.9, 0.3] (mean 0.6, grows) and [0.2, 0.9] (0.55, grows); the
  # third matrix was never due
  np.testing.assert_allclose(state.similarities[:2], [[0.9, 0.3], [0.2, 0.9]])
  np.testing.assert_array_equal(state.gap, [20, 20, 10])
  np.testing.assert_array_equal(state.next_refresh, [40, 40, 0])
  state = advance(state, due, jnp.array([0.1, 0.9, 0.9]), 40)
  # [0.3, 0.1] -> mean 0.2 stays; [0.9, 0.9] grows again
  np.testing.assert_array_equal(state.gap, [20, 40, 10])


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("yes", TypeError, "lazy_refresh='yes'"),
        (LazyRefresh(queue_size=0), ValueError, "queue_size"),
        (LazyRefresh(gap_growth=0.5), ValueError, "gap_growth"),
        (LazyRefresh(threshold=2.0), ValueError, "threshold"),
        (LazyRefresh(max_gap=0), ValueError, "max_gap"),
    ],
)
def test_bad_lazy_refresh(value, error, match):
  with pytest.raises(error, match=match):
    scale_by_galore(rank=2, lazy_refresh=value)
