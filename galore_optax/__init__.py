"""galore-optax: memory-efficient full-parameter training with low-rank gradient projection."""

from galore_optax.adam import ScaleByAdamHFState, scale_by_adam_hf
from galore_optax.alias import galore, galore_adamw
from galore_optax.masking import path_mask
from galore_optax.matrix_view import DimensionNumbers
from galore_optax.refresh import canonical_signs, power_refresh, randomized_refresh, svd_refresh
from galore_optax.transform import GaLoreState, scale_by_galore
from galore_optax.tree_utils import tree_bytes
from galore_optax.weight_decay import decay_weights_after_update

__version__ = "0.1.0"

__all__ = (
    "DimensionNumbers",
    "GaLoreState",
    "ScaleByAdamHFState",
    "canonical_signs",
    "decay_weights_after_update",
    "galore",
    "galore_adamw",
    "path_mask",
    "power_refresh",
    "randomized_refresh",
    "scale_by_adam_hf",
    "scale_by_galore",
    "svd_refresh",
    "tree_bytes",
)
