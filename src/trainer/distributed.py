"""Exact validation under DDP, and which process is the global rank 0.

Lightning gives every validation DataLoader a `DistributedSampler`, which *pads* the dataset to a
multiple of the world size by repeating its first samples: with 1,001 images on 2 ranks one image is
counted twice and top-1 differs from the single-process value. The validation loader should use
Lightning's `UnrepeatedDistributedSampler` instead (rank r gets samples r, r + W, r + 2W, ...; ranks
may differ by one sample, nothing repeated, nothing missed). Lightning keeps a sampler that already is
a `DistributedSampler`, and the torchmetrics accuracies sum their counts over ranks at `compute()`,
so the DDP top-1 equals the single-process top-1 exactly. Validation runs no gradient sync, so ranks
with one batch more or less cannot hang.

A DataModule gets this by building its validation loader with `src.data.folder.validation_sampler(dataset)` (the
sampler itself, chosen when Lightning calls `val_dataloader()`, after the process group exists).
`unpadded_validation(datamodule)` does the same from outside for a DataModule that does not (it
wraps `val_dataloader`); for one that does, it changes nothing.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from src.data.folder import validation_sampler


def is_global_zero() -> bool:
    """Whether this process is the global rank 0, from the launcher's environment (torchrun, SLURM,
    Lightning's own subprocess launcher), usable before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    # Lightning's launcher for N devices per machine sets LOCAL_RANK / NODE_RANK for its children
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def unpadded_loader(loader: DataLoader) -> DataLoader:
    """`loader` with its sequential sampler replaced by an unpadded per-rank split, when a process
    group with more than one rank is running; otherwise (or when it already splits by rank, e.g.
    built with `validation_sampler`) `loader` itself."""
    if validation_sampler(loader.dataset) is None or isinstance(loader.sampler, DistributedSampler):
        return loader
    if not isinstance(loader.sampler, SequentialSampler):
        raise TypeError(
            f"validation loader must be sequential (shuffle=False) to split it exactly across ranks, "
            f"got sampler {type(loader.sampler).__name__}"
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=validation_sampler(loader.dataset),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def unpadded_validation(datamodule):
    """Wrap `datamodule.val_dataloader` (called by Lightning after the process group is set up) so
    validation splits the data across ranks without padding. Returns the datamodule. For a DataModule
    whose loader already uses `validation_sampler` the wrapper returns its loader unchanged (and is
    no longer needed once every DataModule of the project does)."""
    original = datamodule.val_dataloader

    def val_dataloader():
        loaders = original()
        if isinstance(loaders, (list, tuple)):
            return type(loaders)(unpadded_loader(dl) for dl in loaders)
        return unpadded_loader(loaders)

    datamodule.val_dataloader = val_dataloader
    return datamodule


def gather_list_states(metric) -> None:
    """Every rank's list states of a torchmetrics `metric` (created with ``sync_on_compute=False``)
    concatenated in rank order on every rank, so ``compute()`` sees the whole validation set.

    Needed for per-image list states (``MeanAveragePrecision``: boxes, scores, RLE masks per image):
    torchmetrics syncs them one tensor at a time, which needs the same number of images on every rank
    (a padded sampler, i.e. images counted twice); unpadded validation gives ranks one image more or
    less, and the collectives would mismatch. One ``all_gather_object`` of each rank's lists instead."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return

    def cpu(v):
        return v.cpu() if hasattr(v, "cpu") else v

    local = {k: [cpu(v) for v in vals] for k, vals in metric.metric_state.items() if isinstance(vals, list)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for key in local:
        setattr(metric, key, [v for rank in gathered for v in rank[key]])
