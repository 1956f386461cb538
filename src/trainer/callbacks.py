"""Callbacks and logger set-up for long, preemptible and tracked runs.

- `StepCheckpoint`: a `last-step.ckpt` every N training steps and at every epoch end (survives a
  SIGKILL mid-epoch).
- `CheckpointOnSigterm`: SLURM (and most schedulers) send SIGTERM, or SLURM's requeue signal
  (SIGUSR1), or submitit's (SIGUSR2), before preemption or at the time limit. Lightning's signal
  connector turns it into a `SIGTERMException` at the next batch on every rank (after a running
  validation); this callback then writes `last.ckpt` (model, optimizer, scheduler, loop and data-loader
  state) before the process exits, so `ckpt_path=last` resumes from that very step.
- `ExactResume` (src/trainer/resume.py): what else a resumed run needs to end exactly where the run
  left alone would (per-batch RNG streams, epoch aggregates, metrics.csv).
- `TokenImages`: token pictures (`src.models.visualize.visualize_tokens`) of a fixed set of
  validation images, logged to W&B every `every_n_epochs` epochs (and after the last one).
- `prepare_wandb`: the WandbLogger's group (the multirun folder's name in a sweep) and a run id kept
  in the run folder, so a resumed run (same folder, `ckpt_path=last`) continues the same W&B run.
  The API key is only ever read by wandb from the environment (WANDB_API_KEY); it is never put into
  the config, so it cannot reach the saved configs or logs.
"""

from __future__ import annotations

import logging
import os
import signal
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


# Test-only: send this process a signal right after training step N's checkpoints are written (mid-epoch:
# the step's; at an epoch's last step: the epoch end's): "N" sends SIGKILL, "N:SIGTERM" / "N:SIGUSR1" that
# signal. tests/test_resume.py interrupts real runs at chosen steps with it; nothing else sets it.
TEST_SIGNAL_ENV = "TOKEN_REDUCTION_TEST_SIGNAL_AFTER_STEP"


def _test_signal_point(trainer: Trainer) -> None:
    spec = os.environ.get(TEST_SIGNAL_ENV)
    if not spec:
        return
    step, _, name = spec.partition(":")
    if trainer.global_step == int(step):
        os.kill(os.getpid(), getattr(signal, name or "SIGKILL"))


class StepCheckpoint(ModelCheckpoint):
    """The crash-safe checkpoint `last-step.ckpt`: every `every_n_train_steps` training steps inside an
    epoch, and at every epoch's end (after its validation, whether or not `val/top1` improved; Lightning's
    epoch callback rewrites `last.ckpt` only with a new best). Not at an epoch's last step itself: the
    epoch-end checkpoint follows right after that step's validation. Written beside `last.ckpt` rather
    than as Lightning's versioned `last-v1.ckpt`: two files, so a kill while one is being written leaves
    the other; `ckpt_path=last` resumes from the newer (Lightning matches both)."""

    CHECKPOINT_NAME_LAST = "last-step"

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end checkpoint (after validation) follows
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        _test_signal_point(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        _test_signal_point(trainer)


class CheckpointOnSigterm(Callback):
    """Preemption: on SIGTERM, on the SLURM requeue signal (SIGUSR1 unless the SLURMEnvironment plugin
    names another) and on submitit's preemption / time-out signal (SIGUSR2, when submitit has installed a
    handler for it), finish the running training step, or the running validation, write
    `<checkpoint dir>/last.ckpt` (all ranks take part; rank 0 writes) and exit; `ckpt_path=last` resumes
    exactly there. After the SLURM requeue signal (auto-requeue on, Lightning's default under SLURM) the
    job is requeued with `scontrol requeue`; after submitit's, submitit's own handler runs (it requeues
    the job through the launcher, or ends it) once the checkpoint is written.

    Lightning's own handler for the requeue signal writes an `hpc_ckpt_*.ckpt` from inside the signal
    handler, wherever the step happens to be, and `ckpt_path=last` ignores those files; this callback
    replaces it while training runs (Lightning puts the previous handlers back at teardown)."""

    def __init__(self, filename: str = "last.ckpt"):
        self.filename = filename
        self.saved_path: Optional[str] = None
        self.received: Optional[int] = None  # the signal that stopped the run
        self._chained: Dict[int, Any] = {}  # signal -> the handler to run after saving (submitit's)
        self._trainer: Optional[Trainer] = None
        self._deferred = False  # a signal during validation waits for its end

    # --- signals --------------------------------------------------------------------------------
    def _requeue_signal(self, trainer: Trainer):
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment):
            return env.requeue_signal, env.auto_requeue
        return signal.SIGUSR1, False

    def _on_signal(self, signum, frame) -> None:
        log.warning("Received signal %s: the run stops after the current step, saving %s", signum, self.filename)
        self.received = int(signum)
        if self._trainer is not None:
            self._trainer._signal_connector.received_sigterm = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import threading

        self._trainer, self.received = trainer, None
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            return
        requeue_sig, _ = self._requeue_signal(trainer)
        signal.signal(requeue_sig, self._on_signal)
        usr2 = signal.getsignal(signal.SIGUSR2)
        owner = getattr(usr2, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("submitit"):
            self._chained[int(signal.SIGUSR2)] = usr2  # submitit's checkpoint_and_try_requeue
            signal.signal(signal.SIGUSR2, self._on_signal)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        # Lightning stops a validation halfway on SIGTERM; its metrics would then cover part of the data
        # and the resumed run would not repeat it. Let it finish; the run stops right after it.
        from lightning.pytorch.trainer.states import TrainerFn

        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer._signal_connector.received_sigterm
        ):
            self._deferred = True
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._deferred:
            self._deferred = False
            trainer._signal_connector.received_sigterm = True

    # --- saving ---------------------------------------------------------------------------------
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        ckpt_dirs = [
            cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
        ]
        folder = Path(ckpt_dirs[0]) if ckpt_dirs else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / self.filename
        trainer.save_checkpoint(str(path))
        self.saved_path = str(path)
        for lg in trainer.loggers:
            lg.save()
        name = signal.Signals(self.received).name if self.received else "SIGTERM"
        log.warning(
            "%s: saved %s at global step %d; resume with ckpt_path=last in the same run folder",
            name,
            path,
            trainer.global_step,
        )
        if self.received is None:
            return
        requeue_sig, auto_requeue = self._requeue_signal(trainer)
        if self.received == int(requeue_sig) and auto_requeue and trainer.is_global_zero:
            self._scontrol_requeue()
        chained = self._chained.get(self.received)
        if chained is not None:
            chained(self.received, None)  # submitit: requeue through the launcher (or end the job), exit

    @staticmethod
    def _scontrol_requeue() -> None:
        import subprocess

        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
        if not job:
            return
        result = subprocess.call(["scontrol", "requeue", job])
        (log.info if result == 0 else log.warning)("scontrol requeue %s: exit code %d", job, result)


class TokenImages(Callback):
    """Log `num_images` fixed validation images' token pictures to every WandbLogger."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 8, key: str = "val/tokens"):
        if int(every_n_epochs) < 1 or int(num_images) < 1:
            raise ValueError(
                f"TokenImages needs every_n_epochs >= 1 and num_images >= 1, got {every_n_epochs} and {num_images}"
            )
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
            pictures.append(
                wandb.Image(
                    visualize_tokens(student, image.to(device), mean=mean, std=std),
                    caption=f"val[{i}] label {int(label)}",
                )
            )
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
