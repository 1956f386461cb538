"""Callbacks and logger set-up for long, preemptible and tracked runs.

- `StepCheckpoint`: a `last-step.ckpt` every N training steps (survives a SIGKILL mid-epoch).
- `CheckpointOnSigterm`: SLURM (and most schedulers) send SIGTERM before preemption or at the time
  limit. Lightning's signal connector turns it into a `SIGTERMException` at the next batch on every
  rank; this callback then writes `last.ckpt` (model, optimizer, scheduler, loop state) before the
  process exits, so `ckpt_path=last` resumes from that very step.
- `TokenImages`: token pictures (`src.models.visualize.visualize_tokens`) of a fixed set of
  validation images, logged to W&B every `every_n_epochs` epochs (and after the last one).
- `prepare_wandb`: the WandbLogger's group (the multirun folder's name in a sweep) and a run id kept
  in the run folder, so a resumed run (same folder, `ckpt_path=last`) continues the same W&B run.
  The API key is only ever read by wandb from the environment (WANDB_API_KEY); it is never put into
  the config, so it cannot reach the saved configs or logs.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .distributed import is_global_zero

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


class StepCheckpoint(ModelCheckpoint):
    """The crash-safe mid-epoch checkpoint, written as `last-step.ckpt`: beside the epoch callback's
    `last.ckpt` rather than as Lightning's versioned `last-v1.ckpt`. Two files, so a kill while one is
    being written leaves the other; `ckpt_path=last` resumes from the newer (Lightning matches both)."""

    CHECKPOINT_NAME_LAST = "last-step"


class CheckpointOnSigterm(Callback):
    """On SIGTERM, save `<checkpoint dir>/last.ckpt` (all ranks take part; rank 0 writes)."""

    def __init__(self, filename: str = "last.ckpt"):
        self.filename = filename
        self.saved_path: Optional[str] = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        ckpt_dirs = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        folder = Path(ckpt_dirs[0]) if ckpt_dirs else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename
        trainer.save_checkpoint(str(path))
        self.saved_path = str(path)
        log.warning("SIGTERM: saved %s at global step %d; resume with ckpt_path=last in the same run folder",
                    path, trainer.global_step)


class TokenImages(Callback):
    """Log `num_images` fixed validation images' token pictures to every WandbLogger."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 8, key: str = "val/tokens"):
        if int(every_n_epochs) < 1 or int(num_images) < 1:
            raise ValueError(f"TokenImages needs every_n_epochs >= 1 and num_images >= 1, "
                             f"got {every_n_epochs} and {num_images}")
        self.every_n_epochs, self.num_images, self.key = int(every_n_epochs), int(num_images), key
        self.logged_epochs: List[int] = []

    def _due(self, trainer: Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    @staticmethod
    def _mean_std(trainer: Trainer, student, chans: int):
        from src.data.digits import DIGITS_MEAN, DIGITS_STD, DigitsDataModule

        if isinstance(trainer.datamodule, DigitsDataModule):
            return (DIGITS_MEAN,) * chans, (DIGITS_STD,) * chans
        cfg = getattr(student, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if trainer.sanity_checking or not trainer.is_global_zero or not loggers or not self._due(trainer):
            return
        student = pl_module.student
        if not hasattr(student, "forward_tokens"):
            raise TypeError(f"TokenImages needs a ViT patched by apply_reduction, got {type(student).__name__}")
        import wandb

        from src.models.visualize import visualize_tokens

        dataset = trainer.datamodule.val_set
        picks = torch.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().long().tolist()
        was_training = student.training
        device = next(student.parameters()).device
        pictures = []
        for i in picks:
            image, label = dataset[i]
            mean, std = self._mean_std(trainer, student, image.shape[0])
            pictures.append(wandb.Image(visualize_tokens(student, image.to(device), mean=mean, std=std),
                                        caption=f"val[{i}] label {int(label)}"))
        student.train(was_training)
        for lg in loggers:
            lg.experiment.log({self.key: pictures, "trainer/global_step": trainer.global_step})
        self.logged_epochs.append(trainer.current_epoch)


def _sweep_group() -> str:
    """The multirun folder's name in a Hydra sweep, else ""."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return Path(str(hc.sweep.dir)).name if hc.mode == RunMode.MULTIRUN else ""
    except Exception:  # Hydra not running (e.g. run() called from a script)
        return ""


def prepare_wandb(lg_cfg: Dict[str, Any], output_dir: str) -> Dict[str, Any]:
    """Fill a WandbLogger config's group (sweep folder name) and id (kept in the run folder)."""
    cfg = dict(lg_cfg)
    if not cfg.get("group"):
        cfg["group"] = _sweep_group() or None
    if not cfg.get("id"):
        id_file = Path(output_dir) / WANDB_ID_FILE
        if id_file.is_file():
            cfg["id"] = id_file.read_text().strip()
        elif is_global_zero():  # only rank 0 has a real W&B run
            cfg["id"] = uuid.uuid4().hex[:8]  # W&B run ids are short lowercase alphanumerics
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(cfg["id"])
    if cfg.get("id"):
        cfg.setdefault("resume", "allow")  # same id after a restart: continue that run
    return cfg


def finish_wandb(loggers) -> None:
    """Finish the W&B runs of these loggers (Lightning's WandbLogger leaves its run open)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()


def token_images_callback(logger_cfg) -> Optional[TokenImages]:
    """A TokenImages callback when the logger group configures one (logger=wandb)."""
    node = (logger_cfg or {}).get("token_images")
    if not node or not node.get("enabled", True):
        return None
    return TokenImages(every_n_epochs=node.get("every_n_epochs", 5), num_images=node.get("num_images", 8))
