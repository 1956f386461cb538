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

The training loader of every data module here is `resumable_loader` (below): a torchdata
`StatefulDataLoader` over a `ResumableSampler`, whose position Lightning saves in every checkpoint and
restores on resume. The shuffle order of an epoch is a function of (seed, epoch) alone, sharded over the
ranks like `DistributedSampler`, and every training image's augmentation draws come from its own seed
(seed, epoch, index): the rest of an interrupted epoch is the same images with the same augmentations,
whatever the number of DataLoader workers (`SeededItems` seeds python's `random`, numpy and torch for
each image, the way timm's transforms draw).
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data root is missing or not laid out as expected."""


def check_image_folder(path: Path) -> int:
    """Number of class folders in `path`; raises DataError naming the path when unusable."""
    if not path.is_dir():
        raise DataError(
            f"data folder not found: {path}. Expected ImageFolder layout "
            f"<data.root>/train/<class>/<image> and <data.root>/val/<class>/<image>; set data.root=PATH"
        )
    classes = [p for p in path.iterdir() if p.is_dir()]
    if not classes:
        raise DataError(f"{path} has no class sub-folders; ImageFolder expects {path}/<class>/<image>")
    return len(classes)


# --- the resumable training loader (every data module's) -------------------------------------------
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value of `x`."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the integers `parts` (e.g. seed, epoch, index)."""
    h = 0
    for p in parts:
        h = _mix64(h ^ (int(p) & _MASK64))
    return h >> 1


def seed_global_rngs(seed: int, cuda: bool = False) -> None:
    """Seed python's `random`, numpy's global RNG and torch's CPU generator (and every CUDA device's,
    with `cuda`) from one 63-bit seed."""
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF])
    if cuda:
        torch.manual_seed(seed)  # CPU and every CUDA device
    else:
        torch.random.default_generator.manual_seed(seed)


def data_seed(seed: Optional[int] = None) -> int:
    """The data order's seed: `seed`, else the run's (`PL_GLOBAL_SEED`, set by seed_everything), else a
    fresh random one in a single process (a resume restores it from the checkpoint) and 0 under DDP,
    where every rank must agree (Lightning's own DistributedSampler does the same)."""
    if seed is not None:
        return int(seed)
    if os.environ.get("PL_GLOBAL_SEED") not in (None, ""):
        return int(os.environ["PL_GLOBAL_SEED"])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return 0
    return int.from_bytes(os.urandom(4), "little")


class ResumableSampler(DistributedSampler):
    """Shuffled training order that can resume mid-epoch, the same on one process and under DDP.

    Epoch e is `torch.randperm(len(dataset))` of a generator seeded with seed + e, padded to a multiple
    of the world size and dealt round-robin to the ranks, exactly as `DistributedSampler(shuffle=True,
    drop_last=False)` (it is one, so Lightning keeps it under DDP instead of injecting its own). Each
    element is `(index, item seed)`, the item seed `derive_seed(seed, epoch, index)`, so the dataset
    can draw that image's augmentation from its own seed (`SeededItems`, `DigitsDataset`).

    `state_dict()`: seed, epoch, world size and how many positions of the epoch's order all ranks have
    consumed; `load_state_dict()` makes the next iterator start there (for another world size too:
    positions count over all ranks, so every remaining image of the epoch is still seen once). An
    iterator takes its epoch when it yields its first element, so the `set_epoch` that Lightning calls
    after creating the resumed iterator still decides the epoch.
    """

    def __init__(
        self,
        dataset,
        seed: Optional[int] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        item_seeds: bool = True,
    ):
        if num_replicas is None or rank is None:
            running = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if running else 1
            rank = dist.get_rank() if running else 0
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=data_seed(seed), drop_last=False
        )
        self.item_seeds = bool(item_seeds)
        self._resume_epoch: Optional[int] = None  # the restored position, for the next iterator
        self._resume_consumed = 0
        self._epoch_of_position = 0  # the live iterator's epoch and consumed positions (all ranks)
        self._consumed = 0

    def order(self, epoch: int) -> List[int]:
        """The padded order of `epoch` (all ranks), as DistributedSampler builds it."""
        g = torch.Generator()
        g.manual_seed(self.seed + int(epoch))
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        pad = self.total_size - len(indices)
        if pad > 0:
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        return indices

    def __iter__(self) -> Iterator:
        return _ResumableIterator(self)

    def state_dict(self) -> Dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self._epoch_of_position,
            "consumed": self._consumed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume_epoch, self._resume_consumed = self.epoch, int(state["consumed"])
        self._epoch_of_position, self._consumed = self.epoch, self._resume_consumed
        if int(state.get("num_replicas", self.num_replicas)) != self.num_replicas:
            log.warning(
                "Resuming the training data order saved with %s ranks on %s ranks: every remaining image of "
                "the epoch is still seen once, but the batches differ from the uninterrupted run's",
                state.get("num_replicas"),
                self.num_replicas,
            )


class _ResumableIterator:
    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler
        self.mine: Optional[List[int]] = None

    def __iter__(self):
        return self

    def _start(self) -> None:
        s = self.sampler
        epoch = s.epoch
        start = s._resume_consumed if s._resume_epoch == epoch else 0
        s._resume_epoch, s._resume_consumed = None, 0
        s._epoch_of_position, s._consumed = epoch, start
        self.epoch = epoch
        self.mine = s.order(epoch)[start + s.rank : s.total_size : s.num_replicas]
        self.pos = 0

    def __next__(self):
        if self.mine is None:
            self._start()
        if self.pos >= len(self.mine):
            raise StopIteration
        s = self.sampler
        index = self.mine[self.pos]
        self.pos += 1
        s._consumed += s.num_replicas
        return (index, derive_seed(s.seed, self.epoch, index)) if s.item_seeds else index


class SeededItems(Dataset):
    """`dataset` whose item `(index, seed)` is drawn with python's `random`, numpy and torch seeded from
    `seed` (timm / torchvision transforms draw from those global RNGs), so an image's augmentation does
    not depend on which worker loads it or what it loaded before. In the main process (num_workers=0)
    the global RNG states are put back after each batch; a plain index is passed through unchanged."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, key):
        if isinstance(key, tuple):
            index, seed = key
            seed_global_rngs(int(seed))
            return self.dataset[index]
        return self.dataset[key]

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys) -> list:
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNGs serve only its loading
            return [self._item(k) for k in keys]
        saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            return [self._item(k) for k in keys]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])


def validation_sampler(dataset) -> Optional[Sampler]:
    """The sampler of an exact validation loader: under DDP (a process group with more than one rank)
    an unpadded per-rank split in order, otherwise None (the DataLoader's own sequential order). Call
    it in `val_dataloader()`: `DataLoader(dataset, sampler=validation_sampler(dataset), shuffle=False, ...)`."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False
    )


def resumable_loader(
    dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: Optional[int] = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn=None,
):
    """The training DataLoader: a torchdata `StatefulDataLoader` (Lightning saves its `state_dict()` in
    every checkpoint and loads it on resume) over a `ResumableSampler`, full batches only (timm Mixup
    needs even batches; equal steps keep the lr schedule exact). `dataset` takes `(index, seed)` items."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    workers = int(num_workers)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch's deprecated set_vital on construction
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ResumableSampler(dataset, seed=seed),
            drop_last=True,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=bool(persistent_workers) and workers > 0,
            collate_fn=collate_fn,
        )


def validation_loader(dataset, batch_size: int, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """The validation DataLoader of every DataModule: under DDP an unpadded per-rank split (every image
    counted once, `validation_sampler`), else the plain order. `kwargs`: pin_memory, collate_fn, ..."""
    workers = int(num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=validation_sampler(dataset),
        num_workers=workers,
        persistent_workers=workers > 0,
        **kwargs,
    )


IMAGENET_PREPROCESSING = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


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
    def __init__(
        self,
        root: Optional[str] = None,
        train_dir: str = "train",
        val_dir: str = "val",
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        img_size: int = 224,
        in_chans: int = 3,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.3,
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        re_count: int = 1,
        mean=None,
        std=None,
        num_workers: int = 8,
        num_classes: Optional[int] = None,
        model_name: Optional[str] = None,
        model_data_config: Optional[Mapping[str, Any]] = None,
        **_ignored,
    ):
        super().__init__()
        self.root = root
        self.train_dir, self.val_dir = train_dir, val_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        given = {"mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
        pre = {
            **model_preprocessing(model_name, model_data_config),
            **{k: v for k, v in given.items() if v is not None},
        }
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
            raise DataError(
                "data.root is not set: pass data.root=PATH to a folder with train/ and val/ ImageFolder sub-folders"
            )
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
                self.img_size,
                is_training=True,
                auto_augment=self.auto_augment,
                color_jitter=self.color_jitter,
                re_prob=self.re_prob,
                re_mode=self.re_mode,
                re_count=self.re_count,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
            )
        return create_transform(
            self.img_size,
            is_training=False,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(str(self.root)).expanduser()
        if self.val_set is None:
            self.val_set = ImageFolder(str(root / self.val_dir), transform=self.transforms(False))
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ImageFolder(str(root / self.train_dir), transform=self.transforms(True))

    def train_dataloader(self):
        """Resumable (see `resumable_loader`): each image's transform draws from its own seed."""
        return resumable_loader(
            SeededItems(self.train_set),
            self.batch_size,
            num_workers=self.num_workers,
            pin_memory=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return validation_loader(self.val_set, self.eval_batch_size, self.num_workers, pin_memory=True)
