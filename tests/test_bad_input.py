"""Bad values and bad arguments: a clear error, or a correct result, never a silent wrong one.

* a table of calls of every public function with a bad argument, the error
  type and the words the message must contain (the argument's name and what
  to do);
* generated shapes, dtypes and ranks (zero-size, integer, complex, bf16,
  f16, 1 × n, scalars): each either trains correctly or raises a clear error;
* non-finite gradients at a refresh step and at a plain step, for every
  optimizer: the documented policy holds and no weight is ever collapsed.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import galore_optax as go
from examples import optimizers as registry

PARAMS = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
NAN = float("nan")
INF = float("inf")


def init(tx, params=None):
  return tx.init(PARAMS if params is None else params)


def update(tx, grads, params=None):
  params = PARAMS if params is None else params
  return tx.update(grads, tx.init(params), params)


BAD_CALLS = [
    # (what, call, error type, words the message must contain)
    ("rank 0", lambda: go.galore_adamw(1e-3, rank=0), ValueError, ["rank", "positive"]),
    ("rank float", lambda: go.scale_by_galore(rank=2.5), TypeError, ["rank", "int"]),
    ("rank bool", lambda: go.galore(rank=True), TypeError, ["rank", "int"]),
    ("gap 0", lambda: go.galore_adamw(1e-3, update_proj_gap=0), ValueError,
     ["update_proj_gap", "positive"]),
    ("gap 1.5", lambda: go.galore_adamw(1e-3, update_proj_gap=1.5), TypeError,
     ["update_proj_gap", "int"]),
    ("scale nan", lambda: go.galore_adamw(1e-3, scale=NAN), ValueError, ["scale", "finite"]),
    ("scale inf", lambda: go.fira_adamw(1e-3, scale=INF), ValueError, ["scale", "finite"]),
    ("lr nan", lambda: go.galore_adamw(NAN), ValueError, ["learning_rate", "finite"]),
    ("lr negative", lambda: go.adamw_8bit(-1e-3), ValueError, ["learning_rate"]),
    ("b1 = 1", lambda: go.galore_adamw(1e-3, b1=1.0), ValueError, ["b1", "[0.0, 1.0)"]),
    ("b2 nan", lambda: go.apollo_adamw(1e-3, b2=NAN), ValueError, ["b2", "finite"]),
    ("eps negative", lambda: go.gradnorm_lorp(1e-3, eps=-1.0), ValueError, ["eps"]),
    ("weight decay inf", lambda: go.galore_adamw8bit(1e-3, weight_decay=INF), ValueError,
     ["weight_decay", "finite"]),
    ("proj_type", lambda: go.galore_adamw(1e-3, proj_type="diag"), ValueError,
     ["proj_type='diag'", "std"]),
    ("refresh", lambda: go.galore_adamw(1e-3, refresh="qr"), ValueError,
     ["refresh='qr'", "randomized"]),
    ("projector_bits 8.0", lambda: go.galore_adamw(1e-3, projector_bits=8.0), ValueError,
     ["projector_bits=8.0", "4, 8"]),
    ("projector_bits 3", lambda: go.galore_adamw(1e-3, projector_bits=3), ValueError,
     ["projector_bits=3"]),
    ("projector_dtype int8", lambda: go.galore_adamw(1e-3, projector_dtype=jnp.int8), ValueError,
     ["projector_dtype=int8", "floating"]),
    ("dtype and bits", lambda: go.galore_adamw(1e-3, projector_dtype=jnp.float32,
                                               projector_bits=8), ValueError,
     ["projector_dtype", "projector_bits"]),
    ("block_size 0", lambda: go.adamw_8bit(1e-3, block_size=0), ValueError,
     ["block_size", "positive"]),
    ("block_size negative", lambda: go.galore_adamw8bit(1e-3, block_size=-4), ValueError,
     ["block_size"]),
    ("block_size 2.5", lambda: go.scale_by_adam_8bit(block_size=2.5), TypeError,
     ["block_size", "int"]),
    ("unknown keyword", lambda: go.galore_adamw(1e-3, refersh="svd"), TypeError,
     ["galore_adamw", "refersh"]),
    ("lazy_refresh", lambda: go.galore_adamw(1e-3, lazy_refresh="yes"), TypeError,
     ["lazy_refresh"]),
    ("realign on 8-bit", lambda: go.galore_adamw8bit(1e-3, realign_moments=True), TypeError,
     ["galore_adamw8bit", "realign_moments"]),
    ("realign on adafactor", lambda: go.galore_adafactor(realign_moments=True), TypeError,
     ["galore_adafactor", "realign_moments"]),
    ("refresh factory not called", lambda: go.galore_adamw(1e-3, refresh=go.randomized_refresh),
     TypeError, ["refresh=randomized_refresh", "call it", "randomized_refresh()"]),
    ("misspelled keyword", lambda: go.galore_adamw(1e-3, rnk=8), TypeError, ["rnk"]),
    ("decay mask structure", lambda: update(go.galore_adamw(1e-3, weight_decay=0.1,
                                                            mask={"w": True}), PARAMS),
     ValueError, ["mask", "'b'"]),
    ("regenerate with svd", lambda: go.galore_adamw(1e-3, regenerate_projector=True),
     ValueError, ["regenerate_projector", "random"]),
    ("apollo scale_type", lambda: go.apollo_adamw(1e-3, scale_type="row"), ValueError,
     ["scale_type='row'", "channel"]),
    ("apollo proj", lambda: go.apollo_adamw(1e-3, proj="qr"), ValueError, ["proj='qr'", "random"]),
    ("apollo_mini rank", lambda: go.apollo_mini(1e-3, rank=4), TypeError,
     ["apollo_mini", "rank"]),
    ("apollo lazy", lambda: go.apollo_adamw(1e-3, lazy_refresh=True), ValueError,
     ["lazy_refresh", "proj='svd'"]),
    ("fira full", lambda: go.fira_adamw(1e-3, proj_type="full"), ValueError,
     ["fira_adamw", "full"]),
    ("norm_axis str", lambda: go.gradnorm_lorp(1e-3, norm_axis="in"), TypeError, ["norm_axis"]),
    # Errors that need the parameters: they name the leaf.
    ("complex projected", lambda: init(go.galore_adamw(1e-3, projected={"c": True}),
                                       {"c": jnp.ones((4, 4), jnp.complex64)}), ValueError,
     ["c", "complex"]),
    ("complex in 8-bit Adam", lambda: init(go.adamw_8bit(1e-3), {"c": jnp.ones(3, jnp.complex64)}),
     ValueError, ["c", "complex"]),
    ("integer projected", lambda: init(go.galore_adamw(1e-3, projected={"i": True}),
                                       {"i": jnp.ones((4, 4), jnp.int32)}), ValueError,
     ["i", "int32", "projected"]),
    ("vector projected", lambda: init(go.galore_adamw(1e-3, projected={"w": True, "b": True})),
     ValueError, ["b", "fewer than two axes"]),
    ("numpy axes out of range", lambda: init(go.galore_adamw(
        1e-3, dimension_numbers=go.DimensionNumbers(np.int64(0), np.int64(5)),
        projected={"w": True, "b": False})), ValueError, ["w", "output_axes", "out of range"]),
    ("projected structure", lambda: init(go.galore_adamw(1e-3, projected={"w": True})),
     ValueError, ["projected", "'b'"]),
    ("projected from values", lambda: jax.jit(go.galore_adamw(
        1e-3, projected=lambda p: jax.tree.map(lambda x: jnp.sum(x) > 0, p)).init)(PARAMS),
     TypeError, ["projected", "w", "traced"]),
    ("grads of other shapes", lambda: update(go.galore_adamw(1e-3, rank=2),
                                             {"w": jnp.ones((8, 16)), "b": jnp.zeros(8)}),
     ValueError, ["w", "shapes", "tx.init"]),
    ("grads of another tree", lambda: update(go.galore_adamw(1e-3, rank=2), {"w": jnp.ones((16, 8))}),
     ValueError, ["tree structure"]),
    ("gradnorm without params", lambda: go.gradnorm_lorp(1e-3).update(
        PARAMS, go.gradnorm_lorp(1e-3).init(PARAMS)), ValueError, ["params"]),
    ("shardings mesh axis", lambda: go.opt_state_shardings(
        go.galore_adamw(1e-3), PARAMS, mesh=jax.make_mesh((1,), ("fsdp",)),
        shardings={"w": jax.sharding.PartitionSpec("model"), "b": jax.sharding.PartitionSpec()}),
     ValueError, ["w", "'model'", "mesh"]),
    # The family's own arguments.
    ("golore random_from_step", lambda: go.golore_adamw(1e-3, random_from_step=-1),
     ValueError, ["random_from_step"]),
    ("osd projector lr", lambda: go.osd_adamw(1e-3, projector_learning_rate=-1.0),
     ValueError, ["OnlinePCA.learning_rate"]),
    ("subtrack step size", lambda: go.subtrack_adamw(1e-3, subspace_step_size=-1.0),
     ValueError, ["subspace_step_size"]),
    ("coap reproject_factor", lambda: go.coap_adamw(1e-3, reproject_factor=0),
     ValueError, ["reproject_factor", "positive"]),
    ("coap restore_state", lambda: go.coap_adamw(1e-3, restore_state="yes"),
     TypeError, ["restore_state", "True or False"]),
    ("frugal density", lambda: go.frugal_adamw(1e-3, density=1.5), ValueError, ["density"]),
    ("frugal rule", lambda: go.frugal_adamw(1e-3, inactive_update_rule="same"),
     ValueError, ["inactive_update_rule", "sign_sgd"]),
    ("conda gap", lambda: go.conda(1e-3, update_proj_gap=0), ValueError, ["update_proj_gap"]),
    ("frugal block order", lambda: go.frugal_adamw(1e-3, projection="blocks",
                                                   block_order="backwards"),
     ValueError, ["block_order", "descending"]),
    ("frugal blocks side", lambda: go.frugal_adamw(1e-3, projection="blocks", proj_type="left"),
     ValueError, ["proj_type", "whole tensors"]),
    ("frugal blocks gap", lambda: go.frugal_adamw(1e-3, projection="blocks", update_proj_gap=0),
     ValueError, ["update_proj_gap"]),
    ("frugal mirror odd", lambda: go.frugal_adamw(
        1e-3, projection="blocks", block_order="mirror", density=0.5).init([jnp.ones((2, 2))] * 6),
     ValueError, ["mirror", "even", "density"]),
]


@pytest.mark.parametrize("what, call, error, words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_argument_gets_a_clear_error(what, call, error, words):
  with pytest.raises(error) as info:
    call()
  for word in words:
    assert word in str(info.value), (what, str(info.value))


def test_numpy_integers_in_dimension_numbers_work():
  dims = go.DimensionNumbers(reduction_axes=np.int64(-1), output_axes=np.int32(-2))
  got = init(go.galore_adamw(1e-3, rank=2, dimension_numbers=dims))
  want = init(go.galore_adamw(1e-3, rank=2, dimension_numbers=go.DimensionNumbers(-1, -2)))
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)


# --- generated shapes, dtypes and ranks ---------------------------------------

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.complex64]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(shape=(5, 5), dtype=jnp.bfloat16, rank=3)  # an entry of GaLore's first step goes up
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    rank=st.integers(1, 6),
)
def test_any_leaf_trains_correctly_or_raises_clearly(shape, dtype, rank):
  params = {"x": jnp.ones(shape, dtype), "w": jnp.ones((6, 4))}
  tx = go.galore_adamw(1e-2, rank=rank, update_proj_gap=1)
  if jnp.issubdtype(dtype, jnp.complexfloating) and np.prod(shape) > 0:
    with pytest.raises(ValueError, match="complex"):
      tx.init(params)
    return
  state = tx.init(params)
  assert all(x.size > 0 for x in jax.tree.leaves(state))  # orbax can save it
  grads = {"x": jnp.ones(shape, dtype), "w": jnp.ones((6, 4))}
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert new["x"].shape == shape and new["x"].dtype == params["x"].dtype
  assert bool(jnp.all(jnp.isfinite(new["w"].astype(jnp.float32))))
  if jnp.issubdtype(dtype, jnp.floating) and np.prod(shape) > 0:
    projected = len(shape) >= 2
    assert isinstance(state[0].projectors["x"], optax.MaskedNode) != projected
    update = updates["x"].astype(jnp.float32)
    moved = (params["x"] - new["x"]).astype(jnp.float32)  # the gradient is all ones
    if projected:
      # GaLore's first step, -lr·P·N with N of the sign of PᵀG, descends: <u, g> < 0. Not
      # entry by entry: with the ones gradient (rank 1) a rank r > 1 basis, rounded to the
      # leaf's dtype, leaves PᵀG small components on the other directions, which Adam's
      # first step makes as large as the rest (bf16, (5, 5), rank 3: one row goes up).
      assert float(jnp.sum(update)) < 0, update
      assert float(jnp.sum(moved)) > 0, moved
    else:
      # A positive gradient moves every entry down (Adam's first step: -lr·sign(g)),
      # though in bf16 a step below half the weight's ulp rounds away.
      assert bool(jnp.all(update < 0)), update
      assert bool(jnp.all(moved >= 0)) and bool(jnp.any(moved > 0)), moved


# --- non-finite gradients -----------------------------------------------------

# Every optimizer of the library (the repository's registry), rank 2, refreshes every 2 steps.
OPTIMIZERS = {
    spec.name: functools.partial(registry.call_factory, spec.name, 1e-2, rank=2,
                                 update_proj_gap=2, min_8bit_size=16, block_size=16)
    for spec in registry.library()
}
# The 8-bit optimizers treat a non-finite element as zero (it would poison a
# whole block of 8-bit state for good); the others let it through, so the
# failure shows (optax.apply_if_finite skips such steps).
ZEROING = {spec.name for spec in registry.library() if spec.eight_bit}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nonfinite_gradient_never_collapses_a_weight(name):
  tx = OPTIMIZERS[name]()
  update = jax.jit(tx.update)  # one compilation for the four cases
  for step, bad in itertools.product((0, 1), (NAN, INF)):
    case = f"{name}, {'refresh' if step == 0 else 'plain'} step, gradient {bad}"
    params = {"w": 1.0 + 0.1 * jax.random.normal(jax.random.key(0), (32, 16)), "b": jnp.ones(16)}
    state = tx.init(params)
    for t in range(step + 1):
      grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(10 + t), x.shape), params)
      if t == step:
        grads["w"] = grads["w"].at[3, 5].set(bad)
      updates, state = update(grads, state, params)
      new = optax.apply_updates(params, updates)
      if t < step:
        params = new
    norm = lambda x: float(jnp.linalg.norm(x))
    finite = bool(jnp.all(jnp.isfinite(new["w"])))
    if name in ZEROING:
      assert finite, f"{case}: an 8-bit optimizer let a non-finite element into the weights"
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
                 if jnp.issubdtype(x.dtype, jnp.floating)), case
    if finite:
      # Never a finite but destroyed weight: the step is an ordinary step.
      assert abs(norm(new["w"]) - norm(params["w"])) <= 0.05 * norm(params["w"]), case
    else:
      assert name not in ZEROING, case
