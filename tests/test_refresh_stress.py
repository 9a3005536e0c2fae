"""The subspace refresh cannot hang XLA's CPU runtime.

jaxlib 0.10.2's CPU kernels for a batch of matrices (SVD, QR) split the
batch over XLA's intra-op thread pool (one thread per core) and block their
own thread until the pieces are done; XLA runs independent kernels at the
same time. On a 2-core host, two refreshes of different shapes in one jitted
step blocked both threads and the process hung for good, CPU time frozen.

Two checks:
* the stress test runs refresh-heavy steps (`update_proj_gap=1`, several
  shape groups, every refresh method, the lazy schedule, GradNormLoRP) in a
  subprocess with neither NPROC nor XLA_FLAGS set, under a watchdog that
  tells a deadlock (no CPU time used for `STALL_S`) from a slow run;
* on every host, the refresh lowered for CPU holds no LAPACK call on more
  than one matrix, the kind that waits on the pool.
"""

import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import galore_optax as go

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "support", "refresh_stress_worker.py")

# Every refresh method, the lazy schedule (one lax.cond per leaf) and
# GradNormLoRP (which wraps scale_by_galore). With width 192 and 4 matrices
# per shape group, the code before the fix hung in the first step of
# galore:randomized (see the module docstring of refresh_stress_worker.py).
CASES = ("galore:randomized", "gradnorm_lorp:svd", "lazy:power")
WORKER_ARGS = ["--cases", ",".join(CASES), "--steps", "20", "--width", "192", "--layers", "4"]
STALL_S = 30  # no CPU time used for this long: every thread waits, a deadlock
TIMEOUT_S = 600  # a live but slow run (a loaded machine) fails only after this


def _cpu_seconds(pid):
  """User + system CPU time of a process, or None where /proc is absent."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def _run_worker(args, log_path):
  """Runs the worker; returns its output, or fails naming a deadlock or a timeout."""
  env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  # The code under test, not whatever copy of the package is installed.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  # OpenBLAS's own threads do not touch XLA's pool; on a loaded machine they
  # only make each LAPACK call slower (busy-waiting), never hang it.
  env["OPENBLAS_NUM_THREADS"] = "1"
  with open(log_path, "w+") as log:
    proc = subprocess.Popen(
        [sys.executable, WORKER, *args], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, text=True,
    )
    start = last_progress = time.monotonic()
    cpu = _cpu_seconds(proc.pid)
    failure = None
    while proc.poll() is None:
      time.sleep(0.5)
      now, used = time.monotonic(), _cpu_seconds(proc.pid)
      if used is not None and used != cpu:
        cpu, last_progress = used, now
      if cpu is not None and now - last_progress > STALL_S:
        failure = (
            f"deadlock: the worker used no CPU time for {STALL_S} s (every "
            "thread waiting), the hang of concurrent batched LAPACK kernels"
        )
      elif now - start > TIMEOUT_S:
        failure = f"the worker did not finish in {TIMEOUT_S} s, though it kept computing"
      if failure:
        proc.kill()
        break
    proc.wait()
    log.seek(0)
    output = log.read()
  if failure:
    pytest.fail(f"{failure}; its last lines:\n" + "\n".join(output.splitlines()[-8:]))
  assert proc.returncode == 0, f"the worker exited with {proc.returncode}:\n{output[-3000:]}"
  return output


@pytest.mark.slow
def test_refresh_heavy_steps_finish_without_nproc_or_xla_flags(tmp_path):
  output = _run_worker(WORKER_ARGS, tmp_path / "worker.log")
  assert output.splitlines()[-1] == "DONE", output[-3000:]
  for case in CASES:
    losses = [
        float(m.group(1))
        for m in re.finditer(rf"^{re.escape(case)} step \d+ loss (\S+)$", output, re.M)
    ]
    assert len(losses) == 20, f"{case}: {len(losses)} steps reported"
    # 0.5·‖W − T‖² falls at every step: each refresh produced a basis that
    # the step could descend along, not garbage.
    assert np.all(np.isfinite(losses)), (case, losses)
    assert np.all(np.diff(losses) < 0), (case, losses)
    first, last = re.search(rf"^RESULT {re.escape(case)} (\S+) (\S+)$", output, re.M).groups()
    assert float(last) < 0.99 * float(first), (case, first, last)


def _batched_lapack_calls(fn, *args):
  """The LAPACK calls of `fn` lowered for CPU whose operand is a batch of matrices.

  Such a call is what splits its batch over XLA's thread pool and waits; a
  call on one matrix runs on its own thread.
  """
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  calls = re.findall(r"stablehlo\.custom_call @(lapack_\w+)\(.* : \(tensor<([\dx]+)x[a-z]\w*>", text)
  assert calls, "no LAPACK call found in the lowered refresh"
  batched = []
  for target, dims in calls:
    dims = [int(d) for d in dims.split("x")]
    if len(dims) > 2 and np.prod(dims[:-2]) > 1:
      batched.append((target, dims))
  return batched


def _user_svd(g, rank, sides, previous=None, key=None):
  """A user's refresh callable: plain batched SVD, unaware of the CPU pool."""
  del previous, key
  u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  return {"u": u[..., :rank], "vh": vh[..., :rank, :]}


@pytest.mark.parametrize("refresh", ["svd", "randomized", "power", _user_svd])
def test_each_refresh_calls_lapack_one_matrix_at_a_time_on_cpu(refresh):
  shape = jax.ShapeDtypeStruct((2, 3, 40, 24), jnp.float32)  # batch axes (2, 3): six matrices
  tx = go.galore(rank=6, update_proj_gap=1, refresh=refresh)
  params = {"w": shape}
  fn = lambda g, s, p: tx.update(g, s, p)
  assert _batched_lapack_calls(fn, params, jax.eval_shape(tx.init, params), params) == []


@pytest.mark.parametrize("refresh", ["svd", "power"])
def test_a_stack_refreshed_one_matrix_at_a_time_equals_the_batched_refresh(refresh):
  """On CPU the loop runs; the same bases as the batched call (default branch)."""
  fn = go.refresh.REFRESH_METHODS[refresh]
  g = jax.random.normal(jax.random.key(1), (5, 40, 24))
  previous = {"u": jnp.zeros((5, 40, 6)), "vh": jnp.zeros((5, 6, 24))}
  keys = go.refresh.matrix_keys(0, jnp.zeros((5,), jnp.int32))
  looped = go.refresh.one_matrix_at_a_time_on_cpu(fn)(g, 6, ("u", "vh"), previous, keys)
  batched = fn(g, 6, ("u", "vh"), previous, keys)
  for side in ("u", "vh"):
    np.testing.assert_allclose(looped[side], batched[side], atol=2e-5)


def test_optimizer_refreshes_call_lapack_one_matrix_at_a_time_on_cpu():
  # Two shape groups of three matrices (one stacked leaf, three separate
  # ones), the lazy schedule, and a second GaLore transform in the program.
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"a": shape(3, 32, 48), "b0": shape(40, 24), "b1": shape(40, 24), "b2": shape(40, 24)}
  tx = optax.chain(
      go.galore(rank=4, update_proj_gap=1, refresh="randomized", lazy_refresh=True),
      go.galore(rank=8, update_proj_gap=1, refresh="svd"),
      go.gradnorm_lorp(1e-3, rank=4, update_proj_gap=1, refresh="power"),
  )
  batched = _batched_lapack_calls(
      lambda g, s, p: tx.update(g, s, p), params, jax.eval_shape(tx.init, params), params
  )
  assert batched == []
