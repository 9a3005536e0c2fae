"""The refresh on a mesh: each device decomposes its share of the matrices.

On 8 virtual CPU devices (`--xla_force_host_platform_device_count=8`), the LLaMA-60M tree of
`llama_jax` (bf16, attention and MLP projected at rank 128, every matrix split over the devices
along its largest axis, FSDP style) under an Explicit mesh: the compiled refresh step's
temporaries per device (`memory_analysis()`), the number of SVDs each device runs (the LAPACK
calls in its program and their batch), and the median wall time of a refresh step, against the
same step with the library given by `--compare` (e.g. an older checkout) in a second process.

  python -m benchmarks.mesh_refresh                                  # this checkout
  python -m benchmarks.mesh_refresh --compare /path/to/old/checkout  # and another, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

DEVICES = 8
_HERE = os.path.dirname(os.path.abspath(__file__))


def measure(layout: str, rounds: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from benchmarks import common
  from benchmarks import llama_jax
  import galore_optax as go

  hidden, inter, heads, layers = common.LLAMA_SIZES["60m"]
  dims = llama_jax.Dims(hidden, inter, heads, layers, vocab=common.VOCAB)
  shapes = llama_jax.param_shapes(dims, jnp.bfloat16, stacked=layout == "stacked")
  mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,))

  def spec(s):  # the largest axis that the devices divide
    axes = sorted(range(len(s.shape)), key=lambda a: -s.shape[a])
    axis = next((a for a in axes if s.shape[a] % DEVICES == 0), None)
    return P(*[("fsdp" if a == axis else None) for a in range(len(s.shape))])

  tx = go.galore_adamw(1e-3, rank=128, projected=go.path_mask(r"attn|mlp"), update_proj_gap=1)
  with jax.set_mesh(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, spec(s)), shapes)
    params = jax.jit(lambda k: llama_jax.init_params(shapes, k), out_shardings=shardings)(
        jax.random.key(0))
    grads = jax.tree.map(lambda x: x * 0.5 + 0.01, params)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    compiled = step.lower(grads, state, params).compile()
    text = compiled.as_text()
    times = []
    out = step(grads, state, params)
    jax.block_until_ready(out)
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(step(grads, state, params))
      times.append(time.perf_counter() - start)
  svds = svds_per_device(text)
  return {"temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
          "svd_calls": svds[0], "svds_per_device": svds[1],
          "refresh_step_s": statistics.median(times), "rounds": rounds,
          "projected_matrices": sum(
              x.size // (x.shape[-1] * x.shape[-2]) for p, x in
              jax.tree_util.tree_flatten_with_path(shapes)[0]
              if re.search(r"attn|mlp", jax.tree_util.keystr(p)))}


def svds_per_device(hlo: str) -> tuple[int, int]:
  """(LAPACK SVD calls in one device's program, SVDs they run): batch × loop trips.

  A call inside a while loop's body runs once per trip (XLA records the trip
  count of loops it knows); loops nested deeper are not followed.
  """
  trips, owner, calls = {}, None, []
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      owner = header.group(1)
    body = re.search(r"body=%?([\w.\-]+)", line)
    if " while(" in line and body:
      n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      trips[body.group(1)] = int(n.group(1)) if n else 1
    m = re.search(r"= \(?f32\[([0-9,]+)\][^\n]*lapack_sgesdd", line)
    if m:
      dims = m.group(1).split(",")
      calls.append((owner, int(dims[0]) if len(dims) == 3 else 1))
  return len(calls), sum(batch * trips.get(where, 1) for where, batch in calls)


def child(library: str, rounds: int) -> dict:
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  env = dict(common.library_env(library),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             NPROC=str(2 * DEVICES), OPENBLAS_NUM_THREADS="1")
  out = subprocess.run([sys.executable, "-m", "benchmarks.mesh_refresh", "--worker", "--rounds",
                        str(rounds)], env=env, capture_output=True, text=True, check=True,
                       cwd=common.ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--compare", help="another checkout's root, measured the same way")
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "mesh_refresh.md"))
  args = parser.parse_args()
  if args.worker:
    print(json.dumps({layout: measure(layout, args.rounds) for layout in ("per_layer", "stacked")}))
    return
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  runs = {"this checkout": child(common.ROOT, args.rounds)}
  if args.compare:
    try:
      label = "commit " + subprocess.check_output(
          ["git", "-C", args.compare, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
      label = f"`{args.compare}`"
    runs[label] = child(os.path.abspath(args.compare), args.rounds)
  lines = ["# The projector refresh on a mesh", "", common.environment(), "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           "| library | leaves | projected matrices | SVDs per device | LAPACK SVD calls in "
           "its program | refresh step temporaries per device | refresh step (median) |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for name, run in runs.items():
    for layout, r in run.items():
      lines.append(f"| {name} | {layout.replace('_', '-')} | {r['projected_matrices']} | "
                   f"{r['svds_per_device']} | {r['svd_calls']} | "
                   f"{r['temp_bytes_per_device'] / 2**20:.1f} MiB | "
                   f"{r['refresh_step_s'] * 1e3:.0f} ms ({r['rounds']} rounds) |")
  common.write_report(args.out, lines)


if __name__ == "__main__":
  main()
