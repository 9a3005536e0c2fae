"""Optimizers by name, with the GaLore paper's pretraining recipe.

Recipe (Zhao et al. 2024, Sec. 5 / the authors' ``torchrun_main.py``): learning rate 0.01 for
GaLore and 1e-3 for AdamW, GaLore scale 0.25, subspace refresh every 200 steps, linear warmup
over the first 10% of the steps then cosine decay to 10% of the peak. Only the attention and
MLP matrices are projected (``go.path_mask(r"attn|mlp")``); embeddings, norms and the LM head
go through the same Adam update at full size.

``galore_optax`` functions are looked up with ``getattr`` when an optimizer is built, so names
become available as the library grows; a name whose function is missing raises
``ExampleError("optimizer X is not available in this galore_optax version")``.
"""

import dataclasses
import functools
import inspect
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import optax

from examples.errors import ExampleError


# Projection sides accepted by galore_optax (see the design notes).
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
REFRESH_METHODS = ("svd", "randomized", "power")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  name: str
  description: str
  default_lr: float
  # Functions that must exist in galore_optax (empty: optax only).
  requires: Tuple[str, ...]
  uses_galore: bool
  build: Callable[..., optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: Optional[float] = None  # None: the optimizer's default_lr
  total_steps: int = 1000
  warmup_fraction: float = 0.1
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  grad_clip: Optional[float] = None
  rank: int = 128
  update_proj_gap: int = 200
  scale: float = 0.25
  proj_type: str = "std"
  refresh: str = "svd"  # galore_optax subspace refresh: svd, randomized or power
  targets: str = r"attn|mlp"


def _galore_optax():
  try:
    import galore_optax  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except  (missing or half-written package)
    return None
  return galore_optax


def _library_fn(name: str, fn_name: str):
  go = _galore_optax()
  fn = getattr(go, fn_name, None) if go is not None else None
  if fn is None:
    raise ExampleError(f"optimizer {name} is not available in this galore_optax version "
                       f"(galore_optax.{fn_name} is missing)")
  return fn


def _call_supported(fn: Callable, *args, **kwargs):
  """Calls ``fn`` with the keyword arguments its signature accepts (all, with **kwargs)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return fn(*args, **kwargs)
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return fn(*args, **kwargs)
  return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _galore_kwargs(name: str, cfg: OptimizerConfig) -> Dict[str, Any]:
  path_mask = _library_fn(name, "path_mask")
  return dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
              proj_type=cfg.proj_type, refresh=cfg.refresh, mask=path_mask(cfg.targets))


def _build_adamw(name, cfg, lr):
  del name
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


def _build_adamw_8bit(name, cfg, lr):
  return _library_fn(name, "adamw_8bit")(lr, weight_decay=cfg.weight_decay)


def _build_library_galore(fn_name, **fixed):
  def build(name, cfg, lr):
    fn = _library_fn(name, fn_name)
    return _call_supported(fn, lr, weight_decay=cfg.weight_decay, **_galore_kwargs(name, cfg),
                           **fixed)
  return build


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _build_contrib_galore(name, cfg, lr):
  """The peer baseline: ``optax.contrib.galore`` (SVD every gap steps, no batch axes)."""
  del name
  pattern = re.compile(cfg.targets)

  def dimension_numbers(params):
    def pick(path, leaf):
      if leaf.ndim > 2 and pattern.search(_path_str(path)):
        raise ExampleError("optax_contrib_galore cannot project stacked (scan_layers) kernels "
                           f"of shape {leaf.shape}; train without --scan-layers")
      if leaf.ndim == 2 and pattern.search(_path_str(path)):
        return optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)
      return None
    return jax.tree_util.tree_map_with_path(pick, params)

  return optax.contrib.galore(
      lr, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
      base_optimizer=optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
      weight_decay=cfg.weight_decay, weight_dimension_numbers=dimension_numbers)


REGISTRY: Dict[str, OptimizerSpec] = {
    spec.name: spec for spec in [
        OptimizerSpec("adamw", "optax.adamw (full-rank baseline)", 1e-3, (), False, _build_adamw),
        OptimizerSpec("adamw_8bit", "galore_optax.adamw_8bit (blockwise 8-bit states)", 1e-3,
                      ("adamw_8bit",), False, _build_adamw_8bit),
        OptimizerSpec("galore_adamw", "galore_optax.galore_adamw", 1e-2,
                      ("galore_adamw", "path_mask"), True, _build_library_galore("galore_adamw")),
        OptimizerSpec("galore_adamw8bit", "galore_optax.galore_adamw8bit", 1e-2,
                      ("galore_adamw8bit", "path_mask"), True,
                      _build_library_galore("galore_adamw8bit")),
        OptimizerSpec("galore_adafactor", "galore_optax.galore_adafactor", 1e-2,
                      ("galore_adafactor", "path_mask"), True,
                      # The peak learning rate as is, as transformers documents for Adafactor
                      # with a schedule: scale_parameter would multiply it by each weight's
                      # RMS (~0.02 at init, a 50x smaller step).
                      _build_library_galore("galore_adafactor", scale_parameter=False)),
        OptimizerSpec("gradnorm_lorp", "galore_optax.gradnorm_lorp", 1e-2,
                      ("gradnorm_lorp", "path_mask"), True, _build_library_galore("gradnorm_lorp")),
        OptimizerSpec("optax_contrib_galore", "optax.contrib.galore (peer baseline)", 1e-2,
                      (), True, _build_contrib_galore),
    ]
}


def get_spec(name: str) -> OptimizerSpec:
  if name not in REGISTRY:
    raise ExampleError(f"unknown optimizer {name!r} (choose from: {', '.join(REGISTRY)})")
  return REGISTRY[name]


def is_available(name: str) -> bool:
  """True when ``name`` is known and every galore_optax function it needs exists."""
  spec = get_spec(name)
  go = _galore_optax()
  return all(go is not None and getattr(go, fn, None) is not None for fn in spec.requires)


def check_available(name: str) -> OptimizerSpec:
  spec = get_spec(name)
  for fn in spec.requires:
    _library_fn(name, fn)
  return spec


def available_optimizers():
  return [name for name in REGISTRY if is_available(name)]


def learning_rate_schedule(peak: float, cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup over warmup_fraction of the steps, cosine decay to min_lr_ratio * peak."""
  total = max(1, cfg.total_steps)
  warmup = int(cfg.warmup_fraction * total)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=cfg.min_lr_ratio * peak)


def build_optimizer(name: str, cfg: OptimizerConfig):
  """Returns (optax transformation, learning-rate schedule, peak learning rate)."""
  spec = check_available(name)
  peak = spec.default_lr if cfg.learning_rate is None else cfg.learning_rate
  if not peak > 0:
    raise ExampleError(f"learning rate must be positive, got {peak}")
  if spec.uses_galore and cfg.rank < 1:
    raise ExampleError(f"rank must be positive, got {cfg.rank}")
  if cfg.update_proj_gap < 1:
    raise ExampleError(f"update_proj_gap must be positive, got {cfg.update_proj_gap}")
  if spec.uses_galore:
    if cfg.proj_type not in PROJ_TYPES:
      raise ExampleError(f"unknown proj_type {cfg.proj_type!r} "
                         f"(choose from: {', '.join(PROJ_TYPES)})")
    if name == "optax_contrib_galore" and cfg.proj_type != "std":
      raise ExampleError("optax_contrib_galore has no proj_type option (it projects the smaller "
                         "side, like 'std'); drop --proj-type")
    if cfg.refresh not in REFRESH_METHODS:
      raise ExampleError(f"unknown refresh {cfg.refresh!r} "
                         f"(choose from: {', '.join(REFRESH_METHODS)})")
    if name == "optax_contrib_galore" and cfg.refresh != "svd":
      raise ExampleError("optax_contrib_galore only refreshes by exact SVD; drop --refresh")
    try:
      re.compile(cfg.targets)
    except re.error as e:
      raise ExampleError(f"galore targets {cfg.targets!r} is not a regular expression: {e}"
                         ) from None
  return _build(name, cfg, peak)


@functools.lru_cache(maxsize=32)
def _build(name: str, cfg: OptimizerConfig, peak: float):
  # Cached: nnx.Optimizer keeps the transformation as static graph metadata, so handing out
  # the same object for the same configuration lets nnx.jit reuse a compiled train step
  # across runs in one process (a resumed run, the tests).
  schedule = learning_rate_schedule(peak, cfg)
  tx = REGISTRY[name].build(name, cfg, schedule)
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule, peak
