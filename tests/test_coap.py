"""COAP against the official code's trajectories, step for step.

tests/fixtures/coap/ holds trajectories of bytedance/coap's AdamW on matrices (recorded by
tests/fixtures/coap/record.py; docs/coap_reference.md): rank 4, events every 2 steps, every 3rd
a recalibration (sketch at 0, correlation steps at 2, 4, 8, recalibration at 6), 10 steps, with
ordinary gradients ("keep") and gradients ×30 that make the clip of the projector's step act
("loud"), both with the official default restore_state=False, and ordinary gradients with
restore_state=True ("restore": both moments carried into the new basis at each event,
go.RootTransport). The first sketch's test matrix comes from torch's generator; the recording
keeps it (omega0) and it is given to the refresh.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "coap")
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)


@functools.lru_cache(maxsize=None)
def fixtures():
  with open(os.path.join(FIXTURES, "trajectories.json")) as f:
    meta = json.load(f)
  return dict(np.load(os.path.join(FIXTURES, "trajectories.npz"))), meta


def with_recorded_signs(refresh, recorded, every):
  """`refresh` whose sketches (step 0 and recalibrations) take the official vectors' signs."""

  def wrapped(g, rank, sides, previous=None, key=None, *, step):
    bases = refresh(g, rank, sides, previous, key, step=step)
    sketch = (step == 0) | (step % every == 0)
    out = {}
    for side, b in bases.items():
      sign = jnp.sign(jnp.sum(b * recorded[step], axis=-1 if side == "vh" else -2,
                              keepdims=True))
      out[side] = jnp.where(sketch, b * sign, b)
    return out

  wrapped.reads_step = wrapped.reads_moment = True
  return wrapped


@functools.partial(jax.jit, static_argnames="restore")
def run(init, grads, omega0, recorded, restore=False):
  """go.galore_adamw with COAP's refresh (what go.coap_adamw builds), the recorded Ω₀ and the
  official sketches' vector signs (LAPACK's, which the weights depend on at recalibrations);
  with `restore`, the moments carried as restore_state=True does."""
  h = fixtures()[1]["hyperparameters"]
  coap = go.coap_refresh(h["update_interval"], h["reproject_factor"], omega0)
  tx = go.galore_adamw(
      h["lr"], rank=h["rank"], update_proj_gap=h["update_interval"], scale=h["scale"],
      b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"], weight_decay=h["weight_decay"],
      dimension_numbers=TORCH_LAYOUT, realign_moments=go.RootTransport() if restore else None,
      refresh=with_recorded_signs(coap, recorded, h["update_interval"] * h["reproject_factor"]))

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    galore = state[0]
    return (w, state), (w, next(iter(galore.projectors.values())), galore.inner_state.mu,
                        galore.inner_state.nu)

  return jax.lax.scan(step, (init, tx.init(init)), grads)[1]


@pytest.mark.parametrize("shape", ("tall", "wide", "square"))
def test_official_trajectories_step_for_step(shape):
  data, _ = fixtures()
  init = data[f"{shape}/init"]
  worst = {}
  for mode, grads in (("keep", data[f"{shape}/grads"]), ("loud", data[f"{shape}/grads_loud"]),
                      ("restore", data[f"{shape}/grads"])):
    case = f"{shape}/{mode}"
    params, official = data[f"{case}/params"], data[f"{case}/projector"]
    ws, bases, mus, nus = map(np.asarray, run(init, grads, data[f"{shape}/omega0"], official,
                                              restore=mode == "restore"))
    worst[mode] = {
        "params": float(np.max(np.abs(ws - params[1:])) / np.linalg.norm(params[-1] - init)),
        "projector": float(np.max(np.abs(bases - official))),
        "exp_avg": float(np.max(np.abs(mus - data[f"{case}/exp_avg"])) / np.max(np.abs(mus))),
        "exp_avg_sq": float(np.max(np.abs(nus - data[f"{case}/exp_avg_sq"])) / np.max(nus)),
    }
  assert max(max(e.values()) for e in worst.values()) <= 1e-5, worst
