"""Running galore-torch 1.0 (the reference) on CPU for parity tests."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from galore_torch import GaLoreAdamW


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
  groups = [
      {"params": [b]},
      {
          "params": [w],
          "rank": rank,
          "update_proj_gap": update_proj_gap,
          "scale": scale,
          "proj_type": proj_type,
      },
  ]
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
