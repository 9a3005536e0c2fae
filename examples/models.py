"""LLaMA decoder in Flax NNX, laid out for GaLore.

Every projection is an ``nnx.Linear`` without bias whose kernel is a 2-D (in, out) matrix:
``attn/{q,k,v,o}_proj`` and ``mlp/{gate,up,down}_proj``. Nothing else has ``attn`` or
``mlp`` in its path (the norms are ``attention_norm``/``ffn_norm``/``norm``), so the regex
``attn|mlp`` on parameter paths selects exactly the matrices that GaLore projects, like the
``target_modules`` of the paper's training script.

With ``scan_layers=True`` the decoder layers are stacked (the unrolled model's initial
weights, so both layouts start alike) and applied with ``nnx.scan``: every layer parameter
gains a leading layer axis, so the projected kernels are (num_layers, in, out) and the
optimizer keeps one projector per slice.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from examples.configs import LlamaConfig
from examples.errors import ExampleError


def _dtype(name: str) -> Any:
  return jnp.dtype(name)


def remat_policy(name: str):
  """Maps a remat name to (enabled, policy): 'none', 'full' or a jax.checkpoint_policies name."""
  if name in ("none", "", None):
    return False, None
  if name == "full":
    return True, None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or name.startswith("_"):
    choices = ["none", "full"] + sorted(
        n for n in dir(jax.checkpoint_policies) if n.endswith("saveable"))
    raise ExampleError(f"unknown remat policy {name!r} (choose from: {', '.join(choices)})")
  return True, policy


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned per-feature scale (no bias, no centering)."""

  def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float):
  """cos/sin tables of shape (seq_len, head_dim) for rotary embeddings (rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (batch, seq, heads, head_dim); rotates pairs (i, i + head_dim/2) by position angles."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


def _linear(cfg: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=False,
      dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
      kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)


class Attention(nnx.Module):
  """Multi-head causal self-attention with rotary position embeddings."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.q_proj = _linear(cfg, h, h, rngs)
    self.k_proj = _linear(cfg, h, h, rngs)
    self.v_proj = _linear(cfg, h, h, rngs)
    self.o_proj = _linear(cfg, h, h, rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    q = apply_rope(split(self.q_proj(x)), cos, sin)
    k = apply_rope(split(self.k_proj(x)), cos, sin)
    v = split(self.v_proj(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(float(self.head_dim))
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    return self.o_proj(out)


class MLP(nnx.Module):
  """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
    self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps,
                             dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype))
    self.attention_norm = norm()
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = norm()
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x = x + self.attn(self.attention_norm(x), cos, sin)
    return x + self.mlp(self.ffn_norm(x))


class Llama(nnx.Module):
  """Decoder-only LLaMA language model. ``__call__(tokens (B, T) int) -> logits (B, T, V)``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    if cfg.vocab_size is None:
      raise ExampleError("the model config needs a vocab_size (take it from the tokenizer)")
    self.config = cfg
    dtype, param_dtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                           param_dtype=param_dtype,
                           embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    if cfg.scan_layers:
      # The unrolled layers' weights, stacked: both layouts start from the same weights.
      graph = nnx.split(layers[0])[0]
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(l)[1] for l in layers])
      self.layers = nnx.merge(graph, stacked)
    else:
      self.layers = nnx.List(layers)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
                        param_dtype=param_dtype)
    self.lm_head = None if cfg.tie_embeddings else _linear(
        cfg, cfg.hidden_size, cfg.vocab_size, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    seq_len = tokens.shape[1]
    if seq_len > cfg.max_seq_len:
      raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    cos, sin = rope_tables(seq_len, cfg.head_dim, cfg.rope_theta)
    x = self.embed(tokens)
    use_remat, policy = remat_policy(cfg.remat)

    def block(layer: DecoderLayer, h: jax.Array) -> jax.Array:
      return layer(h, cos, sin)

    if use_remat:
      block = nnx.remat(block, policy=policy)

    if cfg.scan_layers:
      def body(h, layer):
        return block(layer, h)
      x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)
    else:
      for layer in self.layers:
        x = block(layer, x)

    return output_logits(self.norm, self.lm_head, self.embed, x)


def output_logits(norm: RMSNorm, lm_head, embed: nnx.Embed, x: jax.Array) -> jax.Array:
  """The final norm and the LM head (the embeddings' transpose when ``lm_head`` is None)."""
  x = norm(x)
  return embed.attend(x) if lm_head is None else lm_head(x)


def fused_parts(model: Llama):
  """The model in three functions of pure parameter dicts, for ``go.fused_scan_step``.

  The parameters are ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``: the stacked decoder
  layers under ``"layers"`` (needs ``scan_layers``), the rest beside them. Each part merges
  the module's own graph with the arrays it is given, so it computes what ``model`` does.

  Returns:
    ``(embed_fn(rest, tokens) -> h, layer_fn(layer, h) -> h, logits_fn(rest, h) -> logits)``.
  """
  cfg = model.config
  if not cfg.scan_layers:
    raise ExampleError("a fused step runs the update inside the scan over stacked layers: "
                       "it needs --scan-layers")
  graphs = {name: nnx.split(getattr(model, name))[0]
            for name in ("embed", "layers", "norm", "lm_head") if getattr(model, name) is not None}
  part = lambda name, arrays: nnx.merge(graphs[name], nnx.State(arrays))

  def embed_fn(rest, tokens):
    return part("embed", rest["embed"])(tokens)

  def layer_fn(layer, h):
    cos, sin = rope_tables(h.shape[1], cfg.head_dim, cfg.rope_theta)
    return part("layers", layer)(h, cos, sin)

  def logits_fn(rest, h):
    lm_head = part("lm_head", rest["lm_head"]) if "lm_head" in graphs else None
    return output_logits(part("norm", rest["norm"]), lm_head, part("embed", rest["embed"]), h)

  return embed_fn, layer_fn, logits_fn


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def copy_weights(src: Llama, dst: Llama) -> None:
  """Copies parameters between a scanned and an unrolled model (or two of the same layout)."""
  src_tree = nnx.to_pure_dict(nnx.state(src, nnx.Param))
  dst_state = nnx.state(dst, nnx.Param)
  num_layers = src.config.num_layers
  src_layers = src_tree["layers"]
  if src.config.scan_layers and not dst.config.scan_layers:
    src_tree["layers"] = {i: jax.tree.map(lambda a, i=i: a[i], src_layers)
                          for i in range(num_layers)}
  elif dst.config.scan_layers and not src.config.scan_layers:
    per_layer = [src_layers[i] for i in range(num_layers)]
    src_tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  nnx.replace_by_pure_dict(dst_state, src_tree)
  nnx.update(dst, dst_state)
