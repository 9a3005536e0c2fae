"""gradnorm_lorp: the weight-norm chain rule, its reductions, and edge cases."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from galore_optax.adam import scale_by_adam_hf
from galore_optax.alias import galore_adamw
from galore_optax.gradnorm import GradNormLoRPState, gradnorm_lorp, gradnorm_lorp8bit
from galore_optax.matrix_view import DimensionNumbers
from galore_optax.transform import scale_by_galore
from galore_optax.tree_utils import tree_bytes


def normal(seed, shape, dtype=jnp.float32):
  # numpy's generator: jax.random would compile a kernel for every shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# --- (1) against an explicit (g, V) reparameterization differentiated by jax.grad

MLP = {"k1": normal(1, (12, 20)) * 0.3, "b1": jnp.zeros(20), "k2": normal(2, (20, 6)) * 0.3}
PROJECTED = {"k1": True, "b1": False, "k2": True}


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["k1"] + params["b1"])
  return jnp.mean(jnp.square(h @ params["k2"] - y))


def batch(t):
  return normal(100 + t, (16, 12)), normal(200 + t, (16, 6))


def kernel_norm(v):
  # Flax kernels are (in, out): one magnitude per output channel.
  return jnp.linalg.norm(v, axis=-2, keepdims=True)


def explicit_reparam_run(params, steps, lr, rank, gap, scale, proj_type, wd, eps):
  """Adam on g and GaLore-Adam on V for W = g ⊙ V/‖V‖, gradients by jax.grad.

  The optimizer under test keeps no V of its own, so the explicit model
  restarts its reparameterization from the new weights after every step
  (V = W, g = ‖W‖): the state it carries is only the optimizers'.
  """
  galore_v = scale_by_galore(
      rank, update_proj_gap=gap, scale=scale, proj_type=proj_type,
      inner=scale_by_adam_hf(eps=eps), projected=PROJECTED,
  )
  adam_g = scale_by_adam_hf(eps=eps)

  def weights(g, v):
    return {k: g[k] * v[k] / kernel_norm(v[k]) if k in g else v[k] for k in v}

  @jax.jit
  def step(g, v, galore_state, adam_state, x, y):
    dg, dv = jax.grad(lambda g, v: mlp_loss(weights(g, v), x, y), argnums=(0, 1))(g, v)
    u_v, galore_state = galore_v.update(dv, galore_state, v)
    u_g, adam_state = adam_g.update(dg, adam_state)
    v = {k: v[k] - lr * u_v[k] for k in v}
    # Decoupled decay after the step: of g for W = g V/‖V‖ (decaying V would
    # not change W), of the weight itself for the unprojected bias.
    g = {k: (1 - lr * wd) * (g[k] - lr * u_g[k]) for k in g}
    v = {k: v[k] if k in g else (1 - lr * wd) * v[k] for k in v}
    return weights(g, v), galore_state, adam_state

  v = dict(params)
  g = {k: kernel_norm(v[k]) for k in v if PROJECTED[k]}
  galore_state, adam_state = galore_v.init(v), adam_g.init(g)
  trajectory = []
  for t in range(steps):
    w, galore_state, adam_state = step(g, v, galore_state, adam_state, *batch(t))
    trajectory.append(w)
    v, g = dict(w), {k: kernel_norm(w[k]) for k in g}
  return trajectory


mlp_grad = jax.jit(jax.grad(mlp_loss))


def gradnorm_run(tx, params, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  trajectory = []
  for t in range(steps):
    grads = mlp_grad(params, *batch(t))
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory, state


# The two-sided projection of a fresh basis is diagonal, U_rᵀ G V_r = S_r: its
# off-diagonal entries are float32 rounding noise, which Adam's first step
# scales up to ±1 unless eps dominates it, so that case uses a larger eps.
@pytest.mark.parametrize(
    "proj_type,wd,eps", [("std", 0.0, 1e-6), ("full", 0.1, 1e-3)]
)
def test_matches_explicit_reparameterization(proj_type, wd, eps):
  kw = dict(lr=0.02, rank=4, gap=3, scale=0.5, proj_type=proj_type, wd=wd, eps=eps)
  steps = 7  # refreshes at steps 0, 3 and 6
  expected = explicit_reparam_run(MLP, steps, **kw)
  tx = gradnorm_lorp(
      kw["lr"], rank=4, update_proj_gap=3, scale=0.5, proj_type=proj_type,
      eps=eps, weight_decay=wd, projected=PROJECTED,
  )
  got, _ = gradnorm_run(tx, MLP, steps)
  for t, (e, g) in enumerate(zip(expected, got)):
    for k in MLP:
      np.testing.assert_allclose(g[k], e[k], rtol=2e-5, atol=2e-6, err_msg=f"step {t} {k}")
  # The weights moved well beyond the tolerance, and not only radially.
  k1_0, k1_t = MLP["k1"] / kernel_norm(MLP["k1"]), got[-1]["k1"] / kernel_norm(got[-1]["k1"])
  assert float(jnp.max(jnp.abs(k1_t - k1_0))) > 1e-2


# --- (2) full rank with the identity projection: weight-normalized Adam


def identity_refresh(g, rank, sides, previous=None, key=None):
  del previous, key
  batch_size, m, n = g.shape
  bases = {}
  if "u" in sides:
    bases["u"] = jnp.broadcast_to(jnp.eye(m, rank), (batch_size, m, rank))
  if "vh" in sides:
    bases["vh"] = jnp.broadcast_to(jnp.eye(rank, n), (batch_size, rank, n))
  return bases


def weight_normalized_adam(w, grads, lr, scale, wd, axis, b1=0.9, b2=0.999, eps=1e-6):
  """Adam on (g, V) at V = W, written out in float64 numpy."""
  w = np.asarray(w, np.float64)
  m_g = v_g = m_v = v_v = 0.0
  for t, grad in enumerate(grads, start=1):
    grad = np.asarray(grad, np.float64)
    g = np.linalg.norm(w, axis=axis, keepdims=True)
    unit = w / g
    dg = np.sum(grad * unit, axis=axis, keepdims=True)
    dv = grad - unit * dg
    m_g, v_g = b1 * m_g + (1 - b1) * dg, b2 * v_g + (1 - b2) * dg**2
    m_v, v_v = b1 * m_v + (1 - b1) * dv, b2 * v_v + (1 - b2) * dv**2
    step = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    g_new = g - step * m_g / (np.sqrt(v_g) + eps)
    v_new = w - scale * step * m_v / (np.sqrt(v_v) + eps)
    w = (1 - lr * wd) * g_new * v_new / np.linalg.norm(v_new, axis=axis, keepdims=True)
  return w


def test_full_rank_identity_projection_is_weight_normalized_adam():
  # A Flax (in, out) kernel, a PyTorch (out, in) one, and an unprojected bias.
  shapes = {"flax": (10, 7), "torch": (7, 10), "b": (7,)}
  dims = {"flax": None, "torch": DimensionNumbers(reduction_axes=-1, output_axes=-2), "b": None}
  params = {k: normal(i, shape) for i, (k, shape) in enumerate(shapes.items())}
  grads = [{k: normal(10 * t + i, shape) for i, (k, shape) in enumerate(shapes.items())}
           for t in range(1, 7)]
  kw = dict(rank=16, update_proj_gap=2, weight_decay=0.1, dimension_numbers=dims)
  tx = gradnorm_lorp(0.05, scale=0.5, refresh=identity_refresh, **kw)
  adamw = galore_adamw(0.05, **kw)
  update, update_adamw = jax.jit(tx.update), jax.jit(adamw.update)
  p, p_adamw = params, params
  state, state_adamw = tx.init(p), adamw.init(p)
  for grad in grads:
    u, state = update(grad, state, p)
    p = optax.apply_updates(p, u)
    u, state_adamw = update_adamw(grad, state_adamw, p_adamw)
    p_adamw = optax.apply_updates(p_adamw, u)
  for name, axis in (("flax", 0), ("torch", 1)):
    expected = weight_normalized_adam(
        params[name], [g[name] for g in grads], lr=0.05, scale=0.5, wd=0.1, axis=axis
    )
    np.testing.assert_allclose(p[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
  # Unprojected leaves are plain AdamW, step for step galore_adamw's.
  np.testing.assert_allclose(p["b"], p_adamw["b"], rtol=1e-6, atol=1e-7)


# --- (3) the split itself, zero rows, dtypes, tracing, errors, 8-bit


def np_norm(x, axis):
  return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))


def test_column_norms_equal_updated_magnitude():
  # name: (shape, dimension numbers, the axes the magnitude is the norm over)
  cases = {
      "dense": ((12, 9), None, (0,)),
      "stacked": ((3, 8, 6), None, (1,)),  # one g per layer and output channel
      "conv": ((3, 3, 4, 10), DimensionNumbers(reduction_axes=(0, 1, 2), output_axes=3),
               (0, 1, 2)),
  }
  lr, wd, b2, eps = 0.1, 0.5, 0.999, 1e-6
  params = {k: normal(i, shape) for i, (k, (shape, _, _)) in enumerate(cases.items())}
  grads = {k: normal(50 + i, shape) for i, (k, (shape, _, _)) in enumerate(cases.items())}
  dims = {k: d for k, (_, d, _) in cases.items()}
  runs = [
      (gradnorm_lorp(lr, rank=2, dimension_numbers=dims, weight_decay=wd), cases),
      # norm_axis given: one magnitude per input channel instead
      (gradnorm_lorp(lr, rank=2, weight_decay=wd, norm_axis=-1), {"dense": ((12, 9), None, (1,))}),
  ]
  for tx, expected_axes in runs:
    p = {k: params[k] for k in expected_axes}
    state = tx.init(p)
    u, _ = jax.jit(tx.update)({k: grads[k] for k in p}, state, p)
    for name, (shape, _, axes) in expected_axes.items():
      assert state.magnitude_state.mu[name].shape == tuple(
          1 if a in axes else d for a, d in enumerate(shape)
      ), name
      # Adam's first update of ∂g is ∂g/(|∂g| + eps/√(1−β2)).
      w, grad = np.asarray(p[name]), np.asarray(grads[name])
      g = np_norm(w, axes)
      dg = np.sum(grad * w / g, axis=axes, keepdims=True)
      g_new = (1 - lr * wd) * (g - lr * dg / (np.abs(dg) + eps / np.sqrt(1 - b2)))
      np.testing.assert_allclose(
          np_norm(w + np.asarray(u[name]), axes), g_new, rtol=1e-5, err_msg=name
      )


def test_radial_gradient_keeps_direction_tangential_keeps_norm():
  w = normal(7, (16, 8))
  unit = w / kernel_norm(w)
  tangential = normal(9, (16, 8))
  tangential = tangential - unit * jnp.sum(tangential * unit, axis=0, keepdims=True)
  params = {"radial": w, "tangential": w}
  grads = {"radial": unit * normal(8, (1, 8)), "tangential": tangential}
  # A radial gradient leaves ∂V = rounding noise, which Adam's scale-free first
  # step would blow up to ±1 with a tiny eps.
  tx = gradnorm_lorp(0.1, rank=3, eps=1e-3)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(new["radial"] / kernel_norm(new["radial"]), unit, atol=1e-6)
  assert float(jnp.max(jnp.abs(kernel_norm(new["radial"]) - kernel_norm(w)))) > 0.05
  np.testing.assert_allclose(kernel_norm(new["tangential"]), kernel_norm(w), rtol=1e-6)
  turned = new["tangential"] / kernel_norm(new["tangential"]) - unit
  assert float(jnp.max(jnp.abs(turned))) > 1e-2


def test_zero_columns_are_finite_and_grow_along_steepest_descent():
  w = normal(11, (16, 8)).at[:, 2].set(0.0).at[:, 5].set(0.0)
  grad = normal(12, (16, 8)).at[:, 5].set(0.0)  # column 5: zero weight and gradient
  params = {"w": w, "dead": jnp.zeros((6, 4))}
  tx = gradnorm_lorp(0.01, rank=3, update_proj_gap=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step({"w": grad, "dead": jnp.zeros((6, 4))}, state, params)
  new = optax.apply_updates(params, u)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))
  np.testing.assert_array_equal(new["dead"], 0.0)
  # ∂g = −‖∇W‖ there, Adam's first step is ≈ −1, so ‖column‖ ≈ lr along −∇W.
  expected = -0.01 * grad[:, 2] / jnp.linalg.norm(grad[:, 2])
  np.testing.assert_allclose(new["w"][:, 2], expected, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(new["w"][:, 5], 0.0)
  for t in range(4):  # keeps training, across a refresh, without NaN
    u, state = step({"w": normal(20 + t, (16, 8)), "dead": normal(30 + t, (6, 4))}, state, new)
    new = optax.apply_updates(new, u)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))
  assert float(jnp.linalg.norm(new["w"][:, 2])) > 0.01
  assert float(jnp.min(jnp.linalg.norm(new["dead"], axis=0))) > 1e-3  # left zero


def test_bf16_dtype_single_trace_eval_shape():
  params = {"w": normal(13, (24, 16), jnp.bfloat16), "b": jnp.zeros(16, jnp.bfloat16)}
  tx = gradnorm_lorp(0.01, rank=4, update_proj_gap=2, weight_decay=0.1)
  state = tx.init(params)
  shapes = jax.eval_shape(tx.init, params)
  assert isinstance(shapes, GradNormLoRPState)
  as_specs = lambda tree: jax.tree.map(lambda s: (s.shape, s.dtype), tree)
  assert as_specs(shapes) == as_specs(state)
  assert state.galore_state.inner_state.mu["w"].dtype == jnp.bfloat16
  traces = []

  def step(grads, state, params):
    traces.append(None)
    return tx.update(grads, state, params)

  step = jax.jit(step)
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  state32 = tx.init(p32)
  for t in range(5):
    grads = {"w": normal(40 + t, (24, 16)), "b": normal(50 + t, (16,))}
    u, new_state = step(jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads), state, params)
    assert jax.tree.map(lambda x: x.dtype, u) == {"w": jnp.bfloat16, "b": jnp.bfloat16}
    assert as_specs(new_state) == as_specs(state)
    params, state = optax.apply_updates(params, u), new_state
    u32, state32 = step(grads, state32, p32)
    p32 = optax.apply_updates(p32, u32)
  assert len(traces) == 2  # once per dtype, not per step
  assert params["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(params["w"].astype(jnp.float32), p32["w"], atol=0.03)


def test_inject_hyperparams_schedule():
  params = {"w": normal(14, (12, 8))}
  schedule = optax.linear_schedule(0.0, 0.05, 3)
  tx = optax.inject_hyperparams(gradnorm_lorp, static_args=("rank", "update_proj_gap"))(
      learning_rate=schedule, rank=2, update_proj_gap=2, weight_decay=0.1
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  u, state = update({"w": normal(15, (12, 8))}, state, params)
  # learning rate 0 at step 0: nothing moves beyond the rounding of W·g/‖W‖
  np.testing.assert_allclose(u["w"], 0.0, atol=1e-6)
  u, state = update({"w": normal(16, (12, 8))}, state, params)
  assert float(jnp.max(jnp.abs(u["w"]))) > 1e-3


def test_bad_arguments_raise_clear_errors():
  params = {"layers": {"w": jnp.ones((2, 6, 4))}}
  tx = gradnorm_lorp(0.01, rank=2)
  with pytest.raises(ValueError, match=r"tx.update\(grads, state, params\)"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match=r"layers/w: gradient shape \(6, 4\)"):
    tx.update({"layers": {"w": jnp.ones((6, 4))}}, tx.init(params), params)
  with pytest.raises(ValueError, match=r"layers/w: norm_axis=0 includes batch axes \[0\]"):
    gradnorm_lorp(0.01, norm_axis=0).init(params)
  with pytest.raises(ValueError, match=r"layers/w: norm_axis axis 3 is out of range"):
    gradnorm_lorp(0.01, norm_axis=3).init(params)
  with pytest.raises(TypeError, match="norm_axis"):
    gradnorm_lorp(0.01, norm_axis="in")
  with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
    gradnorm_lorp(0.01, inner=scale_by_adam_hf)
  with pytest.raises(ValueError, match="rank must be positive"):
    gradnorm_lorp(0.01, rank=0)
  with pytest.raises(ValueError, match="proj_type='diag' is unknown"):
    gradnorm_lorp(0.01, proj_type="diag")
  with pytest.raises(ValueError, match="has fewer than two axes"):
    gradnorm_lorp(0.01, projected={"b": True}).init({"b": jnp.ones(3)})


def test_8bit_runs_and_tracks_float():
  # in=64, out=256: the low-rank direction moments are (256, 16) = 4096 elements.
  params = {"w": normal(17, (64, 256)) * 0.05, "b": jnp.zeros(256)}
  kw = dict(rank=16, update_proj_gap=3, weight_decay=0.01, eps=1e-8)
  tx8, tx32 = gradnorm_lorp8bit(1e-2, **kw), gradnorm_lorp(1e-2, **kw)
  state8, state32 = tx8.init(params), tx32.init(params)
  assert state8.galore_state.inner_state.mu["w"].codes.dtype == jnp.uint8
  assert tree_bytes(state8) < 0.5 * tree_bytes(state32)
  update8, update32 = jax.jit(tx8.update), jax.jit(tx32.update)
  p8 = p32 = params
  for t in range(6):
    grads = {"w": normal(60 + t, (64, 256)), "b": normal(80 + t, (256,))}
    u, state8 = update8(grads, state8, p8)
    p8 = optax.apply_updates(p8, u)
    u, state32 = update32(grads, state32, p32)
    p32 = optax.apply_updates(p32, u)
  moved = float(jnp.linalg.norm(p32["w"] - params["w"]))
  assert moved > 0.1
  assert float(jnp.linalg.norm(p8["w"] - p32["w"])) < 0.1 * moved
  np.testing.assert_allclose(kernel_norm(p8["w"]), kernel_norm(p32["w"]), rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_stack_updates_as_its_layers_do_one_by_one(dtype):
  # A stack's norms are summed a slice of the stack at a time (a loop over its bits), its
  # layers' as whole leaves: the same values, up to a reduction's float32 rounding.
  layers = 3
  w = normal(40, (layers, 10, 7)).at[1, :, 2].set(0.0)  # a zero column in one layer
  params = {"stack": w.astype(dtype)}
  apart = {f"l{i}": w[i].astype(dtype) for i in range(layers)}
  tx = gradnorm_lorp(0.05, rank=3, update_proj_gap=2)
  step = jax.jit(tx.update)
  s1, s2 = tx.init(params), tx.init(apart)
  p1, p2 = params, apart
  for t in range(3):  # a refresh, a plain step, a refresh
    g = normal(41 + t, (layers, 10, 7)).astype(dtype)
    u1, s1 = step({"stack": g}, s1, p1)
    u2, s2 = step({f"l{i}": g[i] for i in range(layers)}, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  together = np.asarray(p1["stack"], np.float32)
  one_by_one = np.stack([np.asarray(p2[f"l{i}"], np.float32) for i in range(layers)])
  assert np.max(np.abs(together - w)) > 0.05  # the steps did something
  # float32: a reduction's rounding; bf16: one unit in the last place of the largest weight.
  tol = 2e-6 if dtype == jnp.float32 else 2**-7 * max(1.0, float(np.max(np.abs(together))))
  np.testing.assert_allclose(together, one_by_one, rtol=0, atol=tol)


def test_a_stack_is_read_for_its_norms_once_its_gradient_exists():
  # XLA:CPU's default scheduler makes an operation as soon as its operands exist: the copy
  # of a stack's bits that the norms' loop slices, made from the weights alone, was made at
  # the start of the step for every stack (LLaMA-7B stacked: 21.9 GiB over the target with
  # the float32 copies it replaced). In the compiled update it must read the gradient too.
  w = jax.ShapeDtypeStruct((4, 64, 48), jnp.bfloat16)
  tx = gradnorm_lorp(0.05, rank=8)
  state = jax.eval_shape(tx.init, {"w": w})
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower({"w": w}, state, {"w": w}).compile()
  entry = hlo.as_text().split("ENTRY")[1]
  copies = [line for line in entry.splitlines()
            if re.match(r"\s*%\S+ = u16\[4,64,48\]", line) and "fusion(" in line]
  assert copies, entry
  for line in copies:
    assert len(re.search(r"fusion\(([^)]*)\)", line).group(1).split(", ")) >= 2, line
