"""The contract every optimizer of the library keeps (cf. optax's contrib/_common_test.py).

Each optimizer, in its plain form and with the GaLore options that change its
state (lazy refresh, 4-bit projectors, moment realignment where it applies),
runs through the same checks on a tree with a dense kernel, a scanned
(layers, in, out) kernel and vectors:

* one trace under `jax.jit` with donated params and state, and the same
  steps as without donation (the reference every other check compares with);
* `jax.eval_shape(tx.init)` has the shapes, dtypes and bytes of `tx.init`;
* `optax.apply_if_finite` skips a NaN step with every state leaf unchanged;
* `optax.MultiSteps` over two equal gradients is one plain step;
* orbax: save, restore into an `eval_shape` target, continue: bit-identical;
* `nnx.Optimizer` gives the same steps as plain optax;
* optax's meanings: `mask` is the weight-decay mask (as in `optax.adamw`),
  `weight_decay` may be a schedule, and `optax.inject_hyperparams` of each
  factory with the README's `static_args` gives the same steps.

The Explicit-mesh `jax.jit(tx.init)` check on 8 virtual devices is in
tests/support/sharding_checks.py (group explicit_init), as it needs its own process.
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import galore_optax as go
from examples import optimizers as registry

LR = 1e-2
COMMON = dict(rank=3, update_proj_gap=2)  # refreshes at steps 0 and 2
ADAM = dict(COMMON, eps=1e-4)
EIGHT = dict(ADAM, eps=1e-3, block_size=32, min_8bit_size=64)

# The library's optimizers, from the repository's one registry, and go.galore: go.scale_by_galore
# with its default (galore-torch) Adam, chained with the learning rate.
FACTORIES = {
    "galore": lambda lr, **kw: optax.chain(go.galore(**kw), optax.scale_by_learning_rate(lr)),
    **{spec.name: functools.partial(spec.factory, weight_decay=0.1)
       for spec in registry.library()},
}


def base_options(name):
  """The test's options that `name` takes: 8-bit sizes for 8-bit states, Adam's eps."""
  if name == "galore":
    return ADAM
  spec = registry.REGISTRY[name]
  params = inspect.signature(spec.factory).parameters
  options = dict(EIGHT if spec.eight_bit else ADAM)
  if not isinstance(params["eps"].default, float):  # Adafactor's (eps1, eps2)
    del options["eps"]
  return {k: v for k, v in options.items() if k in params}


BASE = {name: base_options(name) for name in FACTORIES}


def public_factory(name):
  """The public factory behind a row (a registry row may fix some of its options)."""
  return go.galore if name == "galore" else registry.REGISTRY[name].factory


LAZY = dict(lazy_refresh=go.LazyRefresh(queue_size=1, threshold=0.0))
VARIANTS = {
    "plain": {},
    "lazy+bits4": dict(LAZY, projector_bits=4),
    "lazy+bits4+realign": dict(LAZY, projector_bits=4, realign_moments=True),
}
# Every optimizer plain, and the options that change the state (implemented
# once, in the core, which GradNormLoRP runs too) with a float and an 8-bit optimizer.
# Moment realignment needs float Adam moments: the 8-bit optimizers and
# Adafactor do not take it (tests/test_bad_input.py).
PLAIN = [(name, "plain") for name in FACTORIES]
CASES = PLAIN + [("galore_adamw", "lazy+bits4+realign"), ("galore_adamw8bit", "lazy+bits4")]


def make(name, variant, lr=LR):
  return FACTORIES[name](lr, **BASE[name], **VARIANTS[variant])


def params0():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
      "dense": {"kernel": 0.1 * jax.random.normal(keys[0], (24, 40)), "bias": jnp.zeros(40)},
      "stack": 0.1 * jax.random.normal(keys[1], (2, 32, 16)),  # scanned (layers, in, out)
      "scale": jnp.ones(16),
  }


def grads_at(t):
  leaves, treedef = jax.tree.flatten(params0())
  keys = jax.random.split(jax.random.key(100 + t), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def run(tx, steps, update=None, params=None, state=None):
  params = params0() if params is None else params
  state = tx.init(params) if state is None else state
  update = update or tx.update
  for t in range(steps):
    updates, state = update(grads_at(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# Conda rotates by every singular vector of its first moment, those of near-equal singular
# values too, which differently compiled SVDs mix differently: measured 1.7e-5 on 4 of 1024
# entries (inject_hyperparams against the plain run). GradNormLoRP's refresh decomposes
# ∂V = ∇W − V̂·∂g, a cancellation whose rounding depends on how XLA fuses it, and the SVD
# amplifies it: measured 2.6e-5 on 11 of 960 entries (the donated step against the
# reference), 6.7e-5 with 8-bit moments (nnx.Optimizer against the reference), compiled
# with XLA:CPU's element-wise emitters (tests/support/compile_flags.py).
TOLERANCE = {"conda": 1e-4, "gradnorm_lorp": 1e-4, "gradnorm_lorp8bit": 1e-4}


def assert_close(a, b, tol=1e-5):
  # Differently compiled float32 reductions differ in the last bits, which a
  # refresh can amplify (close singular values); 1e-5 is ~0.03% of the steps.
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def assert_moved(params):
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, params0())
  assert moved["dense"]["kernel"] > 1e-4 and moved["stack"] > 1e-4, moved


@functools.lru_cache(maxsize=None)
def reference(name, variant):
  """The optimizer, its jitted update, and three steps (refreshes at 0 and 2)."""
  tx = make(name, variant)
  update = jax.jit(tx.update)
  return tx, update, run(tx, 3, update)


def reference_run(name, variant):
  return reference(name, variant)[2]


@pytest.mark.parametrize("name, variant", CASES)
def test_jit_traces_once_with_donation(name, variant):
  tx = make(name, variant)
  traces = []

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = params0()
  state = tx.init(params)
  for t in range(3):
    params, state = step(params, state, grads_at(t))
  assert len(traces) == 1
  want_params, want_state = reference_run(name, variant)
  assert_moved(params)
  assert_close(params, want_params, TOLERANCE.get(name, 1e-5))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, want_state)


@pytest.mark.parametrize("name, variant", CASES)
def test_eval_shape_matches_init(name, variant):
  tx = make(name, variant)
  abstract = jax.eval_shape(tx.init, params0())
  state = tx.init(params0())
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)
  assert go.tree_bytes(abstract) == go.tree_bytes(state) > 0
  assert all(x.size > 0 for x in jax.tree.leaves(state))  # orbax refuses zero-size arrays


@pytest.mark.parametrize("name, variant", CASES)
def test_apply_if_finite_leaves_the_state_bit_identical(name, variant):
  tx = optax.apply_if_finite(make(name, variant), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  params, state = run(tx, 2, update)  # the next step, 2, is a refresh step
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads_at(2))
  updates, new_state = update(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1


# The wrapper sees the optimizer whole: the state-changing variants change nothing for it.
@pytest.mark.parametrize("name, variant", PLAIN)
def test_multisteps_of_equal_gradients_is_one_step(name, variant):
  tx = optax.MultiSteps(make(name, variant), every_k_schedule=2)
  plain, plain_update, _ = reference(name, variant)
  state, params = tx.init(params0()), params0()
  g = grads_at(0)
  update = jax.jit(tx.update)
  u1, state = update(g, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(u1))
  u2, _ = update(g, state, params)
  want, _ = plain_update(g, plain.init(params), params)
  # GradNormLoRP's first refresh decomposes ∂V = ∇W − V̂·∂g, a cancellation that XLA rounds
  # differently inside MultiSteps' cond than alone; the SVD amplifies it (3.3e-5 seen, on
  # updates of ~1e-2).
  assert_close(u2, want, tol=1e-4 if name.startswith("gradnorm") else 1e-5)
  assert float(jnp.max(jnp.abs(u2["stack"]))) > 0


@pytest.mark.parametrize("name, variant", CASES)
def test_orbax_restore_then_continue_is_bit_identical(name, variant, tmp_path):
  tx, update, _ = reference(name, variant)
  params, state = run(tx, 2, update)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": params, "state": state})
    ckpt.wait_until_finished()
    target = jax.eval_shape(lambda: {"params": params, "state": state})
    restored = ckpt.restore(tmp_path / "ckpt", target)
  chex.assert_trees_all_equal(restored["state"], state)
  chex.assert_trees_all_equal_structs(restored["state"], state)

  def one_more(params, state):
    updates, state = update(grads_at(2), state, params)  # a refresh step
    return optax.apply_updates(params, updates), state

  chex.assert_trees_all_equal(
      one_more(restored["params"], restored["state"]), one_more(params, state))


class _Model(nnx.Module):

  def __init__(self):
    p = params0()
    self.dense = nnx.Dict(
        kernel=nnx.Param(p["dense"]["kernel"]), bias=nnx.Param(p["dense"]["bias"]))
    self.stack = nnx.Param(p["stack"])
    self.scale = nnx.Param(p["scale"])


@pytest.mark.parametrize("name, variant", CASES)
def test_nnx_optimizer_takes_the_same_steps(name, variant):
  model = _Model()
  optimizer = nnx.Optimizer(model, make(name, variant), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, grads):
    # A loss linear in the weights, whose gradient is exactly `grads`.
    def loss(model):
      weights = nnx.state(model, nnx.Param).to_pure_dict()
      return sum(jnp.vdot(w, g) for w, g in zip(jax.tree.leaves(weights), jax.tree.leaves(grads)))

    optimizer.update(model, nnx.grad(loss)(model))

  for t in range(3):
    step(model, optimizer, grads_at(t))
  got = nnx.state(model, nnx.Param).to_pure_dict()
  assert_close(got, reference_run(name, variant)[0], TOLERANCE.get(name, 1e-5))


# --- optax's meanings: `mask` is the decay mask, decay may be a schedule ------

DECAYING = [name for name in FACTORIES if name != "galore"]  # go.galore has no weight decay
DECAY_MATRICES = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # the usual optax decay mask


def zero_grads():
  return jax.tree.map(jnp.zeros_like, params0())


@pytest.mark.parametrize("name", DECAYING)
def test_mask_is_the_weight_decay_mask_as_in_optax_adamw(name):
  # Zero gradients: the update is the decay alone. optax.adamw leaves the vectors alone under
  # this mask; every factory here must too, and decay the matrices.
  adamw = optax.adamw(LR, weight_decay=0.5, mask=DECAY_MATRICES)
  want, _ = adamw.update(zero_grads(), adamw.init(params0()), params0())
  assert float(jnp.max(jnp.abs(want["scale"]))) == 0.0
  tx = public_factory(name)(LR, **BASE[name], weight_decay=0.5, mask=DECAY_MATRICES)
  updates, _ = jax.jit(tx.update)(zero_grads(), tx.init(params0()), params0())
  assert float(jnp.max(jnp.abs(updates["scale"]))) == 0.0
  assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0.0
  kernel = updates["dense"]["kernel"]
  assert float(jnp.max(jnp.abs(kernel))) > 0
  if name != "galore_adafactor":  # Adafactor scales decay by its own step size, not lr
    rtol = 1e-3 if name.startswith("gradnorm") else 1e-5  # GradNormLoRP rebuilds g·V/‖V‖
    np.testing.assert_allclose(kernel, want["dense"]["kernel"], rtol=rtol, atol=1e-9)


# One optimizer of each module that evaluates the decay (weight_decay.value_at serves them all).
SCHEDULED = ("galore_adamw", "galore_adamw8bit", "adamw_8bit", "fira_adamw", "gradnorm_lorp")


@pytest.mark.parametrize("name", SCHEDULED)
def test_weight_decay_schedule_under_jit(name):
  schedule = lambda count: 0.1 * (count + 1)  # 0.1 at step 0, 0.2 at step 1
  tx = public_factory(name)(LR, **BASE[name], weight_decay=schedule)
  update = jax.jit(tx.update)
  state = tx.init(params0())
  for step in range(2):
    got, state = update(zero_grads(), state, params0())
    # zero gradients: the update is the decay alone, −lr·wd(t)·p (GradNormLoRP: up to the
    # rounding of g·V/‖V‖), on every leaf, projected or not
    for leaf, p in zip(jax.tree.leaves(got), jax.tree.leaves(params0())):
      np.testing.assert_allclose(leaf, -LR * 0.1 * (step + 1) * p, rtol=1e-3, atol=1e-9)


# The README's static arguments (the 8-bit sizes need not be: updates read them off the state).
STATIC = ("rank", "update_proj_gap", "density")


def static_args(factory):
  return tuple(n for n in STATIC if n in inspect.signature(factory).parameters)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams_of_each_factory_with_the_readme_static_args(name):
  public = public_factory(name)
  kwargs = dict(BASE[name])
  injected = optax.inject_hyperparams(public, static_args=static_args(public))
  if name == "galore":
    tx = optax.chain(injected(**kwargs), optax.scale_by_learning_rate(LR))
  else:
    tx = injected(LR, **dict(kwargs, weight_decay=0.1))
  params, state = run(tx, 3, jax.jit(tx.update))
  assert_moved(params)
  assert_close(params, reference_run(name, "plain")[0], TOLERANCE.get(name, 1e-5))
  hyperparams = (state[0] if name == "galore" else state).hyperparams
  assert "clip_threshold" in hyperparams or "b1" in hyperparams  # numbers became arrays
  if name != "galore":
    assert float(hyperparams["learning_rate"]) == pytest.approx(LR)


def test_a_traced_rank_names_itself_and_static_args():
  tx = optax.inject_hyperparams(go.galore_adamw8bit)(LR, rank=3, block_size=32, min_8bit_size=64)
  with pytest.raises(TypeError, match="rank sets array shapes") as info:
    jax.jit(tx.update)(grads_at(0), tx.init(params0()), params0())
  assert "static_args" in str(info.value)
