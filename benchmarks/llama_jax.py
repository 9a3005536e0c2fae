"""A LLaMA decoder in plain JAX for benchmarks: a dict of arrays, one remat per layer.

The architecture of the paper's models (Zhao et al. 2024, Table 2): RMSNorm, rotary
embeddings, SwiGLU MLP, causal multi-head attention, untied LM head. Kernels are 2-D Flax
(in, out) matrices under paths "layers/<i>/attn/{q,k,v,o}_proj" and
"layers/<i>/mlp/{gate,up,down}_proj", so `go.path_mask(r"attn|mlp")` selects exactly the
seven matrices per layer that the paper projects; nothing else has "attn" or "mlp" in its
path. It depends on no example code, so benchmarks keep working while examples/ changes.

Two layer layouts:
- per-layer leaves (`stacked=False`): layers/0, layers/1, ... as separate dicts, applied in
  a Python loop. Every optimizer accepts this tree (`optax.contrib.galore` requires 2-D
  kernels);
- stacked (`stacked=True`): every layer leaf gains a leading layer axis and the layers run
  under `lax.scan` (one compiled layer, faster compilation); GaLore keeps one projector
  per layer slice.
Each layer is wrapped in `jax.checkpoint`, so the backward pass keeps only the layer
inputs and recomputes the rest.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = r"attn|mlp"  # the paper's target modules, as a path regex


@dataclasses.dataclass(frozen=True)
class Dims:
  hidden: int
  intermediate: int
  heads: int
  layers: int
  vocab: int = 32000

  def __post_init__(self):
    if self.hidden % self.heads or (self.hidden // self.heads) % 2:
      raise ValueError(f"hidden={self.hidden} must split into {self.heads} heads of even size")


def layer_shapes(dims: Dims) -> dict:
  h, i = dims.hidden, dims.intermediate
  return {
      "attention_norm": (h,),
      "attn": {name: (h, h) for name in ATTN},
      "ffn_norm": (h,),
      "mlp": {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)},
  }


def param_shapes(dims: Dims, dtype=jnp.bfloat16, stacked: bool = False) -> dict:
  """The whole parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated).

  Args:
    dims: model dimensions.
    dtype: parameter dtype (the optimizers' float moments follow it).
    stacked: one leaf per layer kind with a leading layer axis, for `lax.scan`.

  Returns:
    {"embed", "layers", "norm", "lm_head"}; "layers" is {0: layer, 1: layer, ...}, or one
    layer dict of stacked leaves.
  """
  leaf = lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  layer = layer_shapes(dims)
  if stacked:
    layers = jax.tree.map(lambda s: leaf((dims.layers,) + s), layer, is_leaf=_is_shape)
  else:
    layers = {i: jax.tree.map(leaf, layer, is_leaf=_is_shape) for i in range(dims.layers)}
  return {
      "embed": leaf((dims.vocab, dims.hidden)),
      "layers": layers,
      "norm": leaf((dims.hidden,)),
      "lm_head": leaf((dims.hidden, dims.vocab)),
  }


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def init_params(shapes: dict, key: jax.Array, std: float = 0.02) -> dict:
  """Unit norm scales and Normal(0, std) matrices, in the dtypes of `shapes`.

  Jit it (`jax.jit(functools.partial(init_params, shapes))(key)`) to build the tree on
  the device without host copies.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(flat))
  values = []
  for (path, s), k in zip(flat, keys):
    if "norm" in str(path[-1]):  # "norm", "attention_norm", "ffn_norm"
      values.append(jnp.ones(s.shape, s.dtype))
    else:
      values.append((std * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
  return jax.tree.unflatten(treedef, values)


def _rms_norm(x, scale, eps=1e-6):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x, cos, sin):
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)


def _layer(p, x, cos, sin, heads):
  b, t, h = x.shape
  split = lambda y: y.reshape(b, t, heads, h // heads)
  a = p["attn"]
  y = _rms_norm(x, p["attention_norm"])
  q, k, v = (split(y @ a[n]) for n in ("q_proj", "k_proj", "v_proj"))
  q, k = _rope(q, cos, sin), _rope(k, cos, sin)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(h // heads)
  causal = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h) @ a["o_proj"]
  m = p["mlp"]
  y = _rms_norm(x, p["ffn_norm"])
  return x + (jax.nn.silu(y @ m["gate_proj"]) * (y @ m["up_proj"])) @ m["down_proj"]


def _rotary(seq: int, hidden: int, heads: int, rope_theta: float = 10000.0):
  inv_freq = 1.0 / rope_theta ** (jnp.arange(0, hidden // heads, 2, dtype=jnp.float32)
                                  / (hidden // heads))
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def forward(params: dict, tokens: jax.Array, heads: int, rope_theta: float = 10000.0):
  """Logits (batch, seq, vocab) in float32 for int tokens (batch, seq)."""
  cos, sin = _rotary(tokens.shape[1], params["embed"].shape[-1], heads, rope_theta)
  layer = jax.checkpoint(lambda p, x: _layer(p, x, cos, sin, heads))
  x = params["embed"][tokens]
  layers = params["layers"]
  if isinstance(next(iter(layers)), int):
    for i in sorted(layers):
      x = layer(layers[i], x)
  else:
    x = jax.lax.scan(lambda x, p: (layer(p, x), None), x, layers)[0]
  x = _rms_norm(x, params["norm"])
  return (x @ params["lm_head"]).astype(jnp.float32)


def fused_parts(heads: int):
  """(embed_fn, layer_fn, head_fn) of `loss` for `go.fused_scan_step` (stacked layers)."""

  def embed_fn(rest, batch):
    return rest["embed"][batch[:, :-1]]

  def layer_fn(p, x):
    cos, sin = _rotary(x.shape[1], x.shape[2], heads)
    return _layer(p, x, cos, sin, heads)

  def head_fn(rest, x, batch):
    logits = (_rms_norm(x, rest["norm"]) @ rest["lm_head"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return embed_fn, layer_fn, head_fn


def loss(params: dict, batch: jax.Array, heads: int) -> jax.Array:
  """Mean next-token cross entropy; rows of `batch` hold seq_len + 1 tokens."""
  logits = forward(params, batch[:, :-1], heads)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
