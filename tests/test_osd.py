"""Online Subspace Descent against the official code's trajectories, step for step.

tests/fixtures/osd/ holds trajectories of the official `proj_type="continuous*"` projector
(kyleliang919/Online-Subspace-Descent, recorded by tests/fixtures/osd/record.py;
docs/osd_reference.md): 3 shapes, the projector optimizers AdamW (constant and scheduled
learning rate), SGD and Lion, 7 steps (an SVD at step 0, then six projector steps). The
official run is sign-equivariant in the initial SVD (a flipped basis vector flips its row of
every later projector, of the projector's gradient and moments, and its entries of the first
moment), so each official vector's sign is matched to ours once, at step 0.
"""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "osd")
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)
BASIS = {"left": "u", "right": "vh"}
PROJECTOR_OPTIMIZERS = {  # the official variants, as optax transformations
    "continuous": lambda: None,  # the default: torch.optim.AdamW's
    "continuous_sgd": optax.identity,
    "continuous_lion": lambda: optax.scale_by_lion(b1=0.9, b2=0.99),
}


@functools.lru_cache(maxsize=None)
def fixtures():
  with open(os.path.join(FIXTURES, "trajectories.json")) as f:
    meta = json.load(f)
  return dict(np.load(os.path.join(FIXTURES, "trajectories.npz"))), meta


@functools.partial(jax.jit, static_argnames=("variant",))
def run_osd(init, grads, multipliers, variant):
  """go.osd_adamw over the fixture's gradients: weights, bases and moments per step."""
  h = fixtures()[1]["hyperparameters"]
  lr = lambda t: h["lr"] * multipliers[t]
  tx = go.osd_adamw(
      lr, rank=h["rank"], projector_learning_rate=lambda t: multipliers[t] / h["update_proj_gap"],
      scale=h["scale"], b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
      weight_decay=h["weight_decay"], dimension_numbers=TORCH_LAYOUT,
      projector_optimizer=PROJECTOR_OPTIMIZERS[variant]())

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    galore = state[0]
    basis = next(iter(galore.projectors.values()))
    return (w, state), (w, basis, galore.inner_state.mu, galore.inner_state.nu)

  return jax.lax.scan(step, (init, tx.init(init)), grads)[1]


def signs_of(ours, official, side):
  """±1 per basis vector (a row of Vh, a column of U) aligning `official` with `ours`."""
  axis = 1 if side == "right" else 0
  return np.sign(np.sum(ours * official, axis=axis))


# The official AdamW projector at a constant and a scheduled learning rate on every shape (one
# compile per shape); SGD and Lion on one shape each (all shapes agree as closely: checked).
CASES = {
    "tall": ("continuous/const", "continuous/sched", "continuous_lion/const"),
    "wide": ("continuous/const", "continuous/sched", "continuous_sgd/const"),
    "square": ("continuous/const", "continuous/sched"),
}


@pytest.mark.parametrize("shape", CASES)
def test_official_trajectories_step_for_step(shape):
  data, meta = fixtures()
  side = meta["sides"][shape]
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  worst = {}
  for case in CASES[shape]:
    variant, schedule = case.split("/")
    key = f"{shape}/{case}"
    multipliers = jnp.asarray(meta["schedules"][schedule], jnp.float32)
    ws, bases, mus, nus = map(np.asarray, run_osd(init, grads, multipliers, variant))
    params, projectors = data[f"{key}/params"], data[f"{key}/projectors"]
    flip = signs_of(bases[0], projectors[0], side)
    # right: P (r, n) rows and M (m, r) columns; left: P (m, r) columns and M (r, n) rows.
    p_sign = flip[:, None] if side == "right" else flip[None, :]
    m_sign = flip[None, :] if side == "right" else flip[:, None]
    change = np.linalg.norm(params[-1] - params[0])
    worst[case] = {
        # The errors of the weights over the norm of their whole change (1e5 times
        # stricter than over the weights), the others over their largest entry.
        "params": float(np.max(np.abs(ws - params[1:])) / change),
        "projectors": float(np.max(np.abs(bases - p_sign * projectors[1:]))),
        "exp_avg": float(np.max(np.abs(mus - m_sign * data[f"{key}/exp_avg"]))
                         / np.max(np.abs(mus))),
        "exp_avg_sq": float(np.max(np.abs(nus - data[f"{key}/exp_avg_sq"]))
                            / np.max(np.abs(nus))),
    }
    moved = float(np.max(np.abs(projectors[-1] - projectors[0])))
    assert moved > 1e-3, (case, moved)  # the projector really moves in these cases
  assert max(max(w.values()) for w in worst.values()) <= 1e-5, worst


def test_online_pca_gradient_is_the_loss_gradient():
  """The closed form equals autodiff of ‖Ĝ − ĜPᵀP‖² / ‖Ĝ − PPᵀĜ‖², for a P that is not
  orthonormal; and a zero gradient gives zero, not NaN."""
  key_p, key_g = jax.random.split(jax.random.key(0))
  g = jax.random.normal(key_g, (3, 12, 7))
  for side, shape in (("vh", (3, 4, 7)), ("u", (3, 12, 4))):
    p = jax.random.normal(key_p, shape)  # far from orthonormal

    def loss(p, g):
      gh = g / jnp.linalg.norm(g)
      rebuilt = gh @ p.T @ p if side == "vh" else p @ p.T @ gh
      return jnp.sum((gh - rebuilt) ** 2)

    want = jax.vmap(jax.grad(loss))(p, g)
    got = go.tracking.online_pca_gradient(p, g, side)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
    zero = go.tracking.online_pca_gradient(p, jnp.zeros_like(g), side)
    assert np.all(np.asarray(zero) == 0.0)


def test_osd_refuses_what_cannot_apply():
  params = {"w": jnp.zeros((16, 8))}
  with pytest.raises(ValueError, match="proj_type='full'"):
    go.osd_adamw(1e-3, proj_type="full")
  with pytest.raises(ValueError, match="float arrays"):
    go.scale_by_galore(4, tracking=go.OnlinePCA(), projector_bits=8)
  with pytest.raises(ValueError, match="lazy_refresh"):
    go.scale_by_galore(4, tracking=go.OnlinePCA(), lazy_refresh=True)
  with pytest.raises(TypeError, match="GradientTransformation"):
    go.osd_adamw(1e-3, projector_optimizer="adam")
  with pytest.raises(ValueError, match="OnlinePCA.learning_rate"):
    go.osd_adamw(1e-3, projector_learning_rate=-1.0).init(params)


def test_a_stack_is_updated_over_its_gradient_once_the_tracker_has_read_it(monkeypatch):
  # A stack's output loop writes the update over the gradient, which the tracker reads too.
  # Unless the loop waits for the tracker, XLA copies the gradient for the loop, and XLA:CPU's
  # default scheduler makes that copy as soon as the gradient exists and holds it until the
  # loop (LLaMA-1B stacked: 1.5 GiB over the target). With the gradient donated, the
  # compiled update must make no copy of it.
  monkeypatch.setattr(go.outputs, "SLICE_BYTES", 64 * 48 * 4)  # a matrix a slice: a loop
  w = jax.ShapeDtypeStruct((4, 64, 48), jnp.bfloat16)
  tx = go.osd_adamw(0.05, rank=8)
  state = jax.eval_shape(tx.init, {"w": w})
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=0).lower(
      {"w": w}, state, {"w": w}).compile()
  entry = hlo.as_text().split("ENTRY")[1].splitlines()
  grad = re.match(r"\s*(%\S+) = ", next(line for line in entry if "parameter(0)" in line))
  assert grad, entry
  copies = [line for line in entry if re.search(r" copy\(" + re.escape(grad.group(1)) + r"\)",
                                                line)]
  assert not copies, copies
