"""The compiled train step costs what the state says (issue 18), and chunking changes nothing.

The relations are read from XLA's buffer assignment (`benchmarks/compiled_memory.py`, nothing
allocated) on a tiny LLaMA with the paper's vocabulary, per-layer and stacked leaves, every
optimizer side by side in one process under XLA:CPU's memory-minimizing scheduler (the order
a GPU compiler chooses; XLA:CPU's default concurrency-first order is in the benchmark's
report). Ratios and differences to optax.adamw in the same process, never absolute bytes.
"""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import background
import compile_flags

import galore_optax as go
from galore_optax.options import GaLoreOptions
from galore_optax import adam_8bit
from galore_optax import outputs
from galore_optax import parts
from galore_optax import plan as plan_lib
from galore_optax import projection
from galore_optax import refresh_step
from galore_optax import tree_utils

from benchmarks import compiled_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (GoLore's and SubTrack++'s steps differ from these only in their refresh functions.)
PROJECTED = ("galore_adamw", "galore_adamw8bit", "fira_adamw", "apollo_adamw", "apollo_mini",
             "osd_adamw", "coap_adamw", "frugal_adamw", "frugal_blocks")


# The rows whose update alone the tests read (the others' is not compiled).
UPDATE_ALONE = ("optax.adamw", "galore_adamw", "fira_adamw")


def _command(scratch):
  # Buffer assignment is decided on HLO, before LLVM: the optimization level changes no byte,
  # the element-wise emitters a few KiB (at most 12 KiB of a tiny step's 0.45 GiB measured),
  # far inside the 1 MiB (`compiled_memory.SCALARS`) the relations allow.
  env = dict(os.environ,
             XLA_FLAGS=compile_flags.with_fast_compile(compiled_memory.SCHEDULERS["memory"]))
  return [background.Command(
      [sys.executable, "-m", "benchmarks.compiled_memory", "--sizes", "tiny", "--json",
       os.path.join(scratch, "m.json"),
       "--rows", "optax.adamw", *PROJECTED, "--update-rows", *UPDATE_ALONE], cwd=ROOT, env=env)]


background.register("compiled_tiny", _command, 500)


@pytest.fixture(scope="module")
def compiled_tiny():
  done = background.result("compiled_tiny")
  assert not done.timed_out and done.returncodes[0] == 0, done.stderrs[0][-3000:]
  with open(os.path.join(background.scratch("compiled_tiny"), "m.json")) as f:
    return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("layout", compiled_memory.LAYOUTS)
@pytest.mark.parametrize("name", PROJECTED)
def test_the_step_saves_what_the_state_saves(compiled_tiny, name, layout):
  adamw, cell = compiled_tiny[f"tiny/{layout}/optax.adamw"], compiled_tiny[f"tiny/{layout}/{name}"]
  assert cell["state"] < adamw["state"]
  assert compiled_memory.overage(cell, adamw) <= compiled_memory.SCALARS


@pytest.mark.slow
@pytest.mark.parametrize("layout", compiled_memory.LAYOUTS)
def test_the_update_needs_no_more_than_adamws(compiled_tiny, layout):
  cells = {n: compiled_tiny[f"tiny/{layout}/{n}"] for n in ("optax.adamw",) + PROJECTED}
  assert cells["galore_adamw"]["update_temp"] <= cells["optax.adamw"]["update_temp"]
  # Fira: GaLore's temporaries plus at most one float32 matrix of the largest kernel.
  hidden, inter = compiled_memory.TINY[:2]
  stack = compiled_memory.TINY[3] if layout == "stacked" else 1
  assert (cells["fira_adamw"]["update_temp"]
          <= cells["galore_adamw"]["update_temp"] + 4 * hidden * inter * stack)


@pytest.mark.slow
def test_the_fused_step_needs_less_than_the_usual_one(compiled_tiny):
  cell = lambda name, fused="": compiled_tiny[f"tiny/stacked/{name}{fused}"]
  hidden, inter, _, layers = compiled_memory.TINY
  stacked_grad = 2 * layers * (4 * hidden * hidden + 3 * hidden * inter)  # bf16 kernels
  usual, fused = cell("optax.adamw")["step_peak"], cell("optax.adamw", "/fused")["step_peak"]
  # The layers' whole gradient never exists; the rest of it and the activations do.
  assert fused <= usual - 0.9 * stacked_grad
  galore = cell("galore_adamw", "/fused")["step_peak"]
  assert cell("galore_adamw8bit", "/fused")["step_peak"] < galore
  assert cell("apollo_mini", "/fused")["step_peak"] < galore
  # FRUGAL's blocks choose their tensors over all layers: go.fused_init refuses them.
  assert "refused" in cell("frugal_blocks", "/fused")
  # Each other fused step saves what its state saves.
  for name in (n for n in PROJECTED if n != "frugal_blocks"):
    assert compiled_memory.overage(cell(name, "/fused"), cell("optax.adamw")) <= compiled_memory.SCALARS, name


def _tree(shapes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {k: jax.random.normal(key, s) for (k, s), key in zip(shapes.items(), keys)}


_DIMS = {"w": go.DimensionNumbers(), "v": go.DimensionNumbers(reduction_axes=0, output_axes=2)}
SHAPES = {"a": (5, 24, 40), "b0": (24, 40), "b1": (24, 40), "c": (3, 2, 16, 12)}


# Every method and every projector storage (float, 8-bit, 4-bit, regenerated), each once.
@pytest.mark.parametrize("refresh, storage", [
    ("svd", None), ("randomized", 8), ("power", 4), ("random", "regenerated")])
def test_refresh_batches_give_the_same_bases_whatever_the_budget(refresh, storage):
  grads = _tree(SHAPES)
  options = GaLoreOptions(
      rank=6, refresh=refresh, projector_bits=storage if storage != "regenerated" else None,
      regenerate_projector=storage == "regenerated")
  leaves = jax.tree.leaves(grads)
  plans = parts.plan(options, grads)
  todo = plan_lib.projected(plans)
  storage = parts.storage(options)
  stored = [storage.init(p, g, None) for p, g in zip(plans, leaves)]
  if refresh == "power":  # warm-started: start from a first refresh
    stored = refresh_step.refresh_in_batches(
        plan_lib.refresh_batches(todo, 2**30), leaves, stored, [optax.MaskedNode()] * 4,
        jnp.int32(0), {p.index: jnp.bool_(True) for p in todo}, options)[0]
  due = {p.index: jnp.bool_(True) for p in todo}
  sched = [optax.MaskedNode()] * len(leaves)
  results = []
  for budget, pack in ((2**30, True), (4 * 24 * 40 * 2, True), (0, False)):
    batches = plan_lib.refresh_batches(todo, budget, pack)
    new, _ = jax.jit(lambda l, s, b=batches: refresh_step.refresh_in_batches(
        b, l, s, sched, jnp.int32(3), due, options))(leaves, stored)
    results.append((batches, new))
  kinds = [{(len(b.plans), b.looped) for b in batches} for batches, _ in results]
  # Several leaves in one call; a stack in a loop of calls; one matrix a call.
  assert (3, False) in kinds[0] and (1, True) in kinds[1] and (2, False) in kinds[1]
  assert all(n == 1 for n, _ in kinds[2])
  for _, new in results[1:]:
    for x, y in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(new)):
      if refresh in ("svd", "random"):
        np.testing.assert_array_equal(x, y)
      else:  # XLA may fuse a sketch's products differently for another batch shape
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_a_large_8bit_leaf_updated_in_chunks_equals_one_pass():
  # 2 × 4096 blocks of 256: updated in chunks; the same values as the whole-leaf pass.
  g = {"w": jax.random.normal(jax.random.key(0), (2048, 1024), jnp.bfloat16)}
  tx = go.scale_by_adam_8bit()
  state = tx.init(g)
  assert state.mu["w"].absmax.size > adam_8bit._BLOCKS_PER_CHUNK
  chunked, s1 = jax.jit(tx.update)(g, state)
  chunked, s1 = jax.jit(tx.update)(g, s1)
  blocks = adam_8bit._BLOCKS_PER_CHUNK
  try:
    adam_8bit._BLOCKS_PER_CHUNK = 10**9  # one pass over the whole leaf
    update = jax.jit(go.scale_by_adam_8bit().update)  # a new function: traced anew
    whole, s2 = update(g, state)
    whole, s2 = update(g, s2)
  finally:
    adam_8bit._BLOCKS_PER_CHUNK = blocks
  for x, y in zip(jax.tree.leaves((chunked, s1)), jax.tree.leaves((whole, s2))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_weights_read_apart_from_the_forward_are_their_float32_values(dtype):
  # Every bfloat16 and float16 bit pattern (infinities, NaNs and subnormals included), and
  # float32 values, bit for bit what astype gives.
  if dtype == jnp.float32:
    x = jax.random.normal(jax.random.key(0), (4096,), dtype) * 1e30
  else:
    x = jax.lax.bitcast_convert_type(jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16), dtype)
  got = jax.jit(tree_utils.float32_apart)(x)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, jnp.uint32),
                                jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("dependency", [0.0, -0.0, 2.5, float("nan"), float("-inf")])
def test_a_value_tied_to_another_keeps_its_bits(dtype, dependency):
  # Every bfloat16 and float16 bit pattern (±0, infinities, NaNs, subnormals), whatever the
  # scalar it waits for is.
  if dtype == jnp.float32:
    x = jnp.concatenate([jnp.array([0.0, -0.0, jnp.inf, -jnp.inf, jnp.nan, 1e-45]),
                         jax.random.normal(jax.random.key(0), (4096,)) * 1e30])
  else:
    x = jax.lax.bitcast_convert_type(jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16), dtype)
  bits = {jnp.bfloat16: jnp.uint16, jnp.float16: jnp.uint16, jnp.float32: jnp.uint32}[dtype]
  got = jax.jit(tree_utils.after)(x, jnp.full((3, 2), dependency))
  np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, bits),
                                jax.lax.bitcast_convert_type(x, bits))


def test_integers_and_booleans_tied_to_a_value_keep_theirs():
  ints = jnp.array([0, -1, 7, jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max], jnp.int32)
  flags = jnp.array([True, False])
  for dependency in (0.0, -0.0, float("nan"), 3.0):
    got_ints, got_flags = jax.jit(lambda a, b, d: (tree_utils.after(a, d), tree_utils.after(b, d)))(
        ints, flags, jnp.full((2,), dependency))
    np.testing.assert_array_equal(got_ints, ints)
    np.testing.assert_array_equal(got_flags, flags)


def test_a_tie_costs_nothing_off_the_cpu():
  # Only XLA:CPU's default scheduler runs state-only work early: a GPU program has no tie.
  args = (jax.ShapeDtypeStruct((8, 4), jnp.bfloat16), jax.ShapeDtypeStruct((3,), jnp.float32))
  text = lambda platform: jax.export.export(
      jax.jit(tree_utils.after), platforms=[platform])(*args).mlir_module()
  assert "stablehlo.or" in text("cpu")
  assert "stablehlo.or" not in text("cuda")


# A refresh from the previous bases or the moments, a realignment, a tracker, random bases.
READS_STORED_BASES = {
    "osd_adamw": lambda: go.osd_adamw(0.05, rank=8),
    "subtrack_adamw": lambda: go.subtrack_adamw(0.05, rank=8),
    "coap_adamw": lambda: go.coap_adamw(0.05, rank=8),
    "golore_adamw": lambda: go.golore_adamw(0.05, rank=8),
    "conda": lambda: go.conda(0.05),
}


@pytest.mark.parametrize("name", sorted(READS_STORED_BASES))
def test_stored_bases_read_besides_the_projection_are_copied_once_the_gradient_exists(name):
  # XLA copies stored bases that conditionals read. A copy of the state alone is made by
  # XLA:CPU's default scheduler at the start of the step, for every leaf, and held (LLaMA-7B,
  # what tying them saved: OSD per-layer 1.5 GiB, SubTrack++ stacked 1.0, Conda 2.0). Every
  # reader of a stored basis in the compiled update must read something else too (the
  # gradient it is tied to).
  w = jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)
  tx = READS_STORED_BASES[name]()
  state = jax.eval_shape(tx.init, {"w": w})
  hlo = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower({"w": w}, state, {"w": w}).compile()
  entry = hlo.as_text().split("ENTRY")[1].splitlines()
  bases = [re.match(r"\s*(%\S+) = ", line).group(1) for line in entry
           if "parameter(" in line and "projectors" in line]
  assert bases, entry
  for basis in bases:
    readers = [line for line in entry[1:] if "parameter(" not in line
               and re.search(re.escape(basis) + r"[,)]", line)]
    assert readers, entry
    for line in readers:
      operands = re.search(r"\w+\(([^)]*)\)", line.split(" = ", 1)[1]).group(1).split(", ")
      assert len(operands) >= 2, line  # untied: copy(%...projectors...)


@pytest.mark.parametrize("update_dtype", [jnp.bfloat16, jnp.float32])
def test_a_basis_is_widened_for_its_product_only_once_the_update_exists(update_dtype):
  # XLA:CPU's default scheduler makes an operation as soon as its operands exist: a widened
  # basis that depended on the basis alone would be made at the start of the step for every
  # leaf (GoLore at 1B: +0.66 GiB). The float32 copy the product reads must have operands
  # besides the basis (what it is tied to) in the compiled program.
  basis = jax.ShapeDtypeStruct((64, 8), jnp.bfloat16)
  r = jax.ShapeDtypeStruct((8, 48), update_dtype)
  hlo = jax.jit(lambda b, r: projection.project_back(r, {"u": b})).lower(basis, r).compile()
  entry = hlo.as_text().split("ENTRY")[1]
  widened = [line for line in entry.splitlines() if re.match(r"\s*%\S+ = f32\[64,8\]", line)]
  assert len(widened) == 1, entry
  operands = re.search(r"fusion\(([^)]*)\)", widened[0]).group(1).split(", ")
  assert len(operands) >= 2, widened[0]  # without the tie: fusion(%b.1)


def test_a_stack_loop_slices_float32_reads_as_they_are(monkeypatch):
  """Raw bits only for what is narrower than float32: a float32 array's bits are a copy of it
  (Adafactor's float32 low-rank update: LLaMA-7B stacked, default scheduler, 55.22 GiB with the
  reads sliced as they are, 56.73 with their bits; target 54.48)."""
  monkeypatch.setattr(outputs, "SLICE_BYTES", 1)  # a matrix a slice: a loop
  params = {"w": jnp.ones((6, 32, 48))}
  tx = go.galore_adafactor(1e-2, rank=4, update_proj_gap=2, dimension_numbers={"w": _DIMS["w"]})
  jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
  assert "scan[" in jaxpr
  # Neither the float32 bases nor the low-rank gradient and update, nor their slices.
  assert not re.search(r"u32\[\d+,\d+,\d+\]", jaxpr), re.findall(r"u32\[[\d,]+\]", jaxpr)


def test_a_stack_loop_writes_bf16_slices_as_raw_bits(monkeypatch):
  """XLA:CPU writes a bf16 slice through a float32 copy of the whole array: in the stack loop,
  a pass over the stack for every slice (a (16, 1024, 2816) stack's plain GaLore step: 910 ms,
  517 ms with the slices written as raw bits)."""
  monkeypatch.setattr(outputs, "SLICE_BYTES", 1)  # a matrix a slice: a loop
  params = {"w": jnp.ones((6, 32, 48), jnp.bfloat16)}
  tx = go.galore_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers={"w": _DIMS["w"]})
  hlo = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile().as_text()
  writes = re.findall(r"= (\w+)\[6,32,48\]\S* dynamic-update-slice\(", hlo)
  assert writes == ["u16"], writes


def test_a_refresh_loop_writes_bf16_bases_as_raw_bits():
  """The refresh of a stack larger than its budget writes each slice's new bases into the
  stored stack: as raw bits, not through a float32 copy of the whole stack (XLA:CPU's bf16
  slice write) for every slice."""
  params = {"w": jnp.ones((6, 32, 48), jnp.bfloat16)}
  tx = go.galore_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers={"w": _DIMS["w"]},
                       refresh_memory_budget=1)
  hlo = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
      params, tx.init(params), params).compile().as_text()
  writes = re.findall(r"= (\w+)\[6,4,32\]\S* dynamic-update-slice\(", hlo)
  assert writes == ["u16"], writes


@pytest.mark.parametrize("make", [
    lambda: go.galore_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers=_DIMS),
    lambda: go.fira_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers=_DIMS),
    lambda: go.apollo_adamw(1e-2, rank=4, update_proj_gap=2, dimension_numbers=_DIMS),
], ids=["galore", "fira", "apollo"])
def test_a_stack_applied_a_slice_at_a_time_equals_the_whole_stack(make, monkeypatch):
  # (6, 32, 48): batch axis leading (scanned layers); (16, 5, 12): batch axis in the middle.
  params = {"w": jnp.ones((6, 32, 48)), "v": jnp.ones((16, 5, 12), jnp.bfloat16)}

  def train(slice_bytes):
    monkeypatch.setattr(outputs, "SLICE_BYTES", slice_bytes)
    tx = make()  # a new update function: traced anew
    update, state, p = jax.jit(tx.update), tx.init(params), params
    loops = str(jax.make_jaxpr(tx.update)(params, state, params)).count("scan[")
    for t in range(3):  # a refresh, a plain step, a refresh
      g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape, x.dtype), p)
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    return p, loops

  (whole, whole_loops), (sliced, sliced_loops) = train(2**30), train(1)
  assert sliced_loops == whole_loops + 2  # each stack in a loop of one matrix a call
  # Reductions may be ordered differently for a slice: a float32 rounding, one bf16 ulp.
  np.testing.assert_allclose(sliced["w"], whole["w"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.float32(sliced["v"]), np.float32(whole["v"]), rtol=0, atol=2**-7)


def _conditionals_running(jaxpr, primitive: str):
  """The `cond` equations of `jaxpr` (nested ones too) whose branches run `primitive`."""
  found = []
  for eqn in jaxpr.eqns:
    params = [b for v in eqn.params.values() for b in (v if isinstance(v, tuple) else (v,))]
    subs = [getattr(v, "jaxpr", v) for v in params if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
    if eqn.primitive.name == "cond" and any(primitive in str(s) for s in subs):
      found.append(eqn)
    for s in subs:
      found += _conditionals_running(s, primitive)
  return found


@pytest.mark.parametrize("make", [
    lambda: go.subtrack_adamw(0.05, rank=8, update_proj_gap=2),
    lambda: go.golore_adamw(0.05, rank=8, update_proj_gap=2, random_from_step=4)],
    ids=["subtrack", "golore"])
def test_a_switched_refresh_is_given_the_gradient_as_stored(make):
  # A refresh that switches methods under `lax.cond` (`go.switch_refresh`) converts the gradient
  # inside each branch, into the method's own float32 copy: given a float32 operand, the step
  # held two float32 copies of the matrix (LLaMA-7B per-layer SubTrack++: 172 MiB more live).
  w = jnp.ones((64, 48), jnp.bfloat16) + jnp.eye(64, 48, dtype=jnp.bfloat16)
  tx = make()
  jaxpr = jax.make_jaxpr(tx.update)({"w": w}, tx.init({"w": w}), {"w": w}).jaxpr
  switches = _conditionals_running(jaxpr, "svd")
  assert switches
  for eqn in switches:
    widened = [v.aval for v in eqn.invars
               if sorted(v.aval.shape[-2:]) == [48, 64] and v.aval.dtype == jnp.float32]
    assert not widened, eqn.invars
  # And its first refresh (an SVD) gives GaLore's bases, bit for bit.
  basis = lambda tx: jax.tree.leaves(
      jax.jit(tx.update)({"w": w}, tx.init({"w": w}), {"w": w})[1][0].projectors)
  np.testing.assert_array_equal(basis(tx), basis(go.galore_adamw(0.05, rank=8)))
