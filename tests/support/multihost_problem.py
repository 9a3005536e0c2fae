"""The problem both sides of tests/test_multihost.py solve: params, grads, optimizer."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import galore_optax as go

STEPS = 4  # refreshes at steps 0 and 2
SHAPES = {
    "attn": {"q": (3, 64, 64), "o": (3, 64, 64)},  # scanned (layers, in, out)
    "mlp": {"up": (64, 160), "down": (160, 64)},
    "embed": (96, 64),
    "norm": (64,),
}


def _tree(fn):
  is_shape = lambda x: isinstance(x, tuple)
  return jax.tree.map(fn, SHAPES, is_leaf=is_shape)


def params():
  rng = np.random.default_rng(0)
  return _tree(lambda s: (0.05 * rng.standard_normal(s)).astype(np.float32))


def grads(step):
  rng = np.random.default_rng(100 + step)
  return _tree(lambda s: rng.standard_normal(s).astype(np.float32))


def fsdp_specs(tree):
  """Each leaf split over fsdp along its largest non-layer axis."""

  def spec(x):
    axes = range(1 if x.ndim == 3 else 0, x.ndim)
    axis = max(axes, key=lambda a: x.shape[a])
    return P(*[("fsdp" if a == axis else None) for a in range(x.ndim)])

  return jax.tree.map(spec, tree)


def optimizer():
  # eps 1e-4: see the note on EPS in tests/support/sharding_checks.py.
  return go.galore_adamw(
      1e-2, rank=5, update_proj_gap=2, eps=1e-4, weight_decay=0.01,
      projected=go.path_mask(r"attn|mlp"),
  )


def flatten(tree):
  """{"attn/q": leaf, ...}: the keys of an .npz file."""
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): x
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
