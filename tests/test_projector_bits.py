"""Group-quantized projectors (projector_bits=8 or 4, Q-GaLore style)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax import projection
from galore_optax import projector_quantization as pq
from galore_optax import refresh as go_refresh
from galore_optax.alias import galore_adamw
from galore_optax.transform import scale_by_galore
from galore_optax.tree_utils import tree_bytes


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def per_entry_scale(q, bits, shape, axis):
  """Each entry's group step, laid out like the original array."""
  a = axis % len(shape)
  group = q.codes.shape[a + 1] * 8 // bits
  full = np.repeat(np.asarray(q.scale), group, axis=a)
  return np.take(full, np.arange(shape[a]), axis=a)


@functools.partial(jax.jit, static_argnums=(1, 2))
def round_trip(x, bits, axis):
  q = pq.quantize_projector(x, bits, axis=axis)
  return q, pq.dequantize_projector(q, bits, x.shape, axis=axis)


@pytest.mark.parametrize(
    "bits, shape, axis",
    [(8, (3, 600, 5), -2), (4, (3, 600, 5), -2), (8, (2, 7, 513), -1),
     (4, (2, 7, 513), -1), (4, (5, 1), 0), (8, (1, 3), -1), (4, (4, 256), -1)],
)
def test_round_trip_within_half_a_step_per_group(bits, shape, axis):
  x = jax.random.normal(jax.random.key(sum(shape)), shape) * 0.1
  q, y = jax.tree.map(np.asarray, round_trip(x, bits, axis))
  x = np.asarray(x)
  want = pq.quantized_shapes(shape, bits, axis)
  assert [(a.shape, a.dtype) for a in q] == [(s.shape, s.dtype) for s in want]
  assert all(a.size > 0 for a in q)
  assert q.codes.dtype == jnp.uint8
  # groups hold at most 256 entries along `axis`, padding under one per group
  a = axis % len(shape)
  group = q.codes.shape[a + 1] * 8 // bits
  assert group <= 256 and 0 <= group * q.scale.shape[a] - shape[a] <= q.scale.shape[a]
  assert y.shape == shape
  bound = per_entry_scale(q, bits, shape, axis) / 2
  assert np.all(np.abs(x - y) <= bound * (1 + 1e-5) + 1e-7)
  # a group's step is its range over 2**bits - 1 levels, its zero its minimum
  first = np.asarray(jax.lax.slice_in_dim(x, 0, min(group, shape[a]), axis=a))
  np.testing.assert_allclose(
      np.take(np.asarray(q.scale), 0, axis=a), (first.max(a) - first.min(a)) / (2**bits - 1), rtol=1e-5
  )
  np.testing.assert_allclose(np.take(np.asarray(q.zero_point), 0, axis=a), first.min(a))


def test_constant_and_zero_groups_are_exact():
  x = jnp.zeros((2, 300)).at[1].set(0.25)
  for bits in (8, 4):
    np.testing.assert_array_equal(round_trip(x, bits, -1)[1], x)


def test_four_bit_codes_pack_two_per_byte():
  x = jnp.linspace(-1.0, 1.0, 512).reshape(1, 512)
  q8, q4 = round_trip(x, 8, -1)[0], round_trip(x, 4, -1)[0]
  assert q4.codes.size * 2 == q8.codes.size
  # low nibble holds the first code of a pair: linspace codes rise 0, 0, 1, ...
  low, high = q4.codes & 0x0F, q4.codes >> 4
  assert bool(jnp.all(high >= low))
  assert int(jnp.max(q4.codes >> 4)) == 15


@pytest.mark.parametrize("bits, tol", [(8, 5e-3), (4, 8e-2)])
def test_orthonormality_loss_is_small_and_bounded(bits, tol):
  m, r = 512, 16
  p = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (m, r)))[0]
  q, ph = round_trip(p, bits, -2)
  loss = jnp.max(jnp.abs(ph.T @ ph - jnp.eye(r)))
  # Cauchy-Schwarz: |(p+d)ᵀ(p'+d') - pᵀp'| <= |d| + |d'| + |d||d'| with
  # |d| <= the column's error norm, which the group steps bound.
  eps = float(np.max(np.linalg.norm(per_entry_scale(q, bits, p.shape, -2) / 2, axis=0)))
  assert float(loss) <= 2 * eps + eps**2
  assert float(loss) < tol


def test_bad_bits_and_conflicting_dtype():
  for bad in (3, 16, True, "8"):
    with pytest.raises(ValueError, match="projector_bits=.* is not supported"):
      scale_by_galore(rank=4, projector_bits=bad)
  with pytest.raises(ValueError, match="projector_dtype and projector_bits"):
    scale_by_galore(rank=4, projector_bits=8, projector_dtype=jnp.float32)


LLAMA_LIKE = {  # bf16, 256-multiples: the projector sizes of a small LLaMA block
    "q": jnp.zeros((512, 512), jnp.bfloat16),
    "up": jnp.zeros((512, 1536), jnp.bfloat16),
    "stack": jnp.zeros((2, 1024, 512), jnp.bfloat16),
    "norm": jnp.zeros((512,), jnp.bfloat16),
}


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_state_bytes_halve_and_quarter(proj_type):
  def projector_bytes(bits):
    tx = scale_by_galore(rank=64, proj_type=proj_type, projector_bits=bits)
    return tree_bytes(jax.eval_shape(tx.init, LLAMA_LIKE).projectors)

  bf16, int8, int4 = projector_bytes(None), projector_bytes(8), projector_bytes(4)
  # codes plus a float32 scale and zero point per 256 entries
  assert int8 / bf16 == pytest.approx(0.5 + 8 / 512, rel=1e-6)
  assert int4 / bf16 == pytest.approx(0.25 + 8 / 512, rel=1e-6)


def test_update_uses_the_dequantized_projector():
  bits = 4
  params = {"w": jax.random.normal(jax.random.key(0), (40, 24)), "b": jnp.zeros(24)}
  tx = scale_by_galore(rank=4, proj_type="full", inner=optax.identity(), projector_bits=bits)
  grads = random_like(params, 1)
  updates, state = jax.jit(tx.update)(grads, tx.init(params))
  basis = {
      side: pq.dequantize_projector(
          state.projectors["w"][side], bits, shape, axis=-2 if side == "u" else -1
      )
      for side, shape in (("u", (24, 4)), ("vh", (4, 40)))
  }
  g = grads["w"].T  # Flax (in, out) -> (out × in)
  want = projection.project_back(projection.project(g, basis), basis).T
  np.testing.assert_allclose(updates["w"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(updates["b"], grads["b"])
  # the quantized basis is close to, but not, the exact one (same signs)
  exact = go_refresh.svd_refresh(g[None], 4, ("u",))["u"][0]
  np.testing.assert_allclose(basis["u"], exact, atol=0.3)
  assert float(jnp.max(jnp.abs(basis["u"] - exact))) > 0


def test_warm_started_refresh_with_quantized_projectors():
  """'power' starts from the stored (dequantized) projector."""
  params = {"w": jnp.zeros((2, 64, 48))}  # (in=64, out=48): out < in keeps u
  tx = scale_by_galore(rank=4, update_proj_gap=2, refresh="power", projector_bits=8)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(2):  # a cold refresh at 0
    _, state = step(random_like(params, t), state)
  shape = (2, 48, 4)
  stored = pq.dequantize_projector(state.projectors["w"]["u"], 8, shape, axis=-2)
  g = random_like(params, 2)
  _, state = step(g, state)  # the warm refresh at 2
  # Without extra random columns the warm start uses no key: the refresh is
  # exactly power_refresh from the stored basis, then quantized.
  g_stack = jnp.swapaxes(g["w"], -1, -2)  # (out × in)
  want = go_refresh.power_refresh()(g_stack, 4, ("u",), {"u": stored}, jax.random.key(0))["u"]
  got = pq.dequantize_projector(state.projectors["w"]["u"], 8, shape, axis=-2)
  want_q = pq.dequantize_projector(pq.quantize_projector(want, 8, axis=-2), 8, shape, axis=-2)
  np.testing.assert_allclose(got, want_q, atol=1e-5)
  # ... and not what a cold start from zeros would give.
  cold = go_refresh.power_refresh()(g_stack, 4, ("u",), {"u": jnp.zeros(shape)}, jax.random.key(0))["u"]
  assert float(jnp.max(jnp.abs(cold - want))) > 1e-3


def test_bfloat16_gradients_keep_their_dtype():
  params = {"w": jnp.ones((32, 48), jnp.bfloat16)}
  tx = galore_adamw(1e-3, rank=4, projector_bits=8)
  updates, state = jax.jit(tx.update)(random_like(params, 0), tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  assert state[0].projectors["w"]["vh"].codes.dtype == jnp.uint8


def test_training_converges_close_to_unquantized():
  """Low-rank regression: quantized projectors reach nearly the same loss."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
  target = jnp.asarray(
      rng.standard_normal((64, 8)) @ rng.standard_normal((8, 96)) / 8, jnp.float32
  )
  y = x @ target
  params = {"w": jnp.zeros((64, 96))}
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)

  def train(bits):
    tx = galore_adamw(3e-2, rank=8, update_proj_gap=25, projector_bits=bits)

    def body(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(jax.jit(body), (params, tx.init(params)), None, length=200)
    return float(loss(p))

  start = float(loss(params))
  full, int8, int4 = train(None), train(8), train(4)
  assert full < 0.05 * start
  assert int8 < 0.05 * start and int4 < 0.05 * start
  assert abs(int8 - full) <= 0.05 * full
  # 4-bit bases are visibly perturbed (|PᵀP − I| ~ 0.04) but train as well
  assert int4 <= 1.5 * full
