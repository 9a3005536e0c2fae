"""A one-minute GaLore vs AdamW comparison on a small synthetic regression.

A two-layer MLP learns a fixed random teacher network. GaLore trains every
weight matrix with rank-8 projected Adam; AdamW keeps full-size moments. The
script prints the loss curves and the optimizer-state bytes of each.

  python -m examples.toy_compare
"""

import jax
import jax.numpy as jnp
import optax

import galore_optax as go

IN, HIDDEN, OUT, BATCH, STEPS = 64, 256, 32, 128, 300


def init_mlp(key):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (IN, HIDDEN)) / jnp.sqrt(IN),
      "b1": jnp.zeros(HIDDEN),
      "w2": jax.random.normal(k2, (HIDDEN, OUT)) / jnp.sqrt(HIDDEN),
      "b2": jnp.zeros(OUT),
  }


def mlp(params, x):
  return jax.nn.gelu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def train(tx, teacher, steps=STEPS):
  params = init_mlp(jax.random.key(1))
  state = tx.init(params)

  def loss_fn(params, x):
    return jnp.mean((mlp(params, x) - mlp(teacher, x)) ** 2)

  @jax.jit
  def step(params, state, key):
    x = jax.random.normal(key, (BATCH, IN))
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for t in range(steps):
    params, state, loss = step(params, state, jax.random.key(1000 + t))
    losses.append(float(loss))
  return losses, go.tree_bytes(state)


def main():
  teacher = init_mlp(jax.random.key(0))
  runs = {
      "adamw": optax.adamw(1e-3),
      "galore_adamw (rank 8)": go.galore_adamw(1e-2, rank=8, scale=0.25, update_proj_gap=50),
  }
  print(f"{'optimizer':<24}{'loss@0':>10}{'loss@100':>10}{'final':>10}{'state bytes':>14}")
  for name, tx in runs.items():
    losses, state_bytes = train(tx, teacher)
    print(f"{name:<24}{losses[0]:>10.4f}{losses[100]:>10.4f}{losses[-1]:>10.4f}{state_bytes:>14,}")


if __name__ == "__main__":
  main()
