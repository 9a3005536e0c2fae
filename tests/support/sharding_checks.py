"""Sharded-optimizer checks on 8 virtual CPU devices, in a process of their own.

tests/test_sharding.py runs this file once and asserts on the JSON object it
prints last: one entry per check, holding measured numbers (differences,
counts, bytes, shardings found), not verdicts.

    python tests/support/sharding_checks.py [group ...]   # explicit_init parity nnx orbax example

The device count is fixed when jax starts, so this runs apart from the rest
of the suite, which keeps its single device.
"""

import json
import os
import sys
import tempfile
import time

if "jax" in sys.modules:
  raise RuntimeError("sharding_checks must start jax itself (device count).")
DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
# jaxlib's batched LAPACK kernels (the exact SVD, QR) split their batch over
# XLA's intra-op thread pool and wait for it. That pool has as many threads as
# there are (virtual) devices unless NPROC says more, so when all eight
# devices sit in such a kernel at once nothing is left to run the pieces and
# the step deadlocks (seen ~1 run in 4 on this 2-core machine). More threads
# than devices avoids it; one OpenBLAS thread each avoids oversubscription.
os.environ["NPROC"] = str(2 * DEVICES)
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

import galore_optax as go  # noqa: E402
from examples import optimizers as registry  # noqa: E402

RANK = 5  # odd: divides no mesh axis, so the rank axis must stay replicated
GAP = 2  # refreshes at steps 0, 2, 4, ...
H, INTER, VOCAB, LAYERS = 64, 256, 512, 2
MASK = go.path_mask(r"attn|mlp")
# Tiny moments have few 8-bit blocks; blocks of 32 give every 8-bit moment of
# this model a multiple of 8 blocks, as the default 256 does at real sizes.
BLOCK = 32


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def spec_str(sharding) -> str:
  spec = sharding.spec if hasattr(sharding, "spec") else sharding
  return str(tuple(spec))


# ----------------------------------------------------------------------------
# Shared pieces.


def llama_tiny_params(key):
  """The parameter tree of a LLaMA with scanned layers: (L, in, out) kernels."""
  shapes = {
      "embed": (VOCAB, H),
      "layers": {
          "attention_norm": (LAYERS, H),
          "attn": {n: (LAYERS, H, H) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
          "ffn_norm": (LAYERS, H),
          "mlp": {
              "gate_proj": (LAYERS, H, INTER),
              "up_proj": (LAYERS, H, INTER),
              "down_proj": (LAYERS, INTER, H),
          },
      },
      "norm": (H,),
  }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [0.05 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  )


def param_specs(params, axis_names):
  """FSDP on a 1-d mesh; FSDP x tensor parallel on a 2-d one."""
  if len(axis_names) == 1:
    (fsdp,) = axis_names

    def spec(path, x):  # the largest non-layer axis, over every device
      axes = range(1 if x.ndim == 3 else 0, x.ndim)
      axis = max(axes, key=lambda a: x.shape[a])
      entries = [None] * x.ndim
      entries[axis] = fsdp
      return P(*entries)

    return jax.tree_util.tree_map_with_path(spec, params)
  fsdp, tp = axis_names

  def spec(path, x):
    name = jax.tree_util.keystr(path)
    if "o_proj" in name or "down_proj" in name:
      return P(None, tp, fsdp)  # row parallel
    if "proj" in name:
      return P(None, fsdp, tp)  # column parallel
    if "embed" in name:
      return P(tp, fsdp)
    return P(*([None] * (x.ndim - 1) + [fsdp]))

  return jax.tree_util.tree_map_with_path(spec, params)


# Adam's eps bounds how much a last-bit difference in a gradient entry near
# zero moves its first update (d/dR R/(|R| + eps) <= 1/eps): a sharded
# reduction sums in another order, so with eps = 1e-6 one entry in ~10^4
# lands where a 1e-9 difference becomes 1e-5 in the weights. 1e-4 keeps
# every such difference under 1e-6; the sharded math itself is unchanged.
# bitsandbytes' 8-bit Adam adds eps inside the bias correction, so its
# first-step eps is sqrt(1 - b2) * eps ~ 0.03 eps: it gets 3e-3.
EPS = 1e-4
EPS_8BIT = 3e-3


def optimizer(name, rank=RANK):
  """An optimizer of the library (the repository's registry) or a variant of galore_adamw."""
  common = dict(rank=rank, update_proj_gap=GAP, projected=MASK)
  adam = dict(common, eps=EPS)
  if name == "galore_adamw_projector_bits8":
    return go.galore_adamw(1e-2, projector_bits=8, **adam)
  if name == "galore_lazy_refresh":
    return optax.chain(go.galore(lazy_refresh=True, **adam), optax.scale_by_learning_rate(1e-2))
  eight_bit = registry.REGISTRY[name].eight_bit
  return registry.call_factory(name, 1e-2, weight_decay=0.01, **common,
                               eps=EPS_8BIT if eight_bit else EPS, block_size=BLOCK,
                               min_8bit_size=1024)


def grads_at(params, step):
  """Gradients whose matrices have RANK well-separated leading singular values.

  Exact parity of a projector needs well-conditioned singular vectors: a
  difference of ΔM in the decomposed matrix moves vector i by about
  ΔM / (σ_i − σ_{i+1}). GradNormLoRP decomposes a matrix it computes with a
  sharded reduction (ΔM of a few ulps), and removing each column's radial
  part shifts the spectrum, so the leading values are 1, 0.8, ..., 0.2 and
  the rest 0.02 · 0.5^j (gaps ≥ 0.2), as for a low-rank gradient. (With
  gaps of 0.1 the GradNormLoRP projectors differed by up to 1.1e-6.)
  Vectors and scalars are plain Gaussian.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1000 + step), len(leaves))
  out = []
  for key, x in zip(keys, leaves):
    shape = np.shape(x)
    if len(shape) < 2:
      out.append(jax.random.normal(key, shape, jnp.float32))
      continue
    a, b = shape[-2:]
    k = min(a, b)
    i = jnp.arange(k)
    sigma = jnp.where(i < RANK, 1.0 - 0.2 * i, 0.02 * 0.5 ** (i - RANK))
    left, right = jax.random.split(key)
    u = jnp.linalg.qr(jax.random.normal(left, shape[:-2] + (a, k), jnp.float32))[0]
    v = jnp.linalg.qr(jax.random.normal(right, shape[:-2] + (b, k), jnp.float32))[0]
    out.append((u * sigma) @ jnp.swapaxes(v, -1, -2))
  return treedef.unflatten(out)


def train_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def to_host(tree):
  return jax.tree.map(np.asarray, tree)


def max_float_diff(a, b):
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):
      worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
  return worst


def ints_equal(a, b) -> bool:
  return all(
      np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
      if np.issubdtype(np.asarray(x).dtype, np.signedinteger)
  )


def code_stats(a, b):
  """uint8 codes that differ, all codes, and the largest index distance."""
  bad = total = distance = 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.uint8:
      diff = np.abs(x.astype(np.int32) - y.astype(np.int32))
      bad += int(np.sum(diff > 0))
      total += x.size
      distance = max(distance, int(diff.max(initial=0)))
  return {"mismatched": bad, "total": total, "max_distance": distance}


def sharding_mismatches(arrays, shardings):
  """Paths of the leaves whose sharding is not equivalent to the expected one."""
  bad = []
  flat = jax.tree_util.tree_flatten_with_path(arrays)[0]
  for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
    if not x.sharding.is_equivalent_to(s, x.ndim):
      bad.append(f"{path_str(path)}: {spec_str(x.sharding)} != {spec_str(s)}")
  return bad


def bytes_per_device(tree):
  per = {d: 0 for d in jax.devices()}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per[shard.device] += shard.data.nbytes
  return per


def replicated_bytes(tree):
  return sum(
      x.nbytes for x in jax.tree.leaves(tree) if x.sharding.is_fully_replicated
  )


# ----------------------------------------------------------------------------
# Parity: sharded steps against the single-device result.

PARITY_OPTIMIZERS = ("galore_adamw", "galore_adamw8bit", "gradnorm_lorp")
# Explicit and Auto sharding on the 1-D mesh, Explicit on the 2-D one.
PARITY_MESHES = [((8,), ("fsdp",), AxisType.Explicit), ((8,), ("fsdp",), AxisType.Auto),
                 ((2, 4), ("fsdp", "tp"), AxisType.Explicit)]
PARITY_STEPS = 3


def check_parity(results):
  params = llama_tiny_params(jax.random.key(0))
  grads = [grads_at(params, t) for t in range(PARITY_STEPS)]
  reference, ref_steps = {}, {}
  for name in PARITY_OPTIMIZERS:
    tx = optimizer(name)
    ref_steps[name] = jax.jit(train_step(tx))
    p, s, trail = params, tx.init(params), []
    for t in range(PARITY_STEPS):
      p, s = ref_steps[name](p, s, grads[t])
      trail.append(to_host((p, s)))
    reference[name] = trail

  for mesh_shape, axis_names, axis_type in PARITY_MESHES:
    if True:
      mesh = jax.make_mesh(mesh_shape, axis_names, axis_types=(axis_type,) * len(mesh_shape))
      param_sh = jax.tree.map(
          lambda s: NamedSharding(mesh, s), param_specs(params, axis_names)
      )
      for name in PARITY_OPTIMIZERS:
        t0 = time.perf_counter()
        tx = optimizer(name)
        state_sh = go.opt_state_shardings(tx, params, shardings=param_sh)
        p = jax.device_put(params, param_sh)
        if axis_type == AxisType.Explicit:
          # Shardings live in the types: no out_shardings, the optimizer
          # itself must return the state sharded as it came in.
          with jax.set_mesh(mesh):
            s = jax.jit(tx.init, out_shardings=state_sh)(p)
            step = jax.jit(train_step(tx))
        else:
          s = jax.jit(tx.init, out_shardings=state_sh)(p)
          step = jax.jit(
              train_step(tx),
              in_shardings=(param_sh, state_sh, param_sh),
              out_shardings=(param_sh, state_sh),
          )
        entry = {"init_sharding_mismatches": sharding_mismatches(s, state_sh)}
        if mesh_shape == (8,):
          per = bytes_per_device(s)
          entry.update(
              max_device_bytes=max(per.values()),
              min_device_bytes=min(per.values()),
              total_bytes=go.tree_bytes(s),
              replicated_bytes=replicated_bytes(s),
          )
        trajectory, anchored, codes, counts_equal, kept = [], [], [], True, []
        for t in range(PARITY_STEPS):
          before = to_host((p, s))
          g = jax.device_put(grads[t], param_sh)
          if axis_type == AxisType.Explicit:
            with jax.set_mesh(mesh):
              p, s = step(p, s, g)
          else:
            p, s = step(p, s, g)
          kept += sharding_mismatches(s, state_sh) + sharding_mismatches(p, param_sh)
          got = to_host((p, s))
          # The same step on one device from the same (gathered) inputs.
          one = to_host(ref_steps[name](before[0], before[1], grads[t]))
          trajectory.append(max_float_diff(got, reference[name][t]))
          anchored.append(max_float_diff(got, one))
          codes.append(code_stats(got[1], one[1]))
          counts_equal = counts_equal and ints_equal(got, one)
        entry.update(
            trajectory_max_diff=trajectory,
            one_step_max_diff=anchored,
            code_mismatches=codes,
            counts_equal=counts_equal,
            step_sharding_mismatches=kept[:5],
            seconds=round(time.perf_counter() - t0, 2),
        )
        key = f"{'x'.join(map(str, mesh_shape))}/{axis_type.name}/{name}"
        results[f"parity/{key}"] = entry

  # What a refresh moves between devices: the exact SVD needs whole matrices
  # on one device, the matmul-based methods only (m x k) sketches.
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, ("fsdp",)))
  for method in ("svd", "randomized", "power"):
    tx = go.galore_adamw(1e-2, rank=RANK, update_proj_gap=GAP, projected=MASK, refresh=method)
    state_sh = go.opt_state_shardings(tx, params, shardings=param_sh)
    step = jax.jit(
        train_step(tx),
        in_shardings=(param_sh, state_sh, param_sh),
        out_shardings=(param_sh, state_sh),
    )
    abstract_state = jax.eval_shape(tx.init, params)
    hlo = step.lower(params, abstract_state, params).compile().as_text()
    results[f"parity/refresh_collectives/{method}"] = all_gather_sizes(hlo)


def svd_batches(hlo: str):
  """The batch of every LAPACK SVD call in one device's optimized HLO module."""
  import re  # pylint: disable=import-outside-toplevel

  shapes = re.findall(r"= \(?f32\[([0-9,]+)\][^\n]*lapack_sgesdd", hlo)
  return [int(s.split(",")[0]) if s.count(",") == 2 else 1 for s in shapes]


def check_mesh_refresh(results):
  """A refresh under an Explicit 8-device mesh: each device decomposes its share.

  LAYERS=8 stacked layers (one call of one matrix per device per kernel kind)
  and two per-layer copies of a kernel (one call padded to 8): the SVDs each
  device runs, against the matrices of the tree; and the projectors after two
  refreshes against the same steps on one device.
  """
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,))
  host = llama_tiny_params(jax.random.key(0))
  stacked = {k: jnp.stack([v] * 4, 0) for k, v in host["layers"]["attn"].items()}  # (4·L, H, H)
  host = {"attn": {"stack": stacked["q_proj"], "a0": host["layers"]["attn"]["k_proj"][0],
                   "a1": host["layers"]["attn"]["v_proj"][0]},
          "mlp": host["layers"]["mlp"], "norm": host["norm"]}
  grads0 = jax.tree.map(lambda x: x * 3.0 + 0.01, host)
  for method in ("svd", "randomized", "power"):
    entry = {}
    try:
      tx = go.galore_adamw(1e-2, rank=RANK, update_proj_gap=1, projected=MASK, refresh=method)
      update = lambda g, s, p: tx.update(g, s, p)[1]
      one = jax.jit(update)(grads0, tx.init(host), host)
      one = jax.jit(update)(grads0, one, host)
      with jax.set_mesh(mesh):
        specs = param_specs(host, ("fsdp",))
        put = lambda tree: jax.tree.map(lambda x, sp: jax.device_put(x, sp), tree, specs)
        params, grads = put(host), put(grads0)
        step = jax.jit(update)
        state = step(grads, jax.jit(tx.init)(params), params)
        state = step(grads, state, params)
        hlo = step.lower(grads, state, params).compile().as_text()
      entry["svd_batches"] = svd_batches(hlo)
      entry["projector_max_diff"] = max_float_diff(state[0].projectors, one[0].projectors)
      entry["matrices"] = int(sum(
          x.size // (x.shape[-1] * x.shape[-2]) for x in jax.tree.leaves(host) if x.ndim >= 2))
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    results[f"mesh_refresh/{method}"] = entry


def all_gather_sizes(hlo: str):
  """Bytes of every all-gather result in an optimized HLO module."""
  import re  # pylint: disable=import-outside-toplevel

  sizes = []
  for line in hlo.splitlines():
    if " all-gather(" not in line and " all-gather-start(" not in line:
      continue
    lhs = line.split("=", 1)[1]
    m = re.match(r"\s*\(?\s*(f32|bf16|f16|s32|u8)\[([0-9,]*)\]", lhs)
    if not m:
      continue
    itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u8": 1}[m.group(1)]
    dims = [int(d) for d in m.group(2).split(",") if d]
    sizes.append(int(np.prod(dims, dtype=np.int64)) * itemsize)
  return {"count": len(sizes), "largest_bytes": max(sizes, default=0),
          "total_bytes": int(sum(sizes))}


# ----------------------------------------------------------------------------
# nnx.Optimizer on a sharded NNX model.

NNX_STEPS = 4


def forward(p, x):
  """The test model on a dict of (gathered) weights."""
  h = jax.nn.gelu(x @ p["attn"])
  y = h @ p["mlp"]
  for layer in range(p["mlp_stack"].shape[0]):
    y = y + jnp.tanh(y @ p["mlp_stack"][layer])
  return y * p["norm"]


def nnx_model_class():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  init = nnx.initializers.normal(0.1)

  def gathered(value):
    # FSDP on an Explicit mesh: the matmuls take whole kernels (jax inserts
    # the all-gather; the gradient comes back sharded like the kernel).
    mesh = jax.typeof(value).sharding.mesh
    if mesh is not None and mesh.explicit_axes:
      return jax.sharding.reshard(value, P())
    return value

  class Model(nnx.Module):
    """Kernels sharded over the input axis, the output axis and a stack."""

    def __init__(self, rngs):
      self.attn = nnx.Param(init(rngs.params(), (64, 96)), out_sharding=("fsdp", None))
      self.mlp = nnx.Param(init(rngs.params(), (96, 64)), out_sharding=(None, "fsdp"))
      self.mlp_stack = nnx.Param(
          init(rngs.params(), (2, 64, 64)), out_sharding=(None, "fsdp", None)
      )
      self.norm = nnx.Param(jnp.ones((64,)), out_sharding=("fsdp",))

    def __call__(self, x):
      weights = {k: gathered(getattr(self, k)[...]) for k in ("attn", "mlp", "mlp_stack", "norm")}
      return forward(weights, x)

  return Model


def flat_specs(tree, strip=()):
  """{path: spec} of the arrays of a (pure) tree, NNX `value` keys dropped."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [p for p in path_str(path).split("/") if p != "value"]
    for prefix in strip:
      if parts and parts[0] == prefix:
        parts = parts[1:]
    out["/".join(parts)] = tuple(x.sharding.spec) if hasattr(x, "sharding") else None
  return out


def flat_arrays(tree, strip=()):
  """{path: host array} of a (pure or NNX) tree, NNX `value` keys dropped."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [p for p in path_str(path).split("/") if p != "value"]
    if parts and parts[0] in strip:
      parts = parts[1:]
    out["/".join(parts)] = np.asarray(x)
  return out


def normalize(spec, ndim):
  spec = tuple(spec) + (None,) * (ndim - len(spec))
  return tuple(None if e in ((), None) else e for e in spec)


NNX_CONFIGS = [
    ("Explicit", "galore_adamw", 3),
    ("Explicit", "galore_adamw8bit", 5),
    ("Explicit", "galore_adafactor", 3),
    ("Explicit", "gradnorm_lorp", 5),
    ("Explicit", "gradnorm_lorp8bit", 3),
    ("Auto", "galore_adamw", 3),
    ("Auto", "gradnorm_lorp8bit", 5),
]


def nnx_optimizer(name, rank):
  # The optimizer exactly as a user writes it (no wrapper). The moments of
  # this small model have 320 to 640 elements: 8-bit from 256 on.
  kwargs = dict(rank=rank, update_proj_gap=GAP, projected=MASK)
  if name != "galore_adafactor":
    kwargs["eps"] = EPS
  if name.endswith("8bit"):
    kwargs.update(block_size=BLOCK, min_8bit_size=256, eps=EPS_8BIT)
  return getattr(go, name)(1e-2, **kwargs)


def check_nnx(results):
  from flax import nnx  # pylint: disable=import-outside-toplevel

  Model = nnx_model_class()
  x_host = np.asarray(jax.random.normal(jax.random.key(7), (16, 64)))
  for axis_type, name, rank in NNX_CONFIGS:
    t0 = time.perf_counter()
    key = f"nnx/{axis_type}/{name}/rank{rank}"
    entry = {}
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType[axis_type],) * 2)
    try:
      with jax.set_mesh(mesh):
        model = Model(nnx.Rngs(0))
        params0 = to_host(nnx.as_pure(nnx.state(model, nnx.Param)))
        # The optimizer exactly as a user writes it: no wrapper.
        opt = nnx.Optimizer(model, nnx_optimizer(name, rank), wrt=nnx.Param)
        helper = go.opt_state_shardings(nnx_optimizer(name, rank), model)
        expected = {
            path_str(pth): tuple(sh.spec)
            for pth, sh in jax.tree_util.tree_flatten_with_path(helper)[0]
        }
        ndims = {path_str(pth): len(s.shape) for pth, s in jax.tree_util.tree_flatten_with_path(
            jax.eval_shape(nnx_optimizer(name, rank).init, params0))[0]}

        def mismatches():
          got = flat_specs(nnx.state(opt, nnx.OptState), strip=("opt_state",))
          got.pop("step", None)
          bad = [f"missing {k}" for k in expected if k not in got]
          bad += [f"unexpected {k}" for k in got if k not in expected]
          bad += [
              f"{k}: {got[k]} != {expected[k]}"
              for k in expected
              if k in got and normalize(got[k], ndims[k]) != normalize(expected[k], ndims[k])
          ]
          return bad

        entry["init_spec_mismatches"] = mismatches()
        entry["sharded_state_leaves"] = sum(
            any(e is not None for e in s) for s in expected.values()
        )
        x = jax.device_put(x_host, NamedSharding(mesh, P(("data", "fsdp"))))
        loss_fn = lambda m: jnp.mean(m(x) ** 2)

        @nnx.jit
        def step(model, opt):
          loss, grads = nnx.value_and_grad(loss_fn)(model)
          opt.update(model, grads)
          if axis_type == "Auto":
            # Auto axes: the step's output shardings are XLA's choice unless
            # constrained; Flax's way is the Variables' own metadata.
            for node in (model, opt):
              state = nnx.state(node)
              nnx.update(node, jax.lax.with_sharding_constraint(
                  state, nnx.get_partition_spec(state)))
          return loss

        losses = [float(step(model, opt)) for _ in range(NNX_STEPS)]
        entry["losses"] = losses
        entry["step_spec_mismatches"] = mismatches()
        final = to_host(nnx.as_pure(nnx.state(model, nnx.Param)))
        final_state = flat_arrays(nnx.state(opt, nnx.OptState), strip=("opt_state",))
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
      results[key] = entry
      continue
    # The same steps with plain optax on one device.
    tx = nnx_optimizer(name, rank)
    plain = jax.jit(
        lambda p, s: train_step(tx)(p, s, jax.grad(lambda q: jnp.mean(forward(q, x_host) ** 2))(p))
    )
    p, s = params0, tx.init(params0)
    for _ in range(NNX_STEPS):
      p, s = plain(p, s)
    entry["max_param_diff_vs_single_device"] = max_float_diff(
        {k: final[k] for k in sorted(final)}, {k: p[k] for k in sorted(p)}
    )
    plain_state = flat_arrays(s)
    entry["code_mismatches_vs_single_device"] = code_stats(
        [final_state[k] for k in sorted(plain_state)], [plain_state[k] for k in sorted(plain_state)]
    )
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    results[key] = entry


# ----------------------------------------------------------------------------
# orbax: save, restore into an abstract target, continue.

ORBAX_OPTIMIZERS = (
    "galore_adamw",
    "galore_adamw8bit",
    "galore_adafactor",
    "gradnorm_lorp",
    "gradnorm_lorp8bit",
    "galore_adamw_projector_bits8",
    "galore_lazy_refresh",
)
ORBAX_BEFORE, ORBAX_AFTER = 3, 3  # refreshes at 0, 2 before and 4 after the save


def check_orbax(results):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  params = llama_tiny_params(jax.random.key(0))
  mesh = jax.make_mesh((8,), ("fsdp",))  # Explicit axes, jax.make_mesh's default
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, ("fsdp",)))
  grads = [grads_at(params, t) for t in range(ORBAX_BEFORE + ORBAX_AFTER)]
  for name in ORBAX_OPTIMIZERS:
    t0 = time.perf_counter()
    tx = optimizer(name)
    state_sh = go.opt_state_shardings(tx, params, shardings=param_sh)
    entry = {}
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as workdir:
      step = jax.jit(train_step(tx))
      p = jax.device_put(params, param_sh)
      s = jax.jit(tx.init, out_shardings=state_sh)(p)
      g = [jax.device_put(x, param_sh) for x in grads]
      for t in range(ORBAX_BEFORE):
        p, s = step(p, s, g[t])
      saved = to_host({"params": p, "opt_state": s})
      entry["zero_size_leaves"] = sum(np.size(x) == 0 for x in jax.tree.leaves(saved))
      manager = ocp.CheckpointManager(
          os.path.join(workdir, "ckpt"),
          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
      )
      manager.save(ORBAX_BEFORE, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
      manager.wait_until_finished()
      for t in range(ORBAX_BEFORE, ORBAX_BEFORE + ORBAX_AFTER):
        p, s = step(p, s, g[t])
      uninterrupted = to_host({"params": p, "opt_state": s})

      # A fresh start: the target is built without allocating anything.
      shapes = jax.eval_shape(lambda q: {"params": q, "opt_state": tx.init(q)}, params)
      shardings = {"params": param_sh, "opt_state": state_sh}
      target = jax.tree.map(
          lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings
      )
      restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
      manager.close()
      entry["restored_sharding_mismatches"] = sharding_mismatches(restored, shardings)
      entry["restored_equal"] = all(
          np.array_equal(a, b)
          for a, b in zip(jax.tree.leaves(to_host(restored)), jax.tree.leaves(saved))
      ) and jax.tree.structure(restored) == jax.tree.structure(saved)
      p, s = restored["params"], restored["opt_state"]
      for t in range(ORBAX_BEFORE, ORBAX_BEFORE + ORBAX_AFTER):
        p, s = step(p, s, g[t])
      resumed = to_host({"params": p, "opt_state": s})
    unequal = [
        path_str(path)
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(resumed)[0], jax.tree.leaves(uninterrupted)
        )
        if not np.array_equal(a, b)
    ]
    entry.update(
        leaves=len(jax.tree.leaves(saved)),
        resumed_unequal_leaves=unequal[:10],
        resumed_max_diff=max_float_diff(resumed, uninterrupted),
        seconds=round(time.perf_counter() - t0, 2),
    )
    results[f"orbax/{name}"] = entry


# ----------------------------------------------------------------------------
# The LLaMA example with --mesh.

EXAMPLE_STEPS = 6


def check_example(results):
  from examples import configs  # pylint: disable=import-outside-toplevel
  from examples import input_pipeline  # pylint: disable=import-outside-toplevel
  from examples import train  # pylint: disable=import-outside-toplevel

  nano = configs.LlamaConfig(hidden_size=64, intermediate_size=128, num_heads=2,
                             num_layers=2, vocab_size=None, max_seq_len=32)
  configs.MODEL_CONFIGS["sharding_nano"] = nano
  configs.DEFAULT_RANKS["sharding_nano"] = 5
  words = ("the optimizer projects each gradient matrix onto a low rank subspace and "
           "keeps its moments there while the weights stay full rank").split()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as workdir:
    corpus = os.path.join(workdir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      f.write("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(200)))
    dataset = input_pipeline.build_dataset(corpus, 32, vocab_size=300,
                                 cache_dir=os.path.join(workdir, "cache"))
    for mesh_arg, scan in (("2,2,2", True), ("data=1,fsdp=8,tensor=1", False)):
      t0 = time.perf_counter()
      config = configs.get_config(
          model="sharding_nano", steps=EXAMPLE_STEPS, batch_size=8, scan_layers=scan,
          eval_every=EXAMPLE_STEPS, eval_batches=2, log_every=1, update_proj_gap=2,
          progress=False, mesh=mesh_arg, learning_rate=1e-2,
      )
      result = train.train_and_evaluate(
          config, os.path.join(workdir, f"run_{scan}"), dataset=dataset, log=lambda *_: None
      )
      from flax import nnx  # pylint: disable=import-outside-toplevel

      opt_state = nnx.state(result.optimizer, nnx.OptState)
      params = nnx.state(result.model, nnx.Param)
      per = bytes_per_device(opt_state)
      state_specs = flat_specs(opt_state)
      param_specs_found = flat_specs(params)
      train_losses = [r["loss"] for r in result.history if r["split"] == "train"]
      results[f"example/mesh={mesh_arg}/scan={scan}"] = {
          "train_losses": train_losses,
          "eval_losses": [r["loss"] for r in result.history if r["split"] == "eval"],
          "opt_state_total_bytes": go.tree_bytes(opt_state),
          "opt_state_max_device_bytes": max(per.values()),
          "sharded_state_leaves": sum(
              any(e is not None for e in s) for s in state_specs.values()
          ),
          "state_leaves": len(state_specs),
          "projector_specs": {k: str(v) for k, v in state_specs.items() if k.endswith(("/u", "/vh"))},
          "param_specs": {k: str(v) for k, v in param_specs_found.items()},
          "summary_mesh": result.summary.get("mesh"),
          "seconds": round(time.perf_counter() - t0, 2),
      }


# Every optimizer of the library, as a user writes it, and its parts, for the Explicit-init check.
EXPLICIT_INIT = {
    **{name: (lambda name=name: optimizer(name)) for name in (
        *(spec.name for spec in registry.library()), "galore_adamw_projector_bits8",
        "galore_lazy_refresh")},
    "galore": lambda: go.galore(rank=RANK, projected=MASK),
    "scale_by_galore_bits4_lazy_realigned": lambda: go.scale_by_galore(
        rank=RANK, projected=MASK, projector_bits=4, lazy_refresh=True, realign_moments=True),
    "scale_by_adam_8bit": lambda: go.scale_by_adam_8bit(block_size=BLOCK, min_8bit_size=1024),
    "scale_by_adafactor_hf": lambda: go.scale_by_adafactor_hf(1e-2, scale_parameter=False),
}


def check_explicit_init(results):
  """jax.jit(tx.init) on FSDP-sharded params under an Explicit mesh, no helper.

  Records the state leaves of >= 1 KiB that came out fully replicated although
  an axis of theirs divides the mesh (so the rules would split them), and any
  leaf whose sharding differs from what opt_state_shardings reads back.
  """
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,))
  host = llama_tiny_params(jax.random.key(0))
  for name, make in EXPLICIT_INIT.items():
    entry = {}
    try:
      with jax.set_mesh(mesh):
        specs = param_specs(host, ("fsdp",))
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), host, specs)
        tx = make()
        state = jax.jit(tx.init)(params)
        helper = go.opt_state_shardings(tx, params)
      flat = jax.tree_util.tree_flatten_with_path(state)[0]
      wanted = jax.tree.leaves(helper)
      entry["replicated_but_divisible"] = [
          f"{path_str(p)} {x.shape}" for p, x in flat
          if x.nbytes >= 1024 and x.sharding.is_fully_replicated
          and any(d % DEVICES == 0 for d in x.shape)
      ]
      entry["helper_mismatches"] = [
          f"{path_str(p)}: {spec_str(x.sharding)} != {spec_str(w)}"
          for (p, x), w in zip(flat, wanted)
          if not x.sharding.is_equivalent_to(w, x.ndim)
      ]
      entry["sharded_bytes"] = sum(x.nbytes for _, x in flat if not x.sharding.is_fully_replicated)
      entry["total_bytes"] = sum(x.nbytes for _, x in flat)
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    results[f"explicit_init/{name}"] = entry


def main(groups):
  results = {"devices": jax.device_count()}
  t0 = time.perf_counter()
  for group in groups:
    start = time.perf_counter()
    globals()[f"check_{group}"](results)
    results[f"seconds/{group}"] = round(time.perf_counter() - start, 2)
  results["seconds/total"] = round(time.perf_counter() - t0, 2)
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:] or ["explicit_init", "parity", "mesh_refresh", "nnx", "orbax", "example"])
