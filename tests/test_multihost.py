"""The README's multi-host recipe, run for real: two processes on one machine.

`jax.distributed.initialize` joins two CPU processes of 4 virtual devices
each (local coordinator, gloo collectives) into one 8-device mesh; the
FSDP-sharded train step runs a few steps, refreshes included, and must match
the same steps in this single-device process.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import multihost_problem as problem

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  out = str(tmp_path / "params.npz")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, str(i), str(port), out], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for i in range(2)
  ]
  try:
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s")
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, f"a worker exited with {p.returncode}:\n{err[-3000:]}"
  got = dict(np.load(out))

  tx = problem.optimizer()

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = problem.params()
  state = tx.init(params)
  for t in range(problem.STEPS):
    params, state = step(params, state, problem.grads(t))
  want, start = problem.flatten(params), problem.flatten(problem.params())
  assert sorted(got) == sorted(want)
  assert max(float(np.max(np.abs(want[k] - start[k]))) for k in want) > 1e-3  # weights moved
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
