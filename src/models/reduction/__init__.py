"""Token-reduction methods on one shared patching mechanism (see base.py).

Every module in this package that is not base/schedules is imported here, so a method registers
itself just by existing: adding a method means adding one file (and one config).
"""

import importlib
import pkgutil

from .base import (
    REGISTRY,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    apply_reduction,
    register,
    remove_reduction,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "REGISTRY",
    "AttentionRequest",
    "AttentionResult",
    "ReductionConfigError",
    "ReductionMethod",
    "TokenState",
    "apply_reduction",
    "register",
    "remove_reduction",
]
