"""The README's multi-host recipe, run for real: two processes on one machine.

`jax.distributed.initialize` joins two CPU processes of 4 virtual devices
each (local coordinator, gloo collectives) into one 8-device mesh; the
FSDP-sharded train step runs a few steps, refreshes included, and must match
the same steps in this single-device process.
"""

import os
import socket
import sys

import jax
import numpy as np
import optax
import pytest

import background
import multihost_problem as problem

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _workers(scratch):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  # The code under test, not whatever copy of the package is installed.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
  out = os.path.join(scratch, "params.npz")
  return [background.Command([sys.executable, WORKER, str(i), str(port), out], env=env)
          for i in range(2)]


background.register("two_processes", _workers, TIMEOUT_S)


@pytest.fixture
def two_processes():
  """The parameters the two-process run saved (it ran beside the other tests)."""
  done = background.result("two_processes")
  if done.timed_out:
    pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s")
  for code, err in zip(done.returncodes, done.stderrs):
    assert code == 0, f"a worker exited with {code}:\n{err[-3000:]}"
  return dict(np.load(os.path.join(background.scratch("two_processes"), "params.npz")))


@pytest.mark.slow
def test_two_processes_match_one(two_processes):
  got = two_processes

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
