"""Blockwise 8-bit quantization against bitsandbytes' CPU implementation."""

import math

import bitsandbytes.functional as bnb_f
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from galore_optax import quantization as q

pytestmark = pytest.mark.parity  # needs the PyTorch reference packages

BLOCK = 256


def _bnb_code(signed):
  return bnb_f.create_dynamic_map(signed=signed)


def _bnb_native_quantize(x, signed):
  codes, state = bnb_f.quantize_blockwise(
      torch.from_numpy(np.ascontiguousarray(x)), code=_bnb_code(signed), blocksize=BLOCK
  )
  return codes.numpy().reshape(-1), state.absmax.numpy()


def _bnb_portable_quantize(x, signed):
  """bitsandbytes' pure-PyTorch kernel of the same op (bucketize on midpoints).

  `bitsandbytes.functional.quantize_blockwise` dispatches to the native CPU
  kernel when the C library loads. That kernel's table-based binary search is
  approximate (it often picks a farther code for |x|/absmax below ~1e-2, see
  `test_native_bnb_kernel_never_nearer`); bitsandbytes' portable kernel of the
  same operator, like its CUDA kernel, returns the nearest code. It is reached
  by redispatching past the CPU key.
  """
  keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
  codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
      keyset, torch.from_numpy(np.ascontiguousarray(x)), _bnb_code(signed), BLOCK
  )
  return codes.numpy().reshape(-1), absmax.numpy()


def _random(rng, shape, signed, wide=True):
  x = rng.standard_normal(shape).astype(np.float32)
  if wide:  # magnitudes over ~5 decades inside each block
    x *= np.exp(rng.uniform(-12.0, 0.0, shape)).astype(np.float32)
  return x if signed else x * x


def _ours(x, signed, block_size=BLOCK):
  codes, absmax = q.quantize_blockwise(x, q.dynamic_map(signed), block_size)
  return np.asarray(codes).reshape(-1)[: x.size], np.asarray(absmax).reshape(-1)


# ----------------------------------------------------------------------------
# Codebook.


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bnb(signed):
  ours = q.dynamic_map(signed)
  ref = _bnb_code(signed).numpy()
  assert ours.shape == (256,) and ours.dtype == jnp.float32
  np.testing.assert_array_max_ulp(np.asarray(ours), ref, maxulp=0)


def test_dynamic_map_is_concrete_under_jit():
  def f(x):
    code = q.dynamic_map(True)
    assert not isinstance(code, jax.core.Tracer)
    return x

  jax.jit(f)(1.0)


# ----------------------------------------------------------------------------
# Parity with bitsandbytes.


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("wide", [True, False])
@pytest.mark.parametrize("shape", [(64, 512), (97, 131), (5000,)])
def test_quantize_equals_bnb(signed, wide, shape):
  rng = np.random.default_rng(hash((signed, wide, shape)) % 2**32)
  x = _random(rng, shape, signed, wide)
  codes, absmax = _ours(x, signed)
  ref_codes, ref_absmax = _bnb_portable_quantize(x, signed)
  np.testing.assert_array_equal(absmax, ref_absmax)
  # Exact, ties included (both send a value on a midpoint to the lower code).
  np.testing.assert_array_equal(codes, ref_codes)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_midpoint_ties_equal_bnb(signed):
  code = np.asarray(q.dynamic_map(signed))
  midpoints = (code[:-1] + code[1:]) / np.float32(2)
  x = np.concatenate([[1.0], midpoints, [-1.0] if signed else [0.0]]).astype(np.float32)
  x = np.concatenate([x, x[::-1]])  # 2 blocks, absmax 1: scaled == x exactly
  codes, _ = _ours(x, signed)
  ref_codes, _ = _bnb_portable_quantize(x, signed)
  mismatch = np.mean(codes != ref_codes)
  assert mismatch <= 1e-3, mismatch  # in fact 0: same tie rule
  np.testing.assert_array_equal(codes[1:256], np.arange(255))  # ties go low


@pytest.mark.parametrize("signed", [True, False])
def test_native_bnb_kernel_never_nearer(signed):
  """Against `bitsandbytes.functional.quantize_blockwise` as dispatched on CPU.

  Same absmax; where the codes differ, ours is never farther from the scaled
  value than the native kernel's pick, and on plain Gaussian data they agree
  almost everywhere.
  """
  rng = np.random.default_rng(7)
  x = _random(rng, (40 * BLOCK + 77,), signed, wide=True)
  codes, absmax = _ours(x, signed)
  ref_codes, ref_absmax = _bnb_native_quantize(x, signed)
  np.testing.assert_array_equal(absmax, ref_absmax)
  code = np.asarray(q.dynamic_map(signed))
  scaled = x / np.repeat(absmax, BLOCK)[: x.size]
  ours_err = np.abs(code[codes] - scaled)
  ref_err = np.abs(code[ref_codes] - scaled)
  assert np.all(ours_err <= ref_err + 1e-7)

  x = _random(rng, (40 * BLOCK,), signed, wide=False)
  codes, _ = _ours(x, signed)
  ref_codes, _ = _bnb_native_quantize(x, signed)
  assert np.mean(codes != ref_codes) < (0.01 if signed else 0.05)


# ----------------------------------------------------------------------------
# Round trip, layout, edge cases.


def _half_gap(code, scaled):
  """Largest error of nearest-code rounding of each scaled value."""
  i = np.clip(np.searchsorted(code, scaled), 1, 255)
  return (code[i] - code[i - 1]) / 2


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(8, 512), (3, 7, 100), (1000,), (5,), ()])
def test_round_trip_within_bound(signed, shape):
  rng = np.random.default_rng(len(shape))
  x = _random(rng, shape, signed)
  code = q.dynamic_map(signed)
  codes, absmax = q.quantize_blockwise(x, code, BLOCK)
  y = q.dequantize_blockwise(codes, absmax, code, BLOCK, shape=x.shape)
  assert y.shape == x.shape and y.dtype == jnp.float32

  n_blocks = math.ceil(max(x.size, 1) / BLOCK)
  scale = np.repeat(np.asarray(absmax).reshape(-1), BLOCK)[: x.size].reshape(shape)
  code_np = np.asarray(code)
  lower = -1.0 if signed else 0.0
  bound = scale * _half_gap(code_np, np.clip(x / scale, lower, 1.0)) * (1 + 1e-6)
  if signed:  # [-1, code[0]) is clamped onto code[0]
    bound = np.maximum(bound, scale * (1 + code_np[0]))
  assert np.all(np.abs(np.asarray(y) - x) <= bound + scale * 1e-6 + 1e-30)
  assert np.asarray(absmax).size == n_blocks


def test_layout_rule():
  assert q.blockwise_layout((4, 512), 256) == ((4, 512), (4, 2))
  assert q.blockwise_layout((2, 3, 256), 256) == ((2, 3, 256), (2, 3, 1))
  assert q.blockwise_layout((4, 300), 256) == ((1280,), (5,))
  assert q.blockwise_layout((4, 64), 256) == ((256,), (1,))
  assert q.blockwise_layout((), 256) == ((256,), (1,))
  assert q.blockwise_layout((100,), 32) == ((128,), (4,))
  for shape in [(4, 512), (4, 300), (7,), ()]:
    codes, absmax = q.quantize_blockwise(jnp.ones(shape), q.dynamic_map(), 256)
    assert (codes.shape, absmax.shape) == q.blockwise_layout(shape, 256)
    assert codes.dtype == jnp.uint8 and absmax.dtype == jnp.float32


def test_blocks_match_row_major_blocks():
  """The last-axis layout groups the same elements as bitsandbytes' flat one."""
  rng = np.random.default_rng(3)
  x = _random(rng, (6, 768), True)
  codes, absmax = q.quantize_blockwise(x, q.dynamic_map(True), BLOCK)
  ref_codes, ref_absmax = _bnb_portable_quantize(x, True)
  np.testing.assert_array_equal(np.asarray(absmax).reshape(-1), ref_absmax)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes)


@pytest.mark.parametrize("signed", [True, False])
def test_zero_blocks(signed):
  x = np.zeros((3, BLOCK), np.float32)
  x[1] = np.abs(np.random.default_rng(0).standard_normal(BLOCK))
  code = q.dynamic_map(signed)
  codes, absmax = q.quantize_blockwise(x, code, BLOCK)
  np.testing.assert_array_equal(np.asarray(absmax)[[0, 2], 0], 0.0)
  y = np.asarray(q.dequantize_blockwise(codes, absmax, code, BLOCK))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[[0, 2]], 0.0)
  # All-zero input, flat layout with a padded tail.
  codes, absmax = q.quantize_blockwise(jnp.zeros((3, 100)), code, BLOCK)
  y = q.dequantize_blockwise(codes, absmax, code, BLOCK, shape=(3, 100))
  np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_tail_block_uses_only_its_elements():
  x = np.full(2 * BLOCK + 10, 4.0, np.float32)
  x[-10:] = 0.5
  codes, absmax = q.quantize_blockwise(x, q.dynamic_map(), BLOCK)
  np.testing.assert_array_equal(np.asarray(absmax), [4.0, 4.0, 0.5])
  y = q.dequantize_blockwise(codes, absmax, q.dynamic_map(), BLOCK, shape=x.shape)
  np.testing.assert_array_equal(np.asarray(y), x)  # 1.0 is a code: exact


def test_dtypes():
  x = jnp.linspace(-3.0, 3.0, 512, dtype=jnp.bfloat16)
  code = q.dynamic_map()
  codes, absmax = q.quantize_blockwise(x, code, BLOCK)
  y = q.dequantize_blockwise(codes, absmax, code, BLOCK, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(x, np.float32), atol=0.05)


def test_mismatched_block_size_raises():
  codes, absmax = q.quantize_blockwise(jnp.ones((2, 512)), q.dynamic_map(), 256)
  with pytest.raises(ValueError):
    q.dequantize_blockwise(codes, absmax, q.dynamic_map(), 128)


# ----------------------------------------------------------------------------
# jit and the two search paths.


def test_jit_matches_eager():
  rng = np.random.default_rng(1)
  x = _random(rng, (4, 300), True)
  code = q.dynamic_map(True)
  eager = q.quantize_blockwise(x, code, BLOCK)
  jitted = jax.jit(q.quantize_blockwise, static_argnums=2)(x, code, BLOCK)
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  deq = jax.jit(q.dequantize_blockwise, static_argnums=(3, 4))
  np.testing.assert_array_equal(
      np.asarray(deq(*jitted, code, BLOCK, (4, 300))),
      np.asarray(q.dequantize_blockwise(*eager, code, BLOCK, shape=(4, 300))),
  )


def test_concrete_code_uses_table_lookup():
  """A concrete codebook compiles to one table lookup, not a binary search."""
  for signed in (True, False):
    assert q._bucket_table(np.asarray(q.dynamic_map(signed)).tobytes()) is not None
  x = jnp.ones((2, 512))
  fast = jax.make_jaxpr(lambda x: q.quantize_blockwise(x, q.dynamic_map(), 256))(x)
  assert str(fast).count(" gather[") == 2  # bucket start, midpoint inside it
  assert "searchsorted" not in str(fast)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
    signed=st.booleans(),
    x=hnp.arrays(
        np.float32,
        st.sampled_from([1, 64, 300]),  # few shapes: few compilations
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    ),
)
def test_table_lookup_equals_binary_search(signed, x):
  """The fast lookup and the traced-codebook binary search agree everywhere."""
  code = q.dynamic_map(signed)
  fast = q.quantize_blockwise(x, code, 64)
  slow = jax.jit(q.quantize_blockwise, static_argnums=2)(x, code, 64)
  np.testing.assert_array_equal(np.asarray(fast.absmax), np.asarray(slow.absmax))
  np.testing.assert_array_equal(np.asarray(fast.codes), np.asarray(slow.codes))
