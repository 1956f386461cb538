from . import (
    stvit_swin,  # noqa: F401  registers stvit_swin_{t,s,b} (= stvit_r_swin_{tiny,small,base}) with timm
    stvit_swin_det,  # noqa: F401  their detection backbone (features_only=True)
)
from .reduction import REGISTRY, ReductionConfigError, apply_reduction, remove_reduction
from .weights import WeightsError, load_weights

__all__ = ["REGISTRY", "ReductionConfigError", "WeightsError", "apply_reduction", "load_weights", "remove_reduction"]
