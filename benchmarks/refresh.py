"""Projector refresh cost and quality, side by side in one process.

Part 1, one gradient-shaped matrix (default 2048×5461, rank 512, the LLaMA-1B
MLP shape): time of each refresh method against the exact SVD, and the energy
each captures, ‖PᵀG‖²/‖G‖², relative to the exact SVD's, on a matrix with a
power-law spectrum σᵢ = 1/i (no gap at the rank: the hard case for sketches).
Then the whole update at a refresh step against optax.contrib.galore's, on the
same matrix as a one-leaf tree.
Part 2, real gradients: a 60M-shaped LLaMA of the example (examples/models.py)
trained a few AdamW steps on the embedded corpus; energy each method captures
on every attention/MLP gradient, relative to the exact SVD. The warm-started
'power' method starts from the exact basis of an earlier step's gradient.
Part 3, a whole LLaMA parameter tree (embeddings, norms, LM head; attention and
MLP projected): step time of optax.adamw, optax.contrib.galore and galore_adamw
with each refresh, on a refresh step and on a plain step, and the amortized
step time for T = 200.
Part 4, training quality: the example's LLaMA (tiny config, embedded corpus)
trained by galore_adamw with each refresh method on the same data and seed, as
`python -m examples.compare` trains it; final eval loss relative to exact SVD.

Timings are medians over rounds in which every method runs once in turn
(`common.interleaved_medians`), which spreads the load of a shared machine
over all methods alike.

  python -m benchmarks.refresh                                    # CPU defaults, ~5 min
  python -m benchmarks.refresh --m 4096 --n 11008 --rank 1024 --tree 1b --tree-rank 512
"""

from __future__ import annotations

import argparse
import os
import re
import time

# XLA's CPU runtime runs independent LAPACK calls (SVD, QR) at the same time,
# and each starts OpenBLAS's own threads: on a busy 2-core machine a batch of
# eight 136×136 SVDs took 1.96 s instead of 10 ms. One thread each, for every
# method alike, set before jax loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from examples import optimizers as registry

import galore_optax as go

_HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS = r"attn|mlp"
DEFAULT_RANDOMIZED = go.randomized_refresh()
DEFAULT_POWER = go.power_refresh()


def _defaults(fn) -> str:
  import inspect
  return ", ".join(f"{k}={v.default}" for k, v in inspect.signature(fn).parameters.items())


def method_table():
  """Refresh methods compared on single matrices: name -> (fn, warm?)."""
  return {
      "svd (exact)": (go.svd_refresh, False),
      f"randomized (default: {_defaults(go.randomized_refresh)})": (DEFAULT_RANDOMIZED, False),
      "randomized, oversample=8, power_iters=0": (go.randomized_refresh(8, 0), False),
      "randomized, oversample=8, power_iters=2": (go.randomized_refresh(8, 2), False),
      "randomized, oversample=32, power_iters=1": (go.randomized_refresh(32, 1), False),
      f"power, warm (default: {_defaults(go.power_refresh)})": (DEFAULT_POWER, True),
      "power, warm, power_iters=0": (go.power_refresh(power_iters=0), True),
      "power, cold (first refresh)": (DEFAULT_POWER, False),
      # A data-independent orthonormal basis (GoLore's): it captures about r/m of the energy.
      # (APOLLO's Gaussian bases are not orthonormal, so ‖PᵀG‖² is no captured fraction.)
      "random orthonormal (GoLore)": (go.random_orthonormal_refresh, False),
      # SubTrack++'s move: one geodesic step of the previous basis (the scripts' η = 10).
      "geodesic step from the previous basis (SubTrack++, η=10)": (go.geodesic_refresh(10.0), True),
  }


def power_law_matrix(m, n, seed=0):
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)).astype(np.float32))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)).astype(np.float32))[0]
  return jnp.asarray((u / np.arange(1, k + 1, dtype=np.float32)) @ v.T)[None]


def energy(g, bases) -> np.ndarray:
  """‖PᵀG‖²/‖G‖² per matrix of the stack."""
  low = jnp.swapaxes(bases["u"], -1, -2) @ g if "u" in bases else g
  low = low @ jnp.swapaxes(bases["vh"], -1, -2) if "vh" in bases else low
  return np.asarray(jnp.sum(low ** 2, axis=(-2, -1))
                    / jnp.sum(g**2, axis=(-2, -1)))


def _zeros(g, rank, sides):
  batch, m, n = g.shape
  shapes = {"u": (batch, m, rank), "vh": (batch, rank, n)}
  return {s: jnp.zeros(shapes[s]) for s in sides}


def _paths(tree):
  """'a/b/kernel' for every leaf of `tree`."""
  return [jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def std_sides(m, n):
  """The side(s) GaLore's default proj_type keeps for an (out m × in n) gradient, as the
  library decides it: read off the state of a (in, out) kernel."""
  kernel = jax.ShapeDtypeStruct((n, m), jnp.float32)
  state = jax.eval_shape(go.scale_by_galore(rank=1).init, {"w": kernel})
  return tuple(state.projectors["w"])


# ----------------------------------------------------------------------------- part 1


def single_matrix(m, n, rank, rounds):
  g = power_law_matrix(m, n)
  # The gradient at the previous refresh: the same spectrum, plus an
  # independent one of half its norm (the subspace has moved substantially).
  previous_g = g + 0.5 * power_law_matrix(m, n, seed=1)
  sides = std_sides(m, n)
  key = jax.random.key(0)
  exact_previous = go.svd_refresh(previous_g, rank, sides)
  fns, outputs = {}, {}
  for name, (method, warm) in method_table().items():
    jitted = jax.jit(lambda g, prev, method=method: method(g, rank, sides, prev, key))
    prev = exact_previous if warm else _zeros(g, rank, sides)
    fns[name] = lambda f=jitted, prev=prev: jax.block_until_ready(f(g, prev))
    outputs[name] = jitted(g, prev)
  times = common.interleaved_medians(fns, rounds)
  exact = energy(g, outputs["svd (exact)"])[0]
  svd_time = times["svd (exact)"][0]
  rows = [(name, *times[name], svd_time / times[name][0], energy(g, outputs[name])[0] / exact)
          for name in fns]
  return rows, float(exact), sides


def _update_times(optimizers, params, grads, rounds):
  """Interleaved medians of each `jit(tx.update)` at a refresh step (count 0) and at a plain
  one (count 1), keyed "<name> |refresh" and "<name> |plain"."""
  fns = {}
  for name, tx in optimizers.items():
    step = jax.jit(tx.update)
    state0 = tx.init(params)
    state1 = step(grads, state0, params)[1]  # count 1: a plain (non-refresh) step
    fns[name + " |refresh"] = lambda step=step, s=state0: jax.block_until_ready(step(grads, s, params))
    fns[name + " |plain"] = lambda step=step, s=state1: jax.block_until_ready(step(grads, s, params))
  return common.interleaved_medians(fns, rounds)


def single_matrix_steps(m, n, rank, rounds):
  """Whole update at a refresh and a plain step, one (in=n, out=m) Flax kernel."""
  # The path matches TARGETS, so optax.contrib.galore projects it too.
  params = {"mlp": {"kernel": jnp.zeros((n, m), jnp.float32)}}
  grads = {"mlp": {"kernel": jnp.swapaxes(power_law_matrix(m, n)[0], 0, 1)}}
  optimizers = {"optax.contrib.galore (exact SVD)": registry.call_factory(
      "optax_contrib_galore", 1e-2, rank=rank, targets=TARGETS)}
  # refresh='svd' costs what the exact SVD row above costs; left out to keep the run short.
  for name in ("randomized", "power"):
    optimizers[f"galore_adamw, refresh='{name}'"] = go.galore_adamw(1e-2, rank=rank, refresh=name)
  times = _update_times(optimizers, params, grads, rounds)
  rows = []
  for name in optimizers:
    refresh, plain = times[name + " |refresh"][0], times[name + " |plain"][0]
    rows.append((name, refresh, plain, refresh - plain))
  peer = rows[0][3]
  return [r + (peer / r[3],) for r in rows]


# ----------------------------------------------------------------------------- part 2


def real_gradients(steps, gap, batch_size, seq_len, layers, max_docs, accumulate):
  """Attention/MLP gradients of the example LLaMA (60M shapes) at steps-gap and steps.

  Training steps use `batch_size` rows; the two gradients kept are averaged
  over `accumulate` such batches, so that their rank is not capped by a tiny
  CPU batch (a linear layer's gradient has rank <= tokens in the batch).

  Returns the gradients at both steps, {path: (out × in) matrix}, and a
  description.
  """
  from flax import nnx
  from examples import configs, input_pipeline, models, train

  ds = input_pipeline.build_dataset(None, seq_len, max_docs=max_docs)
  cfg = configs.get_model_config(
      "60m", vocab_size=ds.tokenizer.vocab_size, max_seq_len=seq_len, num_layers=layers)
  model = models.Llama(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, batch: train.loss_fn(nnx.merge(graphdef, p), batch)))

  @jax.jit
  def apply(p, o, g):
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  sampler = input_pipeline.BatchSampler(ds.train, batch_size, seed=0)
  extra = input_pipeline.BatchSampler(ds.train, batch_size, seed=1)
  pattern = re.compile(TARGETS)
  snapshots, losses = {}, []
  for s in range(steps + 1):
    value, g = grad_fn(params, jnp.asarray(sampler(s)))
    losses.append(float(value))
    if s in (steps - gap, steps):
      total = g
      for k in range(1, accumulate):
        total = jax.tree.map(jnp.add, total, grad_fn(params, jnp.asarray(extra(s * accumulate + k)))[1])
      total = nnx.to_pure_dict(total)
      snapshots[s] = {
          path: jnp.swapaxes(leaf, 0, 1) / accumulate  # (in, out) -> (out, in)
          for path, leaf in zip(_paths(total), jax.tree.leaves(total))
          if leaf.ndim == 2 and pattern.search(path)
      }
    params, opt_state = apply(params, opt_state, g)
  what = (f"60M-shaped LLaMA of the example (hidden 512, intermediate 1376, {layers} layers, vocab "
          f"{ds.tokenizer.vocab_size}) on {ds.describe()}; AdamW lr 1e-3, batch {batch_size}×{seq_len}; "
          f"gradients at steps {steps - gap} and {steps}, each averaged over {accumulate} batches "
          f"({accumulate * batch_size * seq_len} tokens; loss {losses[0]:.2f} → {losses[-1]:.2f})")
  return snapshots[steps - gap], snapshots[steps], what


def real_gradient_energy(previous, current, rank):
  """Per method: (aggregate ratio, median ratio, min ratio) of captured energy vs exact."""
  groups = {}
  for name, g in current.items():
    groups.setdefault(g.shape, []).append(name)
  key = jax.random.key(0)
  captured = {name: [] for name in method_table()}
  captured_exact = []
  exact_fraction = []
  for shape, names in groups.items():
    g = jnp.stack([current[n] for n in names])
    prev_g = jnp.stack([previous[n] for n in names])
    m, n = shape
    r = min(rank, m, n)  # a thin SVD has at most min(m, n) vectors
    sides = std_sides(m, n)
    warm_start = go.svd_refresh(prev_g, r, sides)
    norms = np.asarray(jnp.sum(g**2, axis=(-2, -1)))
    for name, (method, warm) in method_table().items():
      prev = warm_start if warm else _zeros(g, r, sides)
      bases = jax.jit(lambda g, p, method=method: method(g, r, sides, p, key))(g, prev)
      captured[name].append(energy(g, bases) * norms)
    captured_exact.append(captured["svd (exact)"][-1])
    exact_fraction.append(captured["svd (exact)"][-1] / norms)
  exact = np.concatenate(captured_exact)
  rows = []
  for name, parts in captured.items():
    mine = np.concatenate(parts)
    ratio = mine / exact
    rows.append((name, mine.sum() / exact.sum(), float(np.median(ratio)), float(ratio.min())))
  fractions = np.concatenate(exact_fraction)
  return rows, len(exact), float(np.median(fractions)), float(fractions.min())


# ----------------------------------------------------------------------------- part 3


def tree_steps(size, rank, rounds):
  shapes = common.llama_params(size)
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(jax.tree.leaves(shapes))))
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)
  mask = go.path_mask(TARGETS)
  optimizers = {
      "optax.adamw": optax.adamw(1e-3),
      "optax.contrib.galore (exact SVD)": registry.call_factory(
          "optax_contrib_galore", 1e-2, rank=rank, targets=TARGETS),
  }
  for name in ("svd", "randomized", "power"):
    optimizers[f"galore_adamw, refresh='{name}'"] = go.galore_adamw(
        1e-2, rank=rank, refresh=name, projected=mask)
  # The GaLore family beyond the paper, at the same rank (APOLLO-Mini at 1).
  optimizers["fira_adamw (exact SVD)"] = go.fira_adamw(1e-2, rank=rank, projected=mask)
  optimizers["apollo_adamw (random, projector stored)"] = go.apollo_adamw(
      1e-2, rank=rank, projected=mask)
  optimizers["apollo_adamw (random, projector regenerated)"] = go.apollo_adamw(
      1e-2, rank=rank, projected=mask, regenerate_projector=True)
  optimizers["apollo_mini"] = go.apollo_mini(1e-2, projected=mask)
  # The family beyond: each refresh step does its own kind of subspace move.
  optimizers["golore_adamw (random orthonormal)"] = go.golore_adamw(
      1e-2, rank=rank, projected=mask)
  # SubTrack++ and COAP refresh by an SVD (a sketch) at step 0: their own moves are timed as
  # the plain step of a gap of 1, where every step after the first is one.
  optimizers["subtrack_adamw, gap 1: plain = a geodesic step"] = go.subtrack_adamw(
      1e-2, rank=rank, update_proj_gap=1, projected=mask)
  optimizers["coap_adamw, gap 1: plain = a correlation step"] = go.coap_adamw(
      1e-2, rank=rank, update_proj_gap=1, projected=mask)
  optimizers["osd_adamw (online PCA every step)"] = go.osd_adamw(1e-2, rank=rank, projected=mask)
  optimizers["frugal_adamw (SVD, density 0.25)"] = go.frugal_adamw(1e-2, projected=mask)
  optimizers["conda (complete bases)"] = go.conda(1e-2, projected=mask)
  times = _update_times(optimizers, params, grads, rounds)
  rows = []
  for name in optimizers:
    refresh, plain = times[name + " |refresh"][0], times[name + " |plain"][0]
    rows.append([name, refresh, plain, (refresh + 199 * plain) / 200, times[name + " |plain"]])
  adamw = rows[0][2]
  n_matrices = sum(jax.tree.leaves(mask(params)))
  return [r + [r[2] / adamw, r[3] / adamw] for r in rows], n_matrices, sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- part 4


def training_quality(steps, gap, config_name):
  """Final eval loss of the example's LLaMA trained with each refresh method."""
  import tempfile
  from examples import compare, configs, train

  base = configs.get_config(model=config_name, optimizer="galore_adamw", steps=steps,
                            update_proj_gap=gap, save_checkpoints=False, progress=False,
                            **{k: v for k, v in compare.DEFAULTS.items()
                               if k not in ("steps", "update_proj_gap")})
  dataset = train.load_dataset(base)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in ("svd", "randomized", "power"):
      config = configs.get_config(**{**vars(base), "refresh": method})
      result = train.train_and_evaluate(config, os.path.join(tmp, method), dataset=dataset,
                                        log=lambda *_: None)
      results[method] = result.summary["final_eval_loss"]
  what = (f"LLaMA `{config_name}` of the example, galore_adamw (lr 1e-2, rank "
          f"{train.optimizer_config(base).rank}, scale 0.25, refresh every {gap} steps), "
          f"{steps} steps of {base.batch_size}×{dataset.seq_len} "
          f"tokens on {dataset.describe()}")
  return results, what


# ----------------------------------------------------------------------------- report


def _ms(s):
  return f"{s * 1e3:,.0f} ms" if s >= 0.1 else f"{s * 1e3:,.1f} ms"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--m", type=int, default=2048)
  parser.add_argument("--n", type=int, default=5461)
  parser.add_argument("--rank", type=int, default=512)
  parser.add_argument("--tree", default="60m", choices=list(common.LLAMA_SIZES))
  parser.add_argument("--tree-rank", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--grad-steps", type=int, default=10, help="AdamW steps before the gradient")
  parser.add_argument("--grad-gap", type=int, default=5, help="steps between the two refreshes")
  parser.add_argument("--grad-accumulate", type=int, default=4, help="batches per kept gradient")
  parser.add_argument("--grad-layers", type=int, default=4)
  parser.add_argument("--grad-batch", type=int, default=4)
  parser.add_argument("--grad-seq", type=int, default=128)
  parser.add_argument("--grad-rank", type=int, default=128)
  parser.add_argument("--max-docs", type=int, default=2000)
  parser.add_argument("--train-steps", type=int, default=150)
  parser.add_argument("--train-gap", type=int, default=50)
  parser.add_argument("--train-config", default="tiny")
  parser.add_argument("--skip", nargs="*", default=[],
                      choices=["single", "steps", "real", "tree", "train"])
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "refresh"))
  args = parser.parse_args()
  started = time.time()
  env = common.environment()
  m, n, r = args.m, args.n, args.rank

  lines = ["# Projector refresh: time and captured energy", "", env,
           "- the machine is shared with other jobs (see the load average): timings are medians "
           f"over {args.rounds} interleaved rounds, with the min–max range where it matters", ""]
  verdicts = []
  if "single" not in args.skip:
    rows, exact, sides = single_matrix(m, n, r, args.rounds)
    lines += [
        f"## One {m}×{n} matrix, rank {r}", "",
        f"Power-law spectrum σᵢ = 1/i; 'std' keeps the {'output (U)' if sides == ('u',) else 'input (Vh)'} "
        f"side. The exact SVD captures {exact * 100:.2f}% of ‖G‖². Warm 'power' starts from the "
        "exact basis of the previous gradient, here G plus an independent power-law matrix of "
        "half its norm (a subspace that moved).", "",
        "| method | refresh time (median, min–max) | speed-up vs exact SVD | energy / exact SVD's |",
        "|---|---:|---:|---:|",
    ]
    for name, med, lo, hi, speedup, rel in rows:
      lines.append(f"| {name} | {_ms(med)} ({_ms(lo)}–{_ms(hi)}) | {speedup:.1f}× | {rel * 100:.2f}% |")
    best = [row for row in rows if row[0] != "svd (exact)" and row[5] >= 0.99]
    if best:
      top = max(best, key=lambda row: row[4])
      default = rows[1]
      ok = default[4] >= 5 and default[5] >= 0.99
      verdicts.append(
          f"- CPU target (≥ 5× faster than exact SVD at ≥ 99% of its energy, {m}×{n}, rank {r}): "
          f"**{'met' if ok else 'not met'}** by the default 'randomized' ({default[4]:.1f}×, "
          f"{default[5] * 100:.2f}%); fastest at ≥ 99%: {top[0]} ({top[4]:.1f}×, {top[5] * 100:.2f}%).")
    lines.append("")
  if "steps" not in args.skip:
    rows = single_matrix_steps(m, n, r, args.rounds)
    lines += [
        f"### The whole update on that matrix as a one-leaf tree (Flax kernel {n}×{m})", "",
        "Refresh cost = update at a refresh step − update at a plain step.", "",
        "| optimizer | refresh step | plain step | refresh cost | refresh vs optax.contrib.galore's |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {a} | {_ms(b)} | {_ms(c)} | {_ms(d)} | {e:.1f}× faster |" for a, b, c, d, e in rows]
    lines.append("")
  if "real" not in args.skip:
    previous, current, what = real_gradients(
        args.grad_steps, args.grad_gap, args.grad_batch, args.grad_seq, args.grad_layers, args.max_docs,
        args.grad_accumulate)
    rows, count, exact_med, exact_min = real_gradient_energy(previous, current, args.grad_rank)
    lines += [
        f"## Real gradients, rank {args.grad_rank}", "",
        f"{what}. {count} attention/MLP gradients; the exact rank-{args.grad_rank} SVD captures "
        f"{exact_med * 100:.1f}% of ‖G‖² (median; min {exact_min * 100:.1f}%). Warm 'power' starts "
        f"from the exact basis of the gradient {args.grad_gap} steps earlier (in training, "
        "update_proj_gap = 200 steps earlier; the subspace moves more then).", "",
        "| method | energy / exact SVD's, all matrices | median per matrix | worst matrix |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b * 100:.2f}% | {c * 100:.2f}% | {d * 100:.2f}% |" for a, b, c, d in rows]
    lines.append("")
  if "tree" not in args.skip:
    rows, n_matrices, n_params = tree_steps(args.tree, args.tree_rank, args.rounds)
    lines += [
        f"## Whole LLaMA-{args.tree} tree ({n_params / 1e6:.1f}M parameters, float32), "
        f"{n_matrices} attention/MLP matrices projected at rank {args.tree_rank}", "",
        "Embeddings, LM head and norms take full-size Adam in every optimizer. "
        "Amortized = (refresh step + 199 plain steps) / 200.", "",
        "| optimizer | refresh step | plain step (min–max) | amortized (T=200) | plain / adamw | amortized / adamw |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, refresh, plain, amort, spread, pr, ar in rows:
      lines.append(f"| {name} | {_ms(refresh)} | {_ms(plain)} ({_ms(spread[1])}–{_ms(spread[2])}) | "
                   f"{_ms(amort)} | {pr:.2f}× | {ar:.2f}× |")
    lines.append("")
    tree_rows = rows
  else:
    tree_rows = None
  if "train" not in args.skip:
    losses, what = training_quality(args.train_steps, args.train_gap, args.train_config)
    exact = losses["svd"]
    lines += [
        "## Training quality", "", f"{what}.", "",
        "| refresh | final eval loss | vs exact SVD |", "|---|---:|---:|",
    ]
    lines += [f"| {m} | {loss:.4f} | {(loss / exact - 1) * 100:+.2f}% |" for m, loss in losses.items()]
    lines.append("")
    # Only a higher loss counts against a method; one seed, so differences of
    # a percent or two either way are within run-to-run variation.
    fast = {m: loss / exact - 1 for m, loss in losses.items() if m != "svd"}
    verdicts.append(
        f"- Training quality with the fast refreshes within 1% of exact-SVD loss: "
        f"**{'met' if max(fast.values()) <= 0.01 else 'not met'}** ("
        + ", ".join(f"{m} {d * 100:+.2f}%" for m, d in fast.items())
        + " final eval loss against exact SVD; one seed).")
  if verdicts:
    lines += ["## Targets", ""] + verdicts + [""]
  lines.append(f"Total run time: {time.time() - started:.0f} s.")
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  if tree_rows is not None:
    _plot(tree_rows, args, args.out + ".png")
  print(text)


def _plot(rows, args, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 3.8))
  names = [r[0] for r in rows][::-1]
  y = np.arange(len(names))
  h = 0.27
  for i, (label, col) in enumerate([("refresh step", 1), ("plain step", 2), ("amortized, T=200", 3)]):
    ax.barh(y + (1 - i) * h, [r[col] * 1e3 for r in rows][::-1], height=h, label=label)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("ms (log scale)")
  ax.set_title(f"Step time, LLaMA-{args.tree} tree, rank {args.tree_rank}, "
               f"{jax.default_backend()} ({os.cpu_count()} cores, shared)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
