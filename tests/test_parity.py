"""galore_adamw against galore-torch 1.0's GaLoreAdamW, step for step.

Both sides see the same gradient sequence (decaying spectrum plus noise, a
fresh draw per step) for an (out × in) weight, which is projected, and a bias,
which is not. The reference's SVD is given the project's canonical signs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import galore_optax as go
import reference

pytestmark = pytest.mark.parity  # needs the PyTorch reference packages

STEPS = 10  # refreshes at 0, 3, 6, 9: three full intervals and one more refresh
GAP = 3
LR = 1e-2
WEIGHT_DECAY = 0.05
SCALE = 0.25
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)
SHAPES = {"tall": (48, 24), "wide": (24, 48), "square": (32, 32)}  # (out, in)


def gradient_sequence(out_dim, in_dim, steps, seed=0):
  rng = np.random.default_rng(seed)
  k = min(out_dim, in_dim)
  left = np.linalg.qr(rng.standard_normal((out_dim, k)))[0]
  spectrum = 0.7 ** np.arange(k)
  grads = []
  for _ in range(steps):
    right = rng.standard_normal((k, in_dim))
    gw = (left * spectrum) @ right + 0.01 * rng.standard_normal((out_dim, in_dim))
    grads.append((gw.astype(np.float32), rng.standard_normal(out_dim).astype(np.float32)))
  return grads


def run_jax(weight, bias, grads, layout, dtype=jnp.float32, **kw):
  """Runs go.galore_adamw; `layout` 'torch' keeps (out, in), 'flax' transposes."""
  flax = layout == "flax"
  orient = (lambda a: a.T) if flax else (lambda a: a)
  params = {"w": jnp.asarray(orient(weight), dtype), "b": jnp.asarray(bias, dtype)}
  tx = go.galore_adamw(
      LR,
      update_proj_gap=GAP,
      scale=SCALE,
      weight_decay=WEIGHT_DECAY,
      projected={"w": True, "b": False},
      dimension_numbers=None if flax else TORCH_LAYOUT,
      **kw,
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for gw, gb in grads:
    g = {"w": jnp.asarray(orient(gw), dtype), "b": jnp.asarray(gb, dtype)}
    params, state = step(params, state, g)
  w = np.asarray(params["w"], np.float32)
  return (w.T if flax else w), np.asarray(params["b"], np.float32), params


def relative_error(got, want):
  """Largest entry-wise error relative to the parameter's (Frobenius) norm."""
  return float(np.max(np.abs(got - want)) / np.linalg.norm(want))


# 'full' projects both sides, so its low-rank gradient Uᵀ G Vhᵀ at a refresh
# step is diag(σ) plus float32 round-off off the diagonal (~1e-7·σ₁). Adam
# divides each of those round-off entries by its own magnitude (plus eps),
# which turns implementation-level round-off into real weight changes; later
# steps' off-diagonal entries are genuine and agree. Measured worst case over
# these cases: 1.1e-5 for 'full' against 4.1e-6 for the one-sided types, so
# 'full' is held to 5e-5 and the one-sided types to the 1e-5 of the issue.
TOLERANCE = {"std": 1e-5, "reverse_std": 1e-5, "left": 1e-5, "right": 1e-5, "full": 5e-5}


# galore-torch 1.0 crashes on reverse_std for a wide matrix with rank >= its
# smaller side; that case is covered by test_reverse_std_rank_clamped instead.
FLOAT32_CASES = [
    (proj_type, shape_name, rank)
    for proj_type in TOLERANCE
    for shape_name in SHAPES
    for rank in (8, 40)
    if not (proj_type == "reverse_std" and shape_name == "wide" and rank == 40)
]


@pytest.mark.parametrize("proj_type,shape_name,rank", FLOAT32_CASES)
@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_matches_galore_torch_float32(proj_type, shape_name, rank, layout):
  out_dim, in_dim = SHAPES[shape_name]
  rng = np.random.default_rng(1)
  weight = rng.standard_normal((out_dim, in_dim)).astype(np.float32) * 0.1
  bias = rng.standard_normal(out_dim).astype(np.float32) * 0.1
  grads = gradient_sequence(out_dim, in_dim, STEPS)
  kw = dict(rank=rank, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type)
  want_w, want_b = reference.run_galore_adamw(
      weight, bias, grads, lr=LR, weight_decay=WEIGHT_DECAY, **kw
  )
  got_w, got_b, _ = run_jax(weight, bias, grads, layout, rank=rank, proj_type=proj_type)
  # The weights must have moved far beyond the tolerance for this to mean anything.
  assert relative_error(weight, want_w) > 1e-3
  assert relative_error(got_w, want_w) <= TOLERANCE[proj_type]
  assert relative_error(got_b, want_b) <= 1e-5


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_matches_galore_torch_bfloat16(proj_type):
  """bf16 params keep their dtype and track the reference run in bf16.

  The reference keeps its moments in bf16 and updates them with bf16
  arithmetic, while galore_optax updates them in float32 before storing bf16:
  agreement is to bf16 resolution of the parameter movement, not bit-exact.
  """
  out_dim, in_dim = 48, 24
  rng = np.random.default_rng(2)
  weight = rng.standard_normal((out_dim, in_dim)).astype(np.float32) * 0.1
  bias = rng.standard_normal(out_dim).astype(np.float32) * 0.1
  grads = gradient_sequence(out_dim, in_dim, STEPS)
  want_w, _ = reference.run_galore_adamw(
      weight, bias, grads, rank=8, update_proj_gap=GAP, scale=SCALE,
      proj_type=proj_type, lr=LR, weight_decay=WEIGHT_DECAY, dtype=torch.bfloat16,
  )
  got_w, _, params = run_jax(
      weight, bias, grads, "flax", dtype=jnp.bfloat16, rank=8, proj_type=proj_type
  )
  assert params["w"].dtype == jnp.bfloat16 and params["b"].dtype == jnp.bfloat16
  moved = np.abs(want_w - weight)
  err = np.abs(got_w - want_w)
  assert np.median(err) <= 0.1 * np.median(moved)
  assert relative_error(got_w, want_w) <= 2e-2


def test_reverse_std_rank_clamped():
  """rank >= the smaller side is clamped; galore-torch 1.0 raises there."""
  out_dim, in_dim = SHAPES["wide"]
  rng = np.random.default_rng(3)
  weight = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
  bias = np.zeros(out_dim, np.float32)
  grads = gradient_sequence(out_dim, in_dim, STEPS)
  big, _, _ = run_jax(weight, bias, grads, "torch", rank=400, proj_type="reverse_std")
  exact, _, _ = run_jax(weight, bias, grads, "torch", rank=out_dim, proj_type="reverse_std")
  np.testing.assert_array_equal(big, exact)
  with pytest.raises(RuntimeError):
    reference.run_galore_adamw(
        weight, bias, grads, rank=400, update_proj_gap=GAP, scale=SCALE,
        proj_type="reverse_std", lr=LR, weight_decay=WEIGHT_DECAY,
    )
