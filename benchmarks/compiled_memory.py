"""What a compiled train step costs: XLA's buffer assignment, nothing allocated.

For each optimizer, on the benchmarks' LLaMA (`llama_jax`, bf16 parameters, attention and MLP
projected, per-layer or stacked layer leaves):

- state: `go.tree_bytes(jax.eval_shape(tx.init, params))`;
- update: `jit(update + apply_updates, donate params, grads and state)`, temporaries and peak;
- step: `jit(loss + grad + update + apply, donate params and state)` on a 4×256 batch with
  `jax.checkpoint` per layer: temporaries and peak,

where peak = arguments + outputs − aliased + temporaries of `compiled.memory_analysis()`.

XLA:CPU schedules for concurrency by default: independent work (every leaf's update, a
dequantization that needs only the state) starts as early as it can, so buffers live longer
than a memory-minimizing order would keep them. GPU compilers order for memory. Each
measurement therefore runs twice, in a child process per scheduler: XLA:CPU's default, and its
memory-minimizing list scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false`).

  python -m benchmarks.memory --compiled          # all sizes and layouts, into results/memory.md
  python -m benchmarks.compiled_memory --sizes 60m --layouts stacked --json /tmp/m.json
  python -m benchmarks.compiled_memory --sizes 7b --layouts per_layer --rows optax.adamw \
      galore_adamw --workdir /tmp/m --report /tmp/m/step.md     # both schedulers, a table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

# The repository root: the working directory of the per-scheduler children.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULERS = {
    "xla_cpu_default": "",
    "memory": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}
SIZES = ("60m", "1b", "7b")
LAYOUTS = ("per_layer", "stacked")
BATCH = (4, 256)  # rows, tokens per row
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  build: Callable[[str], object]  # size -> optax.GradientTransformation
  baseline: bool = False  # not projected: compared against, not checked
  per_layer_only: bool = False  # needs 2-D kernels


def rows() -> list[Row]:
  """The optimizers measured: optax.adamw, optax.contrib.galore and the library's (from the
  repository's registry, `examples.optimizers`), GaLore also on the reverse side."""
  import optax  # pylint: disable=import-outside-toplevel
  from benchmarks import memory
  from examples import optimizers

  mask, lr = memory.MASK, memory.LR

  def rank(name, size):
    ranks = memory.APOLLO_RANKS if name.startswith("apollo") else memory.RANKS
    return ranks.get(size, TINY_RANK)

  def library(name, **options):
    return lambda s: optimizers.call_factory(name, lr, rank=rank(name, s), projected=mask,
                                             **options)

  measured = [
      Row("optax.adamw", lambda s: optax.adamw(lr), baseline=True),
      Row("optax.contrib.galore",
          lambda s: optimizers.call_factory("optax_contrib_galore", lr, rank=rank("", s),
                                            targets=memory.TARGETS),
          baseline=True, per_layer_only=True),
  ]
  for spec in optimizers.library():
    measured.append(Row(spec.name, library(spec.name), baseline=not spec.projects))
    if spec.name == "galore_adamw":  # the memory-minimal side, the side optax.contrib picks
      measured.append(
          Row("galore_adamw, reverse_std", library("galore_adamw", proj_type="reverse_std")))
  return measured


def measure(tx, params, heads: int, batch=BATCH, step: bool = True, update: bool = True) -> dict:
  """State, update and whole-step bytes of `tx` on abstract bf16 `params` (nothing allocated).

  Args:
    tx: the optimizer.
    params: the parameter tree as `jax.ShapeDtypeStruct`s.
    heads: attention heads of the model.
    batch: (rows, tokens per row) of the step.
    step: also compile the whole training step.
    update: also compile the update alone.

  Returns:
    {"state", "params", "update_temp", "update_peak", "step_temp", "step_peak"} in bytes
    (those of a program not compiled left out).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import optax
  import galore_optax as go

  state = jax.eval_shape(tx.init, params)

  def update_and_apply(p, g, s):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  out = {"state": go.tree_bytes(state), "params": go.tree_bytes(params)}
  if update:
    a = jax.jit(update_and_apply, donate_argnums=(0, 1, 2)).lower(params, params, state).compile()
    out.update(update_temp=a.memory_analysis().temp_size_in_bytes,
               update_peak=go.planned_peak_bytes(a))
  if step:
    c = compile_step(tx, params, heads, batch)
    out.update(step_temp=c.memory_analysis().temp_size_in_bytes,
               step_peak=go.planned_peak_bytes(c))
  return out


def compile_step(tx, params, heads: int, batch=BATCH):
  """The compiled train step of `measure`: loss, gradient, update and apply, params and
  state donated, on abstract arguments."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax
  from benchmarks import llama_jax

  def train_step(p, s, tokens):
    loss, g = jax.value_and_grad(llama_jax.loss)(p, tokens, heads)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((batch[0], batch[1] + 1), jax.numpy.int32)
  return jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()


# Not a paper size: the tests' model (the paper's vocabulary, so embeddings and head dominate).
TINY = (256, 688, 4, 2)
TINY_RANK = 64


def measure_fused(tx, params, heads: int, batch=BATCH) -> dict:
  """The step of `measure` with the update fused into the backward scan (stacked params)."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import llama_jax
  import galore_optax as go

  step = go.fused_scan_step(*llama_jax.fused_parts(heads), tx)
  state = jax.eval_shape(lambda p: go.fused_init(tx, p), params)
  tokens = jax.ShapeDtypeStruct((batch[0], batch[1] + 1), jax.numpy.int32)
  c = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
  return {"state": go.tree_bytes(state), "params": go.tree_bytes(params),
          "step_temp": c.memory_analysis().temp_size_in_bytes,
          "step_peak": go.planned_peak_bytes(c)}


def model(size: str, layout: str):
  """(abstract bf16 params, heads) of a LLaMA size ("tiny" or a paper size) in a layout."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import common
  from benchmarks import llama_jax

  hidden, inter, heads, layers = TINY if size == "tiny" else common.LLAMA_SIZES[size]
  dims = llama_jax.Dims(hidden, inter, heads, layers, vocab=common.VOCAB)
  return llama_jax.param_shapes(dims, jnp.bfloat16, stacked=layout == "stacked"), heads


def worker(sizes, layouts, names, path: str, update_rows=None) -> None:
  """Measures every (size, layout, row) into the JSON file `path`, saved after each; the
  update alone of the rows in `update_rows` only (None: of all)."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  from examples import fileio

  import warnings  # pylint: disable=import-outside-toplevel
  # Donating the gradients of `update` is the convention; XLA says it cannot use them.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  results = common.read_json(path) or {}
  for size in sizes:
    for layout in layouts:
      params, heads = model(size, layout)
      # The usual step of every row, then (stacked leaves) the fused one.
      todo = [(f"{size}/{layout}/{r.name}", r, measure) for r in rows()
              if not (r.per_layer_only and layout != "per_layer")]
      if layout == "stacked":
        todo += [(f"{size}/{layout}/{r.name}/fused", r, measure_fused) for r in rows()
                 if not r.per_layer_only]
      for key, row, how in todo:
        if (names and row.name not in names) or key in results:
          continue
        start = time.perf_counter()
        try:
          if how is measure_fused:
            results[key] = how(row.build(size), params, heads)
          else:
            results[key] = how(row.build(size), params, heads,
                               update=update_rows is None or row.name in update_rows)
        except ValueError as e:  # go.fused_init refuses an update that couples layers
          if how is not measure_fused:
            raise
          results[key] = {"refused": str(e).split(":")[0]}
          common.log(f"{key}: refused")
          fileio.write_json(path, results, sort_keys=False)
          continue
        results[key]["seconds"] = time.perf_counter() - start
        common.log(f"{key}: step peak {results[key]['step_peak'] / GIB:.2f} GiB")
        fileio.write_json(path, results, sort_keys=False)


def run_schedulers(sizes, layouts, names=(), workdir: Optional[str] = None) -> dict:
  """{scheduler: results}, each scheduler's measurements in its own child process (both at once)."""
  # Absolute: the children run in _ROOT.
  workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="compiled_memory_"))
  os.makedirs(workdir, exist_ok=True)
  children = {}
  for scheduler, flags in SCHEDULERS.items():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    path = os.path.join(workdir, f"{scheduler}.json")
    cmd = [sys.executable, "-m", "benchmarks.compiled_memory", "--sizes", *sizes,
           "--layouts", *layouts, "--json", path] + (["--rows", *names] if names else [])
    children[scheduler] = (subprocess.Popen(cmd, env=env, cwd=_ROOT), path)
  results = {}
  for scheduler, (child, path) in children.items():
    if child.wait() != 0:
      raise RuntimeError(f"the {scheduler} measurement failed (exit {child.returncode})")
    with open(path) as f:
      results[scheduler] = json.load(f)
  return results


def target(cell: dict, adamw: dict) -> int:
  """The peak a projected optimizer may have: AdamW's, less what its state saves."""
  return adamw["step_peak"] - (adamw["state"] - cell["state"])


# Scalars (step counters, per-matrix norms) may add a few KiB of temporaries.
SCALARS = 2**20


def overage(cell: dict, adamw: dict) -> int:
  """Bytes of `cell`'s step peak above its target (≤ 0: within it)."""
  return cell["step_peak"] - target(cell, adamw)


def _verdict(excess: int) -> str:
  if excess <= SCALARS:
    return "yes"
  return f"no (+{excess / GIB:.2f})" if excess >= GIB // 100 else f"no (+{excess / 2**20:.0f} MiB)"


def _gib(b) -> str:
  return "–" if b is None else f"{b / GIB:.2f}"


def _labels(layout: str) -> list[tuple[str, str, bool]]:
  """(row label, result key suffix, baseline) of a layout's rows; stacked adds the fused ones."""
  out = [(r.name, r.name, r.baseline) for r in rows()]
  if layout == "stacked":
    out += [(f"{r.name}, fused", f"{r.name}/fused", r.baseline) for r in rows()]
  return out


def report(results: dict, sizes, layouts) -> list[str]:
  """Markdown lines: one table per size and layout, both schedulers side by side.

  A fused row (the update inside the backward scan) is checked against the
  usual optax.adamw step, as the usual rows are.
  """
  lines = []
  for size in sizes:
    for layout in layouts:
      labels = _labels(layout)
      cells = {s: {label: results[s].get(f"{size}/{layout}/{key}") for label, key, _ in labels}
               for s in results}
      if not any(v for c in cells.values() for v in c.values()):
        continue
      default, memory_ = cells.get("xla_cpu_default", {}), cells.get("memory", {})
      lines += [f"### LLaMA-{size.upper()}, {layout.replace('_', '-')} leaves", "",
                "| optimizer | state | update temp, XLA:CPU default | update temp, memory "
                "scheduler | step peak, XLA:CPU default | target | met | step peak, memory "
                "scheduler | target | met |",
                "|---|---:|---:|---:|---:|---:|:-:|---:|---:|:-:|"]
      for label, _, baseline in labels:
        d, m = default.get(label), memory_.get(label)
        if not d and not m:
          continue
        any_cell = d or m
        if "refused" in any_cell:
          lines.append(f"| {label} | refused by `go.fused_init`: {any_cell['refused']} |"
                       + " |" * 8)
          continue
        verdicts = []
        for cell, table in ((d, default), (m, memory_)):
          adamw = table.get("optax.adamw")
          if not cell or not adamw or baseline:
            verdicts.append((_gib(cell and cell["step_peak"]), "", ""))
            continue
          verdicts.append((_gib(cell["step_peak"]), _gib(target(cell, adamw)),
                           _verdict(overage(cell, adamw))))
        temps = [_gib(c.get("update_temp")) if c else "–" for c in (d, m)]
        lines.append(f"| {label} | {_gib(any_cell['state'])} | {' | '.join(temps)} | "
                     + " | ".join(" | ".join(v) for v in verdicts) + " |")
      lines.append("")
  return lines


def plot(results: dict, size: str, path: str) -> None:
  """Step peaks of one size, per layout and scheduler, against AdamW's target line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [r.name for r in rows()]
  panels = [(s, l) for s in results for l in LAYOUTS
            if results[s].get(f"{size}/{l}/optax.adamw")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.4 * len(names) + 2),
                           squeeze=False)
  for ax, (scheduler, layout) in zip(axes[0], panels):
    cells = [(n, results[scheduler].get(f"{size}/{layout}/{n}")) for n in names]
    cells = [(n, c) for n, c in cells if c]
    adamw = results[scheduler][f"{size}/{layout}/optax.adamw"]
    y = list(range(len(cells)))[::-1]
    state = [c["state"] / GIB for _, c in cells]
    params = [c["params"] / GIB for _, c in cells]
    rest = [(c["step_peak"] - c["state"] - c["params"]) / GIB for _, c in cells]
    ax.barh(y, params, label="parameters", color="0.7")
    ax.barh(y, state, left=params, label="optimizer state")
    ax.barh(y, rest, left=[p + s for p, s in zip(params, state)],
            label="the rest of the step (gradients, activations, temporaries)")
    for yi, (n, c) in zip(y, cells):
      ax.plot([target(c, adamw) / GIB] * 2, [yi - 0.4, yi + 0.4], color="k", lw=1.5)
    ax.set_yticks(y, [n for n, _ in cells], fontsize=8)
    ax.set_xlabel("GiB (black tick: AdamW's peak less the state saved)")
    ax.set_title(f"LLaMA-{size.upper()}, {layout}, {scheduler}", fontsize=9)
  axes[0][0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES + ("tiny",))
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
  parser.add_argument("--rows", nargs="*", default=(), help="row names; default all")
  parser.add_argument("--json", help="results file (resumed if present)")
  parser.add_argument("--update-rows", nargs="*", help="with --json: the rows whose update "
                      "alone is compiled too; default all (the others: state and step only)")
  parser.add_argument("--workdir", help="with --report: both schedulers' results files "
                      "(xla_cpu_default.json, memory.json; resumed if present)")
  parser.add_argument("--report", help="markdown file: the tables of the rows measured under "
                      "both schedulers in --workdir")
  args = parser.parse_args(argv)
  if args.report:
    if not args.workdir:
      parser.error("--report needs --workdir")
    from benchmarks import common  # pylint: disable=import-outside-toplevel
    results = run_schedulers(args.sizes, args.layouts, tuple(args.rows), args.workdir)
    common.write_report(args.report, [
        "# The compiled train step", "", common.environment(), "",
        "Peaks in GiB from XLA's buffer assignment (`go.planned_peak_bytes`), nothing allocated; "
        "both schedulers, each in its own process with every row side by side; target: "
        "optax.adamw's step peak less what the state saves. The module docstring of "
        "`benchmarks/compiled_memory.py` says what is measured.", ""]
        + report(results, args.sizes, args.layouts))
    return
  if not args.json:
    parser.error("--json is required (or --report with --workdir)")
  worker(args.sizes, args.layouts, tuple(args.rows), args.json,
         None if args.update_rows is None else tuple(args.update_rows))


if __name__ == "__main__":
  main()
