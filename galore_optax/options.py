"""The GaLore and Adam options: validated once, carried as one value.

Every public factory writes its arguments out in its own signature and
builds these carriers from them (`GaLoreOptions.from_arguments(locals())`),
so each check, and each default a factory does not expose, lives here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Optional

from galore_optax import projection
from galore_optax import projector_quantization as pq
from galore_optax import realignment
from galore_optax import refresh as refresh_lib
from galore_optax import schedules
from galore_optax import tracking as tracking_lib
from galore_optax import validation


@dataclasses.dataclass(frozen=True)
class GaLoreOptions:
  """What is projected, how bases are computed and stored, and when.

  Attributes:
    rank: rank of the projection; clamped to the smaller side of each matrix.
      A static int (it fixes array shapes); None keeps every singular vector
      (the projection is then a rotation, as in Conda); a callable
      `rank(m, n, sides)` gives each (m × n) matrix its own (FRUGAL's density).
    update_proj_gap: steps between projector refreshes (T): each matrix is
      refreshed at 0-based steps 0, T, 2T, … from the current gradient;
      None refreshes at step 0 only (then `tracking` may move the bases).
    scale: α, the multiplier of the projected-back update (the paper: 0.25).
    proj_type: 'std' (compress the smaller side, as galore-torch),
      'reverse_std', 'left' (output side), 'right' (input side) or 'full'.
      Applied to the roles of the axes, so a Flax (in, out) kernel and a
      PyTorch (out, in) weight are treated alike.
    projected: which leaves are projected: a pytree of bools (True =
      projected) or callable(params) returning one. Default: every
      floating-point leaf with at least two axes. Zero-size leaves are never
      projected. See `go.path_mask`.
    dimension_numbers: a `DimensionNumbers` for every leaf, a pytree of them
      (None entries for unprojected leaves), or a callable(params) returning
      one. Default: Flax layout, reduction axis -2 and output axis -1; other
      axes are batch axes with one projector per slice.
    refresh: how bases are computed: 'svd' (exact float32 SVD), 'randomized'
      (randomized range finder, one power iteration), 'power' (subspace
      iteration warm-started from the previous projector), or a function with
      the signature of `go.svd_refresh` (e.g. `go.randomized_refresh(16)`).
    refresh_memory_budget: bytes of float32 gradient matrices one batched
      decomposition may take; None (the default) is 256 MiB. A static int
      (with `optax.inject_hyperparams`, name it in `static_args`). A refresh copies each
      matrix to float32 before decomposing it; the budget bounds how many of
      those copies (and their decompositions' work space) exist at once.
      Larger budgets make fewer, larger batched calls, which is faster on a
      GPU; smaller ones need less memory. A matrix larger than the budget is
      decomposed alone. The bases do not depend on it.
    projector_dtype: dtype the bases are stored in; default the leaf's.
    projector_bits: None (bases stored as arrays), 8 or 4: bases stored
      group-quantized (Q-GaLore style) and dequantized where used; excludes
      `projector_dtype`.
    regenerate_projector: with `refresh="random"` only: store no bases, just
      the step of each matrix's last refresh, and draw the random projection
      again from its keys in every step (fewer bytes, more work per step).
    lazy_refresh: None, True or a `go.LazyRefresh(...)`: Q-GaLore's
      layer-adaptive schedule, under which each matrix's gap grows while its
      leading singular vector stays put. Leaves then refresh independently.
    realign_moments: None, True or a `go.MomentRealignment(b1, b2)`: at each
      refresh, map the inner Adam's moments into the new basis (LDAdam).
      `True` uses the optimizer's own b1 and b2. A
      `go.FirstMomentTransport(persistent)` maps the first moment only
      (GoLore), `go.RootTransport()` both moments as COAP's restore_state.
      All need float `mu`/`nu` moments in the inner state (not 8-bit, not
      Adafactor).
    refresh_input: None (a refresh decomposes the gradient) or a
      `realignment.FirstMomentInput(b1)`: it decomposes the first moment
      Mₜ = b1·project_back(m) + (1 − b1)·Gₜ instead (Conda; needs float
      `mu` moments in the inner state).
    tracking: None, or a `go.OnlinePCA(...)`: after every step that did not
      refresh them, move the bases by one optimizer step on the online-PCA
      loss of that step's gradient (Online Subspace Descent). Needs float
      stored bases (no `projector_bits`, no `regenerate_projector`) and a
      one-sided `proj_type`.
  """

  rank: Any = 128  # an int; None; or a callable rank(m, n, sides)
  update_proj_gap: Any = 200
  scale: Any = 1.0
  proj_type: str = "std"
  projected: Any = None
  dimension_numbers: Any = None
  refresh: Any = "svd"
  refresh_memory_budget: Optional[int] = None
  projector_dtype: Any = None
  projector_bits: Optional[int] = None
  regenerate_projector: bool = False
  lazy_refresh: Any = None
  realign_moments: Any = None
  tracking: Any = None
  refresh_input: Any = None

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    if self.rank is not None and not callable(self.rank):
      set_("rank", validation.static_int(self.rank, "rank"))
    if self.update_proj_gap is not None:
      set_("update_proj_gap", validation.positive_int(self.update_proj_gap, "update_proj_gap"))
    validation.real(self.scale, "scale")
    projection.check_proj_type(self.proj_type)
    _check_refresh(self.refresh)
    if self.refresh_memory_budget is not None:
      set_("refresh_memory_budget",
           validation.static_int(self.refresh_memory_budget, "refresh_memory_budget"))
    validation.float_dtype(self.projector_dtype, "projector_dtype")
    if self.projector_bits is not None:
      validation.choice(self.projector_bits, "projector_bits", pq.SUPPORTED_BITS)
      if self.projector_dtype is not None:
        raise ValueError(
            "projector_dtype and projector_bits both set: a quantized projector "
            "is stored as uint8 codes and dequantized to the gradient's dtype; "
            "pass only one of them."
        )
    if not isinstance(self.regenerate_projector, bool):
      raise TypeError(f"regenerate_projector must be a bool, got {self.regenerate_projector!r}.")
    set_("lazy_refresh", schedules.resolve_lazy_refresh(self.lazy_refresh))
    if self.lazy_refresh is not None and self.update_proj_gap is None:
      raise ValueError("lazy_refresh grows the gap between refreshes; it needs an "
                       "update_proj_gap (an int), not None.")
    _check_realignment(self.realign_moments)
    tracking_lib.check_tracking(self.tracking, self.proj_type)
    if self.tracking is not None and self.lazy_refresh is not None:
      raise ValueError("tracking moves every basis at the steps no refresh is due, while "
                       "lazy_refresh makes refreshes due per matrix: pass one of them.")
    if self.tracking is not None and (self.projector_bits is not None
                                      or self.regenerate_projector):
      raise ValueError(
          "tracking moves the stored bases a little every step, which needs them stored as "
          "float arrays: pass projector_bits=None and regenerate_projector=False "
          "(projector_dtype may be bfloat16).")

  @classmethod
  def from_arguments(cls, arguments: Mapping[str, Any], **overrides) -> GaLoreOptions:
    """The options among a factory's `arguments` (its `locals()`), validated; `overrides`
    replace arguments of the same name."""
    return cls(**{**_fields_of(cls, arguments), **overrides})

  def with_realignment_decays(self, b1, b2) -> GaLoreOptions:
    """`realign_moments=True` resolved to the optimizer's own Adam decays."""
    if self.realign_moments is not True:
      return self
    return dataclasses.replace(self, realign_moments=realignment.MomentRealignment(b1, b2))


def _check_refresh(value) -> None:
  """A refresh function takes (g, rank, sides, ...); a factory of one does not."""
  method = refresh_lib.get_refresh_method(value)
  try:
    step = {"step": None} if getattr(method, "reads_step", False) else {}
    inspect.signature(method).bind(None, None, None, **step)
  except TypeError:
    name = getattr(method, "__name__", repr(method))
    raise TypeError(
        f"refresh={name} does not take a refresh function's arguments (g, rank, sides, "
        f"previous=None, key=None); if it makes one, call it: refresh={name}(), as in "
        "refresh=go.randomized_refresh(oversample=16), or pass a name such as "
        "refresh='randomized'."
    ) from None
  except ValueError:  # no signature to inspect (a builtin): trust it
    pass


def _check_realignment(value) -> None:
  if value is None or isinstance(value, bool):
    return
  if isinstance(value, (realignment.ResetMoments, realignment.RootTransport)):
    return
  if isinstance(value, realignment.FirstMomentTransport):
    if not isinstance(value.persistent, bool):
      raise TypeError(
          f"realign_moments=FirstMomentTransport(persistent={value.persistent!r}): "
          "persistent must be a bool.")
    return
  if not isinstance(value, realignment.MomentRealignment):
    raise TypeError(
        f"realign_moments={value!r}: pass None, True, "
        "go.MomentRealignment(b1=..., b2=...) with the inner Adam's decays, "
        "go.FirstMomentTransport(persistent=...) or go.RootTransport()."
    )
  validation.decay(value.b1, "realign_moments.b1")
  validation.decay(value.b2, "realign_moments.b2")


@dataclasses.dataclass(frozen=True)
class AdamOptions:
  """The Adam(W) hyperparameters of the GaLore-family optimizers.

  Attributes:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to √v (galore-torch's placement, before the bias correction;
      the 8-bit optimizers add it inside, as bitsandbytes, and default 1e-8).
    weight_decay: decoupled weight decay, a number or an optax schedule;
      where each optimizer applies it is in its description.
    mask: which leaves are decayed, as in `optax.adamw`: a pytree of bools
      or a callable(params) returning one; default all.
    mu_dtype: optional dtype of the first moment (float moments only).
  """

  b1: Any = 0.9
  b2: Any = 0.999
  eps: Any = 1e-6
  weight_decay: Any = 0.0
  mask: Any = None
  mu_dtype: Any = None

  def __post_init__(self):
    validation.decay(self.b1, "b1")
    validation.decay(self.b2, "b2")
    validation.non_negative(self.eps, "eps")
    validation.scalar_or_schedule(self.weight_decay, "weight_decay")

  @classmethod
  def from_arguments(cls, arguments: Mapping[str, Any], **overrides) -> AdamOptions:
    """The Adam options among a factory's `arguments` (its `locals()`), validated; `overrides`
    replace arguments of the same name."""
    return cls(**{**_fields_of(cls, arguments), **overrides})


def _fields_of(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
  return {f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
