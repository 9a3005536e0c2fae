"""The measurements of `benchmarks/gpu.py`, each run in a child process of its own.

  python -m benchmarks.gpu_children --worker step --task TASK.json

The task file holds the sizes, the time budget and where to write the result (JSON,
rewritten as rows complete, so a child stopped at its time limit leaves what it measured).
Only these processes use the accelerator.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from examples import fileio
from benchmarks import gpu_report
from benchmarks import llama_jax
from benchmarks.gpu_spec import EXACT, GAP, OPTIMIZERS, REFRESH_METHODS, TARGETS, build

import galore_optax as go


def _deadline(task: dict) -> float:
  return time.perf_counter() + task["budget_s"]


def _dims(task: dict, key: str) -> llama_jax.Dims:
  return llama_jax.Dims(**task[key])


def worker_probe(task: dict, result: dict, save: Callable[[], None]) -> None:
  """Device, versions, and the state bytes of every library optimizer at the memory size."""
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  shapes = llama_jax.param_shapes(_dims(task, "memory_dims"))
  state_bytes = {name: go.tree_bytes(jax.eval_shape(build(name, task["memory_rank"]).init, shapes))
                 for name, o in OPTIMIZERS.items() if o.smallest_candidate}
  versions = {}
  for dist in ("jaxlib", "flax", "matplotlib"):
    try:
      from importlib import metadata
      versions[dist] = metadata.version(dist)
    except Exception:  # pylint: disable=broad-except
      versions[dist] = "not installed"
  result.update(
      environment=common.environment(task["command"]), backend=jax.default_backend(),
      device_kind=device.device_kind, device_count=jax.device_count(),
      device_memory_bytes=stats.get("bytes_limit"), versions=versions,
      state_bytes=state_bytes, param_bytes=go.tree_bytes(shapes))


@jax.jit
def _captured_energy(g: jax.Array, bases: dict) -> jax.Array:
  """‖PᵀG‖²/‖G‖² in float32 for one stacked (1, m, n) matrix."""
  g = g.astype(jnp.float32)
  r = g
  if "u" in bases:
    r = jnp.swapaxes(bases["u"].astype(jnp.float32), -1, -2) @ r
  if "vh" in bases:
    r = r @ jnp.swapaxes(bases["vh"].astype(jnp.float32), -1, -2)
  return jnp.sum(r**2) / jnp.sum(g**2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _gradients(m: int, n: int) -> tuple[jax.Array, jax.Array]:
  """A bf16 (1, m, n) power-law gradient, and the one at the previous refresh.

  The previous one has the same spectrum plus an independent one of half its norm (a
  subspace that moved); the warm-started methods start from its exact basis.
  """
  g = common.power_law_matrix(m, n, 0)
  previous = g + 0.5 * common.power_law_matrix(m, n, 1)
  return g.astype(jnp.bfloat16)[None], previous.astype(jnp.bfloat16)[None]


def worker_refresh(task: dict, result: dict, save: Callable[[], None]) -> None:
  """Time and captured energy of every refresh method on each matrix shape."""
  deadline = _deadline(task)
  key = jax.random.key(0)
  result.update(rows=[], errors={})
  inputs = {}

  def lowered():  # a method that fails to trace costs only its rows (the exact SVD must work)
    for m, n, rank in task["shapes"]:
      g, previous_g = _gradients(m, n)
      sides = ("vh",) if m >= n else ("u",)  # 'std': compress the smaller side (design notes)
      warm_start = jax.jit(go.svd_refresh, static_argnums=(1, 2))(previous_g, rank, sides)
      cold_start = jax.tree.map(jnp.zeros_like, warm_start)
      for name, method in REFRESH_METHODS.items():
        previous = warm_start if method.warm else cold_start
        inputs[m, n, name] = (g, previous)
        fn = jax.jit(lambda g, p, f=method.fn, r=rank, s=sides: f(g, r, s, p, key))
        try:
          yield (m, n, name), fn.lower(g, previous)
        except Exception as e:  # pylint: disable=broad-except
          result["errors"][f"{name}, {m}×{n}"] = error_text(e)

  futures = _compile_all(lowered(), task["compile_threads"])
  for i, (m, n, rank) in enumerate(task["shapes"]):
    fns, energies, first = {}, {}, {}
    for name in REFRESH_METHODS:
      if (m, n, name) not in futures:
        continue
      g, previous = inputs[m, n, name]
      try:
        compiled = futures[m, n, name].result()[0]
        start = time.perf_counter()
        bases = jax.block_until_ready(compiled(g, previous))
        first[name] = time.perf_counter() - start
      except Exception as e:  # pylint: disable=broad-except
        result["errors"][f"{name}, {m}×{n}"] = error_text(e)
        continue
      energies[name] = float(_captured_energy(g, bases))
      fns[name] = lambda c=compiled, g=g, p=previous: jax.block_until_ready(c(g, p))
    if EXACT not in energies:
      raise RuntimeError(f"the exact SVD failed on {m}×{n}: {result['errors']}")
    # Split the time left between the shapes still to do.
    share = time.perf_counter() + (deadline - time.perf_counter()) / (len(task["shapes"]) - i)
    times = common.budgeted_medians(fns, share, task["max_rounds"])
    for name in fns:
      med, lo, hi, rounds = times[name]
      result["rows"].append(dict(
          shape=f"{m}×{n}", m=m, n=n, rank=rank, method=name, median_s=med, min_s=lo, max_s=hi,
          rounds=rounds, first_s=first[name], energy=energies[name],
          energy_vs_exact=energies[name] / energies[EXACT]))
    common.log(f"refresh {m}×{n}, rank {rank}: " + ", ".join(
        f"{k} {gpu_report.seconds(v[0])} ({energies[k] / energies[EXACT]:.2%})"
        for k, v in times.items()))
    save()
  if result["errors"]:
    raise RuntimeError("; ".join(f"{n}: {e}" for n, e in result["errors"].items()))


def _step_fn(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def _compile_all(lowered, threads: int) -> dict:
  """{name: future of (compiled, seconds)}, compiling on `threads` threads.

  `lowered` yields (name, jax.stages.Lowered) pairs; each is submitted as soon as it is
  lowered, so tracing the next one overlaps the compilation of the last. XLA releases
  the GIL while it compiles, so a many-core host compiles them side by side.
  """
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

  def compile_one(lowered_one):
    start = time.perf_counter()
    compiled = lowered_one.compile()
    return compiled, time.perf_counter() - start

  futures = {name: pool.submit(compile_one, one) for name, one in lowered}
  pool.shutdown(wait=False)
  return futures


def worker_step(task: dict, result: dict, save: Callable[[], None]) -> None:
  """Refresh, plain and amortized step of every step optimizer on one LLaMA tree."""
  deadline = _deadline(task)
  dims, rank = _dims(task, "dims"), task["rank"]
  shapes = llama_jax.param_shapes(dims)
  base = jax.jit(functools.partial(llama_jax.init_params, shapes))(jax.random.key(0))
  # Synthetic gradients of the right shapes and dtype (norm scales get ones).
  grads = jax.jit(functools.partial(llama_jax.init_params, shapes, std=1.0))(jax.random.key(1))
  result.update(rows=[], skipped=[], errors={}, projected_count=_projected_count(shapes),
                param_count=sum(x.size for x in jax.tree.leaves(shapes)))
  txs = {}

  # A quarter of the budget is kept for the plain-step rounds at the end.
  measure_until = deadline - 0.25 * task["budget_s"]

  def lowered():  # one optimizer that fails to build or trace costs only its row
    for name in task["rows"]:
      if time.perf_counter() > measure_until:
        break  # no time left to run it: not worth tracing either
      try:
        txs[name] = tx = build(name, rank)
        yield name, _step_fn(tx).lower(shapes, jax.eval_shape(tx.init, shapes), shapes)
      except Exception as e:  # pylint: disable=broad-except
        txs.pop(name, None)
        result["errors"][name] = error_text(e)
        common.log(f"step: {name}: {result['errors'][name]}")

  futures = _compile_all(lowered(), task["compile_threads"])
  live = {}  # name -> [params, state, compiled]
  exact_cost = 0.0  # the slowest exact-SVD refresh step so far
  for name in task["rows"]:
    if name in result["errors"]:
      continue
    # An exact-SVD refresh step is only started when one like it fits: a part stopped at its
    # hard limit loses the plain-step timings of every row.
    left = measure_until - time.perf_counter()
    exact = OPTIMIZERS[name].refresh == EXACT
    if name not in futures or left <= 0 or (exact and left < 1.2 * exact_cost):
      if name in futures:
        futures[name].cancel()
      result["skipped"].append(name)
      common.log(f"step: {name} skipped (budget)")
      continue
    tx = txs[name]
    try:
      compiled, compile_s = futures[name].result(timeout=left)
      params = jax.tree.map(jnp.copy, base)
      state_init = jax.jit(tx.init)
      refresh = []
      # Every run starts from a fresh state (step 0: a refresh step). Repeat while cheap.
      while len(refresh) < task["max_rounds"] and sum(refresh) < 2.0:
        state = jax.block_until_ready(state_init(params))
        start = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        refresh.append(time.perf_counter() - start)
    except concurrent.futures.TimeoutError:
      result["skipped"].append(name)
      common.log(f"step: {name} skipped (budget, still compiling)")
      continue
    except Exception as e:  # pylint: disable=broad-except  (one row's failure, e.g. out of memory)
      result["errors"][name] = error_text(e)
      common.log(f"step: {name}: {result['errors'][name]}")
      continue
    live[name] = [params, state, compiled]
    if exact:
      exact_cost = max(exact_cost, max(refresh))
    result["rows"].append(dict(name=name, compile_s=compile_s, refresh_s=sorted(refresh)[
        len(refresh) // 2], refresh_runs=len(refresh), state_bytes=go.tree_bytes(state)))
    common.log(f"step: {name}: compiled in {compile_s:.1f} s, refresh step "
               f"{gpu_report.seconds(result['rows'][-1]['refresh_s'])} ({len(refresh)} runs)")
    save()

  chain = task["chain"]

  def plain(name):
    entry = live[name]
    for _ in range(chain):
      entry[0], entry[1] = entry[2](entry[0], entry[1], grads)
    jax.block_until_ready(entry[:2])

  fns = {name: functools.partial(plain, name) for name in live}
  for fn in fns.values():  # one untimed call each: first runs of the plain branch
    fn()
  rounds_left = (GAP - 1 - 2 * chain) // chain  # stay below the next refresh step
  times = common.budgeted_medians(fns, deadline, min(task["max_rounds"], rounds_left))
  for row in result["rows"]:
    med, lo, hi, rounds = times[row["name"]]
    row.update(plain_s=med / chain, plain_min_s=lo / chain, plain_max_s=hi / chain,
               plain_rounds=rounds, amortized_s=(row["refresh_s"] + (GAP - 1) * med / chain) / GAP)
  common.log("step: plain steps " + ", ".join(f"{n} {gpu_report.seconds(t[0] / chain)}" for n, t in times.items()))
  if result["errors"]:
    raise RuntimeError("; ".join(f"{n}: {e}" for n, e in result["errors"].items()))


def _projected_count(shapes) -> int:
  flags = jax.tree.leaves(go.path_mask(TARGETS)(shapes))
  return sum(x.size for x, f in zip(jax.tree.leaves(shapes), flags) if f)


def _skip_refresh(state):
  """The state with every step counter (an int32 scalar, or one per layer in a fused
  state) set to 1.

  The next update is then a plain step: it takes the branch of `lax.cond` that keeps
  the projectors instead of computing them (an exact-SVD refresh of a 7B model takes
  minutes).
  """
  def bump(x):
    if isinstance(x, jax.Array) and x.ndim <= 1 and x.dtype == jnp.int32:
      return jnp.ones_like(x)
    return x
  return jax.tree.map(bump, state)


def worker_memory(task: dict, result: dict, save: Callable[[], None]) -> None:
  """Compile the training step of one optimizer, wait for the go file, then measure."""
  dims, rank, heads = _dims(task, "dims"), task["rank"], task["dims"]["heads"]
  rows, seq = task["batch"]
  tx = build(task["row"], rank)
  fused = OPTIMIZERS[task["row"]].fused
  shapes = llama_jax.param_shapes(dims, stacked=fused)

  def train_step(params, state, batch):
    loss, grads = jax.value_and_grad(llama_jax.loss)(params, batch, heads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  init = tx.init
  if fused:  # the update inside the backward scan of the stacked layers
    train_step = go.fused_scan_step(*llama_jax.fused_parts(heads), tx)
    init = lambda p: go.fused_init(tx, p)
  batch = np.random.default_rng(0).integers(0, dims.vocab, (rows, seq + 1), dtype=np.int32)
  state_shapes = jax.eval_shape(init, shapes)
  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      shapes, state_shapes, batch).compile()
  result.update(compile_s=time.perf_counter() - start, state_bytes=go.tree_bytes(state_shapes),
                param_bytes=go.tree_bytes(shapes), status="compiled")
  # Everything the measurement runs is compiled now, while other children measure.
  init_params = jax.jit(functools.partial(llama_jax.init_params, shapes)).lower(
      jax.random.key(0)).compile()
  init_state = jax.jit(lambda p: _skip_refresh(init(p))).lower(shapes).compile()
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result["compiled"] = {k: int(getattr(analysis, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes") if hasattr(analysis, k)}
  save()
  while not os.path.exists(task["go_file"]):  # the parent lets one child measure at a time
    time.sleep(0.05)
  device = jax.devices()[0]
  params = init_params(jax.random.key(0))
  state = jax.block_until_ready(init_state(params))
  after_init = device.memory_stats()
  losses, times = [], []
  for _ in range(task["steps"]):
    start = time.perf_counter()
    params, state, loss = compiled(params, state, batch)
    losses.append(float(loss))
    times.append(time.perf_counter() - start)
  stats = device.memory_stats()
  result.update(losses=losses, step_s=times)
  if stats:
    result.update(peak_bytes=stats.get("peak_bytes_in_use"),
                  peak_after_init_bytes=(after_init or {}).get("peak_bytes_in_use"),
                  bytes_limit=stats.get("bytes_limit"))


WORKERS = {"probe": worker_probe, "refresh": worker_refresh, "step": worker_step,
           "memory": worker_memory}


def error_text(e: BaseException) -> str:
  """The exception's type and the first line of its message (XLA's can be pages long)."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def worker_main(name: str, task_path: str) -> int:
  task = common.read_json(task_path)
  common.set_log_start(task["log_start"])
  result = {"status": "started"}
  save = lambda: fileio.write_json(task["result"], result, sort_keys=False)
  try:
    WORKERS[name](task, result, save)
    result["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except  (reported in the results file)
    result.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-4000:])
    traceback.print_exc()
  save()
  return 0 if result["status"] == "ok" else 1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--worker", choices=tuple(WORKERS), required=True)
  parser.add_argument("--task", required=True)
  args = parser.parse_args()
  code = worker_main(args.worker, args.task)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # without waiting for compilations that the budget cancelled


if __name__ == "__main__":
  main()
