"""Where a compiled step's planned peak comes from: live bytes, or the heap's packing.

XLA's buffer assignment places every temporary at an offset of one heap; the planned peak
(`go.planned_peak_bytes`, what `benchmarks.compiled_memory` reports) is the heap's top plus
the arguments and outputs. Its heap simulator also reports the largest sum of the buffers
live at one point of the schedule. The two differ by what the packing leaves unused
(fragmentation): bytes no order of the program's work needs at once, but that its buffers'
sizes and lifetimes make the heap hold. Telling them apart says where to look: a live excess
is a buffer the optimizer keeps too long; a packing excess is the compiler's.

The live sum counts XLA's values, and a value written in place over another (a
dynamic-update-slice chain, a donated buffer) shares its buffer: where a program has many of
those at its peak, the sum can exceed the planned peak (a negative packing column), and then it
says less about what is live.

For each row: its state, its target (with `optax.adamw` first among the rows: AdamW's planned
peak less what the state saves), the planned peak, the live peak (entry parameters included, as
in the planned one), their difference, and where in the schedule the live peak falls (0: the start, 1: the
end; the loss and the last layers' backward come early in a per-layer step, the updates of
the first layers late). From `--xla_dump_to`'s `*-live-range.txt` (`Live ranges at … (peak)`).

  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \\
    python -m benchmarks.compiled_liveness --size 7b --rows optax.adamw galore_adamw fira_adamw
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

GIB = 2**30


def live_peak(dump_dir: str) -> tuple[int, float]:
  """(bytes live at the heap simulator's peak, its position in the schedule, 0..1) of the
  train step dumped in `dump_dir`."""
  [path] = glob.glob(os.path.join(dump_dir, "*train_step*live-range.txt"))
  with open(path) as f:
    lines = f.read().splitlines()
  length = int(re.search(r"max (\d+)", lines[0]).group(1))
  at = next(i for i, line in enumerate(lines) if "(peak)" in line)
  position = int(re.search(r"at (\d+)", lines[at]).group(1)) / length
  total = 0
  for line in lines[at + 1:]:
    m = re.match(r"\s+\S+: (\d+) bytes", line)
    if not m:
      break
    total += int(m.group(1))
  return total, position


def _measure_one(size: str, layout: str, name: str) -> None:
  """Child: compiles `name`'s step with a dump, prints one JSON line."""
  import json  # pylint: disable=import-outside-toplevel
  import galore_optax as go
  from benchmarks import compiled_memory

  import jax
  row = {r.name: r for r in compiled_memory.rows()}[name]
  params, heads = compiled_memory.model(size, layout)
  tx = row.build(size)
  compiled = compiled_memory.compile_step(tx, params, heads)
  print(json.dumps({"planned": go.planned_peak_bytes(compiled),
                    "state": go.tree_bytes(jax.eval_shape(tx.init, params))}))


def measure(size: str, layout: str, name: str) -> dict:
  """{"planned", "state", "live", "position"} of one row, compiled in a child that dumps its HLO."""
  import json  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="liveness_") as dump:
    flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
             " --xla_dump_hlo_module_re=train_step").strip()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.compiled_liveness", "--child", size, layout, name],
        env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["live"], result["position"] = live_peak(dump)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="7b")
  parser.add_argument("--layout", default="per_layer", choices=("per_layer", "stacked"))
  parser.add_argument("--rows", nargs="+", default=["optax.adamw", "galore_adamw"])
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _measure_one(*args.child)
    return
  # The target of issue 18: AdamW's planned peak less what the state saves.
  print("| optimizer | state | target | planned peak | live peak | live − target | "
        "packing (planned − live) | live peak at |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  adamw = None
  gib = lambda b: f"{b / GIB:.2f}"
  for name in args.rows:
    r = measure(args.size, args.layout, name)
    if name == "optax.adamw":
      adamw = r
    target = adamw and adamw["planned"] - (adamw["state"] - r["state"])
    over = "" if not adamw or r is adamw else f"{(r['live'] - target) / GIB:+.2f}"
    print(f"| {name} | {gib(r['state'])} | {gib(target) if target and r is not adamw else ''} | "
          f"{gib(r['planned'])} | {gib(r['live'])} | {over} | "
          f"{gib(r['planned'] - r['live'])} | {r['position']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
