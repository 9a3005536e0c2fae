"""Optimizer-state memory of the paper's LLaMA sizes, counted exactly.

Every figure is `go.tree_bytes(jax.eval_shape(tx.init, params))`: the state
the transformation really builds for the whole example LLaMA (embeddings, LM
head, norms and all decoder layers; attention and MLP kernels projected via
`go.path_mask(r"attn|mlp")`), without allocating it. "Optimizer state" is
everything in that state: moments (with their 8-bit block scales), projectors
(with their quantization scales and zero points), step counters.

  python benchmarks/memory.py                  # all sizes, writes results/memory.{md,png}
  python benchmarks/memory.py --sizes 60m 7b --out /tmp/memory
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Optional

import jax
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repository root, for `examples`
import common  # noqa: E402

from galore_optax import adam  # noqa: E402
from galore_optax import adam_8bit  # noqa: E402
from galore_optax import masking  # noqa: E402
from galore_optax import transform  # noqa: E402
from galore_optax import tree_utils  # noqa: E402

# GaLore ranks of the paper (Zhao et al. 2024, Table 2 and Section 5).
RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
TARGETS = r"attn|mlp"
MASK = masking.path_mask(TARGETS)
LR = 1e-3  # no effect on the state; every optimizer needs one
PAPER_GALORE, PAPER_GALORE_8BIT = 65.5, 82.5  # % below BF16 AdamW at 7B (abstract)
TARGET_REDUCTION = 85.0  # issue 3: 8-bit moments + quantized projectors at 7B


class Missing(Exception):
  """A row whose transformation is not in the library (yet)."""


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  param_dtype: str
  build: Callable[[int], tuple[optax.GradientTransformation, str]]


def _accepts(fn: Callable[..., Any], kwargs: dict) -> bool:
  params = inspect.signature(fn).parameters
  if any(p.kind is p.VAR_KEYWORD for p in params.values()):
    return True
  return all(k in params for k in kwargs)


def _library(module: str, name: str) -> Optional[Callable[..., Any]]:
  try:
    return getattr(importlib.import_module(module), name, None)
  except ImportError:
    return None


def _galore_row(module: str, name: str, inner: Optional[Callable[[], Any]], **kwargs):
  """A row built by `module.name(LR, rank=..., mask=MASK, **kwargs)`.

  While `name` is not in the library, or does not take `kwargs` yet, the row
  is composed from the pieces that make it (scale_by_galore with `inner` and
  a learning rate; weight decay is 0 and stateless), when `inner` is given.
  """

  unknown = lambda f: ", ".join(k for k in kwargs if not _accepts(f, {k: None}))

  def build(rank):
    fn = _library(module, name)
    if fn is not None and _accepts(fn, kwargs):
      return fn(LR, rank=rank, mask=MASK, **kwargs), f"`go.{name}`"
    if inner is not None and _accepts(transform.scale_by_galore, kwargs):
      tx = optax.chain(
          transform.scale_by_galore(rank, inner=inner(), mask=MASK, **kwargs),
          optax.scale_by_learning_rate(LR),
      )
      why = "is not in the library" if fn is None else f"takes no {unknown(fn)}"
      return tx, f"`scale_by_galore(inner={inner.__name__})` + lr, as `go.{name}` {why}"
    reasons = [f"`go.{name}` does not exist" if fn is None
               else f"`go.{name}` takes no {unknown(fn)}"]
    if inner is not None:
      reasons.append(f"`scale_by_galore` takes no {unknown(transform.scale_by_galore)}")
    raise Missing("; ".join(reasons))

  return build


def _contrib_galore(rank):
  return common.contrib_galore(LR, rank, TARGETS), "`optax.contrib.galore`, scale_by_adam inside"


def _adam8bit():
  return adam_8bit.scale_by_adam_8bit()


_adam8bit.__name__ = "scale_by_adam_8bit"


def rows() -> list[Row]:
  g = "galore_optax.alias"
  hf = adam.scale_by_adam_hf
  out = [
      Row("AdamW, fp32 states", "float32", lambda r: (optax.adamw(LR), "`optax.adamw`")),
      Row("AdamW, bf16 states (baseline)", "bfloat16", lambda r: (optax.adamw(LR), "`optax.adamw`")),
      Row("8-bit AdamW", "bfloat16", lambda r: (adam_8bit.adamw_8bit(LR), "`go.adamw_8bit`")),
      Row("optax.contrib.galore", "bfloat16", _contrib_galore),
      Row("GaLore AdamW, std", "bfloat16", _galore_row(g, "galore_adamw", hf)),
      Row("GaLore AdamW, reverse_std (memory-minimal side)", "bfloat16",
          _galore_row(g, "galore_adamw", hf, proj_type="reverse_std")),
      Row("GaLore AdamW, std, int8 projectors", "bfloat16",
          _galore_row(g, "galore_adamw", hf, projector_bits=8)),
      Row("GaLore AdamW8bit, std", "bfloat16", _galore_row(g, "galore_adamw8bit", _adam8bit)),
      Row("GaLore AdamW8bit, std, int8 projectors", "bfloat16",
          _galore_row(g, "galore_adamw8bit", _adam8bit, projector_bits=8)),
      Row("GaLore AdamW8bit, std, int4 projectors", "bfloat16",
          _galore_row(g, "galore_adamw8bit", _adam8bit, projector_bits=4)),
      Row("GaLore AdamW8bit, reverse_std, int8 projectors", "bfloat16",
          _galore_row(g, "galore_adamw8bit", _adam8bit, proj_type="reverse_std", projector_bits=8)),
      Row("GaLore AdamW8bit, reverse_std, int4 projectors", "bfloat16",
          _galore_row(g, "galore_adamw8bit", _adam8bit, proj_type="reverse_std", projector_bits=4)),
      Row("GaLore Adafactor, std", "bfloat16", _galore_row(g, "galore_adafactor", None)),
      Row("GradNormLoRP", "bfloat16", _galore_row("galore_optax.gradnorm", "gradnorm_lorp", None)),
      Row("GradNormLoRP 8-bit", "bfloat16",
          _galore_row("galore_optax.gradnorm", "gradnorm_lorp8bit", None)),
  ]
  return out


BASELINE = "AdamW, bf16 states (baseline)"


def _projector_bytes(state) -> int:
  """Bytes under a state field named projector(s) (ours and optax.contrib's)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if any(getattr(k, "name", None) in ("projectors", "projector") for k in path):
      total += tree_utils.tree_bytes(leaf)
  return total


@dataclasses.dataclass
class Cell:
  total: int
  projectors: int
  how: str


def measure(sizes) -> tuple[dict, dict, dict]:
  """{row label: {size: Cell}}, {row label: reason missing}, {size: (params, projected)}."""
  table: dict[str, dict[str, Cell]] = {}
  missing: dict[str, str] = {}
  counts = {}
  for size in sizes:
    trees = {}
    for row in rows():
      if row.label in missing:
        continue
      if row.param_dtype not in trees:
        trees[row.param_dtype] = common.llama_params(size, row.param_dtype)
      params = trees[row.param_dtype]
      try:
        tx, how = row.build(RANKS[size])
      except Missing as e:
        missing[row.label] = str(e)
        continue
      state = jax.eval_shape(tx.init, params)
      table.setdefault(row.label, {})[size] = Cell(
          tree_utils.tree_bytes(state), _projector_bytes(state), how)
    params = trees["float32"]
    flags = masking.resolve_mask(MASK, params)
    leaves = jax.tree.leaves(params)
    counts[size] = (sum(x.size for x in leaves), sum(x.size for x, f in zip(leaves, flags) if f))
  return table, missing, counts


def _gib(b: int) -> str:
  return f"{b / 2**30:.2f}"


def _reduction(cell: Cell, base: Cell) -> float:
  return 100.0 * (1.0 - cell.total / base.total)


def report(table, missing, counts, sizes) -> str:
  big = sizes[-1]
  base = table[BASELINE]
  lines = [
      "# Optimizer-state memory", "",
      common.environment(), "",
      "Exact bytes of `jax.eval_shape(tx.init, params)` (no allocation) for the whole example "
      "LLaMA (`examples/llama.py`: embeddings, LM head, RMSNorm scales and every decoder layer; "
      "vocab 32000, untied). GaLore projects the attention and MLP kernels "
      f"(`go.path_mask(r\"{TARGETS}\")`) at the paper's ranks "
      + ", ".join(f"{s}: {RANKS[s]}" for s in sizes)
      + "; embeddings, LM head and norms keep full-size states of the same optimizer "
      "(8-bit ones for the 8-bit rows, as bitsandbytes does). \"Optimizer state\" is all of "
      "the state: moments (and their fp32 block absmax for 8-bit moments), projectors (and "
      "their scales/zero points when quantized) and step counters. Parameters, gradients and "
      "activations are not included. All rows but the first hold bf16 parameters, so float "
      "moments and projectors are bf16.", "",
      "Parameters: " + ", ".join(
          f"{s} {counts[s][0] / 1e6:,.1f}M ({counts[s][1] / 1e6:,.1f}M projected)" for s in sizes)
      + ".", "",
      f"## LLaMA-{big.upper()}, rank {RANKS[big]}", "",
      "| optimizer | built from | moments etc. (GiB) | projectors (GiB) | total (GiB) | bytes | below bf16 AdamW (negative: above) |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  for label, cells in table.items():
    if big not in cells:
      continue
    c = cells[big]
    lines.append(
        f"| {label} | {c.how} | {_gib(c.total - c.projectors)} | {_gib(c.projectors)} | "
        f"{_gib(c.total)} | {c.total:,} | {_reduction(c, base[big]):.1f}% |")
  lines += ["", "## All sizes: total GiB (reduction below bf16 AdamW)", "",
            "| optimizer | " + " | ".join(f"{s} (r={RANKS[s]})" for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes)]
  for label, cells in table.items():
    lines.append(f"| {label} | " + " | ".join(
        f"{_gib(cells[s].total)} ({_reduction(cells[s], base[s]):.1f}%)" if s in cells else "–"
        for s in sizes) + " |")

  lines += ["", "## Against the paper", ""]
  std = table.get("GaLore AdamW, std", {}).get(big)
  if std is not None:
    ours_std = _reduction(std, base[big])
    # The paper's 8-bit figure matches counting every GaLore state element
    # (moments and projector) at one byte.
    one_byte = 100.0 * (1.0 - (std.total / 2) / base[big].total)
    lines += [
        f"- GaLore (bf16): paper {PAPER_GALORE}% below BF16 AdamW at 7B; here "
        f"{ours_std:.1f}% for `galore_adamw` with the reference's side choice (std), all "
        "state in bf16, which is the paper's Table 1 accounting (projector m·r plus two "
        "moments n·r per projected m×n matrix, 2mn for Adam elsewhere) applied to the "
        "whole model.",
    ]
    eight = table.get("GaLore AdamW8bit, std", {}).get(big)
    if eight is not None:
      lines.append(
          f"- 8-bit GaLore: paper {PAPER_GALORE_8BIT}%. The same state elements counted at "
          f"one byte each, projector included, give {one_byte:.1f}%, which matches the "
          "paper's figure. galore-torch's `GaLoreAdamW8bit` keeps the projector "
          f"in the gradient dtype (bf16), so its real state is {_reduction(eight, base[big]):.1f}% "
          "below (the `GaLore AdamW8bit, std` row, block absmax included).")
  quant = {label: cells[big] for label, cells in table.items()
           if "8bit" in label and "projectors" in label and big in cells}
  if quant:
    best_label, best = min(quant.items(), key=lambda kv: kv[1].total)
    best_red = _reduction(best, base[big])
    verdict = "met" if best_red >= TARGET_REDUCTION else "not met"
    std_rows = {l: c for l, c in quant.items() if "reverse_std" not in l}
    std_note = ""
    if std_rows and "reverse_std" in best_label:
      std_best = max(_reduction(c, base[big]) for c in std_rows.values())
      std_note = (f" With the reference's side choice (std) the best is {std_best:.1f}%, "
                  f"{'above' if std_best >= TARGET_REDUCTION else 'below'} the target.")
    lines.append(
        f"- Target of issue 3 (≥ {TARGET_REDUCTION:.0f}% below bf16 AdamW at {big.upper()} with "
        f"8-bit moments and quantized projectors): **{verdict}** by `{best_label}`, "
        f"{best_red:.1f}%.{std_note} All such rows: " + "; ".join(
            f"{lbl} {_reduction(c, base[big]):.1f}%" for lbl, c in quant.items()) + ".")
  else:
    lines.append(
        f"- Target of issue 3 (≥ {TARGET_REDUCTION:.0f}% with 8-bit moments and quantized "
        "projectors): not measurable, no quantized-projector row could be built.")
  lines.append(
      "- The side: 'std' projects the smaller side of each matrix (the reference's choice, "
      "kept for parity); for an MLP kernel the other side ('reverse_std') stores a larger "
      "projector but moments of the smaller side, which is less memory whenever a projector "
      "element costs less than two moment elements (always, with equal dtypes). "
      "`optax.contrib.galore` picks that side for non-square kernels, which is why its bf16 "
      "state equals the reverse_std row, not the std one.")
  adafactor = table.get("GaLore Adafactor, std", {}).get(big)
  if adafactor is not None:
    lines.append(
        f"- `galore_adafactor` ({_reduction(adafactor, base[big]):.1f}%) keeps no first moment "
        "(beta1=None, the default) and a factored second moment (a row and a column vector per "
        "matrix), so nearly all of its state is the projector, kept in float32 as galore-torch's "
        "`GaLoreAdafactor` does.")
  if missing:
    lines += ["", "## Rows not measured", ""]
    lines += [f"- {label}: {why}" for label, why in missing.items()]
  return "\n".join(lines) + "\n"


def plot(table, sizes, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  big = sizes[-1]
  labels = [lbl for lbl, cells in table.items() if big in cells]
  moments = [(table[l][big].total - table[l][big].projectors) / 2**30 for l in labels]
  projectors = [table[l][big].projectors / 2**30 for l in labels]
  fig, axes = plt.subplots(1, 2, figsize=(14, 0.42 * len(labels) + 2),
                           gridspec_kw={"width_ratios": [3, 2]})
  ax = axes[0]
  y = range(len(labels))[::-1]
  ax.barh(list(y), moments, label="moments (+ block scales, counters)")
  ax.barh(list(y), projectors, left=moments, label="projectors")
  ax.set_yticks(list(y), labels, fontsize=8)
  base = table[BASELINE][big].total / 2**30
  ax.axvline(base * (1 - TARGET_REDUCTION / 100), color="k", ls="--", lw=1,
             label=f"{TARGET_REDUCTION:.0f}% below bf16 AdamW")
  ax.set_xlabel("GiB")
  ax.set_title(f"Optimizer state, LLaMA-{big.upper()} (rank {RANKS[big]}), exact from eval_shape")
  ax.legend(fontsize=8, loc="lower right")
  ax = axes[1]
  # One colour per row (the default cycle repeats after ten) and fp32 AdamW,
  # at -100%, left out so the interesting range fills the panel.
  colors = plt.get_cmap("tab20").colors
  for i, label in enumerate(labels):
    cells = table[label]
    xs = [s for s in sizes if s in cells]
    reductions = [_reduction(cells[s], table[BASELINE][s]) for s in xs]
    if min(reductions) < 0:
      continue
    ax.plot(xs, reductions, marker="o", label=label, lw=1, color=colors[i % len(colors)])
  ax.axhline(TARGET_REDUCTION, color="k", ls="--", lw=1)
  ax.set_ylabel("% below bf16 AdamW")
  ax.set_xlabel("model size")
  ax.set_title("Reduction by size")
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", nargs="+", default=list(RANKS), choices=list(RANKS))
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "memory"))
  args = parser.parse_args()
  sizes = [s for s in RANKS if s in args.sizes]
  table, missing, counts = measure(sizes)
  text = report(table, missing, counts, sizes)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  plot(table, sizes, args.out + ".png")
  print(text)


if __name__ == "__main__":
  main()
