"""How projector bases are computed: the refresh methods.

A refresh method maps a float32 stack of gradient matrices (B, m, n) to the
bases named by `sides` ("u": (B, m, r), "vh": (B, r, n)), orthonormal and in
the project's canonical sign convention. Methods share one signature so the
transformation can swap them and batch equal-shaped matrices into one call:

  method(g, rank, sides, previous, key) -> dict[side, array]

`previous` holds the bases from the last refresh (zeros before the first),
for warm-started methods; a method that never reads them says so with an
attribute `reads_previous = False`, and then receives None (a refresh need not
decode the stored projectors). A method with an attribute `reads_step = True`
also receives the 0-based step of the refresh as the keyword `step`, and one
with `converts_gradient = True` receives the matrices in the gradient's own
dtype and converts them to float32 itself. `key` is
a PRNG key for randomized ones: either one key, or one per matrix (shape
(B,)), which is what `scale_by_galore` passes, so that a matrix's random draws
do not depend on which other matrices share its batched call.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from galore_optax import projection
from galore_optax.projection import INPUT_SIDE, OUTPUT_SIDE

RefreshFn = Callable[..., dict]


def canonical_signs(vectors: jax.Array, axis: int) -> jax.Array:
  """Flips each vector so that its entry of largest magnitude is positive.

  Singular vectors are defined up to sign, and LAPACK builds disagree on it;
  moments carried over a refresh depend on the sign, so the project fixes one
  convention. The first entry of largest magnitude decides on ties.

  Args:
    vectors: a stack of vectors laid along `axis` (the columns of U use
      axis=-2, the rows of Vh axis=-1).
    axis: the axis that runs along each vector.

  Returns:
    `vectors` with every vector's sign fixed.
  """
  idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  pivot = jnp.take_along_axis(vectors, idx, axis=axis)
  return vectors * jnp.where(pivot < 0, -1.0, 1.0).astype(vectors.dtype)


def _canonical_bases(u: jax.Array, vh: jax.Array, sides) -> dict[str, jax.Array]:
  bases = {}
  if projection.OUTPUT_SIDE in sides:
    bases[projection.OUTPUT_SIDE] = canonical_signs(u, axis=-2)
  if projection.INPUT_SIDE in sides:
    bases[projection.INPUT_SIDE] = canonical_signs(vh, axis=-1)
  return bases


# Matrices whose largest |entry| lies in [2**-24, 2**24] are decomposed as
# they are (bit for bit); the others are first scaled by a power of two.
_PLAIN_EXPONENT = 24


def rescaled(g: jax.Array) -> jax.Array:
  """float32 `g` (*batch, m, n), each matrix scaled by a power of two if extreme.

  A basis does not depend on the scale of the matrix, but its computation
  does: the norms inside an SVD or QR and the sketch G Gᵀ G Ω of the
  randomized methods overflow to inf (then NaN bases) for entries of 1e30,
  and underflow to zero for 1e-30. A matrix whose largest entry is outside
  [2**-24, 2**24] is multiplied by the power of two that brings it to
  [0.5, 1): exact, so its bases are those of the ideal computation; any
  other matrix is left untouched, so ordinary bases do not change by a bit.
  """
  # The maximum is taken in g's own dtype (exact), so that the float32 copy below is made
  # in one fused convert-and-scale: the only float32 copy of G a refresh holds.
  amax = jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True).astype(jnp.float32)
  _, e = jnp.frexp(amax)  # amax = f · 2**e with f in [0.5, 1)
  plain = ((amax >= 2.0**-_PLAIN_EXPONENT) & (amax <= 2.0**_PLAIN_EXPONENT)
           | (amax == 0) | ~jnp.isfinite(amax))
  # Clipped so that 2**-e is a normal float32 (XLA:CPU flushes subnormals).
  e = jnp.where(plain, 0, jnp.clip(e, -125, 126)).astype(jnp.int32)
  two_to_minus_e = jax.lax.bitcast_convert_type((127 - e) << 23, jnp.float32)  # exact
  return g.astype(jnp.float32) * two_to_minus_e


def svd_refresh(g, rank, sides, previous=None, key=None):
  """Exact refresh: the leading singular vectors from a float32 thin SVD."""
  del previous, key
  u, _, vh = jnp.linalg.svd(rescaled(g), full_matrices=False)
  return _canonical_bases(u[..., :rank], vh[..., :rank, :], sides)


svd_refresh.reads_previous = False


def _orthonormalize(x: jax.Array) -> jax.Array:
  return jnp.linalg.qr(x)[0]


def _rayleigh_ritz(g: jax.Array, q: jax.Array, rank: int, sides):
  """Leading singular vectors of G restricted to the range of orthonormal Q.

  B = QᵀG is (k × n); through a QR of Bᵀ the only SVD left is of a (k × k)
  matrix, which is fast on every backend (a GPU SVD of a wide matrix is not).
  """
  b = jnp.swapaxes(q, -1, -2) @ g
  q2, r2 = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))
  us, _, vsh = jnp.linalg.svd(jnp.swapaxes(r2, -1, -2))
  u = q @ us[..., :rank]
  vh = vsh[..., :rank, :] @ jnp.swapaxes(q2, -1, -2)
  return _canonical_bases(u, vh, sides)


def _range_finder(g: jax.Array, omega: jax.Array, power_iters: int) -> jax.Array:
  """An orthonormal basis of range((G Gᵀ)^q G Ω).

  The sketch is re-orthonormalized before every power iteration but the
  first: one iteration amplifies the spectrum by σ³, which float32 holds for
  the leading directions that carry the energy, and skipping that QR is a
  quarter of the CPU time.
  """
  gt = jnp.swapaxes(g, -1, -2)
  q = g @ omega
  for i in range(power_iters):
    if i:
      q = _orthonormalize(q)
    q = g @ (gt @ q)
  return _orthonormalize(q)


def gaussian(key: jax.Array, batch_shape: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """float32 N(0, 1) draws of (*batch_shape, *shape), one key per matrix.

  `key` is a single key (split per matrix by folding in the matrix's index)
  or an array of keys of shape `batch_shape`.
  """
  if not batch_shape:
    return jax.random.normal(key, shape, jnp.float32)
  draw = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))
  return draw(_flat_keys(key, batch_shape)).reshape(tuple(batch_shape) + tuple(shape))


def _flat_keys(key: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """One key per matrix, flattened: `key` itself if it has `batch_shape`, else
  `key` folded with each matrix's index."""
  size = math.prod(batch_shape)
  if key.shape != tuple(batch_shape):
    key = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size))
  return key.reshape(size)


def randomized_refresh(oversample: int = 8, power_iters: int = 1) -> RefreshFn:
  """A randomized range finder (Halko, Martinsson and Tropp, 2011).

  Sketches G with a Gaussian (n × (r + oversample)) matrix, sharpens the
  sketch with `power_iters` power iterations, then extracts the leading
  singular vectors from the small projected problem. Cost O(mn(r+p)) matmuls
  instead of a full SVD.

  Args:
    oversample: extra sketch columns, which make the leading r vectors accurate.
    power_iters: power iterations; each costs two matmuls with G.

  Returns:
    A refresh method for `scale_by_galore(refresh=...)`.
  """

  def refresh(g, rank, sides, previous=None, key=None):
    del previous
    assert key is not None, "the refresh step passes a key to every refresh function"
    g = rescaled(g)  # G Gᵀ G Ω overflows float32 from entries of ~1e12
    k = min(rank + oversample, *g.shape[-2:])
    omega = gaussian(key, g.shape[:-2], (g.shape[-1], k))
    return _rayleigh_ritz(g, _range_finder(g, omega, power_iters), rank, sides)

  refresh.reads_previous = False
  return refresh


def power_refresh(power_iters: int = 1, oversample: int = 0) -> RefreshFn:
  """Subspace iteration warm-started from the previous projector.

  Gradients' dominant subspaces move slowly between refreshes, so a single
  iteration from the last basis recovers the new one at the cost of a few
  matmuls. Before the first refresh (a zero previous basis) it starts from a
  Gaussian sketch, as `randomized_refresh` does.

  Args:
    power_iters: subspace iterations per refresh.
    oversample: extra random columns added to the warm start.

  Returns:
    A refresh method for `scale_by_galore(refresh=...)`.
  """

  def refresh(g, rank, sides, previous=None, key=None):
    assert key is not None and previous is not None, "power_refresh reads previous bases"
    g = rescaled(g)  # G Gᵀ G Ω overflows float32 from entries of ~1e12
    k = min(rank + oversample, *g.shape[-2:])
    n = g.shape[-1]
    cold = gaussian(key, g.shape[:-2], (n, k))
    if INPUT_SIDE in previous:  # (B, r, n): its rows span the input side
      warm = jnp.swapaxes(previous[INPUT_SIDE], -1, -2)
    else:  # (B, m, r): map the output-side basis to the input side
      warm = jnp.swapaxes(g, -1, -2) @ previous[OUTPUT_SIDE]
    warm = jnp.concatenate([warm, cold[..., rank:]], axis=-1)
    started = jnp.any(warm[..., :rank] != 0, axis=(-2, -1), keepdims=True)
    omega = jnp.where(started, warm, cold)
    return _rayleigh_ritz(g, _range_finder(g, omega, power_iters), rank, sides)

  return refresh


def random_bases(key, batch_shape, m: int, n: int, rank: int, sides) -> dict:
  """APOLLO's random projection: N(0, 1/r) entries, one key per matrix."""
  shapes = {OUTPUT_SIDE: (m, rank), INPUT_SIDE: (rank, n)}
  scale = 1.0 / math.sqrt(rank)
  return {side: scale * gaussian(key, batch_shape, shapes[side]) for side in sides}


def random_refresh(g, rank, sides, previous=None, key=None):
  """A random Gaussian projection (APOLLO): entries N(0, 1/r), no SVD.

  The bases are not orthonormal, and the gradient is not read: E‖PᵀG‖² =
  ‖G‖² per row (or column), which is all APOLLO's scaling factors need. Each
  refresh draws new matrices from the step's keys.
  """
  del previous
  return random_bases(key, g.shape[:-2], g.shape[-2], g.shape[-1], rank, sides)


# Data-independent methods: their bases can be recomputed from the keys alone.
random_refresh.regenerate = random_bases
random_refresh.reads_previous = False


def _fold_in(key: jax.Array, data: int) -> jax.Array:
  """`key` (one key or an array of keys) with `data` folded into each: a side's own keys."""
  if key.ndim == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def random_orthonormal_bases(key, batch_shape, m: int, n: int, rank: int, sides) -> dict:
  """GoLore's projection: bases drawn uniformly (Haar) from the orthonormal ones.

  The Q factor of a Gaussian matrix, with the signs of R's diagonal moved
  into Q, is uniformly distributed on the Stiefel manifold (Mezzadri, 2007);
  its columns (output side, (m, r)) or rows (input side, (r, n)) are
  orthonormal to float32 round-off. Each side draws from its own key.
  """
  bases = {}
  for position, side in enumerate((OUTPUT_SIDE, INPUT_SIDE)):
    if side not in sides:
      continue
    side_key = _fold_in(key, position)
    z = gaussian(side_key, batch_shape, (m if side == OUTPUT_SIDE else n, rank))
    q, r = jnp.linalg.qr(z)
    signs = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    q = q * signs[..., None, :]
    bases[side] = q if side == OUTPUT_SIDE else jnp.swapaxes(q, -1, -2)
  return bases


def random_orthonormal_refresh(g, rank, sides, previous=None, key=None):
  """A random orthonormal projection (GoLore): uniform on the Stiefel manifold.

  The gradient is not read. Unlike GaLore's SVD basis, which can lock onto
  directions the gradient's noise no longer follows, a fresh uniform basis
  at each refresh keeps every direction reachable in expectation,
  E[P Pᵀ] = (r/m) I, which is what GoLore's convergence proof needs. A
  refresh costs one QR of an (m × r) or (n × r) Gaussian matrix.
  """
  del previous
  return random_orthonormal_bases(key, g.shape[:-2], g.shape[-2], g.shape[-1], rank, sides)


random_orthonormal_refresh.regenerate = random_orthonormal_bases
random_orthonormal_refresh.reads_previous = False


def data_independent(method: RefreshFn) -> bool:
  """Whether `method` draws its bases from keys alone, reading no gradient."""
  return getattr(method, "regenerate", None) is not None


def random_coordinates_bases(key, batch_shape, m: int, n: int, rank: int, sides) -> dict:
  """FRUGAL's RandK: r coordinates of the kept side, drawn without replacement.

  The basis holds one-hot vectors: on the input side (r, n) rows selecting
  r random columns of G (R = G[:, J]), on the output side (m, r) columns
  selecting r random rows. J is the first r entries of a uniform random
  permutation, in that order.
  """
  bases = {}
  for position, side in enumerate((OUTPUT_SIDE, INPUT_SIDE)):
    if side not in sides:
      continue
    dim = m if side == OUTPUT_SIDE else n
    side_key = _fold_in(key, position)
    keys = _flat_keys(side_key, batch_shape) if batch_shape else side_key[None]
    chosen = jax.vmap(lambda k, dim=dim: jax.random.permutation(k, dim)[:rank])(keys)  # (B, r)
    one_hot = jax.nn.one_hot(chosen, dim, dtype=jnp.float32)  # (B, r, dim)
    one_hot = one_hot.reshape(tuple(batch_shape) + (rank, dim))
    bases[side] = jnp.swapaxes(one_hot, -1, -2) if side == OUTPUT_SIDE else one_hot
  return bases


def random_coordinates_refresh(g, rank, sides, previous=None, key=None):
  """FRUGAL's random coordinates (RandK columns or rows): no decomposition.

  Each refresh selects r random columns (input side) or rows (output side)
  of every matrix, stored as one-hot bases (`random_coordinates_bases`); the
  gradient is not read, and with `regenerate_projector=True` only the step
  of the last refresh is stored.
  """
  del previous
  return random_coordinates_bases(key, g.shape[:-2], g.shape[-2], g.shape[-1], rank, sides)


random_coordinates_refresh.regenerate = random_coordinates_bases
random_coordinates_refresh.reads_previous = False


def _geodesic_output_side(p: jax.Array, g: jax.Array, step_size) -> jax.Array:
  """One rank-1 Grassmann geodesic step of an (m × r) orthonormal basis towards G's range."""
  t = lambda x: jnp.swapaxes(x, -1, -2)
  a = t(p) @ g  # (r, n): the coordinates of G in the basis
  residual = g - p @ a
  d = -2.0 * residual @ t(a)  # ∂‖G − P A‖²/∂P at fixed A
  h = d - p @ (t(p) @ d)  # its part orthogonal to the basis: the Grassmann tangent
  u, s, vh = jnp.linalg.svd(h, full_matrices=False)
  u, sigma, v = u[..., :, :1], s[..., :1], t(vh[..., :1, :])  # top triple: (m,1), (1,), (r,1)
  angle = (step_size * sigma)[..., None, :]
  # P⁺ = (P v cos θ − u sin θ) vᵀ + P (I − v vᵀ): the direction P v turns towards −u by θ.
  return p + ((jnp.cos(angle) - 1.0) * (p @ v) - jnp.sin(angle) * u) @ t(v)


def geodesic_refresh(step_size: optax.ScalarOrSchedule = 10.0) -> RefreshFn:
  """SubTrack++'s refresh: the previous basis moved along a Grassmann geodesic.

  From the previous basis P and the gradient G: the tangent H = (I − PPᵀ)D of
  the estimation error ‖G − PPᵀG‖² (D = −2(G − PPᵀG)GᵀP), its top singular
  triple (σ, u, v), and the rank-1 geodesic step P⁺ = (P v cos ησ − u sin ησ)vᵀ
  + P(I − vvᵀ), which stays orthonormal. No SVD of G: one of the (m × r)
  tangent. The input side moves the same way on the transposes (the official
  code's input-side step is zero in exact arithmetic: docs/subtrack_reference.md).
  A zero previous basis (before the first refresh) is returned as it is: use
  it after an SVD, as `go.subtrack_adamw` does (`switch_refresh`).

  Args:
    step_size: η, a number or a schedule of the 0-based step of the refresh
      (the official `iterative_decrease` is ``lambda step: eta0 / step``);
      the angle is ησ, so η scales with 1/‖G‖² (the official scripts: a
      constant 10).

  Returns:
    A refresh method that reads the previous bases (and, with a schedule, the
    step).
  """

  def refresh(g, rank, sides, previous=None, key=None, **step):
    del rank, key
    assert previous is not None, "geodesic_refresh reads the previous bases"
    eta = step_size(step["step"]) if callable(step_size) else step_size
    t = lambda x: jnp.swapaxes(x, -1, -2)
    g = rescaled(g)  # the angle grows with ‖G‖²: extreme matrices keep their direction
    bases = {}
    if OUTPUT_SIDE in sides:
      bases[OUTPUT_SIDE] = _geodesic_output_side(previous[OUTPUT_SIDE], g, eta)
    if INPUT_SIDE in sides:
      bases[INPUT_SIDE] = t(_geodesic_output_side(t(previous[INPUT_SIDE]), t(g), eta))
    return bases

  refresh.reads_step = callable(step_size)
  return refresh


def _sketched_input_basis(g: jax.Array, omega: jax.Array) -> jax.Array:
  """COAP's one-pass randomized SVD: Q = qr(GΩ), the right singular vectors of QᵀG (r × n)."""
  q = jnp.linalg.qr(g @ omega)[0]
  vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ g, full_matrices=False)[2]
  return canonical_signs(vh, axis=-1)


def _correlation_loss(p: jax.Array, g: jax.Array, lifted_moment_coordinates: jax.Array,
                      cosine_axis: int):
  """COAP's loss of an input-side basis P (r × n): mse(G PᵀP, G) · (1 − mean cosine of M P
  and G), with M the first moment's (m × r) coordinates; the cosines are taken along
  `cosine_axis` (the official code: along the rows of the parameter's (out × in) G)."""
  eps = 1e-8
  mse = jnp.mean(jnp.square(g @ jnp.swapaxes(p, -1, -2) @ p - g))
  a = lifted_moment_coordinates @ p
  # max(‖x‖, eps) as √max(‖x‖², eps²): the same value, and a zero (not NaN) gradient at 0.
  norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=cosine_axis), eps * eps))
  norms = norm(a) * norm(g)
  cosine = jnp.sum(a * g, axis=cosine_axis) / norms
  return mse * (1.0 - jnp.mean(cosine))


def _coap_input_side(p, g, m_coordinates, step, key, update_interval, reproject_factor,
                     omega0, cosine_axis, step_size=0.1):
  """One COAP event for an input-side basis (r × n) of one matrix G (m × n)."""
  rank, n = p.shape[-2:]

  def sketch():
    omega = (jax.random.normal(key, (n, rank), jnp.float32) if omega0 is None
             else jnp.asarray(omega0, jnp.float32))
    return _sketched_input_basis(g, omega)

  def recalibrate():
    return _sketched_input_basis(g, jnp.swapaxes(p, -1, -2))

  def correlation_step():
    grad = jax.grad(_correlation_loss)(p, g, m_coordinates, cosine_axis)
    grad = grad * jnp.minimum(1.0, 1.0 / (jnp.linalg.norm(grad) + 1e-6))  # clip to norm 1
    return p - step_size * grad

  kind = jnp.where(step == 0, 0, jnp.where(step % (update_interval * reproject_factor) == 0, 1, 2))
  return jax.lax.switch(kind, (sketch, recalibrate, correlation_step))


def coap_refresh(update_interval: int, reproject_factor: int = 5, omega0=None) -> RefreshFn:
  """COAP's projector: a sketch, then correlation-aware steps and periodic recalibrations.

  Called at every refresh (every `update_interval` steps, the schedule's
  `update_proj_gap`): at step 0 a one-pass randomized SVD of G with a
  Gaussian test matrix; at steps that are multiples of `update_interval` ·
  `reproject_factor` the same sketch warm-started from the current basis
  (recalibration); at the others one clipped gradient step (size 0.1, norm
  ≤ 1) of the previous basis on mse(G, PPᵀG) · (1 − mean row cosine of the
  projected-back first moment and G): the basis moves towards what both the
  gradient and the moment say, without an SVD. Not re-orthonormalized, as
  in the official code. Reads the previous bases, the step and the first
  moment (`previous["moment"]`, the moment before this step in the leaf's
  shape). The sketches' singular vectors get the project's canonical signs
  (the official code keeps LAPACK's; with the moments kept across a
  recalibration, the trajectory depends on them).

  Args:
    update_interval: steps between events (T_u); must equal the schedule's
      `update_proj_gap`.
    reproject_factor: every K-th event is a recalibration (K).
    omega0: None (a Gaussian test matrix from each matrix's key), or a fixed
      (n or m, rank) test matrix for the first sketch (the official code
      draws one from torch's generator seeded 3407).

  Returns:
    A refresh method reading the previous bases, the step and the moment.
  """

  def refresh(g, rank, sides, previous=None, key=None, *, step):
    del rank
    assert previous is not None and "moment" in previous, "coap_refresh reads the moment"
    assert key is not None, "the refresh step passes a key to every refresh function"
    t = lambda x: jnp.swapaxes(x, -1, -2)
    # The sketch and the cosines do not depend on the scales of G and M: extreme matrices are
    # scaled by powers of two (`rescaled`, the identity for ordinary ones), so that G Ω, the
    # mse and M's coordinates do not overflow.
    g, moment = rescaled(g), rescaled(previous["moment"])
    keys = key if key.ndim else jnp.broadcast_to(key, g.shape[:1])

    def one(side, p, g1, moment1, key1):
      # The output side is the input side of the transposes: P = Uᵀ, G = Gᵀ, M = Mᵀ.
      if side == OUTPUT_SIDE:
        p, g1, moment1 = t(p), t(g1), t(moment1)
      # The moment's (m, r) coordinates M in the old basis, from its projection back M P
      # (P need not be orthonormal: M = (M P) Pᵀ (P Pᵀ)⁻¹).
      gram = p @ t(p)
      coordinates = t(jnp.linalg.solve(gram, p @ t(moment1)))
      # The cosines run along the rows of the (out × in) G: the last axis, or the first
      # of the transposes.
      new = _coap_input_side(p, g1, coordinates, step, key1, update_interval,
                             reproject_factor, omega0, -2 if side == OUTPUT_SIDE else -1)
      return t(new) if side == OUTPUT_SIDE else new

    return {side: jax.vmap(lambda p, g1, m1, k1, side=side: one(side, p, g1, m1, k1))(
        previous[side], g, moment, keys) for side in sides}

  refresh.reads_step = True
  refresh.reads_moment = True
  return refresh


def switch_refresh(at_step: int, before: Any = "svd",
                   after: Any = "random_orthonormal") -> RefreshFn:
  """One refresh method before step `at_step`, another from it on (GoLore's switch).

  A refresh at 0-based step t uses `after` if t ≥ `at_step`, else `before`;
  the choice is made under `lax.cond`, so one trace serves both. GoLore's
  official code refreshes with the SVD until `rand_epoch`, then at random.

  Args:
    at_step: the first step whose refresh uses `after` (an int ≥ 0).
    before: a refresh method (name or function) for earlier refreshes.
    after: a refresh method (name or function) for refreshes from `at_step`.

  Returns:
    A refresh method for `scale_by_galore(refresh=...)`; it reads the step
    (`reads_step`), which the refresh passes as the keyword `step`.
  """
  first, then = get_refresh_method(before), get_refresh_method(after)
  reads_previous = any(getattr(f, "reads_previous", True) for f in (first, then))

  def refresh(g, rank, sides, previous=None, key=None, *, step):
    def call(method):
      reads = {"step": step} if getattr(method, "reads_step", False) else {}
      # Converted inside the branch, where it fuses into the method's own float32 copy
      # (`rescaled`): a float32 operand of the cond is one more copy of every matrix
      # (LLaMA-7B: 172 MiB for an MLP matrix).
      return lambda: method(g.astype(jnp.float32), rank, sides, previous, key, **reads)

    return jax.lax.cond(step >= at_step, call(then), call(first))

  refresh.reads_previous = reads_previous
  refresh.reads_step = True
  refresh.converts_gradient = True
  return refresh


def one_matrix_at_a_time_on_cpu(refresh: RefreshFn) -> RefreshFn:
  """`refresh` run on a (B, m, n) stack one matrix at a time on CPU, batched elsewhere.

  jaxlib's CPU LAPACK kernels (SVD, QR) split a batch of matrices over XLA's
  intra-op thread pool and block their own thread until the pieces are done,
  while XLA runs independent kernels at once: on a host with few cores the
  blocked threads can be the whole pool, and the step hangs for good. A call
  on one matrix never waits on the pool. Each matrix still sees a stack of
  one, with its own key, so its bases are those of the batched call.
  """

  def per_matrix(g, rank, sides, previous, keys, **step):
    batched = lambda: refresh(g, rank, sides, previous, keys, **step)
    if g.shape[0] == 1:
      return batched()

    def one(matrix_previous_key):
      g1, previous1, key1 = jax.tree.map(lambda x: x[None], matrix_previous_key)
      return jax.tree.map(lambda x: x[0], refresh(g1, rank, sides, previous1, key1, **step))

    looped = lambda: jax.lax.map(one, (g, previous, keys))
    return jax.lax.platform_dependent(cpu=looped, default=batched)

  return per_matrix


REFRESH_METHODS: dict[str, RefreshFn] = {
    "svd": svd_refresh,
    "randomized": randomized_refresh(),
    "power": power_refresh(),
    "random": random_refresh,
    "random_orthonormal": random_orthonormal_refresh,
    "random_coordinates": random_coordinates_refresh,
}

# Root of the keys of random refresh methods; each matrix folds in its leaf's
# index, the step of the refresh and its slice of the stack.
_REFRESH_SEED = 0x6A10


class KeyContext(NamedTuple):
  """Where a transformation's leaves sit in a larger tree, for their random keys.

  A fused step (`go.fused_scan_step`) runs the optimizer on one layer's slice
  of the parameters, or on the parameters outside the layers; the keys of its
  random refreshes must be those the whole tree would give them.

  Attributes:
    leaf_indices: per leaf of the tree the transformation sees, its index
      among the whole tree's flattened leaves.
    layer: None, or the (traced) layer whose slice the leaves are: a matrix's
      slice index in the whole stacked leaf is layer × (matrices per layer)
      + its index in the slice.
  """

  leaf_indices: tuple[int, ...]
  layer: Any = None


_KEY_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("galore_keys", default=None)


@contextlib.contextmanager
def keys_of_whole_tree(context: KeyContext):
  """Within it, `matrix_keys` gives the keys of `context`'s whole tree."""
  token = _KEY_CONTEXT.set(context)
  try:
    yield
  finally:
    _KEY_CONTEXT.reset(token)


def matrix_keys(leaf_index: int, steps: jax.Array, first=0, num_matrices=None) -> jax.Array:
  """One PRNG key per matrix of a leaf, from the leaf, the refresh step and the slice.

  Args:
    leaf_index: the leaf's position among the flattened parameters.
    steps: int32 (B,): the step at which each matrix is refreshed.
    first: the index in the leaf's stack of the first of these B matrices
      (an int or a traced scalar), for a refresh that walks a stack in parts.
    num_matrices: the leaf's number of matrices (default B); with a
      `KeyContext` layer, a slice index is offset by layer × num_matrices.

  Returns:
    A key array of shape (B,).
  """
  context = _KEY_CONTEXT.get()
  if context is not None:
    leaf_index = context.leaf_indices[leaf_index]
    if context.layer is not None:
      first = context.layer * (steps.shape[0] if num_matrices is None else num_matrices) + first
  root = jax.random.fold_in(jax.random.key(_REFRESH_SEED), leaf_index)
  fold = lambda step, i: jax.random.fold_in(jax.random.fold_in(root, step), i)
  return jax.vmap(fold)(steps, first + jnp.arange(steps.shape[0]))


def get_refresh_method(method) -> RefreshFn:
  """A refresh function from its name or a callable with the refresh signature."""
  if callable(method):
    return cast(RefreshFn, method)
  try:
    return REFRESH_METHODS[method]
  except (KeyError, TypeError):
    raise ValueError(
        f"refresh={method!r} is unknown; use one of {', '.join(REFRESH_METHODS)} "
        "or a callable such as go.randomized_refresh(oversample=8, power_iters=2)."
    ) from None
