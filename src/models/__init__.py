from .reduction import REGISTRY, ReductionConfigError, apply_reduction, remove_reduction
from .weights import WeightsError, load_weights
from . import stvit_swin  # noqa: F401  registers stvit_r_swin_{tiny,small,base} with timm

__all__ = ["REGISTRY", "ReductionConfigError", "WeightsError", "apply_reduction", "load_weights", "remove_reduction"]
