"""ImageFolder data (``data=imagenet`` / ``data=folder``): ``root/train/<class>/*`` and
``root/val/<class>/*`` with timm's transforms.

Training uses ``timm.data.create_transform(is_training=True)`` with the DeiT recipe from the data
config (RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic random-resized crop,
colour jitter 0.3); mixup / cutmix / label smoothing are applied on the batch by the
LightningModule (timm ``Mixup``). Evaluation resizes to ``img_size / crop_pct`` and center-crops
``img_size``.

Preprocessing (mean, std, interpolation, crop_pct) that the data config leaves unset (null) comes
from the model: its config's ``data_config`` (e.g. DeiT's own crop_pct 0.875: resize 256, crop 224),
else timm's pretrained config of ``model_name`` (``resolve_data_config``: CLIP's mean/std, AugReg's
0.5/0.5, DINOv2's crop 1.0 ...), else ImageNet's mean/std, bicubic, 0.875.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import lightning as L
from torch.utils.data import DataLoader


class DataError(ValueError):
    """The data root is missing or not laid out as expected."""


def check_image_folder(path: Path) -> int:
    """Number of class folders in `path`; raises DataError naming the path when unusable."""
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}. Expected ImageFolder layout "
                        f"<data.root>/train/<class>/<image> and <data.root>/val/<class>/<image>; set data.root=PATH")
    classes = [p for p in path.iterdir() if p.is_dir()]
    if not classes:
        raise DataError(f"{path} has no class sub-folders; ImageFolder expects {path}/<class>/<image>")
    return len(classes)


IMAGENET_PREPROCESSING = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                          "interpolation": "bicubic", "crop_pct": 0.875}


def model_preprocessing(model_name: Optional[str], model_data_config: Optional[Mapping[str, Any]] = None) -> dict:
    """mean / std / interpolation / crop_pct for `model_name`: the model config's own `data_config`
    over timm's pretrained config over ImageNet's defaults."""
    out = dict(IMAGENET_PREPROCESSING)
    if model_name:
        import timm
        from timm.data import resolve_data_config

        try:
            pretrained = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError:  # a name timm does not know (e.g. a model registered by this project)
            pretrained = None
        if pretrained is not None:
            resolved = resolve_data_config(pretrained_cfg=pretrained.to_dict())
            out.update({k: resolved[k] for k in out if resolved.get(k) is not None})
    out.update({k: v for k, v in dict(model_data_config or {}).items() if v is not None})
    return out


class ImageFolderDataModule(L.LightningDataModule):
    def __init__(self, root: Optional[str] = None, train_dir: str = "train", val_dir: str = "val",
                 batch_size: int = 64, eval_batch_size: Optional[int] = None, img_size: int = 224,
                 in_chans: int = 3, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.3,
                 re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1,
                 mean=None, std=None, num_workers: int = 8, num_classes: Optional[int] = None,
                 model_name: Optional[str] = None, model_data_config: Optional[Mapping[str, Any]] = None,
                 **_ignored):
        super().__init__()
        self.root = root
        self.train_dir, self.val_dir = train_dir, val_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        given = {"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
        pre = {**model_preprocessing(model_name, model_data_config),
               **{k: v for k, v in given.items() if v is not None}}
        self.img_size, self.in_chans, self.crop_pct = img_size, in_chans, float(pre["crop_pct"])
        self.interpolation, self.auto_augment, self.color_jitter = pre["interpolation"], auto_augment, color_jitter
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.num_workers = num_workers
        self.num_classes = num_classes
        self.train_set = self.val_set = None

    def validate(self, need_train: bool = True) -> None:
        """Cheap checks of the layout, run before any model is built."""
        if self.root in (None, "", "???"):
            raise DataError("data.root is not set: pass data.root=PATH to a folder with train/ and val/ "
                            "ImageFolder sub-folders")
        root = Path(str(self.root)).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root not found: {root}")
        n_val = check_image_folder(root / self.val_dir)
        if need_train:
            n_train = check_image_folder(root / self.train_dir)
            if n_train != n_val:
                raise DataError(f"{root / self.train_dir} has {n_train} classes but {root / self.val_dir} has {n_val}")
        if self.num_classes is not None and n_val != self.num_classes:
            raise DataError(f"{root / self.val_dir} has {n_val} class folders but model.num_classes={self.num_classes}")

    def transforms(self, train: bool):
        from timm.data import create_transform

        if train:
            return create_transform(
                self.img_size, is_training=True, auto_augment=self.auto_augment, color_jitter=self.color_jitter,
                re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count,
                interpolation=self.interpolation, mean=self.mean, std=self.std,
            )
        return create_transform(self.img_size, is_training=False, crop_pct=self.crop_pct,
                                interpolation=self.interpolation, mean=self.mean, std=self.std)

    def setup(self, stage: Optional[str] = None) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(str(self.root)).expanduser()
        if self.val_set is None:
            self.val_set = ImageFolder(str(root / self.val_dir), transform=self.transforms(False))
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ImageFolder(str(root / self.train_dir), transform=self.transforms(True))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=True, persistent_workers=self.num_workers > 0)
