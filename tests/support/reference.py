"""Running galore-torch 1.0 (the reference) on CPU for parity tests."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from galore_torch import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit


def _canonical_torch(vectors: torch.Tensor, dim: int) -> torch.Tensor:
  """The project's sign convention (see galore_optax.canonical_signs) in torch."""
  idx = vectors.abs().argmax(dim=dim, keepdim=True)
  pivot = torch.gather(vectors, dim, idx)
  return vectors * torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)


@contextlib.contextmanager
def canonical_svd():
  """Makes torch.linalg.svd return canonically signed U columns and Vh rows.

  The sign rule is per vector, so applying it to the whole thin SVD before
  galore-torch slices U[:, :r] / Vh[:r] gives the same bases as applying it
  after; the rest of the reference runs unmodified.
  """
  original = torch.linalg.svd

  def svd(a, full_matrices=True, **kw):
    u, s, vh = original(a, full_matrices=full_matrices, **kw)
    return _canonical_torch(u, -2), s, _canonical_torch(vh, -1)

  torch.linalg.svd = svd
  try:
    yield
  finally:
    torch.linalg.svd = original


def _galore_group(rank, update_proj_gap, scale, proj_type) -> dict:
  """The keys of galore-torch's GaLore parameter group (what it reads besides "params")."""
  return {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
          "proj_type": proj_type}


def run_galore_adamw(
    weight: np.ndarray,
    bias: np.ndarray,
    grads: list[tuple[np.ndarray, np.ndarray]],
    *,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: str,
    lr: float,
    weight_decay: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
  """Steps GaLoreAdamW on an (out × in) weight (projected) and a bias (plain)."""
  w = torch.nn.Parameter(torch.tensor(weight, dtype=torch.float32).to(dtype))
  b = torch.nn.Parameter(torch.tensor(bias, dtype=torch.float32).to(dtype))
  galore = _galore_group(rank, update_proj_gap, scale, proj_type)
  groups = [{"params": [b]}, {"params": [w], **galore}]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)
  with canonical_svd():
    for gw, gb in grads:
      w.grad = torch.tensor(gw, dtype=torch.float32).to(dtype)
      b.grad = torch.tensor(gb, dtype=torch.float32).to(dtype)
      opt.step()
  return (
      w.detach().float().numpy(),
      b.detach().float().numpy(),
  )


@contextlib.contextmanager
def cpu_cuda_sync():
  """Lets GaLoreAdamW8bit step on a CPU-only torch.

  Its `step` calls torch.cuda.synchronize() after every parameter, which
  raises without CUDA; a synchronization has no numerical effect.
  """
  original = torch.cuda.synchronize
  torch.cuda.synchronize = lambda *args, **kwargs: None
  try:
    yield
  finally:
    torch.cuda.synchronize = original


@contextlib.contextmanager
def bnb_nearest_rounding():
  """bitsandbytes' CPU blockwise quantizer replaced by its nearest-code kernel.

  The native CPU kernel picks a farther code for some small entries; the
  portable (CompositeExplicitAutograd) kernel rounds to the nearest code, as
  the CUDA kernel and galore_optax do.
  """
  keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
  portable = torch.ops.bitsandbytes.quantize_blockwise.default

  def nearest(a, code, blocksize):
    return portable.redispatch(keyset, a, code, blocksize)

  lib = torch.library.Library("bitsandbytes", "IMPL")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # "overriding a kernel"
      lib.impl("quantize_blockwise", nearest, "CPU")
    yield
  finally:
    lib._destroy()  # restores the native kernel


@contextlib.contextmanager
def _one_thread():
  """Single-threaded torch (and bitsandbytes' CPU kernels, same OpenMP pool).

  On these small tensors the thread pool costs far more than the work: on a
  shared 2-core machine 100 GaLoreAdamW8bit steps took 3-7 s with the
  default pool and 0.3 s with one thread.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def _run_reference(
    optimizer_cls,
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    projected: set[str],
    galore_options: dict,
    optimizer_options: dict,
    dtype: torch.dtype,
):
  """Steps a galore-torch optimizer; `projected` leaves get the GaLore group.

  Arrays are in PyTorch layout (out × in). Returns the final parameters (as
  float32 numpy arrays) and the optimizer, for inspecting its state.
  """
  tensors = {
      k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32).to(dtype))
      for k, v in params.items()
  }
  plain = [t for k, t in tensors.items() if k not in projected]
  lowrank = [t for k, t in tensors.items() if k in projected]
  groups = []
  if plain:
    groups.append({"params": plain})
  if lowrank:
    groups.append({"params": lowrank, **galore_options})
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = optimizer_cls(groups, **optimizer_options)
  with canonical_svd(), cpu_cuda_sync(), _one_thread():
    for step_grads in grads:
      for k, t in tensors.items():
        t.grad = torch.tensor(step_grads[k], dtype=torch.float32).to(dtype)
      opt.step()
  final = {k: t.detach().float().numpy() for k, t in tensors.items()}
  return final, opt, tensors


class _GaLoreAdamW8bitIntendedArgs(GaLoreAdamW8bit):
  """GaLoreAdamW8bit with the bitsandbytes arguments galore-torch meant."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.args.max_unorm = 0.0
    self.args.skip_zeros = False


def run_galore_adamw8bit(
    params, grads, projected, *, rank, update_proj_gap, scale, proj_type, lr,
    weight_decay, betas=(0.9, 0.999), eps=1e-8, min_8bit_size=4096,
    dtype=torch.float32,
):
  """Steps GaLoreAdamW8bit (bitsandbytes' blockwise 8-bit Adam, CPU kernels).

  galore-torch 1.0 passes bitsandbytes' old positional arguments
  (..., min_8bit_size, percentile_clipping=100, block_wise=True); bitsandbytes
  0.50 reads them as max_unorm=100 and skip_zeros=True. max_unorm then
  rescales the step by 100·‖p‖/‖update‖, and galore-torch hands the optimizer
  a zeroed low-rank p, so projected leaves with float32 (small) states never
  move. The intended values (no update-norm clipping, no zero skipping) are
  restored here; the 8-bit blockwise kernels ignore both on CPU anyway.

  Returns (final params, optimizer, torch parameters by name).
  """
  return _run_reference(
      _GaLoreAdamW8bitIntendedArgs, params, grads, projected,
      _galore_group(rank, update_proj_gap, scale, proj_type),
      {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
       "min_8bit_size": min_8bit_size},
      dtype,
  )


def run_galore_adafactor(
    params, grads, projected, *, rank, update_proj_gap, scale, proj_type,
    dtype=torch.float32, **adafactor_options,
):
  """Steps GaLoreAdafactor; `adafactor_options` are its keyword arguments
  (lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter,
  relative_step, warmup_init).

  Returns (final params, optimizer, torch parameters by name).
  """
  return _run_reference(
      GaLoreAdafactor, params, grads, projected,
      _galore_group(rank, update_proj_gap, scale, proj_type), adafactor_options, dtype,
  )


def decaying_gradients(shapes, steps, seed, decay, noise):
  """Per step, {name: float32 gradient}: a fixed left basis with singular values
  decay**i times fresh Gaussian right factors, plus `noise`; 1-D leaves Gaussian."""
  rng = np.random.default_rng(seed)
  lefts = {
      k: np.linalg.qr(rng.standard_normal((s[0], min(s))))[0]
      for k, s in shapes.items()
      if len(s) == 2
  }
  grads = []
  for _ in range(steps):
    step = {}
    for k, s in shapes.items():
      if len(s) == 2:
        k_dim = min(s)
        g = (lefts[k] * decay ** np.arange(k_dim)) @ rng.standard_normal((k_dim, s[1]))
        g = g + noise * rng.standard_normal(s)
      else:
        g = rng.standard_normal(s)
      step[k] = g.astype(np.float32)
    grads.append(step)
  return grads


def random_params(shapes, scale, seed):
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
