"""galore_adafactor against galore-torch 1.0's GaLoreAdafactor, step for step.

Leaves: a tall and a wide weight (projected, 'std'; the wide one in Flax
(in, out) layout on the JAX side, the tall one in PyTorch layout), an
unprojected matrix (plain factored Adafactor) and a bias (unfactored). Ten
steps with gap 3 refresh at 0, 3, 6 and 9: three full intervals. The
reference's SVD gets the project's canonical signs.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import reference
import tiny_leaves
from galore_optax import adafactor
from galore_optax.alias import galore_adafactor
from galore_optax.matrix_view import DimensionNumbers

pytestmark = pytest.mark.parity  # needs the PyTorch reference packages

TORCH_LAYOUT = DimensionNumbers(reduction_axes=-1, output_axes=-2)
SHAPES = {"tall": (48, 24), "wide": (24, 48), "emb": (16, 20), "b": (48,)}  # (out, in)
PROJECTED = {"tall", "wide"}
FLAX_LEAVES = {"wide"}  # given to JAX transposed, with the default layout
MASK = {k: k in PROJECTED for k in SHAPES}
DIMS = {"tall": TORCH_LAYOUT, "wide": None, "emb": None, "b": None}
RANK, GAP, SCALE, STEPS = 6, 3, 0.25, 10


def gradient_sequence(steps, seed=0):
  return reference.decaying_gradients(SHAPES, steps, seed, decay=0.7, noise=0.01)


def initial_params(scale=0.5, seed=1):
  return reference.random_params(SHAPES, scale, seed)


def to_jax(tree, dtype=jnp.float32):
  return {k: jnp.asarray(v.T if k in FLAX_LEAVES else v, dtype) for k, v in tree.items()}


def from_jax(tree):
  out = {k: np.asarray(v, np.float32) for k, v in tree.items()}
  return {k: v.T if k in FLAX_LEAVES else v for k, v in out.items()}


_TRACES = collections.Counter()


def _traced_update(tx, grads, state, params):
  _TRACES[id(tx)] += 1
  return tx.update(grads, state, params)


_update = jax.jit(_traced_update, static_argnums=0)


def run_jax(tx, p0, grads, dtype=jnp.float32):
  params = to_jax(p0, dtype)
  state = tx.init(params)
  for g in grads:
    updates, state = _update(tx, to_jax(g, dtype), state, params)
    params = optax.apply_updates(params, updates)
  return from_jax(params), params, state


def movement_error(ours, theirs, p0, key):
  d_ours, d_theirs = ours[key] - p0[key], theirs[key] - p0[key]
  return float(np.linalg.norm(d_ours - d_theirs) / np.linalg.norm(d_theirs))


def make_tx(learning_rate=None, **kw):
  return galore_adafactor(
      learning_rate, RANK, GAP, SCALE, "std", projected=MASK, dimension_numbers=DIMS, **kw
  )


# The reference's defaults; an external lr with momentum, weight decay and a
# low clip threshold (so the RMS clipping acts); the warm-up relative step
# without parameter scaling. Tolerances are on each leaf's total movement;
# measured errors are ~7e-6, ~3e-5 and ~1.4e-6. Using the RMS of the projected
# weights PᵀW instead of the weights' own (what the inner transformation
# would see by itself) moves the second case by 1e-3 to 3e-3.
CASES = {
    "defaults": (dict(), 0.5),
    "lr_beta1_decay_clip": (
        dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.3),
        0.5,
    ),
    # Tiny steps (1e-6·t): small weights keep float32 round-off below them.
    "warmup_unscaled": (
        dict(warmup_init=True, scale_parameter=False, beta1=0.5, weight_decay=0.2),
        1e-5,
    ),
}


# One transformation object per case, so tests share its compiled update.
TXS = {
    case: make_tx(options.get("lr"), **{k: v for k, v in options.items() if k != "lr"})
    for case, (options, _) in CASES.items()
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_galore_torch_adafactor(case):
  options, param_scale = CASES[case]
  p0, grads = initial_params(param_scale), gradient_sequence(STEPS)
  ref, opt, tensors = reference.run_galore_adafactor(
      p0, grads, PROJECTED, rank=RANK, update_proj_gap=GAP, scale=SCALE,
      proj_type="std", **options,
  )
  # The reference kept factored low-rank second moments for the weights.
  assert opt.state[tensors["tall"]]["exp_avg_sq_row"].shape == (48,)
  assert opt.state[tensors["tall"]]["exp_avg_sq_col"].shape == (RANK,)
  assert opt.state[tensors["wide"]]["exp_avg_sq_col"].shape == (48,)
  ours, _, state = run_jax(TXS[case], p0, grads)
  errors = {k: movement_error(ours, ref, p0, k) for k in SHAPES}
  assert max(errors.values()) <= 1e-4, errors
  inner = state[0].inner_state
  assert inner.nu["tall"].row.shape == (48,) and inner.nu["tall"].col.shape == (RANK,)
  assert inner.nu["b"].shape == (48,)
  assert (inner.mu is None) == ("beta1" not in options)


def test_bf16_params_keep_dtype():
  """bf16 weights: float32 projection and state, as the reference.

  The reference adds the float32 update to a float32 copy of the weight and
  rounds once. With float32 gradients our updates are float32 and
  `optax.apply_updates` does the same: the runs agree exactly. bf16
  gradients give bf16 updates, rounded before the sum (measured: 11% of the
  movement here, where a step is ~2 bf16 ulps; the bf16 and float32
  references differ by 80%).
  """
  p0, grads = initial_params(), gradient_sequence(STEPS)
  ref, _, tensors = reference.run_galore_adafactor(
      p0, grads, PROJECTED, rank=RANK, update_proj_gap=GAP, scale=SCALE,
      proj_type="std", dtype=torch.bfloat16,
  )
  assert tensors["tall"].dtype == torch.bfloat16
  to_bf16 = lambda tree: {k: np.asarray(torch.tensor(v).bfloat16().float()) for k, v in tree.items()}
  tx = TXS["defaults"]
  params = to_jax(p0, jnp.bfloat16)
  state = tx.init(params)
  # bf16 gradients: bf16 updates (shapes and dtypes only, nothing compiled).
  out = jax.eval_shape(tx.update, to_jax(grads[0], jnp.bfloat16), state, params)
  assert all(u.dtype == jnp.bfloat16 for u in out[0].values())
  for g in grads:
    updates, state = _update(tx, to_jax(to_bf16(g)), state, params)
    params = optax.apply_updates(params, updates)
  assert all(p.dtype == jnp.bfloat16 for p in params.values())
  assert state[0].projectors["tall"]["vh"].dtype == jnp.float32
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state))
  errors = {k: movement_error(from_jax(params), ref, to_bf16(p0), k) for k in SHAPES}
  assert max(errors.values()) <= 1e-6, errors


def test_zero_gradients():
  params = to_jax(initial_params())
  tx = TXS["defaults"]
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = _update(tx, zeros, state, params)
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(np.asarray(u), 0.0)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_tiny_leaves():
  params = tiny_leaves.initial_params()
  tx = galore_adafactor(rank=8, weight_decay=0.1, projected=tiny_leaves.nonempty_matrices)
  state = tx.init(params)
  assert all(leaf.size > 0 for leaf in jax.tree.leaves(state))
  nu = state[0].inner_state.nu
  # Flax (in=3, out=2) kernel: r × in = 2 × 3 after clamping the rank to 2.
  assert nu["w"].row.shape == (2,) and nu["w"].col.shape == (3,)
  assert nu["s"].shape == () and nu["v"].shape == (1,)
  tiny_leaves.assert_two_steps_go_down(tx, state, params)


def test_scale_by_adafactor_hf_alone_matches_reference():
  """Without projection (no GaLore group) the reference is plain Adafactor."""
  p0, grads = initial_params(), gradient_sequence(4, seed=2)
  ref, _, _ = reference.run_galore_adafactor(
      p0, grads, set(), rank=RANK, update_proj_gap=GAP, scale=SCALE,
      proj_type="std", beta1=0.8, weight_decay=0.05,
  )
  tx = optax.chain(
      adafactor.scale_by_adafactor_hf(beta1=0.8),
      adafactor.add_adafactor_decayed_weights(0.05),
      optax.scale(-1.0),
  )
  params = jax.tree.map(jnp.asarray, p0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  ours = {k: np.asarray(v) for k, v in params.items()}
  errors = {k: movement_error(ours, ref, p0, k) for k in SHAPES}
  assert max(errors.values()) <= 1e-4, errors


def test_step_size():
  """transformers' `_get_lr`; a schedule is read at the 0-based step."""
  count = jnp.asarray(3)  # 1-based step 4
  rms = jnp.asarray(0.2)
  step_size = lambda lr=None, **kw: float(adafactor._make_step_size(lr, (1e-30, 1e-3), **kw)(count, rms))
  np.testing.assert_allclose(step_size(scale_parameter=True, relative_step=None, warmup_init=False), 1e-2 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(step_size(scale_parameter=False, relative_step=True, warmup_init=True), 4e-6, rtol=1e-6)
  np.testing.assert_allclose(step_size(0.1, scale_parameter=False, relative_step=None, warmup_init=False), 0.1, rtol=1e-6)
  schedule = lambda c: 0.1 * (c + 1)
  np.testing.assert_allclose(step_size(schedule, scale_parameter=True, relative_step=False, warmup_init=False), 0.4 * 0.2, rtol=1e-6)
  late = adafactor._make_step_size(None, (1e-30, 1e-3), False, True, False)(jnp.asarray(40_000 - 1), None)
  np.testing.assert_allclose(float(late), 1 / 200, rtol=1e-6)  # 1/sqrt(t) once below 1e-2
  floor = adafactor._make_step_size(0.5, (1e-30, 1e-3), True, None, False)(count, jnp.asarray(0.0))
  np.testing.assert_allclose(float(floor), 0.5 * 1e-3, rtol=1e-6)  # eps2 floors the RMS


def test_bad_arguments():
  with pytest.raises(ValueError, match="relative_step"):
    galore_adafactor(1e-3, relative_step=True)
  with pytest.raises(ValueError, match="warmup_init"):
    galore_adafactor(1e-3, warmup_init=True)
  with pytest.raises(ValueError, match="learning_rate"):
    galore_adafactor(relative_step=False)
  with pytest.raises(ValueError, match="eps"):
    galore_adafactor(eps=1e-3)
  tx = galore_adafactor(rank=4)
  params = {"w": jnp.ones((8, 4))}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  inner = adafactor.scale_by_adafactor_hf()
  with pytest.raises(ValueError, match="params"):
    inner.update(params, inner.init(params))


def test_projector_bits():
  """Quantized projectors: dequantized to float32 on use (traced only)."""
  params = to_jax(initial_params())
  g = to_jax(gradient_sequence(1)[0], jnp.bfloat16)
  for bits in (8, 4):
    tx = make_tx(projector_bits=bits)
    state = tx.init(params)
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state[0].projectors["tall"]))
    updates, new_state = jax.eval_shape(tx.update, g, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in updates.values())
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
  with pytest.raises(ValueError, match="projector_dtype"):
    make_tx(projector_bits=8, projector_dtype=jnp.bfloat16)
