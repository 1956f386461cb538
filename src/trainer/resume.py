"""Exact resumption: a run interrupted any number of times ends where the same run left alone would.

What a resumed run needs beyond Lightning's own checkpoint (weights, optimizer, scheduler, loop
counters, EMA weights in the module's state dict):

- the data: the training loaders are torchdata `StatefulDataLoader`s over `ResumableSampler`
  (src/data/folder.py); Lightning saves their position in every checkpoint and restores it, and each
  image's augmentation comes from its own seed (seed, epoch, index).
- every other random draw of a training step (timm Mixup's numpy draws, DynamicViT's Gumbel noise,
  drop path, dropout, python `random`, CUDA): `ExactResume` seeds python's `random`, numpy's global RNG
  and torch's CPU and CUDA generators at the start of every training batch from (run seed, rank, epoch,
  batch index). A step's draws are then a function of where it is in the run, not of what ran before,
  so nothing has to be carried over: not across a resume, not per rank under DDP (the checkpoint is
  written by rank 0 alone), not across the validation and data-loader set-up that a resumed run
  skips or repeats. Only the run seed is saved (callback state).
- the epoch's running means (`train/*_epoch`, the method's epoch metrics, `train/lr`): Lightning keeps
  them in memory only; `ExactResume` saves them with a mid-epoch checkpoint and adds them back, so the
  epoch's row has the same values as the uninterrupted run's.
- the metrics file: `ResumableCSVLogger` keeps an existing `metrics.csv` (Lightning's CSVLogger deletes
  it); on resume `ExactResume` rewinds it to the checkpoint (rows of steps after it, written by the
  interrupted run, are dropped; the resumed run writes them again) and adds the row that the
  checkpointed step logs right after the checkpoint is written, which a kill in between would lose
  (saved in the checkpoint). No step is missing or duplicated.
- the module's once-per-run teacher accuracy (`teacher_val_top1`), so a resumed run does not validate
  and log the teacher again.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers.csv_logs import CSVLogger, ExperimentWriter

from src.data.folder import ResumableSampler, derive_seed, seed_global_rngs

log = logging.getLogger(__name__)

CKPT_KEY = "exact_resume"  # top-level checkpoint entry: pending metric rows, epoch aggregates, teacher
_REDUCE = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}


def _samplers(trainer: Trainer) -> list:
    """The ResumableSamplers of the running training loaders."""
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    found = []
    for dl in loader.flattened if loader is not None else []:
        for s in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
            if isinstance(s, ResumableSampler) and s not in found:
                found.append(s)
    return found


def _reduce_name(meta) -> Optional[str]:
    for name in ("mean", "sum", "max", "min"):
        if getattr(meta, f"is_{name}_reduction"):
            return name
    return None


class ExactResume(Callback):
    """Per-batch RNG streams, epoch aggregates, metric rows and the teacher's accuracy across resumes
    (see the module docstring). `seed`: the streams' base seed; default the run's (`seed_everything`'s
    PL_GLOBAL_SEED), else a random one shared by the ranks; a resume uses the checkpoint's."""

    def __init__(self, seed: Optional[int] = None):
        self.seed = None if seed is None else int(seed)
        self._restored: Optional[Dict[str, Any]] = None  # this checkpoint entry, on resume
        self._resumed = False
        self._first_batch = True
        self._epoch_started = False
        self._pending_results: List[Dict[str, Any]] = []

    # --- callback state (rank 0's is saved; it holds nothing rank-specific) -----------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    # --- start ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            seed = int(env) if env not in (None, "") else int.from_bytes(os.urandom(7), "little")
            self.seed = int(trainer.strategy.broadcast(seed, src=0))  # the same base on every rank
        self._first_batch = True
        fit = trainer.fit_loop
        if fit._combined_loader_states_to_load and fit._combined_loader is not None:
            # The module's configure_optimizers asks for trainer.estimated_stepping_batches, which builds
            # the train loader (and its iterator) before Lightning restores the loops; Lightning then
            # never loads the saved loader position. Load it now and start the iterator from it.
            fit._load_combined_loader_states()
            if fit._data_fetcher is not None:
                iter(fit._data_fetcher)
        if not self._resumed:  # a fresh run in this folder: earlier processes' rows go
            for lg in trainer.loggers:
                if hasattr(lg, "start_fresh"):
                    lg.start_fresh()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resumed at an epoch's end, Lightning (2.6) goes on to the next epoch with the iterator it
        # restored (at the finished epoch's end) instead of starting a new one: start it here, after
        # set_epoch (once per resumed process; a second iter() where Lightning makes one too is harmless).
        if (
            self._resumed
            and not self._epoch_started
            and any(s._epoch_of_position != s.epoch for s in _samplers(trainer))
        ):
            iter(trainer.fit_loop._data_fetcher)
        self._epoch_started = True

    # --- every training batch --------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._first_batch:
            self._first_batch = False
            if self._resumed:
                self._rewind_loggers(trainer)
        seed_global_rngs(derive_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx), cuda=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending_results:
            self._merge_results(trainer, create=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_results:  # saved aggregates the resumed part never logged (e.g. train/lr)
            self._merge_results(trainer, create=True)

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        for lg in trainer.loggers:  # what was logged before the checkpoint is on disk with it
            lg.save()
        entry: Dict[str, Any] = {"rows": self._pending_rows(trainer), "epoch": trainer.current_epoch}
        fit = trainer.fit_loop
        if trainer.training and fit.epoch_progress.current.processed == fit.epoch_progress.current.completed:
            # inside an epoch: its running aggregates, with those restored from an earlier checkpoint that
            # this process has not logged again yet (e.g. train/lr, logged at the epoch's start)
            entry["results"] = self._results_state(trainer) + list(self._pending_results)
        if hasattr(pl_module, "teacher_val_top1"):
            entry["teacher_val_top1"] = pl_module.teacher_val_top1
            entry["teacher_val_done"] = bool(getattr(pl_module, "teacher_val_done", False))
        checkpoint[CKPT_KEY] = entry

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        self._restored = checkpoint.get(CKPT_KEY) or {}
        self._resumed = True
        if "teacher_val_top1" in self._restored and hasattr(pl_module, "teacher_val_top1"):
            pl_module.teacher_val_top1 = self._restored["teacher_val_top1"]
            pl_module.teacher_val_done = self._restored.get("teacher_val_done", False)

    # --- metric rows ------------------------------------------------------------------------------
    @staticmethod
    def _pending_rows(trainer: Trainer) -> List[Dict[str, Any]]:
        """The rows Lightning logs right after this checkpoint is written: the step's own row (saved in
        on_train_batch_end, before the logger connector logs it) and the epoch's row (saved in
        on_train_epoch_end, before the epoch aggregates are logged)."""
        if not trainer.training or not trainer.loggers:
            return []
        conn, fit = trainer._logger_connector, trainer.fit_loop
        loop, rows = fit.epoch_loop, []
        batch, epoch = loop.batch_progress.current, fit.epoch_progress.current
        in_batch_end = batch.processed == batch.completed + 1 and conn._first_loop_iter is not None
        if in_batch_end and not fit._should_accumulate() and (conn.should_update_logs or trainer.fast_dev_run):
            rows.append(
                {
                    **{k: float(v) for k, v in conn.metrics["log"].items()},
                    "epoch": trainer.current_epoch,
                    "step": loop._batches_that_stepped,
                }
            )
        if epoch.processed == epoch.completed + 1 and conn._first_loop_iter is None:
            rows.append(
                {
                    **{k: float(v) for k, v in conn.metrics["log"].items()},
                    "epoch": trainer.current_epoch,
                    "step": loop._batches_that_stepped - 1,
                }
            )
        return [r for r in rows if len(r) > 2]

    def _rewind_loggers(self, trainer: Trainer) -> None:
        boundary = trainer.fit_loop.epoch_loop._batches_that_stepped  # the resumed run's first step
        rows = (self._restored or {}).get("rows") or []
        for lg in trainer.loggers:
            if hasattr(lg, "rewind"):
                lg.rewind(boundary, rows)
        if (self._restored or {}).get("epoch") == trainer.current_epoch:
            self._pending_results = list((self._restored or {}).get("results") or [])

    # --- the epoch's running aggregates (Lightning's _ResultCollection) ------------------------------
    @staticmethod
    def _results_state(trainer: Trainer) -> List[Dict[str, Any]]:
        results = trainer.fit_loop.epoch_loop._results
        out = []
        for key, m in results.valid_items():
            reduce = _reduce_name(m.meta)
            if not m.is_tensor or not m.meta.on_epoch or reduce is None:
                continue
            meta = m.meta
            out.append(
                {
                    "key": key,
                    "fx": meta.fx,
                    "name": meta.name,
                    "prog_bar": meta.prog_bar,
                    "logger": meta.logger,
                    "on_step": meta.on_step,
                    "on_epoch": meta.on_epoch,
                    "reduce": reduce,
                    "enable_graph": meta.enable_graph,
                    "add_dataloader_idx": meta.add_dataloader_idx,
                    "dataloader_idx": meta.dataloader_idx,
                    "metric_attribute": meta.metric_attribute,
                    "sync_dist": bool(meta.sync.should),
                    "rank_zero_only": bool(meta.sync.rank_zero_only),
                    "value": m.value.detach().cpu().clone(),
                    "cumulated_batch_size": (
                        m.cumulated_batch_size.detach().cpu().clone() if reduce == "mean" else None
                    ),
                }
            )
        return out

    def _merge_results(self, trainer: Trainer, create: bool) -> None:
        from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric, _Sync

        results = trainer.fit_loop.epoch_loop._results
        left = []
        for saved in self._pending_results:
            m = results.get(saved["key"])
            if m is None or m.has_reset:
                if not create:
                    left.append(saved)
                    continue
                meta = _Metadata(
                    fx=saved["fx"],
                    name=saved["name"],
                    prog_bar=saved["prog_bar"],
                    logger=saved["logger"],
                    on_step=saved["on_step"],
                    on_epoch=saved["on_epoch"],
                    reduce_fx=_REDUCE[saved["reduce"]],
                    enable_graph=saved["enable_graph"],
                    add_dataloader_idx=saved["add_dataloader_idx"],
                    dataloader_idx=saved["dataloader_idx"],
                    metric_attribute=saved["metric_attribute"],
                )
                meta.sync = _Sync(
                    _should=saved["sync_dist"], fn=trainer.strategy.reduce, rank_zero_only=saved["rank_zero_only"]
                )
                m = _ResultMetric(meta, is_tensor=True)
                m.to(trainer.strategy.root_device)
                results[saved["key"]] = m
                m.value = saved["value"].to(m.value.device, m.value.dtype)
                if saved["reduce"] == "mean":
                    m.cumulated_batch_size = saved["cumulated_batch_size"].to(m.value.device)
                m._update_count = 1  # torchmetrics: "updated", so compute() does not warn
                m.has_reset = False
                continue
            value = saved["value"].to(m.value.device, m.value.dtype)
            if saved["reduce"] in ("mean", "sum"):
                m.value = m.value + value
                if saved["reduce"] == "mean":
                    m.cumulated_batch_size = m.cumulated_batch_size + saved["cumulated_batch_size"].to(m.value.device)
            else:
                m.value = _REDUCE[saved["reduce"]](torch.stack([m.value, value]))
            m._computed = None
        self._pending_results = left


# --- metrics.csv across resumes --------------------------------------------------------------------
def _step_of(row: Dict[str, Any]) -> int:
    return int(float(row["step"]))


def _keys_of(row: Dict[str, Any]) -> frozenset:
    return frozenset(k for k, v in row.items() if v not in (None, "") and k != "step")


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing metrics.csv (rows of earlier processes of this run)
    until told whether this process resumed (`rewind`) or started afresh (`start_fresh`)."""

    def __init__(self, log_dir: str) -> None:
        self.previous_rows: List[Dict[str, Any]] = []  # earlier processes' rows, as read
        self.own_rows: List[Dict[str, Any]] = []  # rows this process wrote
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                reader = csv.DictReader(f)
                self.previous_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        self.own_rows.extend(dict(r) for r in self.metrics)
        super().save()

    def _write_all(self, rows: List[Dict[str, Any]]) -> None:
        keys = sorted(set(self.metrics_keys).union(*[set(r) for r in rows]) if rows else set(self.metrics_keys))
        self.metrics_keys = keys
        tmp = self.metrics_file_path + ".tmp"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)

    def start_fresh(self) -> None:
        if self.previous_rows:
            self.previous_rows = []
            self.save()
            self._write_all(self.own_rows)

    def rewind(self, boundary: int, pending: List[Dict[str, Any]]) -> None:
        self.save()
        kept = [r for r in self.previous_rows if _step_of(r) < boundary]
        have = {(_step_of(r), _keys_of(r)) for r in kept}
        for row in pending:
            if _step_of(row) < boundary and (_step_of(row), _keys_of(row)) not in have:
                kept.append(dict(row))
        own = [r for r in self.own_rows if _step_of(r) >= boundary]
        dropped = len(self.previous_rows) - len([r for r in self.previous_rows if _step_of(r) < boundary])
        self.previous_rows, self.own_rows = kept, own
        self._write_all(kept + own)
        log.info(
            "metrics.csv rewound to step %d for the resumed run (%d later rows of the interrupted run dropped)",
            boundary,
            dropped,
        )


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but a resumed run continues the same metrics.csv: with `ExactResume` the
    rows after the checkpoint are replaced by the resumed run's, and no step is lost or repeated. A run
    started afresh (no checkpoint) in a folder with an old metrics.csv replaces it, as Lightning's does."""

    @property
    def experiment(self) -> _ResumableWriter:
        if self._experiment is not None:
            return self._experiment
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank > 0:  # Lightning's rank_zero_experiment: a dummy on other ranks
            return super().experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    def rewind(self, boundary: int, pending: List[Dict[str, Any]]) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:
            self.experiment.rewind(boundary, pending)

    def start_fresh(self) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:
            self.experiment.start_fresh()


__all__ = ["ExactResume", "ResumableCSVLogger", "CKPT_KEY"]
