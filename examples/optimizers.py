"""Optimizers by name, with the GaLore paper's pretraining recipe.

Recipe (Zhao et al. 2024, Sec. 5 / the authors' ``torchrun_main.py``): peak learning rate 0.01
for GaLore and 1e-3 for AdamW (``examples.compare`` tunes it per optimizer), GaLore scale 0.25,
subspace refresh every 200 steps, linear warmup over the first 10% of the steps then cosine
decay to 10% of the peak. Only the attention and MLP matrices are projected
(``go.path_mask(r"attn|mlp")``); embeddings, norms and the LM head go through the same Adam
update at full size.

``REGISTRY`` is the repository's one list of optimizers: each name maps to an ``OptimizerSpec``
holding the factory (a ``galore_optax`` optimizer, or an optax baseline) and the keyword
arguments the recipe gives it, written out, so a misspelt or removed option fails at once. The
examples, the contract and bad-input tests, the GPU suite and the memory and quality benchmarks
read their optimizers from it (``library()`` lists the library's own, ``call_factory`` builds
one with the options a test or benchmark sets). Adding an optimizer is one ``OptimizerSpec`` in
the list below (see ``fira_adamw`` for an example).

The learning rate comes with every update as the extra argument ``learning_rate`` (the
training step computes it from the schedule), so it is not a constant of the compiled program:
runs that differ only in their peak learning rate or length (``examples.compare``'s tuning runs
and seeds) share one transformation and one compiled step.

Every optimizer is wrapped in ``optax.apply_if_finite`` (see ``build_optimizer``): a step whose
gradients hold a NaN or an infinity changes neither the weights nor the optimizer state.
"""

import dataclasses
import functools
import inspect
import re
from typing import Any, Callable, Optional

import galore_optax as go
import jax
import optax

from examples.errors import ExampleError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Hyperparameters shared by the builders (those an optimizer has no use for are ignored)."""

  learning_rate: Optional[float] = None  # peak; None: the optimizer's default_lr
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
  targets: str = r"attn|mlp"  # regex on parameter paths selecting the projected matrices
  # Skip steps with non-finite gradients (optax.apply_if_finite) and allow this many in a
  # row; the training loop stops at that count. 0: no wrapper, the first NaN stops the run.
  max_consecutive_nonfinite: int = 10


Factory = Callable[..., optax.GradientTransformation]  # factory(learning_rate, **options)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One registry entry.

  Attributes:
    name: the name used on the command line (the factory's own name for the library's).
    factory: ``factory(learning_rate, **options) -> optax.GradientTransformation``.
    description: one line for ``--list-optimizers`` and the docs.
    default_lr: the peak learning rate of the paper's recipe (the centre of the tuning grid).
    options: ``options(config) -> dict``, the factory's keyword arguments for a config.
    projects: True when the optimizer takes GaLore's options (rank, proj_type, refresh).
    proj_types: the ``proj_type`` values it supports; None: those its factory accepts (the
      library checks them and says which it refuses, e.g. Fira's 'full').
    refresh_methods: the ``refresh`` values it supports; None: those its factory accepts.
    stacked_kernels: False when it cannot project (layers, in, out) kernels (--scan-layers).
    fixed_rank: the optimizer's own rank, which ``rank`` does not change (APOLLO-Mini: 1).
  """

  name: str
  factory: Factory
  description: str
  default_lr: float
  options: Callable[[OptimizerConfig], dict[str, Any]]
  projects: bool = True
  proj_types: Optional[tuple[str, ...]] = None
  refresh_methods: Optional[tuple[str, ...]] = None
  stacked_kernels: bool = True
  fixed_rank: Optional[int] = None

  def build(self, learning_rate, cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer with the recipe's options for ``cfg``; the learning rate is a scalar
    (a traced one inside the step)."""
    return self.factory(learning_rate, **self.options(cfg))

  @property
  def library(self) -> bool:
    """One of galore_optax's own optimizers (not a baseline from optax)."""
    factory = getattr(self.factory, "func", self.factory)  # a functools.partial's own
    return factory.__module__.startswith("galore_optax")

  @property
  def eight_bit(self) -> bool:
    """Blockwise 8-bit states (the factory takes a ``block_size``)."""
    return "block_size" in _parameters(self.factory)


def _parameters(factory: Factory) -> dict[str, inspect.Parameter]:
  return dict(inspect.signature(factory).parameters)


def galore_options(cfg: OptimizerConfig) -> dict[str, Any]:
  """The GaLore keyword arguments every galore_optax optimizer takes."""
  return dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale,
              proj_type=cfg.proj_type, projected=go.path_mask(cfg.targets))


def _galore_recipe(cfg: OptimizerConfig) -> dict[str, Any]:
  return dict(galore_options(cfg), weight_decay=cfg.weight_decay, refresh=cfg.refresh)


def _contrib_galore(learning_rate, rank, targets, update_proj_gap=200, scale=1.0, weight_decay=0.0):
  """The peer baseline ``optax.contrib.galore`` on the same matrices (exact SVD, 2-D only)."""
  pattern = re.compile(targets)

  def dimension_numbers(params):
    def pick(path, leaf):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      if leaf.ndim == 2 and pattern.search(name):
        return optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)
      return None
    return jax.tree_util.tree_map_with_path(pick, params)

  return optax.contrib.galore(
      learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
      base_optimizer=optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
      weight_decay=weight_decay, weight_dimension_numbers=dimension_numbers)


def _scaled_adamw(learning_rate, scale, targets):
  """AdamW whose attention/MLP updates are multiplied by GaLore's scale: GaLore's step sizes
  per parameter group without its projection (a diagnostic row, not an optimizer to use)."""
  return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.masked(optax.scale(scale), go.path_mask(targets)),
                     optax.scale_by_learning_rate(learning_rate))


# APOLLO and GoLore: their own random projections (--refresh does not apply); APOLLO at scale 1,
# as its scripts.
_APOLLO = dict(refresh_methods=("svd",))


def _apollo_recipe(cfg: OptimizerConfig) -> dict[str, Any]:
  return dict(galore_options(cfg), weight_decay=cfg.weight_decay, scale=1.0)


REGISTRY: dict[str, OptimizerSpec] = {spec.name: spec for spec in [
    OptimizerSpec(
        "adamw", optax.adamw, "optax.adamw (full-rank baseline)", 1e-3,
        lambda c: dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=c.weight_decay),
        projects=False),
    OptimizerSpec(
        "adamw_8bit", go.adamw_8bit, "galore_optax.adamw_8bit (blockwise 8-bit states)", 1e-3,
        lambda c: dict(weight_decay=c.weight_decay), projects=False),
    OptimizerSpec("galore_adamw", go.galore_adamw, "galore_optax.galore_adamw", 1e-2,
                  _galore_recipe),
    OptimizerSpec("galore_adamw8bit", go.galore_adamw8bit, "galore_optax.galore_adamw8bit",
                  1e-2, _galore_recipe),
    OptimizerSpec(
        "galore_adafactor", go.galore_adafactor, "galore_optax.galore_adafactor", 1e-2,
        # The learning rate as is, as transformers documents for Adafactor with a schedule:
        # scale_parameter would multiply it by each weight's RMS (~0.02 at init).
        lambda c: dict(_galore_recipe(c), scale_parameter=False, relative_step=False)),
    OptimizerSpec("gradnorm_lorp", go.gradnorm_lorp, "galore_optax.gradnorm_lorp", 1e-2,
                  _galore_recipe),
    OptimizerSpec("gradnorm_lorp8bit", go.gradnorm_lorp8bit, "galore_optax.gradnorm_lorp8bit",
                  1e-2, _galore_recipe),
    OptimizerSpec(
        "fira_adamw", go.fira_adamw, "galore_optax.fira_adamw (GaLore + the rescaled residual)",
        1e-2, _galore_recipe),
    OptimizerSpec(
        "golore_adamw", go.golore_adamw,
        "galore_optax.golore_adamw (GaLore with random orthonormal projectors)", 1e-2,
        lambda c: dict(galore_options(c), weight_decay=c.weight_decay), refresh_methods=("svd",)),
    OptimizerSpec(
        "osd_adamw", go.osd_adamw,
        "galore_optax.osd_adamw (Online Subspace Descent: the projector moved by online PCA)",
        1e-2,
        # The official projector step size 1/update_proj_gap (no SVD refresh after step 0).
        lambda c: dict({k: v for k, v in galore_options(c).items() if k != "update_proj_gap"},
                       weight_decay=c.weight_decay,
                       projector_learning_rate=1.0 / c.update_proj_gap),
        proj_types=("std", "reverse_std", "left", "right"), refresh_methods=("svd",)),
    OptimizerSpec(
        "conda", go.conda,
        "galore_optax.conda (Adam in the rotating singular basis of its first moment)", 1e-2,
        # Rotates every singular vector: no rank or side to choose (projects=False).
        lambda c: dict(update_proj_gap=c.update_proj_gap, scale=c.scale,
                       weight_decay=c.weight_decay, projected=go.path_mask(c.targets)),
        projects=False),
    OptimizerSpec(
        "subtrack_adamw", go.subtrack_adamw,
        "galore_optax.subtrack_adamw (SubTrack++: the subspace tracked along Grassmann geodesics)",
        1e-2, lambda c: dict(galore_options(c), weight_decay=c.weight_decay),
        proj_types=("std", "reverse_std", "left", "right"), refresh_methods=("svd",)),
    OptimizerSpec(
        "coap_adamw", go.coap_adamw,
        "galore_optax.coap_adamw (COAP: correlation-aware steps of the projector, sketches)",
        1e-2, lambda c: dict(galore_options(c), weight_decay=c.weight_decay),
        proj_types=("std", "reverse_std", "left", "right"), refresh_methods=("svd",)),
    OptimizerSpec(
        "frugal_adamw", go.frugal_adamw,
        "galore_optax.frugal_adamw (Adam on an SVD subspace at density 0.25, signSGD outside)",
        1e-2,
        # The density sets each matrix's rank (projects=False: no rank option).
        lambda c: dict(update_proj_gap=c.update_proj_gap, weight_decay=c.weight_decay,
                       projected=go.path_mask(c.targets)),
        projects=False),
    OptimizerSpec(
        "frugal_blocks", functools.partial(go.frugal_adamw, projection="blocks"),
        "galore_optax.frugal_adamw(projection='blocks') (Adam on a quarter of the tensors at a "
        "time, top layers first, signSGD on the rest)",
        1e-2,
        lambda c: dict(update_proj_gap=c.update_proj_gap, weight_decay=c.weight_decay,
                       projected=go.path_mask(c.targets)),
        projects=False),
    OptimizerSpec(
        "apollo_adamw", go.apollo_adamw,
        "galore_optax.apollo_adamw (random projection, channel-wise scaling)", 1e-2,
        _apollo_recipe, **_APOLLO),
    OptimizerSpec(
        "apollo_adamw8bit", go.apollo_adamw8bit,
        "galore_optax.apollo_adamw8bit (APOLLO with blockwise 8-bit moments)", 1e-2,
        _apollo_recipe, **_APOLLO),
    OptimizerSpec(
        "apollo_mini", go.apollo_mini,
        "galore_optax.apollo_mini (rank 1, tensor-wise scaling, scale 128)", 1e-2,
        lambda c: dict(weight_decay=c.weight_decay, update_proj_gap=c.update_proj_gap,
                       proj_type=c.proj_type, projected=go.path_mask(c.targets)),
        fixed_rank=1, **_APOLLO),
    OptimizerSpec(
        "optax_contrib_galore", _contrib_galore, "optax.contrib.galore (peer baseline)", 1e-2,
        lambda c: dict(rank=c.rank, update_proj_gap=c.update_proj_gap, scale=c.scale,
                       weight_decay=c.weight_decay, targets=c.targets),
        proj_types=("std",), refresh_methods=("svd",), stacked_kernels=False),
    OptimizerSpec(
        "adamw_scaled", _scaled_adamw,
        "AdamW with attention/MLP updates x GaLore's scale (diagnostic)", 1e-2,
        lambda c: dict(scale=c.scale, targets=c.targets), projects=False),
]}


def library() -> list[OptimizerSpec]:
  """The library's own optimizers, in registry order."""
  return [spec for spec in REGISTRY.values() if spec.library]


def call_factory(name: str, learning_rate, **options) -> optax.GradientTransformation:
  """The factory of ``name`` called with those of ``options`` it takes.

  For tests and benchmarks that set one configuration for a whole family: options a factory
  has no use for are left out (``rank`` for APOLLO-Mini, ``block_size`` for float states, Adam's
  ``eps`` for Adafactor, whose eps is a pair).
  """
  factory = REGISTRY[name].factory
  params = _parameters(factory)
  takes = lambda k: k in params and not (k == "eps" and isinstance(params[k].default, tuple))
  return factory(learning_rate, **{k: v for k, v in options.items() if takes(k)})


def get_spec(name: str) -> OptimizerSpec:
  """The registry entry of ``name``; an unknown name is an ExampleError listing the others."""
  if name not in REGISTRY:
    raise ExampleError(f"unknown optimizer {name!r} (choose from: {', '.join(REGISTRY)})")
  return REGISTRY[name]


def learning_rate_schedule(peak: float, cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup over warmup_fraction of the steps, cosine decay to min_lr_ratio * peak."""
  total = max(1, cfg.total_steps)
  warmup = int(cfg.warmup_fraction * total)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=cfg.min_lr_ratio * peak)


def check_config(name: str, cfg: OptimizerConfig, *, stacked_kernels: bool = False) -> float:
  """Checks ``cfg`` for optimizer ``name``; returns the peak learning rate.

  Raises:
    ExampleError: naming the option and the accepted values.
  """
  spec = get_spec(name)
  peak = spec.default_lr if cfg.learning_rate is None else cfg.learning_rate
  if not peak > 0 or peak == float("inf"):
    raise ExampleError(f"learning rate must be a positive number, got {peak}")
  if cfg.max_consecutive_nonfinite < 0:
    raise ExampleError("max-consecutive-nonfinite must be >= 0 (0: no skipping), got "
                       f"{cfg.max_consecutive_nonfinite}")
  if not spec.projects:
    return peak
  if cfg.rank < 1:
    raise ExampleError(f"rank must be positive, got {cfg.rank}")
  if cfg.update_proj_gap < 1:
    raise ExampleError(f"update_proj_gap must be positive, got {cfg.update_proj_gap}")
  if spec.proj_types is not None and cfg.proj_type not in spec.proj_types:
    raise ExampleError(f"{name} does not support proj_type {cfg.proj_type!r} "
                       f"(choose from: {', '.join(spec.proj_types)})")
  if spec.refresh_methods is not None and cfg.refresh not in spec.refresh_methods:
    raise ExampleError(f"{name} does not support refresh {cfg.refresh!r} "
                       f"(choose from: {', '.join(spec.refresh_methods)})")
  if stacked_kernels and not spec.stacked_kernels:
    raise ExampleError(f"{name} cannot project stacked (scan_layers) kernels; "
                       "train without --scan-layers")
  try:
    re.compile(cfg.targets)
  except re.error as e:
    raise ExampleError(f"galore targets {cfg.targets!r} is not a regular expression: {e}"
                       ) from None
  try:  # the library checks its own options at construction (no arrays): before any data
    spec.build(peak, cfg)
  except ValueError as e:  # e.g. Fira's 'full'
    raise ExampleError(f"{name}: {e}") from None
  return peak


def build_optimizer(name: str, cfg: OptimizerConfig):
  """The optimizer ``name`` configured by ``cfg``.

  Args:
    name: a key of ``REGISTRY``.
    cfg: the hyperparameters.

  Returns:
    (optax transformation, learning-rate schedule, peak learning rate). The transformation's
    ``update`` takes the learning rate as a keyword argument
    (``optimizer.update(model, grads, learning_rate=schedule(step))``). It is
    ``optax.apply_if_finite`` around the (optionally clipped) optimizer unless
    ``cfg.max_consecutive_nonfinite`` is 0, and the same object for every ``cfg`` that differs
    only in the schedule (learning rate, steps, warmup), so that ``nnx.jit`` reuses the
    compiled step.
  """
  peak = check_config(name, cfg)
  schedule_free = dataclasses.replace(cfg, learning_rate=None, total_steps=0,
                                      warmup_fraction=0.0, min_lr_ratio=0.0)
  return _build(name, schedule_free), learning_rate_schedule(peak, cfg), peak


@functools.lru_cache(maxsize=64)
def _build(name: str, cfg: OptimizerConfig) -> optax.GradientTransformationExtraArgs:
  def with_learning_rate(learning_rate):
    tx = REGISTRY[name].build(learning_rate, cfg)
    if cfg.grad_clip:
      tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx
  tx = _learning_rate_argument(with_learning_rate)
  if cfg.max_consecutive_nonfinite:
    # The loop stops once this many steps in a row were skipped, so apply_if_finite's
    # "apply anyway after max_consecutive_errors" is never reached.
    # sharding_aware hands the state back in the containers nnx.Optimizer gave it, so
    # apply_if_finite's lax.cond sees one structure for the old and the new state.
    tx = optax.apply_if_finite(go.sharding_aware(tx),
                               max_consecutive_errors=cfg.max_consecutive_nonfinite)
  return tx


def _learning_rate_argument(
    make: Callable[[Any], optax.GradientTransformation]) -> optax.GradientTransformationExtraArgs:
  """``make(learning_rate)`` with the learning rate passed to every ``update`` as the keyword
  argument ``learning_rate``: nothing in the state, no constant in the compiled step."""
  # The state does not depend on the learning rate; any positive value builds it. Building
  # here also makes a bad option fail now rather than at the first step.
  placeholder = make(1.0)

  def update(updates, state, params=None, *, learning_rate, **extra_args):
    del extra_args
    return make(learning_rate).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(placeholder.init, update)


def nonfinite_counts(opt_state) -> Optional[tuple[Any, Any]]:
  """(consecutive, total) skipped steps of an ``apply_if_finite`` state or of a fused step's
  (``go.FusedState``; zeros unless it skips); None without one."""
  if isinstance(opt_state, (optax.ApplyIfFiniteState, go.FusedState)):
    return opt_state.notfinite_count, opt_state.total_notfinite
  return None
