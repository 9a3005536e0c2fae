"""go.fused_scan_step: the update inside the backward scan takes the steps the usual one takes."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go
from examples import optimizers as registry

L, H, V = 3, 16, 12
MASK = go.path_mask(r"w|v")
# optax.adamw and the library's optimizers (the repository's registry), rank 4, refreshes at
# steps 0 and 2 of the 3, but two whose fused state is not the usual one by design: Adafactor,
# whose update of one layer depends on the others (go.fused_init refuses it), and
# gradnorm_lorp8bit, whose per-row magnitude moments of a stacked leaf (3 × 32 entries) are
# 8-bit over the stack but float32 per layer (32 < min_8bit_size): 2e-4 apart after 3 steps;
# and FRUGAL's blocks, which choose active tensors over the whole tree (refused, in
# tests/test_frugal.py).
NOT_THE_SAME_STATE = ("galore_adafactor", "gradnorm_lorp8bit", "frugal_blocks")
# Optimizers that differ from galore_adamw only in a refresh function of (G, previous bases,
# key, step), which the fused step runs as the usual one does (random keys: apollo_adamw).
SAME_PARTS = ("golore_adamw", "subtrack_adamw")
OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    **{spec.name: functools.partial(
        registry.call_factory, spec.name, 1e-2, rank=4, update_proj_gap=2, projected=MASK,
        weight_decay=0.1, block_size=32, min_8bit_size=64)
       for spec in registry.library() if spec.name not in NOT_THE_SAME_STATE + SAME_PARTS},
}
ELEMENTWISE = ("optax.adamw", "adamw_8bit")


def model(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 5)
  params = {
      "embed": 0.3 * jax.random.normal(k[0], (V, H)),
      "layers": {"w": 0.3 * jax.random.normal(k[1], (L, H, 2 * H)),
                 "v": 0.3 * jax.random.normal(k[2], (L, 2 * H, H)), "n": jnp.ones((L, H))},
      "out": 0.3 * jax.random.normal(k[3], (H, V)),
  }
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  batch = jax.random.randint(k[4], (4, 6), 0, V)
  return params, batch


def embed(rest, tokens):
  return rest["embed"][tokens]


def layer(p, h):
  return h + jnp.tanh((h * p["n"]) @ p["w"]) @ p["v"]


def head(rest, h, tokens):
  logits = (h @ rest["out"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def loss(params, tokens):
  h = jax.lax.scan(lambda h, p: (layer(p, h), None), embed(params, tokens), params["layers"])[0]
  return head(params, h, tokens)


def unfused(tx, clip=None):
  if clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)

  def step(params, state, tokens):
    value, grads = jax.value_and_grad(loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return tx, jax.jit(step)


@functools.cache
def built(name):
  """One optimizer per name for the module: fused_init probes each once."""
  return OPTIMIZERS[name]()


def run_both(name, dtype, steps=3, clip=None):
  params, tokens = model(dtype)
  tx = built(name)
  ref_tx, ref_step = unfused(tx, clip)
  fused = jax.jit(go.fused_scan_step(embed, layer, head, tx, clip_norm=clip), donate_argnums=(0, 1))
  p1, s1 = params, ref_tx.init(params)
  p2, s2 = jax.tree.map(jnp.copy, params), go.fused_init(tx, params)
  losses = []
  for _ in range(steps):
    p1, s1, l1 = ref_step(p1, s1, tokens)
    p2, s2, l2 = fused(p2, s2, tokens)
    losses.append((float(l1), float(l2)))
  return p1, p2, losses, params


def assert_float32_ulp_apart_at_most(a, b):
  """Equal but for one float32 unit in the last place of the leaf's largest entry.

  Bit-identical under XLA:CPU's default fusion emitters; the element-wise emitters the suite
  compiles with (tests/support/compile_flags.py) may round a differently fused float32
  expression (an update, before it is added to a weight) the other way.
  """
  assert np.max(np.abs(a - b)) <= 2.0**-23 * np.max(np.abs(a)), np.max(np.abs(a - b))


# Every optimizer in float32; in bfloat16 the elementwise baseline (bit-identical) and GaLore
# with float and 8-bit moments: the others add no bf16 path of their own.
BF16 = ("optax.adamw", "galore_adamw", "galore_adamw8bit")


@pytest.mark.parametrize("name, dtype", [(n, jnp.float32) for n in OPTIMIZERS]
                         + [(n, jnp.bfloat16) for n in BF16])
def test_fused_steps_equal_the_usual_steps(name, dtype):
  p1, p2, losses, p0 = run_both(name, dtype)
  moved = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0)))
  assert moved > 1e-3  # the steps did something
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if dtype == jnp.bfloat16 and name == "optax.adamw":
      np.testing.assert_array_equal(a, b)
    elif name in ELEMENTWISE:
      assert_float32_ulp_apart_at_most(a, b)
    elif dtype == jnp.float32:  # relative to the leaf's largest weight
      # Conda rotates by every singular vector, near-equal singular values' too, which
      # differently compiled SVDs mix differently (5.9e-6 measured).
      tol = 2e-5 if name == "conda" else 1e-6
      assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(a)), name
    else:  # bf16: a differently fused product may round one way or the other
      assert np.max(np.abs(a - b)) <= 2 ** -7 * max(1.0, np.max(np.abs(a))), name
  for l1, l2 in losses:
    assert abs(l1 - l2) <= 1e-5 * abs(l1) + (1e-2 if dtype == jnp.bfloat16 else 0)


@pytest.mark.parametrize("name", ["optax.adamw", "galore_adamw"])
def test_clip_norm_is_clip_by_global_norm(name):
  p1, p2, _, _ = run_both(name, jnp.float32, clip=0.05)  # far below the gradients' norm
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    # Relative to the leaf's largest weight, as above: the norm is summed in another order
    # (layer by layer), and GaLore's moments carry that rounding on (3.6e-7 of the largest
    # weight on an AVX2-only host; an element-wise 2e-7 failed there, not on the CI's).
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(a)), name


@pytest.mark.parametrize("tx", [
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    optax.apply_if_finite(optax.adam(1e-3), 3),
    optax.MultiSteps(optax.adam(1e-3), 2),
    optax.lamb(1e-3),
], ids=["clip_by_global_norm", "apply_if_finite", "MultiSteps", "lamb"])
def test_transforms_that_reduce_across_layers_are_refused(tx):
  params, _ = model()
  with pytest.raises(ValueError, match="clip_norm"):
    go.fused_init(tx, params)


def test_bad_arguments_name_the_fix():
  params, tokens = model()
  tx = optax.adamw(1e-2)
  with pytest.raises(ValueError, match="layers="):
    go.fused_init(tx, params, layers="blocks")
  with pytest.raises(ValueError, match="clip_norm"):
    go.fused_scan_step(embed, layer, head, tx, clip_norm=-1.0)
  ragged = dict(params, layers={"w": jnp.ones((3, 4, 4)), "n": jnp.ones((2, 4))})
  with pytest.raises(ValueError, match="leading layer axis"):
    go.fused_init(tx, ragged)
  step = go.fused_scan_step(embed, layer, head, tx)
  with pytest.raises(TypeError, match="fused_init"):
    step(params, tx.init(params), tokens)


def test_fused_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params, tokens = model()
  tx = OPTIMIZERS["galore_adamw8bit"]()
  step = jax.jit(go.fused_scan_step(embed, layer, head, tx))
  params, state, _ = step(params, go.fused_init(tx, params), tokens)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "s", {"params": params, "state": state})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "s", jax.eval_shape(lambda: {"params": params, "state": state}))
  a = step(params, state, tokens)
  b = step(restored["params"], restored["state"], tokens)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tx", [go.apollo_adamw(1e-2, rank=4), go.apollo_mini(1e-2)],
                         ids=["apollo_adamw", "apollo_mini"])
def test_random_refreshes_pass_the_probe_when_every_matrix_is_projected(tx):
  # Unmasked, the probe's own leaves get random bases: each slice must draw the whole tree's.
  params = {"layers": {"w": jnp.ones((2, 16, 32))}, "out": jnp.ones((16, 8))}
  state = go.fused_init(tx, params)
  assert state.layers[0].count.shape == (2,)


def test_extra_args_reach_every_update():
  # The learning rate as an update argument, as examples/optimizers.py passes it.
  def update(g, s, p=None, *, learning_rate):
    return optax.adamw(learning_rate, weight_decay=0.1).update(g, s, p)
  tx = optax.GradientTransformationExtraArgs(optax.adamw(1.0).init, update)
  params, tokens = model()
  ref = jax.jit(go.fused_scan_step(embed, layer, head, built("optax.adamw")))
  fused = jax.jit(go.fused_scan_step(embed, layer, head, tx))
  a = ref(params, go.fused_init(built("optax.adamw"), params), tokens)
  b = fused(params, go.fused_init(tx, params, learning_rate=0.5), tokens, learning_rate=1e-2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):  # the learning rate a constant or an argument
      assert_float32_ulp_apart_at_most(x, y)
    else:
      np.testing.assert_array_equal(x, y)


def poisoned_embed(rest, batch):
  # d/d embed[0, 0] of 0 · √(0 · embed[0, 0] + poison) is NaN when poison is 0; the
  # loss stays finite, so only the gradient shows it (and only the embeddings').
  tokens, poison = batch
  guard = 0.0 * jnp.sqrt(0.0 * rest["embed"][0, 0] + poison)
  return rest["embed"][tokens] + guard


def poisoned_head(rest, h, batch):
  return head(rest, h, batch[0])


@pytest.mark.parametrize("name", ["optax.adamw", "galore_adamw8bit"])
def test_skip_nonfinite_leaves_everything_as_it_was(name):
  params, tokens = model()
  tx = built(name)
  step = jax.jit(go.fused_scan_step(poisoned_embed, layer, poisoned_head, tx,
                                    skip_nonfinite=True))
  plain = jax.jit(go.fused_scan_step(embed, layer, head, tx))
  state = go.fused_init(tx, params)
  # A finite step is the step without skip_nonfinite.
  p1, s1, loss1 = step(params, state, (tokens, 1.0))
  p2, s2, loss2 = plain(params, state, tokens)
  for x, y in zip(jax.tree.leaves((p1, s1.layers, s1.rest)), jax.tree.leaves((p2, s2.layers, s2.rest))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(loss1) == float(loss2) and int(s1.total_notfinite) == 0
  # Two poisoned steps change nothing, and are counted; a finite one resets the run.
  p, s = p1, s1
  for skipped in (1, 2):
    p, s, loss = step(p, s, (tokens, 0.0))
    assert np.isfinite(float(loss))
    assert (int(s.notfinite_count), int(s.total_notfinite)) == (skipped, skipped)
    for x, y in zip(jax.tree.leaves((p, s.layers, s.rest)), jax.tree.leaves((p1, s1.layers, s1.rest))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  p, s, _ = step(p, s, (tokens, 1.0))
  assert (int(s.notfinite_count), int(s.total_notfinite)) == (0, 2)
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(p))
  assert float(jnp.max(jnp.abs(p["layers"]["w"] - p1["layers"]["w"]))) > 1e-4
  with pytest.raises(ValueError, match="skip_nonfinite"):
    go.fused_scan_step(embed, layer, head, tx, skip_nonfinite="yes")


def test_planned_peak_bytes_reads_the_compiled_plan():
  x = jax.ShapeDtypeStruct((1024,), jnp.float32)
  lowered = jax.jit(lambda x: x * 2, donate_argnums=0).lower(x)
  compiled = lowered.compile()
  assert go.planned_peak_bytes(compiled) == 4096  # the output written over the donated input
  kept = jax.jit(lambda x: x * 2).lower(x).compile()
  assert go.planned_peak_bytes(kept.memory_analysis()) == 8192
  assert go.planned_peak_bytes({"argument_size_in_bytes": 1}) is None  # fields missing
  with pytest.raises(TypeError, match=r"lower\(...\).compile\(\)"):
    go.planned_peak_bytes(lowered)


def test_a_bf16_stack_is_sliced_and_written_as_raw_bits():
  """XLA:CPU slices and writes a bf16 stack in a loop through a float32 copy of the whole
  stack: the fused step held one of every parameter stack (LLaMA-1B: 4.7 GiB; 7B galore_adamw:
  47.46 → 35.39 GiB planned peak with the slices read and written as raw bits)."""
  params, tokens = model(jnp.bfloat16)
  tx = go.galore_adamw(1e-2, rank=4, update_proj_gap=2, projected=MASK)
  step = go.fused_scan_step(embed, layer, head, tx)
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, go.fused_init(tx, params), tokens).compile().as_text()
  for shape in {x.shape for x in jax.tree.leaves(params["layers"])}:
    dims = ",".join(map(str, shape))
    assert not re.findall(rf"= f32\[{dims}\]", hlo), shape  # no float32 copy of the stack
    writes = re.findall(rf"= (\w+)\[{dims}\]\S* (?:dynamic-update-slice|scatter)\(", hlo)
    assert writes and set(writes) == {"u16"}, (shape, writes)
