"""Conda against the official code's trajectories and against pytorch-optimizer's Conda.

tests/fixtures/conda/ holds trajectories of the official optimizer (jie040109/Conda, recorded
by tests/fixtures/conda/record.py; docs/conda_reference.md): tall (right), wide (left) and
square (right) matrices, refreshes at 0, 2, 4, 6. A Conda trajectory does not depend on the
signs of the singular vectors (the first moment is carried exactly into each new basis and the
second moment sees squares), so the library's own SVD is compared with the recording directly.
The official code also runs a square matrix with `left` and `full`; `go.conda` rotates the
smaller side only (as 'std'), so those two are not compared.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
import torch

import galore_optax as go

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "conda")
TORCH_LAYOUT = go.DimensionNumbers(reduction_axes=-1, output_axes=-2)


@functools.lru_cache(maxsize=None)
def fixtures():
  with open(os.path.join(FIXTURES, "trajectories.json")) as f:
    meta = json.load(f)
  return dict(np.load(os.path.join(FIXTURES, "trajectories.npz"))), meta


def make(gap=None, **overrides):
  h = fixtures()[1]["hyperparameters"]
  kw = dict(update_proj_gap=h["update_proj_gap"] if gap is None else gap, scale=h["scale"],
            b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"], weight_decay=h["weight_decay"],
            dimension_numbers=TORCH_LAYOUT)
  kw.update(overrides)
  return go.conda(h["lr"], **kw)


@functools.partial(jax.jit, static_argnames=("gap",))
def run(init, grads, gap=None):
  """go.conda over `grads`: weights, full first moment and second moment after each step."""
  tx = make(gap)

  def step(carry, g):
    w, state = carry
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    galore = state[0]
    bases, mu = galore.projectors, galore.inner_state.mu
    full = mu @ bases["vh"] if "vh" in bases else bases["u"] @ mu  # back to (out, in)
    return (w, state), (w, full, galore.inner_state.nu)

  return jax.lax.scan(step, (init, tx.init(init)), grads)[1]


def relative(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("shape,side", [("tall", "right"), ("wide", "left"), ("square", "right")])
def test_official_trajectories_step_for_step(shape, side):
  data, _ = fixtures()
  init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
  ws, ms, vs = map(np.asarray, run(init, grads))
  case = f"{shape}/{side}"
  params = data[f"{case}/params"]
  errors = {
      # weights: over the norm of their whole change (far stricter than over the weights)
      "params": float(np.max(np.abs(ws - params[1:])) / np.linalg.norm(params[-1] - params[0])),
      "exp_avg": relative(ms, data[f"{case}/exp_avg"]),
      "exp_avg_sq": relative(vs, data[f"{case}/exp_avg_sq"]),
  }
  assert max(errors.values()) <= 1e-5, errors


def test_pytorch_optimizer_conda_with_a_refresh_every_step():
  """pytorch-optimizer 4.1.0 counts steps from 1 for the schedule (refreshes at 0, 1, 3, 5),
  so the two agree when both refresh at every step."""
  from pytorch_optimizer import Conda  # pylint: disable=import-outside-toplevel

  data, meta = fixtures()
  h = meta["hyperparameters"]
  for shape in ("wide", "square"):  # a left and a right rotation
    init, grads = data[f"{shape}/init"], data[f"{shape}/grads"]
    w = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = Conda([w], lr=h["lr"], betas=tuple(h["betas"]), weight_decay=h["weight_decay"],
                update_proj_gap=1, scale=h["scale"], projection_type="std", eps=h["eps"])
    want = []
    for g in grads:
      w.grad = torch.from_numpy(g.copy())
      opt.step()
      want.append(w.detach().numpy().copy())
    ws = np.asarray(run(init, grads, gap=1)[0])
    err = float(np.max(np.abs(ws - np.stack(want))) / np.linalg.norm(want[-1] - init))
    assert err <= 1e-5, (shape, err)


def test_conda_state_is_a_full_first_and_second_moment_and_a_rotation():
  params = {"w": jax.numpy.zeros((48, 24)), "b": jax.numpy.zeros(24)}
  state = go.conda(1e-3).init(params)
  galore = state[0]
  assert galore.projectors["w"]["u"].shape == (24, 24)  # the smaller side, all of it
  assert galore.inner_state.mu["w"].shape == galore.inner_state.nu["w"].shape == (24, 48)
  # AdamW's state, plus the basis and one more step counter.
  adamw = optax.adamw(1e-3).init(params)
  assert go.tree_bytes(state) == go.tree_bytes(adamw) + 24 * 24 * 4 + 4
