"""scale_by_galore's behaviour as an optax transformation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import galore_optax as go


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def run(tx, params, steps, seed=0, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(steps):
    updates, state = update(random_like(params, seed + t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


PARAMS = {
    "dense": {"kernel": jnp.ones((12, 20)) * 0.1, "bias": jnp.zeros(20)},
    "stack": jnp.ones((3, 16, 8)) * 0.1,
}


def test_state_is_low_rank_and_orbax_friendly():
  state = go.galore_adamw(1e-3, rank=4).init(PARAMS)[0]
  # dense kernel: in=12, out=20 -> out >= in: input side, low-rank grad (20, 4)
  assert state.projectors["dense"]["kernel"]["vh"].shape == (4, 12)
  assert state.inner_state.mu["dense"]["kernel"].shape == (20, 4)
  assert state.inner_state.mu["dense"]["bias"].shape == (20,)
  assert isinstance(state.projectors["dense"]["bias"], optax.MaskedNode)
  # stack: (3, in=16, out=8) -> out < in: output side, low-rank grad (3, 4, 16)
  assert state.inner_state.mu["stack"].shape == (3, 4, 16)
  assert all(x.size > 0 for x in jax.tree.leaves(state))


def test_state_shapes_fixed_across_refreshes():
  tx = go.galore_adamw(1e-3, rank=4, update_proj_gap=2)
  state0 = tx.init(PARAMS)
  _, state = run(tx, PARAMS, 5)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)


def test_projector_is_refreshed_only_on_schedule():
  tx = go.scale_by_galore(rank=3, update_proj_gap=3)
  state = tx.init(PARAMS)
  seen = []
  for t in range(7):
    _, state = tx.update(random_like(PARAMS, t), state)
    seen.append(np.asarray(state.projectors["stack"]["u"]))
  changed = [not np.array_equal(a, b) for a, b in zip(seen, seen[1:])]
  assert changed == [False, False, True, False, False, True]  # at steps 3 and 6


def test_projector_orthonormal_and_canonical():
  tx = go.scale_by_galore(rank=5, proj_type="full")
  _, state = tx.update(random_like(PARAMS, 0), tx.init(PARAMS))
  basis = state.projectors["dense"]["kernel"]
  u, vh = basis["u"], basis["vh"]
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  np.testing.assert_allclose(vh @ vh.T, np.eye(5), atol=1e-5)
  np.testing.assert_array_equal(go.canonical_signs(u, axis=-2), u)
  pivots = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), 0)[None], 0)
  assert bool(jnp.all(pivots > 0))


def test_galore_equals_galore_adamw_without_decay():
  a = optax.chain(go.galore(rank=4, update_proj_gap=2), optax.scale_by_learning_rate(1e-2))
  b = go.galore_adamw(1e-2, rank=4, update_proj_gap=2)
  pa, _ = run(a, PARAMS, 4)
  pb, _ = run(b, PARAMS, 4)
  chex.assert_trees_all_close(pa, pb, rtol=0, atol=0)


def test_full_rank_projection_of_sgd_is_identity():
  """With rank = the full side and an SGD inner, GaLore changes nothing."""
  params = {"w": jax.random.normal(jax.random.key(0), (6, 10))}
  tx = go.scale_by_galore(rank=6, inner=optax.identity())
  grads = random_like(params, 1)
  updates, _ = tx.update(grads, tx.init(params))
  np.testing.assert_allclose(updates["w"], grads["w"], atol=1e-5)


@pytest.mark.parametrize(
    "mask", [{"dense": {"kernel": False, "bias": False}, "stack": True}, go.path_mask("stack")]
)
def test_mask(mask):
  state = go.galore_adamw(1e-3, rank=4, projected=mask).init(PARAMS)[0]
  assert isinstance(state.projectors["dense"]["kernel"], optax.MaskedNode)
  assert state.inner_state.mu["dense"]["kernel"].shape == (12, 20)
  assert state.inner_state.mu["stack"].shape == (3, 4, 16)


def test_path_mask_selects_by_path_and_skips_vectors():
  params = {
      "layers": [{"attn": {"q": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, "norm": jnp.zeros(4)}],
      "embed": jnp.zeros((10, 4)),
  }
  mask = go.path_mask(r"attn|mlp")(params)
  assert mask == {
      "layers": [{"attn": {"q": True, "b": False}, "norm": False}],
      "embed": False,
  }


def test_dimension_numbers_tree_and_torch_layout():
  params = {"torch_w": jnp.zeros((20, 12)), "flax_w": jnp.zeros((12, 20))}
  dims = {
      "torch_w": go.DimensionNumbers(reduction_axes=-1, output_axes=-2),
      "flax_w": None,  # default Flax layout
  }
  state = go.galore_adamw(1e-3, rank=4, dimension_numbers=dims).init(params)[0]
  # both are out=20, in=12 matrices: same basis and low-rank shapes
  assert state.projectors["torch_w"]["vh"].shape == state.projectors["flax_w"]["vh"].shape
  assert state.inner_state.mu["torch_w"].shape == (20, 4)


def test_conv_kernel_with_several_reduction_axes():
  params = {"conv": jnp.zeros((3, 3, 8, 16))}  # (kh, kw, in, out)
  dims = go.DimensionNumbers(reduction_axes=(0, 1, 2), output_axes=3)
  tx = go.galore_adamw(1e-3, rank=4, dimension_numbers=dims)
  state = tx.init(params)
  # out=16 < in=3*3*8=72: output side, low-rank gradient (rank, in)
  assert state[0].inner_state.mu["conv"].shape == (4, 72)
  updates, _ = tx.update(random_like(params, 0), state, params)
  assert updates["conv"].shape == (3, 3, 8, 16)


@pytest.mark.parametrize(
    "inner", [optax.scale_by_lion(), optax.scale_by_factored_rms(), optax.scale_by_rms()]
)
def test_other_inner_transforms(inner):
  """Any optax inner runs on the low-rank gradients: update = P · inner(Pᵀ G)."""
  from galore_optax import matrix_view, projection

  tx = go.scale_by_galore(rank=4, inner=inner)
  state = tx.init(PARAMS)
  grads = random_like(PARAMS, 0)
  updates, state = jax.jit(tx.update)(grads, state, PARAMS)
  view = matrix_view.make_view((3, 16, 8), go.DimensionNumbers(), "stack")
  basis = state.projectors["stack"]
  low, low_params = (
      {"stack": projection.project(matrix_view.to_matrix(x["stack"], view), basis)}
      for x in (grads, PARAMS))
  # These inners act leaf by leaf, so the stack's part can be computed alone.
  want_low, _ = inner.update(low, inner.init(low_params), low_params)
  want = matrix_view.from_matrix(projection.project_back(want_low["stack"], basis), view)
  np.testing.assert_allclose(updates["stack"], want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(updates["stack"]))) > 0


def test_inject_hyperparams_learning_rate_and_scale():
  factory = optax.inject_hyperparams(go.galore_adamw, static_args=("rank", "update_proj_gap"))
  tx = factory(learning_rate=1e-2, rank=4, scale=0.25)
  state = tx.init(PARAMS)
  step = jax.jit(tx.update)
  u_a, state = step(random_like(PARAMS, 0), state, PARAMS)
  state.hyperparams["scale"] = jnp.asarray(0.5)
  # scale only multiplies the projected leaves' updates
  fixed = go.galore_adamw(1e-2, rank=4, scale=0.5)
  s = fixed.init(PARAMS)
  _, s = fixed.update(random_like(PARAMS, 0), s, PARAMS)
  u_b, _ = step(random_like(PARAMS, 1), state, PARAMS)
  want, _ = fixed.update(random_like(PARAMS, 1), s, PARAMS)
  # injected hyperparameters are float32 arrays rather than Python floats
  chex.assert_trees_all_close(u_b, want, rtol=1e-5, atol=1e-9)


def test_inject_hyperparams_needs_static_rank():
  tx = optax.inject_hyperparams(go.galore_adamw)(learning_rate=1e-2, rank=4)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(tx.update)(random_like(PARAMS, 0), tx.init(PARAMS), PARAMS)


def test_bfloat16_params_keep_dtype():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  tx = go.galore_adamw(1e-3, rank=4, weight_decay=0.1)
  new, state = run(tx, params, 3)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  assert state[0].projectors["stack"]["u"].dtype == jnp.bfloat16
  f32 = go.galore_adamw(1e-3, rank=4, projector_dtype=jnp.float32).init(params)
  assert f32[0].projectors["stack"]["u"].dtype == jnp.float32


def test_tree_bytes():
  assert go.tree_bytes({"a": jnp.zeros((4, 4)), "b": jnp.zeros(3, jnp.uint8)}) == 67
  assert go.tree_bytes(jax.ShapeDtypeStruct((1000, 1000), jnp.bfloat16)) == 2_000_000
  assert go.tree_bytes({"m": optax.MaskedNode(), "n": None}) == 0


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be positive"),
        (dict(rank=-3), "rank must be positive"),
        (dict(rank=2.5), "rank must be an int"),
        (dict(update_proj_gap=0), "update_proj_gap must be positive"),
        (dict(proj_type="diagonal"), "proj_type='diagonal' is unknown"),
        (dict(refresh="qr"), "refresh='qr' is unknown"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    go.scale_by_galore(**kwargs)


def test_projected_vector_is_named():
  tx = go.scale_by_galore(rank=2, projected={"dense": {"kernel": True, "bias": True}, "stack": False})
  with pytest.raises(ValueError, match=r"dense/bias: shape \(20,\) has fewer than two axes"):
    tx.init(PARAMS)


@pytest.mark.parametrize(
    "dims, match",
    [
        (go.DimensionNumbers(reduction_axes=0, output_axes=5), "output_axes axis 5 is out of range"),
        (go.DimensionNumbers(reduction_axes=-1, output_axes=-1), "overlap"),
        (go.DimensionNumbers(reduction_axes=(0, 0), output_axes=1), "names an axis twice"),
    ],
)
def test_bad_dimension_numbers_name_the_leaf(dims, match):
  tx = go.scale_by_galore(rank=2, projected=go.path_mask("kernel"), dimension_numbers=dims)
  with pytest.raises(ValueError, match="dense/kernel.*" + match):
    tx.init(PARAMS)


def test_mask_with_wrong_structure_names_the_leaf():
  tx = go.scale_by_galore(rank=2, projected={"dense": {"kernel": True}, "stack": True})
  with pytest.raises(ValueError, match="no entry for parameter 'dense/bias'"):
    tx.init(PARAMS)
  tx = go.scale_by_galore(rank=2, projected={"dense": {"kernel": True, "bias": False}, "stack": True, "x": True})
  with pytest.raises(ValueError, match="'x' that is not a parameter"):
    tx.init(PARAMS)


def test_non_bool_mask_entry_is_named():
  tx = go.scale_by_galore(rank=2, projected={"dense": {"kernel": "yes", "bias": False}, "stack": True})
  with pytest.raises(TypeError, match="projected entry for 'dense/kernel'"):
    tx.init(PARAMS)


# --- property test -------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    rank=st.integers(1, 12),
    proj_type=st.sampled_from(["std", "reverse_std", "left", "right", "full"]),
    torch_layout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_rank_type(batch, m, n, rank, proj_type, torch_layout, seed):
  shape = tuple(batch) + ((m, n) if torch_layout else (n, m))
  dims = go.DimensionNumbers(-1, -2) if torch_layout else go.DimensionNumbers(-2, -1)
  params = {"w": jnp.zeros(shape)}
  tx = go.galore_adamw(
      1e-2, rank=rank, update_proj_gap=2, proj_type=proj_type, dimension_numbers=dims
  )
  state0 = tx.init(params)
  state = state0
  for t in range(3):
    grads = random_like(params, seed + t)
    updates, state = tx.update(grads, state, params)
    assert updates["w"].shape == shape
    assert bool(jnp.all(jnp.isfinite(updates["w"])))
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  r = min(rank, m, n)
  assert r in state[0].inner_state.mu["w"].shape[-2:]
