"""galore-optax: memory-efficient full-parameter training with low-rank gradient projection."""

from galore_optax.adam import ScaleByAdamHFState, scale_by_adam_hf
from galore_optax.adam_8bit import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from galore_optax.adafactor import (
    AddAdafactorDecayedWeightsState,
    FactoredMoment,
    ScaleByAdafactorHFState,
    add_adafactor_decayed_weights,
    scale_by_adafactor_hf,
)
from galore_optax.alias import galore, galore_adafactor, galore_adamw, galore_adamw8bit
from galore_optax.gradnorm import GradNormLoRPState, gradnorm_lorp, gradnorm_lorp8bit
from galore_optax.masking import path_mask
from galore_optax.matrix_view import DimensionNumbers
from galore_optax.quantization import (
    QuantizedArray,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)
from galore_optax.projector_quantization import (
    QuantizedProjector,
    dequantize_projector,
    quantize_projector,
)
from galore_optax.refresh import (
    LazyRefresh,
    LazyRefreshState,
    canonical_signs,
    power_refresh,
    randomized_refresh,
    svd_refresh,
)
from galore_optax.sharding import opt_state_shardings, sharding_aware
from galore_optax.transform import GaLoreState, MomentRealignment, scale_by_galore
from galore_optax.tree_utils import tree_bytes
from galore_optax.weight_decay import decay_weights_after_update

__version__ = "0.1.0"

__all__ = (
    "AddAdafactorDecayedWeightsState",
    "DimensionNumbers",
    "FactoredMoment",
    "GaLoreState",
    "GradNormLoRPState",
    "LazyRefresh",
    "LazyRefreshState",
    "MomentRealignment",
    "QuantizedArray",
    "QuantizedProjector",
    "ScaleByAdafactorHFState",
    "ScaleByAdam8bitState",
    "ScaleByAdamHFState",
    "adamw_8bit",
    "add_adafactor_decayed_weights",
    "canonical_signs",
    "decay_weights_after_update",
    "dequantize_blockwise",
    "dequantize_projector",
    "dynamic_map",
    "galore",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw8bit",
    "gradnorm_lorp",
    "gradnorm_lorp8bit",
    "opt_state_shardings",
    "path_mask",
    "power_refresh",
    "quantize_blockwise",
    "quantize_projector",
    "randomized_refresh",
    "scale_by_adafactor_hf",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_galore",
    "sharding_aware",
    "svd_refresh",
    "tree_bytes",
)
