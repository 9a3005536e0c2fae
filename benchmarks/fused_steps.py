"""Step time of the fused backward (`go.fused_scan_step`) against the usual step, on CPU.

The LLaMA-60M of `llama_jax` with stacked layers, bf16, a 4×256-token batch, plain steps
(the step counts start past the first refresh), jitted with parameters and state donated. The
usual step is `jax.value_and_grad` (remat per layer) then `tx.update`; the fused one recomputes
each layer in its backward scan and updates it there; with `clip_norm` it runs one more backward
to sum the squared gradients first. Medians over rounds in which every variant runs once in turn
(`common.interleaved_medians`), ratios to the usual step of the same optimizer.

  python -m benchmarks.fused_steps            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from benchmarks import llama_jax

import galore_optax as go

_HERE = os.path.dirname(os.path.abspath(__file__))

CLIP = 1.0


def _past_first_refresh(state):
  """The state with every step count at 1: the measured steps are plain steps."""
  return jax.tree.map(lambda x: jnp.ones_like(x) if x.dtype == jnp.int32 and x.ndim <= 1 else x,
                      state)


def variants(size: str, rank: int):
  hidden, inter, heads, layers = common.LLAMA_SIZES[size]
  dims = llama_jax.Dims(hidden, inter, heads, layers, vocab=common.VOCAB)
  shapes = llama_jax.param_shapes(dims, jnp.bfloat16, stacked=True)
  params = jax.jit(lambda k: llama_jax.init_params(shapes, k))(jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (4, 257), 0, dims.vocab)
  optimizers = {"optax.adamw": optax.adamw(1e-3),
                "galore_adamw": go.galore_adamw(1e-3, rank=rank, projected=go.path_mask(r"attn|mlp"))}
  fns = {}
  for name, tx in optimizers.items():
    def usual(p, s, b, tx=tx, clip=None):
      loss, g = jax.value_and_grad(llama_jax.loss)(p, b, heads)
      if clip is not None:
        g = optax.clip_by_global_norm(clip).update(g, optax.EmptyState())[0]
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    for clip in (None, CLIP):
      label = "" if clip is None else f", clip_norm={clip}"
      state = _past_first_refresh(tx.init(params))
      fstate = _past_first_refresh(go.fused_init(tx, params))
      step_u = jax.jit(lambda p, s, b, tx=tx, clip=clip: usual(p, s, b, tx, clip))
      step_f = jax.jit(go.fused_scan_step(*llama_jax.fused_parts(heads), tx, clip_norm=clip))
      fns[f"{name}{label} | usual"] = (
          lambda f=step_u, s=state: jax.block_until_ready(f(params, s, batch)))
      fns[f"{name}{label} | fused"] = (
          lambda f=step_f, s=fstate: jax.block_until_ready(f(params, s, batch)))
  return fns


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="60m", choices=list(common.LLAMA_SIZES))
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "fused_steps.md"))
  args = parser.parse_args()
  times = common.interleaved_medians(variants(args.size, args.rank), args.rounds)
  lines = ["# The fused backward: step time", "", common.environment(), "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           f"LLaMA-{args.size.upper()}, rank {args.rank}.", "",
           "| optimizer | usual step (median, min–max) | fused step | fused / usual |",
           "|---|---:|---:|---:|"]
  for key in [k for k in times if k.endswith("| usual")]:
    name = key[: -len(" | usual")]
    u, f = times[key], times[name + " | fused"]
    lines.append(f"| {name} | {u[0] * 1e3:,.0f} ms ({u[1] * 1e3:,.0f}–{u[2] * 1e3:,.0f}) | "
                 f"{f[0] * 1e3:,.0f} ms ({f[1] * 1e3:,.0f}–{f[2] * 1e3:,.0f}) | "
                 f"{f[0] / u[0]:.2f}× |")
  common.write_report(args.out, lines)


if __name__ == "__main__":
  main()
