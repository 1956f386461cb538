from .reduction import REGISTRY, ReductionConfigError, apply_reduction, remove_reduction
from .weights import WeightsError, load_weights

__all__ = ["REGISTRY", "ReductionConfigError", "WeightsError", "apply_reduction", "load_weights", "remove_reduction"]
