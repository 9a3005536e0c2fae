"""galore-optax: memory-efficient full-parameter training with low-rank gradient projection.

Every optimizer factory exported here returns a transformation wrapped once
in `sharding_aware`, the package's boundary with meshes and Flax NNX.
"""

from galore_optax.adafactor import (
    AddAdafactorDecayedWeightsState,
    FactoredMoment,
    ScaleByAdafactorHFState,
    add_adafactor_decayed_weights,
    scale_by_adafactor_hf,
)
from galore_optax.adam import (
    ScaleByAdamHFState,
    ScaleByBiasCorrectionState,
    scale_by_adam_hf,
    scale_by_bias_correction,
)
from galore_optax.adam_8bit import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from galore_optax.alias import galore, galore_adafactor, galore_adamw, galore_adamw8bit
from galore_optax.fira_apollo import apollo_adamw, apollo_adamw8bit, apollo_mini, fira_adamw
from galore_optax.coap import coap_adamw
from galore_optax.conda import conda, scale_by_conda
from galore_optax.frugal import frugal_adamw, scale_by_frugal
from galore_optax.frugal_blocks import FrugalBlocksState, scale_by_frugal_blocks
from galore_optax.fused import FusedState, fused_init, fused_scan_step
from galore_optax.golore import golore_adamw
from galore_optax.osd import osd_adamw
from galore_optax.gradnorm import GradNormLoRPState, gradnorm_lorp, gradnorm_lorp8bit
from galore_optax.masking import path_mask
from galore_optax.matrix_view import DimensionNumbers
from galore_optax.inspection import ProjectionWarning, describe
from galore_optax.projector_quantization import (
    QuantizedProjector,
    dequantize_projector,
    quantize_projector,
)
from galore_optax.quantization import (
    QuantizedArray,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
)
from galore_optax.realignment import FirstMomentTransport, MomentRealignment, RootTransport
from galore_optax.refresh import (
    canonical_signs,
    coap_refresh,
    geodesic_refresh,
    random_coordinates_refresh,
    power_refresh,
    random_orthonormal_refresh,
    random_refresh,
    randomized_refresh,
    svd_refresh,
    switch_refresh,
)
from galore_optax.memory_analysis import planned_peak_bytes
from galore_optax.schedules import LazyRefresh, LazyRefreshState
from galore_optax.tracking import OnlinePCA
from galore_optax.sharding import opt_state_shardings, sharding_aware
from galore_optax.subtrack import subtrack_adamw
from galore_optax.transform import GaLoreState, scale_by_galore
from galore_optax.tree_utils import tree_bytes
from galore_optax.weight_decay import decay_weights_after_update


__version__ = "0.1.0"

__all__ = (
    "AddAdafactorDecayedWeightsState",
    "DimensionNumbers",
    "FactoredMoment",
    "FirstMomentTransport",
    "FrugalBlocksState",
    "FusedState",
    "GaLoreState",
    "GradNormLoRPState",
    "LazyRefresh",
    "LazyRefreshState",
    "MomentRealignment",
    "OnlinePCA",
    "ProjectionWarning",
    "QuantizedArray",
    "QuantizedProjector",
    "RootTransport",
    "ScaleByAdafactorHFState",
    "ScaleByAdam8bitState",
    "ScaleByAdamHFState",
    "ScaleByBiasCorrectionState",
    "adamw_8bit",
    "apollo_adamw",
    "apollo_adamw8bit",
    "apollo_mini",
    "add_adafactor_decayed_weights",
    "canonical_signs",
    "coap_adamw",
    "coap_refresh",
    "conda",
    "decay_weights_after_update",
    "describe",
    "dequantize_blockwise",
    "dequantize_projector",
    "dynamic_map",
    "fira_adamw",
    "frugal_adamw",
    "fused_init",
    "fused_scan_step",
    "galore",
    "galore_adafactor",
    "galore_adamw",
    "galore_adamw8bit",
    "geodesic_refresh",
    "golore_adamw",
    "gradnorm_lorp",
    "gradnorm_lorp8bit",
    "opt_state_shardings",
    "osd_adamw",
    "path_mask",
    "planned_peak_bytes",
    "power_refresh",
    "quantize_blockwise",
    "quantize_projector",
    "random_coordinates_refresh",
    "random_orthonormal_refresh",
    "random_refresh",
    "randomized_refresh",
    "scale_by_adafactor_hf",
    "scale_by_adam_8bit",
    "scale_by_adam_hf",
    "scale_by_bias_correction",
    "scale_by_conda",
    "scale_by_frugal",
    "scale_by_frugal_blocks",
    "scale_by_galore",
    "sharding_aware",
    "subtrack_adamw",
    "svd_refresh",
    "switch_refresh",
    "tree_bytes",
)
