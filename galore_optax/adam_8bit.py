"""Adam with blockwise 8-bit moments, as bitsandbytes' `Adam8bit`/`AdamW8bit`.

Leaves with at least `min_8bit_size` elements keep m as uint8 codes of the
signed dynamic map and v as uint8 codes of the unsigned one, each with one
float32 absmax per block (see `galore_optax.quantization` for the layout):
~2 bytes per parameter instead of 8. Smaller leaves keep float32 m and v. Each
step dequantizes, updates the moments in float32 and requantizes them with
fresh block scales, exactly the order of bitsandbytes' blockwise kernels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from galore_optax import axis_specs
from galore_optax import nonfinite
from galore_optax import tree_utils
from galore_optax import quantization
from galore_optax import validation
from galore_optax.adam import check_real
from galore_optax.sharding import public


class ScaleByAdam8bitState(NamedTuple):
  """State of `scale_by_adam_8bit`.

  `mu` and `nu` mirror the updates tree; each leaf is a
  `quantization.QuantizedArray` (uint8 codes + float32 absmax) for leaves of
  at least `min_8bit_size` elements and a float32 array otherwise.
  """

  count: jax.typing.ArrayLike  # int32
  mu: optax.Updates
  nu: optax.Updates


def _init_moment(leaf, block_size: int, min_8bit_size: int):
  shape = np.shape(leaf)
  size = math.prod(shape)
  layout = axis_specs.layout_of(leaf)
  if size == 0:
    # Keeps the state free of zero-size arrays (orbax refuses them).
    return jnp.zeros((1,), jnp.float32)
  if size < max(min_8bit_size, 1):
    return axis_specs.zeros(shape, jnp.float32, layout, layout and layout.like(shape))
  # absmax 0 dequantizes any code to 0 (bitsandbytes also starts from 0s).
  codes_shape, absmax_shape = quantization.blockwise_layout(shape, block_size)
  spec = None if layout is None else _blockwise_spec(layout, shape, codes_shape, absmax_shape)
  return quantization.QuantizedArray(
      codes=axis_specs.zeros(codes_shape, jnp.uint8, layout, spec),
      absmax=axis_specs.zeros(absmax_shape, jnp.float32, layout, spec),
  )


def _blockwise_spec(layout, shape, codes_shape, absmax_shape):
  """One spec for the codes and their block scales, so that every device holds
  whole blocks together with their absmax.

  In the last-axis layout the codes have the moment's shape and the absmax
  the same leading axes: a split of the absmax is a split of the codes into
  whole blocks. The flat layout splits its one block axis over the names of
  all the moment's axes (blocks are row-major).
  """
  if tuple(codes_shape) == tuple(shape):
    entries = layout.entries
  else:
    entries = (layout.merged(range(len(shape))),)
  return layout.derive(absmax_shape, entries)


def _load(moment, shape, signed: bool) -> jax.Array:
  if not isinstance(moment, quantization.QuantizedArray):
    return moment
  block_size = moment.codes.size // moment.absmax.size
  code = quantization.dynamic_map(signed)
  return quantization.dequantize_blockwise(
      moment.codes, moment.absmax, code, block_size, shape=shape
  )


def _store(value: jax.Array, like, signed: bool):
  if not isinstance(like, quantization.QuantizedArray):
    return value
  # The block size is read off the state, so the update needs no static
  # hyperparameter.
  block_size = like.codes.size // like.absmax.size
  code = quantization.dynamic_map(signed)
  return quantization.quantize_blockwise(value, code, block_size)


# Blocks of 256 updated together in a large leaf: 2 MiB of each float32 temporary. A leaf of
# more blocks than this goes through the loop of `_in_chunks`; a smaller one is dequantized
# whole, which depends on the state alone, and XLA:CPU's default scheduler does it at the
# start of the step (LLaMA-1B's low-rank attention moments, 4096 blocks each: 192 × 4 MiB
# alive at the peak of galore_adamw8bit's step with 4096 here).
_BLOCKS_PER_CHUNK = 2048


def _in_chunks(moments, g, mu, nu):
  """`moments(g, mu, nu)` of a large 8-bit leaf, a chunk of whole blocks at a time.

  Blocks are quantized independently, so the result is the same; but only one
  chunk's dequantized, updated and requantized float32 values exist at once
  (whole, they would be four float32 copies of the leaf). The loop writes the
  new codes over the old ones in place, and each chunk's update over that
  chunk of the gradient, which it has read: no buffer of the loop depends on
  the state alone, so no scheduler can make one before the gradient exists (a
  zero-filled output buffer was made at the start of the step by XLA:CPU's
  default scheduler and kept through the forward and backward passes: LLaMA-1B,
  0.8 GiB).
  """
  blocks, size = mu.absmax.size, mu.codes.size // mu.absmax.size
  flat = g.reshape(-1)
  if flat.size != blocks * size:  # the flat layout pads the last block with zeros
    flat = jnp.pad(flat, (0, blocks * size - flat.size))
  chunk = tree_utils.even_chunk(blocks, _BLOCKS_PER_CHUNK)
  # The loop slices the gradient as raw bits (`tree_utils.bits`: otherwise XLA
  # converts the whole gradient to float32 before the loop).
  g_bits = tree_utils.bits(flat.reshape(blocks, size))
  from_bits = lambda b: tree_utils.from_bits(b, g.dtype)
  as_blocks = lambda q: (q.codes.reshape(blocks, size), q.absmax.reshape(blocks, 1))

  def body(i, carry):
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk)
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, i * chunk, 0)
    m_codes, m_absmax, v_codes, v_absmax, g_or_u = carry
    u_i, m_i, v_i = moments(
        from_bits(take(g_or_u)),
        quantization.QuantizedArray(take(m_codes), take(m_absmax)),
        quantization.QuantizedArray(take(v_codes), take(v_absmax)))
    u_i_bits = tree_utils.bits(u_i)
    return (put(m_codes, m_i.codes), put(m_absmax, m_i.absmax), put(v_codes, v_i.codes),
            put(v_absmax, v_i.absmax), put(g_or_u, u_i_bits))

  carry = (*as_blocks(mu), *as_blocks(nu), g_bits)
  m_codes, m_absmax, v_codes, v_absmax, u_bits = jax.lax.fori_loop(
      0, blocks // chunk, body, carry)
  like = lambda codes, absmax, old: quantization.QuantizedArray(
      codes.reshape(old.codes.shape), absmax.reshape(old.absmax.shape))
  u = from_bits(u_bits).reshape(-1)[: g.size].reshape(g.shape)
  return u, like(m_codes, m_absmax, mu), like(v_codes, v_absmax, nu)


@public
def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    bias_correction: bool = True,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam with blockwise 8-bit moments (bitsandbytes).

  A drop-in for `optax.scale_by_adam` (eps_root=0) whose moments of large
  leaves are stored in 8 bits. At step t (1-based), per element:

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \cdot
          \frac{m_t}{\sqrt{v_t} + \sqrt{1-\beta_2^t}\,\epsilon},

  which equals optax's :math:`\hat m / (\sqrt{\hat v} + \epsilon)`. For leaves
  of at least `min_8bit_size` elements, m and v are dequantized before and
  requantized (fresh per-block absmax, nearest code) after the moment update.

  Non-finite gradient elements are treated as zeros, for the moments and for
  the update. bitsandbytes lets them through: a NaN/Inf element turns its
  whole 256-element block of the 8-bit state into NaN (its absmax becomes
  non-finite) for the rest of training. Here one bad element costs nothing but
  its own step. Wrap with `optax.apply_if_finite` to skip such steps entirely.
  A finite element whose square overflows float32 (|g| > 1.8e19) makes v
  infinite and its update 0, as in `optax.scale_by_adam`; v's 8-bit block then
  saturates at 3.4e38 (see `quantize_blockwise`) rather than turning NaN.

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to sqrt(v) *before* bias correction, scaled by
      sqrt(1−β2^t) as in bitsandbytes.
    block_size: elements per quantization block (bitsandbytes uses 256).
    min_8bit_size: leaves with fewer elements keep float32 moments
      (bitsandbytes' default 4096).
    bias_correction: False returns m / (sqrt(v) + sqrt(1−β2^t)·eps) alone,
      for a `scale_by_bias_correction` later in the chain.

  Returns:
    An `optax.GradientTransformation` whose state is a
    `ScaleByAdam8bitState`. Updates have the gradient's dtype.

  References:
    Kingma and Ba, Adam, 2014 (https://arxiv.org/abs/1412.6980);
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022
    (https://arxiv.org/abs/2110.02861).

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((64, 256)), "b": jnp.ones(64)}
    >>> tx = optax.chain(go.scale_by_adam_8bit(), optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].mu["w"].codes.dtype, state[0].mu["w"].absmax.shape
    (dtype('uint8'), (64, 1))
    >>> updates, state = tx.update(params, state)
    >>> round(float(updates["w"][0, 0]), 6), round(float(updates["b"][0]), 6)
    (-0.001, -0.001)
  """
  # Under optax.inject_hyperparams the sizes arrive as arrays (traced in the
  # update, which reads the layout off the state); only `init` needs them.
  validation.positive_int(block_size, "block_size")
  validation.positive_int(min_8bit_size, "min_8bit_size", minimum=0)
  validation.decay(b1, "b1")
  validation.decay(b2, "b2")
  validation.non_negative(eps, "eps")

  def init_fn(params):
    size = validation.static_int(block_size, "block_size")
    smallest = validation.static_int(min_8bit_size, "min_8bit_size", minimum=0)
    check_real(params, "scale_by_adam_8bit")
    init = lambda p: _init_moment(p, size, smallest)
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(init, params),
        nu=jax.tree.map(init, params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = jnp.asarray(count, jnp.float32)
    b1_ = jnp.asarray(b1, jnp.float32)
    b2_ = jnp.asarray(b2, jnp.float32)
    correction2 = jnp.sqrt(1.0 - b2_**t)  # sqrt(1 - b2^t)
    step_scale = correction2 / (1.0 - b1_**t) if bias_correction else 1.0
    eps_ = correction2 * jnp.asarray(eps, jnp.float32)

    def moments(g, mu, nu):
      """One leaf's update and new moments, all in one pass over its elements."""
      gf = g.astype(jnp.float32)
      gf = nonfinite.zeros_for_nonfinite(gf)
      m = b1_ * _load(mu, g.shape, True) + (1.0 - b1_) * gf
      v = b2_ * _load(nu, g.shape, False) + (1.0 - b2_) * gf * gf
      u = step_scale * (m / (jnp.sqrt(v) + eps_))
      return u.astype(g.dtype), _store(m, mu, True), _store(v, nu, False)

    def leaf(g, mu, nu):
      if g.size == 0:
        return g, mu, nu
      if isinstance(mu, quantization.QuantizedArray) and mu.absmax.size > _BLOCKS_PER_CHUNK:
        return _in_chunks(moments, g, mu, nu)
      return moments(g, mu, nu)

    out = jax.tree.map(leaf, updates, state.mu, state.nu)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), ScaleByAdam8bitState(count=count, mu=pick(1), nu=pick(2))

  return optax.GradientTransformation(init_fn, update_fn)


@public
def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-2,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
) -> optax.GradientTransformation:
  r"""AdamW with blockwise 8-bit moments, as `bitsandbytes.optim.AdamW8bit`.

  bitsandbytes first decays the parameters, p ← p·(1 − lr·wd), then applies
  the Adam step of `scale_by_adam_8bit` scaled by lr. Since the Adam step does
  not depend on p, this is the same update as
  ``chain(scale_by_adam_8bit(...), add_decayed_weights(wd, mask),
  scale_by_learning_rate(lr))``, which is what this returns.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: see `scale_by_adam_8bit`.
    weight_decay: decoupled weight decay, multiplied by the learning rate; a
      number or an optax schedule.
    block_size: elements per quantization block.
    min_8bit_size: leaves with fewer elements keep float32 moments.
    mask: pytree of bools (or a callable of params returning one) selecting
      the leaves that are decayed; None decays all leaves, as bitsandbytes.

  Returns:
    An `optax.GradientTransformation`. Works under
    `optax.inject_hyperparams`; `block_size` and `min_8bit_size` fix array
    shapes, so an `init` traced there needs them in ``static_args``.

  References:
    Loshchilov and Hutter, Decoupled Weight Decay Regularization, 2019
    (https://arxiv.org/abs/1711.05101); Dettmers et al., 8-bit Optimizers via
    Block-wise Quantization, 2022 (https://arxiv.org/abs/2110.02861).

  Example:
    >>> import jax.numpy as jnp, optax, galore_optax as go
    >>> params = {"w": jnp.ones((64, 256))}
    >>> tx = go.adamw_8bit(learning_rate=1e-3, weight_decay=0.0)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> round(float(params["w"][0, 0]), 6)
    0.999
  """
  validation.learning_rate(learning_rate)
  validation.scalar_or_schedule(weight_decay, "weight_decay")
  tx = optax.chain(
      scale_by_adam_8bit(
          b1=b1, b2=b2, eps=eps, block_size=block_size, min_8bit_size=min_8bit_size
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return tx
