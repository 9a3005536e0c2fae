"""GPU evidence in one command: projector refresh, optimizer step, 7B peak memory, 60M quality.

  python -m benchmarks.gpu                            # all four parts, about 8 min on one H100/H200
  python -m benchmarks.gpu --part refresh,step        # a subset
  python -m benchmarks.gpu --smoke --out /tmp/gpu.md  # the same code with tiny sizes (CPU, < 60 s)

Writes benchmarks/results/gpu.md (or --out) with gpu.png and gpu.json beside it; docs/gpu.md
says how to run it on a GPU machine and what to watch for.

1. refresh: each refresh method of the library (exact SVD, randomized, warm power) on a bf16
   gradient of 4096×11008 (rank 1024) and 2048×5461 (rank 512) with a power-law spectrum:
   median time and captured energy ‖PᵀG‖²/‖G‖² relative to the exact SVD's.
2. step: one optimizer step (update + apply, jit with donated params and state) on the
   LLaMA-1B tree (bf16 parameters, synthetic gradients, attention and MLP at rank 512):
   refresh step, plain step, amortized step for T = 200, ratios to optax.adamw, all
   optimizers side by side in one process.
3. memory: peak device memory (`memory_stats()['peak_bytes_in_use']`) of a LLaMA-7B training
   step (bf16, batch 4×256, remat per layer, donated buffers), one process per optimizer.
4. quality: the example's 60M LLaMA, 2,000 steps of 32×256 tokens, AdamW at its tuned lr vs
   galore_adamw (paper recipe) vs optax.contrib.galore, through `python -m examples.compare`.

How it runs: this process never touches the accelerator. Each part runs in a child process
(gpu_children.py) with a time budget (progress on stderr, results as JSON), so a part that
crashes, runs out of memory or hangs costs only its own rows, and the report is rewritten
after every part (gpu_report.py). The memory part starts one child per optimizer, because
peak statistics are per process: the children compile at the same time, then measure one
after another. What is measured, and against which targets: gpu_spec.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

_CHILD_ENV = dict(os.environ)  # what children start from (main() changes this process's)

from benchmarks import common  # noqa: E402
from examples import fileio  # noqa: E402
from benchmarks import gpu_report  # noqa: E402
from benchmarks.gpu_spec import (COMPARE_FLAGS, FULL, GAP, GIB, OPTIMIZERS, PAPER_LR,  # noqa: E402
                                 PARTS, QUALITY_OPTIMIZERS, SMOKE, Sizes)

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
CHILD = "benchmarks.gpu_children"  # run as `python -m` from _ROOT


@dataclasses.dataclass
class Run:
  sizes: Sizes
  smoke: bool
  out: str  # markdown path; .png and .json beside it
  workdir: str  # task and result files of the children
  command: str
  budgets: dict
  quality_data: Optional[str]
  memory_jobs: Optional[int]
  compile_threads: int
  report: dict = dataclasses.field(default_factory=dict)
  cpu: bool = False  # the children's backend is the CPU

  def env(self, memory: bool = False) -> dict:
    env = dict(_CHILD_ENV, PYTHONUNBUFFERED="1")
    if self.cpu:
      # CPU only: concurrent LAPACK calls each starting OpenBLAS threads thrash a
      # small machine.
      env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if memory:
      # Several children share the device while they compile: none may grab 75% of it up
      # front (JAX's default), and the one measuring may use nearly all of it.
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
    return env

  def hard_limit(self, part: str) -> float:
    """Seconds after which a part's children are stopped: its budget plus a margin."""
    return 1.1 * self.budgets[part] + 15


def _spawn(run: Run, name: str, task: dict, memory: bool = False):
  task_path = os.path.join(run.workdir, f"{task.get('tag', name)}.task.json")
  task["result"] = task_path.replace(".task.json", ".result.json")
  task["log_start"] = common.log_start()
  fileio.write_json(task_path, task, sort_keys=False)
  proc = subprocess.Popen([sys.executable, "-m", CHILD, "--worker", name, "--task", task_path],
                          env=run.env(memory), cwd=_ROOT)
  return proc, task


def _collect(proc, task, timed_out: bool, limit: float) -> dict:
  result = common.read_json(task["result"]) or {}
  if timed_out:
    result.update(status="timeout", error=f"stopped after {limit:.0f} s (time budget)")
  elif proc.returncode != 0 and result.get("status") in (None, "started", "ok", "compiled"):
    result.update(status="error", error=result.get("error") or
                  f"the child process exited with code {proc.returncode} (crashed?)")
  return result


def _run_child(run: Run, name: str, task: dict, limit: float) -> dict:
  proc, task = _spawn(run, name, task)
  try:
    proc.wait(timeout=limit)
    timed_out = False
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    timed_out = True
  return _collect(proc, task, timed_out, limit)


def part_refresh(run: Run) -> dict:
  task = dict(shapes=run.sizes.refresh_shapes, budget_s=run.budgets["refresh"],
              max_rounds=run.sizes.max_rounds, compile_threads=run.compile_threads)
  return _run_child(run, "refresh", task, run.hard_limit("refresh"))


def _subset(names: list, chosen: Optional[tuple]) -> tuple[list, list]:
  """(names to run, names left out) for a Sizes row subset."""
  if chosen is None:
    return names, []
  return [n for n in names if n in chosen], [n for n in names if n not in chosen]


def part_step(run: Run) -> dict:
  rows, left_out = _subset([name for name, o in OPTIMIZERS.items() if o.step],
                           run.sizes.step_rows)
  task = dict(dims=dataclasses.asdict(run.sizes.step_dims), rank=run.sizes.step_rank, rows=rows,
              budget_s=run.budgets["step"], max_rounds=run.sizes.max_rounds,
              chain=run.sizes.chain, compile_threads=run.compile_threads)
  result = _run_child(run, "step", task, run.hard_limit("step"))
  done = {r["name"] for r in result.get("rows", [])} | set(result.get("errors", {}))
  result.setdefault("skipped", [])
  result["skipped"] += [n for n in rows if n not in done and n not in result["skipped"]]
  result["left_out"] = left_out
  return result


def memory_rows(state_bytes: dict, chosen: Optional[tuple] = None) -> tuple[list, list, str]:
  """Part 3's optimizers (the fixed rows and the library's smallest-state optimizer), the
  rows left out of `chosen`, and the name of the smallest."""
  names = [name for name, o in OPTIMIZERS.items() if o.memory]
  smallest = min(state_bytes, key=state_bytes.get)
  names, left_out = _subset(names, chosen)
  if smallest not in names:
    names.append(smallest)
  return names, left_out, smallest


def part_memory(run: Run) -> dict:
  names, left_out, smallest = memory_rows(run.report["probe"]["state_bytes"],
                                          run.sizes.memory_rows)
  limit = run.hard_limit("memory")
  deadline = time.perf_counter() + limit
  jobs = run.memory_jobs or (2 if run.cpu else len(names))
  base = dict(dims=dataclasses.asdict(run.sizes.memory_dims), rank=run.sizes.memory_rank,
              batch=run.sizes.memory_batch, steps=2)
  pending, children, rows = list(names), {}, []

  def start_more():
    while pending and len(children) < jobs and time.perf_counter() < deadline:
      name = pending.pop(0)
      tag = f"memory{names.index(name)}"
      children[name] = _spawn(run, "memory", dict(
          base, row=name, tag=tag, go_file=os.path.join(run.workdir, tag + ".go")), memory=True)

  start_more()
  for name in names:  # measure one at a time, in order, while the others compile
    if name not in children:
      start_more()
    if name not in children:  # the part's time is up
      rows.append(dict(name=name, status="timeout", error=f"not started within {limit:.0f} s"))
      continue
    proc, task = children[name]
    timed_out = False
    while proc.poll() is None and (common.read_json(task["result"]) or {}).get("status") != "compiled":
      if time.perf_counter() > deadline:
        timed_out = True
        break
      time.sleep(0.1)
    if not timed_out and proc.poll() is None:
      common.log(f"memory: {name}: compiled, measuring")
      open(task["go_file"], "w").close()
      try:
        proc.wait(timeout=max(deadline - time.perf_counter(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out:
      proc.kill()
      proc.wait()
    row = _collect(proc, task, timed_out, limit)
    rows.append(dict(row, name=name))
    del children[name]
    if row.get("peak_bytes") is not None:
      common.log(f"memory: {name}: peak {row['peak_bytes'] / GIB:.2f} GiB")
    elif row.get("status") == "ok":
      common.log(f"memory: {name}: measured (no peak statistics on this backend)")
    else:
      common.log(f"memory: {name}: {row.get('status')}: {row.get('error')}")
    start_more()
  failed = [r for r in rows if r.get("status") != "ok"]
  return dict(status="ok" if not failed else ("timeout" if all(
      r.get("status") == "timeout" for r in failed) else "error"),
              rows=rows, smallest=smallest, left_out=left_out,
              error="; ".join(f"{r['name']}: {r.get('error')}" for r in failed) or None)


def compare_command(run: Run, out_dir: str, json_path: str, help_text: str) -> list:
  q = run.sizes.quality
  cmd = [sys.executable, "-m", "examples.compare", "--config", q["config"],
         "--optimizers", ",".join(QUALITY_OPTIMIZERS),
         # AdamW is tuned on the grid; the GaLore optimizers run the paper's recipe.
         "--lr", f"galore_adamw={PAPER_LR}", "--lr", f"optax_contrib_galore={PAPER_LR}",
         "--lr-grid", "0.333,1,3", "--tune-steps", str(q["tune_steps"]),
         "--steps", str(q["steps"]), "--batch-size", str(q["batch_size"]),
         "--seq-len", str(q["seq_len"]), "--seeds", "0", "--out", out_dir, "--json", json_path]
  if "--update-proj-gap" in help_text:
    cmd += ["--update-proj-gap", str(GAP)]  # the paper's gap (compare's own default is for CPU)
  if "--no-progress" in help_text:
    cmd += ["--no-progress"]
  if "--eval-every" in help_text and q["steps"] >= 1000:
    cmd += ["--eval-every", str(q["steps"] // 8)]  # the final evaluation is always made
  if run.quality_data:
    cmd += ["--data", run.quality_data]
  return cmd


def _as_list(value) -> list:
  if value is None:
    return []
  if isinstance(value, dict):
    return [value[k] for k in sorted(value, key=str)]
  return list(value) if isinstance(value, (list, tuple)) else [value]


def compare_records(data) -> list:
  """examples.compare's --json as one dict per optimizer, in the keys of the contract."""
  if isinstance(data, dict):
    for key in ("optimizers", "results", "runs"):
      if isinstance(data.get(key), (list, dict)):
        data = data[key]
        break
  if isinstance(data, dict):
    data = [dict(v, name=v.get("name", k)) for k, v in data.items() if isinstance(v, dict)]
  if not isinstance(data, list) or not data:
    raise ValueError(f"examples.compare --json holds no per-optimizer records: {str(data)[:200]}")
  records = []
  for r in data:
    missing = [k for k in ("name", "final_eval_loss", "wall_s") if k not in r]
    if missing:
      raise ValueError(f"examples.compare --json record lacks {missing}; keys: {sorted(r)}")
    losses = [float(x) for x in _as_list(r["final_eval_loss"]) if x is not None]
    if r.get("error") or not losses:
      records.append(dict(name=r["name"], error=r.get("error") or "no final eval loss"))
      continue
    mean = float(r["mean"]) if r.get("mean") is not None else sum(losses) / len(losses)
    std = float(r["std"]) if r.get("std") is not None else (  # sample std; none for 1 seed
        math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        if len(losses) > 1 else None)
    records.append(dict(name=r["name"], grid=_as_list(r.get("grid")),
                        tuning_losses=_as_list(r.get("tuning_losses")),
                        chosen_lr=r.get("chosen_lr"), at_grid_edge=r.get("chosen_at_grid_edge"),
                        losses=losses, mean=mean, std=std, wall_s=float(r["wall_s"]),
                        state_bytes=r.get("state_bytes"), step_time_s=r.get("step_time_s")))
  return records


def part_quality(run: Run) -> dict:
  limit = run.hard_limit("quality")
  started = time.perf_counter()
  env = run.env()
  try:
    help_text = subprocess.run([sys.executable, "-m", "examples.compare", "--help"], env=env,
                               cwd=_ROOT, capture_output=True, text=True, timeout=120).stdout
  except subprocess.TimeoutExpired:
    return dict(status="error", error="python -m examples.compare --help did not answer in 120 s")
  missing = [f for f in COMPARE_FLAGS if f not in help_text]
  if missing:
    return dict(status="error", error="python -m examples.compare does not take "
                + ", ".join(missing) + " (the tuned comparison CLI of issue 15 is not there)")
  out_dir = os.path.join(run.workdir, "compare")
  json_path = os.path.join(run.workdir, "compare.json")
  cmd = compare_command(run, out_dir, json_path, help_text)
  hidden = {"--out", out_dir, "--json", json_path}  # temporary paths of this run
  shown = "python " + " ".join(shlex.quote(c) for c in cmd[1:] if c not in hidden)
  common.log(f"quality: {shown}")
  proc = subprocess.Popen(cmd, env=env, cwd=_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  output = []

  def relay():  # compare's own progress lines, on this run's time line
    for line in proc.stdout:
      output.append(line)
      if line.strip() and not line.startswith("|"):
        common.log(f"quality: {line.rstrip()[:200]}")

  reader = threading.Thread(target=relay, daemon=True)
  reader.start()
  timed_out = False
  try:
    proc.wait(timeout=max(limit - (time.perf_counter() - started), 1))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    timed_out = True
  reader.join(timeout=5)
  tail = "".join(output)[-600:].strip()
  if timed_out:
    return dict(status="timeout", command=shown,
                error=f"examples.compare stopped after {limit:.0f} s (time budget); its last "
                f"output: {tail}")
  data = common.read_json(json_path)
  if data is None:
    return dict(status="error", command=shown,
                error=f"examples.compare exited with code {proc.returncode} and wrote no "
                f"--json: {tail}")
  try:
    records = compare_records(data)
  except ValueError as e:
    return dict(status="error", command=shown, error=str(e))
  failed = [r["name"] for r in records if r.get("error")]
  config = data.get("config") or {}
  return dict(status="error" if proc.returncode or failed else "ok", command=shown,
              rows=records, data=data.get("data"), compare_wall_s=data.get("wall_s"),
              update_proj_gap=config.get("update_proj_gap"), rank=config.get("rank"),
              error=(f"examples.compare exited with code {proc.returncode}; failed: "
                     f"{', '.join(failed) or 'none'}: {tail}") if proc.returncode or failed
              else None)


PART_RUNNERS = {"refresh": part_refresh, "step": part_step, "memory": part_memory,
                "quality": part_quality}


def write_outputs(run: Run) -> None:
  stem = os.path.splitext(run.out)[0]
  os.makedirs(os.path.dirname(os.path.abspath(run.out)), exist_ok=True)
  run.report.pop("plot_error", None)
  run.report["plot"] = None
  try:
    if gpu_report.plot(run.report, stem + ".png"):
      run.report["plot"] = os.path.basename(stem + ".png")
    elif os.path.exists(stem + ".png"):
      os.remove(stem + ".png")  # an earlier run's plot would not match these tables
  except Exception as e:  # pylint: disable=broad-except  (the tables matter more)
    run.report["plot_error"] = f"{type(e).__name__}: {e}"
  with open(run.out, "w") as f:
    f.write(gpu_report.render(run.report, run.sizes, run.smoke))
  fileio.write_json(stem + ".json", run.report, sort_keys=False)


def _parse_budgets(text: Optional[str], defaults: dict) -> dict:
  """`--budget step=300,memory=200` over the defaults; ValueError naming the bad item."""
  budgets = dict(defaults)
  for item in filter(None, (text or "").split(",")):
    part, _, value = item.partition("=")
    if part not in PARTS:
      raise ValueError(f"--budget {item!r}: unknown part {part!r} "
                       f"(choose from {', '.join(PARTS)}), e.g. --budget step=300")
    try:
      budgets[part] = float(value)
    except ValueError:
      raise ValueError(f"--budget {item!r}: seconds must be a number") from None
    if budgets[part] <= 0:
      raise ValueError(f"--budget {item!r}: seconds must be positive")
  return budgets


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes and budgets: keeps the script working on a CPU (< 60 s)")
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "gpu.md"),
                      help="markdown report; the .png and .json go beside it")
  parser.add_argument("--budget", default=None,
                      help="seconds per part, e.g. step=300,memory=200 (defaults: "
                      + ", ".join(f"{k}={v}" for k, v in FULL.budgets.items()) + ")")
  parser.add_argument("--quality-data", default=None,
                      help="--data for examples.compare (default: its embedded corpus)")
  parser.add_argument("--memory-jobs", type=int, default=None,
                      help="memory children compiling at once (default: all; 2 on a CPU)")
  parser.add_argument("--compile-threads", type=int, default=os.cpu_count() or 1,
                      help="threads compiling the refresh and step programs side by side "
                      "(default: one per core; 1 compiles one after another)")
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run the full sizes even when JAX sees no GPU")
  parser.add_argument("--merge", action="store_true",
                      help="keep the parts of the report already at --out that this call does "
                      "not run (e.g. a part rerun with a larger budget)")
  args = parser.parse_args(argv)
  # This process never needs the accelerator (and must not hold its memory): children do.
  os.environ["JAX_PLATFORMS"] = "cpu"
  parts = [p.strip() for p in args.part.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown or not parts:
    parser.error(f"--part {args.part!r}: choose from {','.join(PARTS)}")
  if args.memory_jobs is not None and args.memory_jobs < 1:
    parser.error("--memory-jobs must be at least 1")
  if args.compile_threads < 1:
    parser.error("--compile-threads must be at least 1")
  sizes = SMOKE if args.smoke else FULL
  shown = ["-m", "benchmarks.gpu"] + list(sys.argv[1:] if argv is None else argv)
  try:
    budgets = _parse_budgets(args.budget, sizes.budgets)
  except ValueError as e:
    parser.error(str(e))
  earlier_parts = {}
  if args.merge:
    earlier = common.read_json(os.path.splitext(args.out)[0] + ".json")
    if earlier is None or "parts" not in earlier:
      parser.error(f"--merge: no report next to {args.out} (its .json) to merge into")
    if earlier.get("smoke") != args.smoke:
      parser.error("--merge: the report at --out comes from a "
                   + ("smoke" if earlier.get("smoke") else "full-size") + " run; this one is not")
    earlier_parts = {k: v for k, v in earlier["parts"].items() if k not in parts}
  run = Run(sizes=sizes, smoke=args.smoke, out=args.out, workdir=tempfile.mkdtemp(prefix="gpu_"),
            command="python " + " ".join(shlex.quote(a) for a in shown), budgets=budgets,
            quality_data=args.quality_data, memory_jobs=args.memory_jobs,
            compile_threads=args.compile_threads)
  run.report = dict(smoke=args.smoke, command=run.command, budgets=budgets, parts=earlier_parts)
  try:
    return _run_parts(run, parts, allow_cpu=args.smoke or args.allow_cpu)
  finally:
    shutil.rmtree(run.workdir, ignore_errors=True)


def _run_parts(run: Run, parts: list, allow_cpu: bool) -> int:
  """The probe, then each part in turn; the report is rewritten after each. Exit code."""
  common.log("probe: device, versions, state sizes")
  probe = _run_child(run, "probe", dict(command=run.command, budget_s=120,
                                        memory_dims=dataclasses.asdict(run.sizes.memory_dims),
                                        memory_rank=run.sizes.memory_rank), 180)
  run.report["probe"] = probe
  if probe.get("status") != "ok":
    write_outputs(run)
    print(f"error: the probe child failed: {probe.get('error')}", file=sys.stderr)
    return 1
  run.cpu = probe["backend"] == "cpu"
  common.log(f"probe: {probe['backend']} ({probe['device_kind']})")
  if run.cpu and not allow_cpu:
    print("error: JAX sees no GPU (backend: cpu). Install a CUDA build of jax (see docs/gpu.md), "
          "or pass --smoke (tiny sizes) or --allow-cpu (full sizes on the CPU).", file=sys.stderr)
    return 2
  for name in parts:
    common.log(f"{name}: started (budget {run.budgets[name]:.0f} s)")
    start = time.perf_counter()
    result = PART_RUNNERS[name](run)
    result.update(took_s=time.perf_counter() - start, budget_s=run.budgets[name],
                  call=run.command, device=probe["device_kind"],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    run.report["parts"][name] = result
    run.report["parts"] = {k: run.report["parts"][k] for k in PARTS if k in run.report["parts"]}
    common.log(f"{name}: {gpu_report.status_text(result)[:200]} in {result['took_s']:.0f} s")
    write_outputs(run)
  common.log(f"wrote {run.out}")
  failed = [n for n in parts if run.report["parts"][n].get("status") != "ok"]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
