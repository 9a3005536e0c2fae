"""Refresh and plain step times of this checkout against another, as ratios to optax.adamw.

Each checkout runs `refresh.py`'s whole-tree part (`refresh.tree_steps`: the LLaMA-60M tree,
float32, attention and MLP at rank 128, `jit(tx.update)` at a refresh step and at a plain step,
medians of interleaved rounds) in a process of its own, optax.adamw beside every optimizer in
that process; the checkouts run one after the other, so compare ratios, not milliseconds.

  python -m benchmarks.step_times --compare /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import common

_HERE = os.path.dirname(os.path.abspath(__file__))


def child(checkout: str, size: str, rank: int, rounds: int) -> dict:
  """`refresh.tree_steps` of `checkout`, run by that checkout's own benchmark code and library.

  Each checkout measures itself: the optimizers' arguments change between versions of the
  library (e.g. `projected`, once `mask`), so one checkout's benchmark code cannot drive
  another's library.
  """
  call = ("rows, _, _ = refresh.tree_steps(%r, %d, %d); "
          "print(json.dumps({r[0]: r[1:4] for r in rows}))" % (size, rank, rounds))
  if os.path.exists(os.path.join(checkout, "benchmarks", "__init__.py")):
    code, cwd = "import json; from benchmarks import refresh; " + call, checkout
  else:  # from before benchmarks/ was a package: its scripts import their siblings by name
    code, cwd = "import json, refresh; " + call, os.path.join(checkout, "benchmarks")
  # `python -c` puts its working directory first on the path; the library comes next.
  env = dict(os.environ, PYTHONPATH=checkout)
  env.pop("PYTHONSAFEPATH", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=cwd)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--compare", required=True, help="the other checkout's root")
  parser.add_argument("--size", default="60m")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "step_times.md"))
  args = parser.parse_args()
  try:
    other = "commit " + subprocess.check_output(
        ["git", "-C", args.compare, "rev-parse", "--short", "HEAD"], text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    other = args.compare
  runs = {"this checkout": child(common.ROOT, args.size, args.rank, args.rounds),
          other: child(os.path.abspath(args.compare), args.size, args.rank, args.rounds)}
  lines = ["# Step times against an earlier checkout", "", common.environment(), "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           "| optimizer | " + " | ".join(f"{n}: refresh step / AdamW | {n}: plain step / AdamW"
                                          for n in runs) + " | refresh, this / other | plain, "
           "this / other |", "|---|" + "---:|" * (2 * len(runs) + 2)]
  (this, a), (_, b) = runs.items()
  for name in a:
    if name not in b:
      continue
    ra = [x / a["optax.adamw"][1] for x in a[name][:2]]
    rb = [x / b["optax.adamw"][1] for x in b[name][:2]]
    lines.append(f"| {name} | {ra[0]:.2f}× | {ra[1]:.2f}× | {rb[0]:.2f}× | {rb[1]:.2f}× | "
                 f"{ra[0] / rb[0]:.2f} | {ra[1] / rb[1]:.2f} |")
  lines += ["", f"AdamW's plain step: {a['optax.adamw'][1] * 1e3:,.0f} ms ({this}), "
            f"{b['optax.adamw'][1] * 1e3:,.0f} ms ({other})."]
  common.write_report(args.out, lines)


if __name__ == "__main__":
  main()
