"""One process of the two-process FSDP run of tests/test_multihost.py.

    python tests/support/multihost_worker.py PROCESS_ID PORT OUT.npz

Each process owns 4 virtual CPU devices; `jax.distributed.initialize` joins
them into one 8-device mesh (gloo collectives). The README's multi-host recipe
runs as written: parameters created sharded with `jax.make_array_from_callback`,
the optimizer state from `jax.jit(tx.init)` on an Explicit mesh, a donated
train step. Process 0 writes the gathered parameters after the last step.
"""

import os
import sys

if "jax" in sys.modules:
  raise RuntimeError("multihost_worker must start jax itself (device count).")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("NPROC", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multihost_problem as problem  # noqa: E402


def main(process_id: int, port: int, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
  )
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = jax.make_mesh((8,), ("fsdp",))
  with jax.set_mesh(mesh):
    host = problem.params()
    specs = problem.fsdp_specs(host)

    def global_array(x, spec):
      sharding = NamedSharding(mesh, spec)
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    params = jax.tree.map(global_array, host, specs)
    tx = problem.optimizer()
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for t in range(problem.STEPS):
      grads = jax.tree.map(global_array, problem.grads(t), specs)
      params, state = step(params, state, grads)
    gathered = multihost_utils.process_allgather(params, tiled=True)
  if process_id == 0:
    flat = {k: np.asarray(v) for k, v in problem.flatten(gathered).items()}
    np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
