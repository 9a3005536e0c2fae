"""Shared helpers for the benchmarks: environment facts, timing, LLaMA shapes."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

import jax


# hidden, intermediate, heads, layers (Zhao et al. 2024, Table 2); vocab 32000.
LLAMA_SIZES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
VOCAB = 32000
# The repository root: the working directory of the benchmarks' child processes.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_matrices(size: str, dtype=jax.numpy.float32) -> dict:
  """Abstract attention and MLP kernels of one LLaMA size, Flax (in, out) layout."""
  hidden, inter, _, layers = LLAMA_SIZES[size]
  attn = {name: (hidden, hidden) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
  mlp = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
  block = lambda shapes: {n: jax.ShapeDtypeStruct(s, dtype) for n, s in shapes.items()}
  return {f"layers_{i}": {"attn": block(attn), "mlp": block(mlp)} for i in range(layers)}


def llama_params(size: str, param_dtype: str = "float32") -> dict:
  """The whole parameter tree of a LLaMA size as `jax.ShapeDtypeStruct`s.

  The benchmarks' plain-JAX model (`llama_jax`): embeddings, norms, LM head
  and per-layer kernels under paths "layers/3/attn/q_proj", which
  `go.path_mask(r"attn|mlp")` selects as the paper does. Nothing is
  allocated: enough for `jax.eval_shape(tx.init, params)`.
  """
  from benchmarks import llama_jax  # pylint: disable=import-outside-toplevel

  hidden, inter, heads, layers = LLAMA_SIZES[size]
  dims = llama_jax.Dims(hidden=hidden, intermediate=inter, heads=heads, layers=layers, vocab=VOCAB)
  return llama_jax.param_shapes(dims, dtype=param_dtype)


def write_report(path: str, lines) -> str:
  """Writes markdown `lines` to `path` (and prints them); returns the text."""
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  print(text)
  return text


def read_json(path: str):
  """The JSON value in `path`, or None when it does not exist (yet) or is not JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` (which must block until its result is ready)."""
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


_START = time.perf_counter()


def log_start() -> float:
  """The `time.perf_counter()` value from which `log` counts."""
  return _START


def set_log_start(start: float) -> None:
  """Makes `log` count seconds from `start`, a `time.perf_counter()` value.

  On Linux that clock is the system's monotonic clock, so a child process given its
  parent's start logs on the parent's time line.
  """
  global _START
  _START = start


def log(message: str) -> None:
  """Progress on stderr, with the seconds since the benchmark started."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def interleaved_medians(fns: dict, rounds: int) -> dict:
  """{name: (median, min, max) seconds} of each `fn()`, timed round-robin.

  Each function runs once to compile, then once per round in turn, so load
  from other processes on a shared machine falls on every method alike.
  Every `fn` must block until its result is ready.
  """
  for name, fn in fns.items():
    start = time.perf_counter()
    fn()
    log(f"compiled and ran {name}: {time.perf_counter() - start:.2f} s")
  times = {name: [] for name in fns}
  for i in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
    log(f"round {i + 1}/{rounds}: " + ", ".join(f"{t[-1]:.3f}" for t in times.values()))
  return {n: (statistics.median(t), min(t), max(t)) for n, t in times.items()}


def budgeted_medians(fns: dict, deadline: float, max_rounds: int, min_rounds: int = 1) -> dict:
  """{name: (median, min, max, rounds)} seconds of each `fn()`, timed round-robin.

  Like `interleaved_medians`, for functions that have already run once (compiled
  and warm): rounds go on while the next one, estimated from the last, ends
  before `deadline` (a `time.perf_counter()` value), `min_rounds` at least and
  `max_rounds` at most. Every `fn` must block until its result is ready.
  """
  times = {name: [] for name in fns}
  last_round = 0.0
  for i in range(max_rounds):
    if i >= min_rounds and time.perf_counter() + last_round > deadline:
      break
    start = time.perf_counter()
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    last_round = time.perf_counter() - start
  return {n: (statistics.median(t), min(t), max(t), len(t)) for n, t in times.items()}


def power_law_matrix(m: int, n: int, seed: int = 0, dtype=jax.numpy.float32) -> jax.Array:
  """An (m × n) matrix with singular values 1, 1/2, 1/3, ... and random singular vectors.

  No gap at any rank: the hard case for sketching methods. Built on the default
  device (QR of Gaussian matrices), so large sizes need no host work.
  """
  jnp = jax.numpy
  k = min(m, n)
  ku, kv = jax.random.split(jax.random.key(seed))
  u = jnp.linalg.qr(jax.random.normal(ku, (m, k), jnp.float32))[0]
  v = jnp.linalg.qr(jax.random.normal(kv, (n, k), jnp.float32))[0]
  return ((u / jnp.arange(1, k + 1, dtype=jnp.float32)) @ v.T).astype(dtype)


def argv_as_typed() -> list:
  """`sys.argv` with the script as it was named: ["-m", "benchmarks.memory", ...] under -m.

  Under `python -m`, `sys.argv[0]` is the module's file path, which does not run it.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return ["-m", spec.name] + sys.argv[1:]
  return list(sys.argv)


def library_env(library: str) -> dict:
  """The environment of a child that imports `galore_optax` from the checkout `library`.

  The child (`python -m benchmarks.<name>` or `python -c`, with cwd=ROOT) finds the
  library first, then this checkout's `benchmarks`; PYTHONSAFEPATH keeps the working
  directory (this checkout, and its `galore_optax`) off its path. A `library` that has a
  `benchmarks` package itself gives the child that checkout's benchmark code.
  """
  return dict(os.environ, PYTHONPATH=os.pathsep.join([library, ROOT]), PYTHONSAFEPATH="1")


def environment(command: str | None = None) -> str:
  """Markdown bullet lines: date, command, machine, versions, commit (`examples.report`'s).

  Args:
    command: the command line to show; default: this process's.
  """
  from examples import report  # pylint: disable=import-outside-toplevel
  versions = report.versions()
  # A copy of the tree without .git (e.g. on a lent GPU machine): the caller may say.
  commit = versions.pop("git commit", os.environ.get("GALORE_OPTAX_COMMIT", "unknown"))
  load = report.load_average()
  return "\n".join([
      f"- date: {datetime.date.today().isoformat()}",
      f"- command: `{command or 'python ' + ' '.join(argv_as_typed())}`",
      f"- device: {report.machine()}, {jax.local_device_count()} device(s); 1-min load average "
      f"at start: {'unknown' if load is None else f'{load[0]:.2f}'}",
      "- versions: " + ", ".join(f"{name} {v}" for name, v in versions.items()),
      f"- galore-optax commit: {commit}",
  ] + [f"- {name}={os.environ[name]}" for name in ("OPENBLAS_NUM_THREADS", "XLA_FLAGS")
         if os.environ.get(name)])


