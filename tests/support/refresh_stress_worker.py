"""Runs refresh-heavy jitted GaLore steps many times (the stress test's child).

Every step refreshes (`update_proj_gap=1`) the projectors of a tree with
several matrix shapes, so one jitted program holds several batched
decompositions (SVDs, QRs) of different shapes. On a 2-core CPU, jaxlib
0.10.2 ran such independent LAPACK calls at the same time, each splitting its
batch over XLA's intra-op thread pool (one thread per core) and blocking its
own thread until done: with every thread blocked, the process hung for good.
tests/test_refresh_stress.py runs this script as a subprocess, with neither
NPROC nor XLA_FLAGS set, under a timeout.

For each case (optimizer × refresh method) it prints one line per step (so a
hang shows where it stopped), then `RESULT <case> <first loss> <last loss>`,
and `DONE` at the end.

  python tests/support/refresh_stress_worker.py --steps 20
  python tests/support/refresh_stress_worker.py --cases galore:randomized --steps 200 --width 128
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import galore_optax as go

OPTIMIZERS = ("galore", "lazy", "quantized", "gradnorm_lorp", "multi")
REFRESH_METHODS = ("svd", "randomized", "power")
DEFAULT_CASES = tuple(f"galore:{m}" for m in REFRESH_METHODS) + (
    "lazy:randomized",
    "quantized:power",
    "gradnorm_lorp:svd",
)


def shapes(layers: int, d: int) -> dict:
  """A LLaMA-like tree (Flax (in, out) layout) with several shape groups.

  `layers` separate attention kernels (one shape group, refreshed as one
  batched decomposition), two MLP kernels stacked over the layers (a leading
  batch axis: one projector per slice, and with `lazy_refresh` one batched
  decomposition per leaf), one unstacked head and a vector that is not
  projected.
  """
  out = {f"attn_{i}": (d, d) for i in range(layers)}
  out["mlp_up"] = (layers, d, 5 * d // 2)
  out["mlp_down"] = (layers, 5 * d // 2, d)
  out["head"] = (3 * d // 2, d // 2)
  out["bias"] = (d,)
  return out


def build(optimizer: str, refresh: str, rank: int, learning_rate: float):
  """The optimizer under test, every leaf refreshing at every step."""
  common = dict(rank=rank, update_proj_gap=1, refresh=refresh)
  descend = optax.scale(-learning_rate)
  if optimizer == "galore":
    return optax.chain(go.galore(**common), descend)
  if optimizer == "lazy":  # one lax.cond per leaf inside the refresh
    return optax.chain(go.galore(lazy_refresh=True, **common), descend)
  if optimizer == "quantized":  # 4-bit projectors
    return optax.chain(go.scale_by_galore(projector_bits=4, **common), descend)
  if optimizer == "gradnorm_lorp":  # wraps scale_by_galore
    return go.gradnorm_lorp(learning_rate, **common)
  if optimizer == "multi":  # two independent GaLore transforms in one program
    del common["rank"]
    return optax.chain(
        optax.multi_transform(
            {"attn": go.galore(rank=rank, **common), "rest": go.galore(rank=2 * rank, **common)},
            lambda params: {k: "attn" if k.startswith("attn") else "rest" for k in params},
        ),
        descend,
    )
  raise ValueError(
      f"optimizer {optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}."
  )


def run_case(case: str, steps: int, layers: int, width: int, rank: int, learning_rate: float):
  """Steps one optimizer on a least-squares loss; returns (first, last) loss."""
  optimizer, _, refresh = case.partition(":")
  if refresh not in REFRESH_METHODS:
    raise ValueError(
        f"case {case!r}: write OPTIMIZER:METHOD with METHOD one of "
        f"{', '.join(REFRESH_METHODS)}."
    )
  tx = build(optimizer, refresh, rank, learning_rate)
  rng = np.random.default_rng(0)
  tree = shapes(layers, width)
  # 0.5·‖W − T‖² per leaf: the gradient W − T has a full spectrum, so every
  # refresh does real work, and descent must lower the loss.
  targets = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in tree.items()}
  # Nonzero weights: GradNormLoRP splits each into magnitude and direction.
  params = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in tree.items()}

  def loss_fn(p):
    return sum(0.5 * jnp.sum(jnp.square(p[k] - targets[k])) for k in p)

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  state = tx.init(params)
  first = float(loss_fn(params))
  for t in range(steps):
    params, state, loss = step(params, state)
    loss = float(loss)  # waits for the step: a deadlock stops here
    print(f"{case} step {t} loss {loss:.6f}", flush=True)
  return first, float(loss_fn(params))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--cases", default=",".join(DEFAULT_CASES),
      help="comma-separated OPTIMIZER:METHOD, OPTIMIZER in "
      f"{', '.join(OPTIMIZERS)}, METHOD in {', '.join(REFRESH_METHODS)}",
  )
  parser.add_argument("--steps", type=int, default=20, help="steps per case (each refreshes)")
  parser.add_argument("--layers", type=int, default=4, help="matrices per shape group")
  parser.add_argument("--width", type=int, default=64, help="model width d")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  args = parser.parse_args(argv)
  for case in args.cases.split(","):
    first, last = run_case(
        case, args.steps, args.layers, args.width, args.rank, args.learning_rate
    )
    print(f"RESULT {case} {first:.6f} {last:.6f}", flush=True)
  print("DONE", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
