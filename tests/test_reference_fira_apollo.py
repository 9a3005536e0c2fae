"""The Fira / APOLLO reference harness changes nothing but what it means to pin.

Injected random projections equal to apollo-torch's own draws reproduce its
unpatched run bit for bit (and other matrices change it); canonical SVD signs
leave a run within one projection interval unchanged and are really applied;
configurations the references cannot step are refused with a clear error.
"""

import numpy as np
import pytest
import torch
from fira import FiraAdamW

import reference
import reference_fira_apollo as rfa

pytestmark = pytest.mark.parity

STEPS = 7  # refreshes at 0, 3, 6 with GAP 3
GAP = 3
LR = 1e-2
WEIGHT_DECAY = 0.05
SHAPES = {"tall": (40, 20), "wide": (20, 40), "square": (24, 24)}  # (out, in)


def problem(shape, seed=0):
  """A projected weight and a plain bias, with decaying-spectrum gradients."""
  shapes = {"w": shape, "b": (shape[0],)}
  params = reference.random_params(shapes, 0.1, seed)
  grads = reference.decaying_gradients(shapes, STEPS, seed + 1, decay=0.7, noise=0.01)
  return params, grads


def assert_same_trajectory(got, want):
  assert len(got) == len(want) == STEPS
  for step_got, step_want in zip(got, want):
    for name in step_want:
      np.testing.assert_array_equal(step_got[name], step_want[name])


def moved(trajectory, params):
  return max(np.max(np.abs(trajectory[-1][k] - params[k])) for k in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("scale_type,rank,scale_front", [
    ("channel", 5, False), ("tensor", 1, True), ("tensor", 1, False),
])
def test_injected_own_draws_reproduce_unpatched_apollo(
    dtype, shape_name, scale_type, rank, scale_front
):
  params, grads = problem(SHAPES[shape_name])
  kw = dict(rank=rank, update_proj_gap=GAP, scale=128.0 if rank == 1 else 1.0,
            scale_type=scale_type, scale_front=scale_front, lr=LR,
            weight_decay=WEIGHT_DECAY, dtype=dtype)
  unpatched = rfa.run_apollo(params, grads, {"w"}, **kw)
  own = rfa.reference_random_matrices(params, {"w"}, rank=rank, refreshes=3)
  injected = rfa.run_apollo(params, grads, {"w"}, random_matrices=own, **kw)
  assert moved(unpatched.trajectory, params) > 1e-2
  assert_same_trajectory(injected.trajectory, unpatched.trajectory)
  # The projector in use is the last injected matrix, in the parameter dtype.
  held = injected.optimizer.state[injected.tensors["w"]]["projector"].ortho_matrix
  assert held.dtype == dtype
  last = torch.tensor(own["w"][2]).to(dtype)
  np.testing.assert_array_equal(held.float().numpy(), last.float().numpy())


def test_other_injected_matrices_change_the_run():
  params, grads = problem(SHAPES["tall"])
  kw = dict(rank=5, update_proj_gap=GAP, scale=1.0, lr=LR)
  own = rfa.reference_random_matrices(params, {"w"}, rank=5, refreshes=3)
  rng = np.random.default_rng(0)
  draws = [rng.standard_normal(m.shape) / np.sqrt(5) for m in own["w"]]
  other = {"w": [d.astype(np.float32) for d in draws]}
  a = rfa.run_apollo(params, grads, {"w"}, random_matrices=own, **kw).trajectory
  b = rfa.run_apollo(params, grads, {"w"}, random_matrices=other, **kw).trajectory
  assert np.max(np.abs(a[-1]["w"] - b[-1]["w"])) > 1e-4
  # The plain bias does not see the projection.
  np.testing.assert_array_equal(a[-1]["b"], b[-1]["b"])


def test_reference_seeds_follow_parameter_order():
  """Plain parameters come first, so a projected weight's seed is its 1-based
  position among all of them; two weights get different matrices."""
  shapes = {"b": (8,), "w1": (12, 6), "w2": (12, 6)}
  params = reference.random_params(shapes, 0.1, 0)
  mats = rfa.reference_random_matrices(params, {"w1", "w2"}, rank=3, refreshes=2)
  first = torch.randn((3, 6), generator=torch.Generator().manual_seed(2)) / np.sqrt(3)
  np.testing.assert_array_equal(mats["w1"][0], first.numpy())
  assert not np.array_equal(mats["w1"][0], mats["w2"][0])
  assert not np.array_equal(mats["w1"][0], mats["w1"][1])


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("method", ["fira", "apollo_svd"])
def test_canonical_signs_leave_one_interval_unchanged(method, shape_name):
  """Within one projection interval the update does not depend on basis signs."""
  params, grads = problem(SHAPES[shape_name])
  if method == "fira":
    runner, options = rfa.run_fira, dict(alpha=0.25)
  else:
    runner, options = rfa.run_apollo, dict(scale=1.0, proj="svd")

  def run(canonical_signs):
    return runner(params, grads, {"w"}, rank=5, update_proj_gap=100, lr=LR,
                  weight_decay=WEIGHT_DECAY, canonical_signs=canonical_signs, **options)

  canonical, raw = run(canonical_signs=True), run(canonical_signs=False)
  assert moved(raw.trajectory, params) > 1e-2
  for step_c, step_r in zip(canonical.trajectory, raw.trajectory):
    np.testing.assert_allclose(step_c["w"], step_r["w"], rtol=0, atol=1e-7)
  def basis_rows(run):
    basis = run.optimizer.state[run.tensors["w"]]["projector"].ortho_matrix.numpy()
    return basis if basis.shape[0] == 5 else basis.T

  # Canonical: each basis vector's largest-|entry| is positive; only signs differ.
  vectors = basis_rows(canonical)
  assert np.all(vectors[np.arange(5), np.abs(vectors).argmax(axis=1)] > 0)
  np.testing.assert_array_equal(np.abs(vectors), np.abs(basis_rows(raw)))


def test_fira_full_is_refused_and_really_unsupported():
  params, grads = problem(SHAPES["tall"])
  with pytest.raises(ValueError, match="proj_type='full'"):
    rfa.run_fira(params, grads, {"w"}, rank=5, update_proj_gap=GAP, alpha=0.25,
                 proj_type="full", lr=LR)
  w = torch.nn.Parameter(torch.tensor(params["w"]))
  opt = FiraAdamW([{"params": [w], "rank": 5, "update_proj_gap": GAP, "alpha": 0.25,
                    "proj_type": "full"}], lr=LR, no_deprecation_warning=True)
  w.grad = torch.tensor(grads[0]["w"])
  with pytest.raises(RuntimeError):
    opt.step()


@pytest.mark.parametrize("proj_type", ["reverse_std", "left"])
def test_apollo_channel_off_the_std_side_is_refused(proj_type):
  params, grads = problem(SHAPES["tall"])
  with pytest.raises(ValueError, match="scale_type='channel'"):
    rfa.run_apollo(params, grads, {"w"}, rank=5, update_proj_gap=GAP, scale=1.0,
                   proj_type=proj_type, scale_type="channel", lr=LR)
  # 'tensor' has no axis to get wrong.
  run = rfa.run_apollo(params, grads, {"w"}, rank=5, update_proj_gap=GAP, scale=1.0,
                       proj_type=proj_type, scale_type="tensor", lr=LR)
  assert moved(run.trajectory, params) > 1e-2


def test_bad_injected_matrices_are_refused():
  params, grads = problem(SHAPES["tall"])
  kw = dict(rank=5, update_proj_gap=GAP, scale=1.0, lr=LR)
  good = rfa.reference_random_matrices(params, {"w"}, rank=5, refreshes=3)
  with pytest.raises(ValueError, match="needs one more"):
    rfa.run_apollo(params, grads, {"w"}, random_matrices={"w": good["w"][:2]}, **kw)
  with pytest.raises(ValueError, match=r"needs \(5, 20\)"):
    transposed = {"w": [m.T for m in good["w"]]}
    rfa.run_apollo(params, grads, {"w"}, random_matrices=transposed, **kw)
  with pytest.raises(ValueError, match="no entry"):
    rfa.run_apollo(params, grads, {"w"}, random_matrices={}, **kw)
  with pytest.raises(ValueError, match="proj must be"):
    rfa.run_apollo(params, grads, {"w"}, proj="gaussian", **kw)
