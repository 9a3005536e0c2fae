"""galore_optax inside Flax NNX's nnx.Optimizer."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import galore_optax as go


class Block(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.Linear(32, 48, use_bias=True, rngs=rngs)
    self.mlp = nnx.Linear(48, 16, use_bias=False, rngs=rngs)
    self.norm = nnx.RMSNorm(16, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.mlp(jax.nn.gelu(self.attn(x))))


def test_nnx_optimizer_trains_and_matches_plain_optax():
  model = Block(nnx.Rngs(0))
  params0 = nnx.as_pure(nnx.state(model, nnx.Param))  # a snapshot, not live Variables
  tx = go.galore_adamw(1e-2, rank=4, update_proj_gap=2, mask=go.path_mask(r"attn|mlp"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 32))
  loss_fn = lambda m: jnp.mean(m(x) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]

  # The same five steps with plain optax on the pure parameter tree.
  graphdef, _ = nnx.split(model)
  params = params0
  state = tx.init(params)

  @jax.jit
  def plain_step(params, state):
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    params, state = plain_step(params, state)
  got = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert jnp.allclose(a, b, atol=1e-6)
