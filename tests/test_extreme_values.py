"""Extreme but finite gradients never make the weights non-finite (issue 20).

Every optimizer runs a few steps (a projector refresh at steps 0, 2 and 4)
on gradients of 1e30 and ±1e38 (whose squares, and the sums in projections
and norms, overflow float32), of 1e-38 and 1e-45 (subnormal: flushed to zero
on CPU) and on ordinary gradients with one huge entry. The weights must stay
finite, move by a bounded amount per step and never go uphill; with one huge
entry, the ordinary entries must still train.

Where v = g² overflows, Adam's update m/√v is 0, as in `optax.adamw` (its
update there is also 0): the bound below allows that, and a better update.

Integer hyperparameters beyond int32 are a ValueError at construction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from galore_optax import projection
from galore_optax import quantization
from galore_optax import refresh as refresh_lib
from galore_optax import validation
from examples import optimizers as registry

LR = 1e-3
STEPS = 5
GAP = 2  # refreshes at steps 0, 2, 4
# Adam-type steps are about lr per entry; Fira's first (unlimited) residual
# step and 8-bit rounding reach ~7 lr.
STEP_BOUND = 10 * LR
F32_MAX = float(np.finfo(np.float32).max)

# Rank 32 makes the low-rank moments of the (128, 64) matrix 4096 entries: 8-bit. Every
# optimizer of the library (the repository's registry), GaLore's other refreshes and go.galore.
OPTIMIZERS = {
    **{spec.name: functools.partial(registry.call_factory, spec.name, LR,
                                    rank=32 if spec.eight_bit else 8, update_proj_gap=GAP)
       for spec in registry.library()},
    "galore_adamw_randomized": lambda: go.galore_adamw(
        LR, rank=8, update_proj_gap=GAP, refresh="randomized"),
    "galore_adamw_power": lambda: go.galore_adamw(LR, rank=8, update_proj_gap=GAP, refresh="power"),
    "coap_adamw_restore_state": lambda: go.coap_adamw(
        LR, rank=8, update_proj_gap=GAP, reproject_factor=2, restore_state=True),
    "galore_chain": lambda: optax.chain(
        go.galore(rank=8, update_proj_gap=GAP), optax.scale_by_learning_rate(LR)),
}
EIGHT_BIT = tuple(spec.name for spec in registry.library() if spec.eight_bit)

# One factor ‖N‖/‖R‖ per matrix: with a huge entry it is ~1e-38 even in exact
# arithmetic, so the ordinary entries of a 'mixed' gradient hardly move.
ONE_FACTOR = ("apollo_mini",)

# Where one entry is huge ("mixed"): its index in each leaf.
HUGE_AT = {"w": (5, 7), "b": (3,)}


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (128, 64), jnp.float32),
          "b": jax.random.normal(k2, (64,), jnp.float32)}


def _gradients(kind: str, params) -> dict:
  """One gradient, used at every step (so momentum agrees with it)."""
  out = {}
  for i, (name, p) in enumerate(sorted(params.items())):
    k_sign, k_size = jax.random.split(jax.random.fold_in(jax.random.key(1), i))
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, p.shape), 1.0, -1.0)
    size = jax.random.uniform(k_size, p.shape, minval=0.5, maxval=1.0)
    if kind == "mixed":  # ordinary entries and a huge one of each sign
      g = jax.random.normal(k_size, p.shape).at[HUGE_AT[name]].set(1e38 if i else -1e38)
    elif kind == "aligned":  # 1e38 along the weights: every row sum overflows
      g = 1e38 * jnp.sign(p)
    elif kind == "-1e38":  # one sign everywhere: every projection sum overflows
      g = -1e38 * size
    else:
      g = float(kind) * sign * size
    out[name] = g.astype(jnp.float32)
  return out


KINDS = ("1e30", "1e38", "-1e38", "aligned", "1e-38", "1e-45", "mixed")


@functools.lru_cache(maxsize=None)
def _runner(name: str):
  """jit(params, grads) -> (weights after each step, final state), one compile per optimizer."""
  tx = OPTIMIZERS[name]()

  def run(params, grads):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params

    (_, state), trajectory = jax.lax.scan(step, (params, tx.init(params)), None, length=STEPS)
    return trajectory, state

  return jax.jit(run)


def _ordinary(kind: str, name: str, x: np.ndarray) -> np.ndarray:
  """(steps, *shape) -> (steps, n): the entries other than a 'mixed' gradient's huge one."""
  keep = np.ones(x.shape[1:], bool)
  if kind == "mixed":
    keep[HUGE_AT[name]] = False
  return x[:, keep]



# Conda rotates every coordinate by the complete singular basis of its first moment: the
# float32 round-off of an entry 1e38 times the others (~1e31) reaches every rotated
# coordinate, and at a refresh the first moment is rotated while the second moment is not
# (the official design), so a coordinate whose second moment is tiny takes a huge step
# (5e19 measured). Said in go.conda's docstring; not a case it survives.
NOT_MIXED = ("conda",)


def _cases():
  for name in OPTIMIZERS:
    for kind in KINDS:
      if kind == "mixed" and name in NOT_MIXED:
        continue
      yield pytest.param(name, kind, id=f"{name}-{kind}")


@pytest.mark.parametrize("name, kind", list(_cases()))
def test_extreme_gradients_keep_weights_finite_and_bounded(name, kind):
  params = _params()
  grads = _gradients(kind, params)
  trajectory, state = _runner(name)(params, grads)
  if name in EIGHT_BIT:  # the moments really are 8-bit
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state))
  for leaf in params:
    w = np.concatenate([np.asarray(params[leaf])[None], np.asarray(trajectory[leaf])])
    g = np.asarray(grads[leaf], np.float64)
    assert np.all(np.isfinite(w)), f"{leaf}: non-finite weights at steps {np.unique(np.nonzero(~np.isfinite(w))[0] - 1)}"
    steps = np.diff(w.astype(np.float64), axis=0)  # (STEPS, *shape)
    assert np.max(np.abs(steps)) <= STEP_BOUND, (leaf, np.max(np.abs(steps)))
    # Never uphill on the ordinary entries: <Δw, g> ≤ what a weight decay of
    # at most 0.1 could add.
    moved = _ordinary(kind, leaf, steps)
    ordinary_g = _ordinary(kind, leaf, g[None])[0]
    ordinary_w = _ordinary(kind, leaf, w[:-1].astype(np.float64))
    slope = np.sum(moved * ordinary_g, axis=-1)
    allowance = 0.1 * LR * np.sum(np.abs(ordinary_w * ordinary_g), axis=-1) + 1e-30
    assert np.all(slope <= allowance), (leaf, slope, allowance)
    if kind == "mixed" and leaf == "w" and name not in ONE_FACTOR:
      # One huge entry must not freeze the rest: the ordinary entries go
      # downhill at a rate of the order of lr · Σ|g| (Adam-type steps).
      rate = -slope[-1] / (LR * np.sum(np.abs(ordinary_g)))
      assert rate > 0.01, rate
    if kind.startswith("1e-"):  # tiny (flushed) gradients: tiny steps
      assert np.max(np.abs(steps)) <= 0.1 * LR * np.max(np.abs(w))


# ----------------------------------------------------------------------------
# The building blocks.


def test_quantize_saturates_an_infinite_block_scale():
  code = quantization.dynamic_map(signed=False)
  x = jnp.zeros((2, 256)).at[0, :3].set(jnp.array([jnp.inf, 1.0, 3e38])).at[1, :2].set(
      jnp.array([3e38, 1.5e38]))
  q = quantization.quantize_blockwise(x, code, 256)
  np.testing.assert_array_equal(np.asarray(q.absmax)[:, 0], np.float32([F32_MAX, 3e38]))
  y = np.asarray(quantization.dequantize_blockwise(q.codes, q.absmax, code, 256))
  assert np.all(np.isfinite(y))
  assert y[0, 0] == F32_MAX and y[0, 1] == 0.0  # inf saturates, 1.0 is below resolution
  # Scales above 2**126 (whose reciprocal XLA:CPU flushes to zero) still quantize.
  np.testing.assert_allclose(y[0, 2], 3e38, rtol=0.01)
  np.testing.assert_allclose(y[1, :2], [3e38, 1.5e38], rtol=0.01)
  nan = quantization.quantize_blockwise(x.at[1, 5].set(jnp.nan), code, 256)
  assert np.isnan(np.asarray(nan.absmax)[1, 0])  # NaN is not hidden


def test_quantize_ordinary_blocks_unchanged():
  # The plain x · (1/absmax) of bitsandbytes, bit for bit.
  code = quantization.dynamic_map(signed=True)
  x = jax.random.normal(jax.random.key(0), (4, 512)) * jnp.array([[1.0], [1e-30], [1e30], [0.0]])
  q = quantization.quantize_blockwise(x, code, 256)
  blocks = np.asarray(x, np.float32).reshape(4, 2, 256)
  absmax = np.abs(blocks).max(-1)
  scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.finfo(np.float32).tiny))[..., None], -1, 1)
  mid = (np.asarray(code)[:-1] + np.asarray(code)[1:]) / 2
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(4, 2, 256), np.searchsorted(mid, scaled))
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)


@pytest.mark.parametrize("method", ["svd", "randomized", "power"])
def test_refresh_of_extreme_matrices(method):
  """Bases are invariant to scaling by a power of two, bit for bit."""
  refresh = refresh_lib.get_refresh_method(method)
  g = jax.random.normal(jax.random.key(2), (1, 48, 32))
  g = g / (2.0 * jnp.max(jnp.abs(g)))  # largest entry 0.5: not rescaled
  previous = {projection.INPUT_SIDE: jnp.zeros((1, 4, 32))}
  key = jax.random.split(jax.random.key(3), 1)
  decompose = jax.jit(lambda x: refresh(x, 4, (projection.INPUT_SIDE,), previous, key))
  bases = lambda x: np.asarray(decompose(x)[projection.INPUT_SIDE])  # one compile
  plain = bases(g)
  for factor in (2.0**100, 2.0**-60, -(2.0**126)):
    scaled = bases(g * factor)
    assert np.all(np.isfinite(scaled))
    np.testing.assert_array_equal(np.abs(scaled), np.abs(plain))
  ordinary = g * 3.0  # within [2**-24, 2**24]: decomposed as it is
  np.testing.assert_array_equal(np.asarray(refresh_lib.rescaled(ordinary)), np.asarray(ordinary))


def test_projection_saturates_instead_of_nan():
  basis = {projection.INPUT_SIDE: jnp.full((2, 64), 0.125)}  # rows of norm 1
  g = jnp.full((3, 64), 1e38).at[1].set(-1e38).at[2].set(1.0)
  r = np.asarray(projection.project(g, basis))
  np.testing.assert_array_equal(r[0], F32_MAX)
  np.testing.assert_array_equal(r[1], -F32_MAX)
  np.testing.assert_array_equal(r[2], 8.0)


# ----------------------------------------------------------------------------
# Integer hyperparameters.


@pytest.mark.parametrize("gap", [2**31, 10**12, np.int64(2**31)])
@pytest.mark.parametrize("factory", [go.galore_adamw, go.fira_adamw, go.apollo_mini])
def test_update_proj_gap_beyond_int32_is_a_value_error(factory, gap):
  with pytest.raises(ValueError, match=r"update_proj_gap=\d+ is out of range.*\[1, 2147483647\]"):
    factory(1e-3, update_proj_gap=gap)


def test_largest_update_proj_gap_runs():
  params = {"w": jnp.ones((16, 8))}
  tx = go.galore_adamw(1e-3, rank=2, update_proj_gap=2**31 - 1)
  state = tx.init(params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(params, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.parametrize("argument", ["block_size", "min_8bit_size"])
def test_8bit_sizes_beyond_int32_are_value_errors(argument):
  with pytest.raises(ValueError, match=rf"{argument}=1000000000000 is out of range"):
    go.scale_by_adam_8bit(**{argument: 10**12})


def test_shape_setting_ints_may_be_large():
  # rank only fixes shapes (a thin SVD keeps at most min(m, n) vectors).
  assert validation.static_int(10**12, "rank") == 10**12
  params = {"w": jnp.ones((16, 8))}
  tx = go.galore_adamw(1e-3, rank=10**12)
  updates, _ = tx.update(params, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  with pytest.raises(ValueError, match="must be positive"):
    validation.positive_int(0, "update_proj_gap")
