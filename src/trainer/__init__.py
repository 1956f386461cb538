"""The LightningModule (student, frozen teacher, losses, metrics) and run()."""

from .module import ReductionModule

__all__ = ["ReductionModule"]
