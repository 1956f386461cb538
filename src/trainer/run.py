"""run(cfg): everything train.py does, in small steps other entry points can reuse.

    check data -> build backbone (train/cache the quickstart teacher first if needed) -> resolve the
    method's parameters -> LightningModule -> profile (GMACs, throughput) -> fit / validate -> summary

Every user error (bad method parameters, missing weights or data, a checkpoint for another model) is
raised before the trainer starts, as one of USER_ERRORS, which the entry points print without a
stack trace.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data import DataError
from src.models.backbone import BackboneError, build_model
from src.models.profile import count_gmacs, count_gmacs_split, count_params, measure_throughput
from src.models.reduction import ReductionConfigError
from src.models.weights import WeightsError

from .callbacks import finish_wandb, prepare_wandb, token_images_callback
from .config_check import check_values
from .distributed import is_global_zero, unpadded_validation
from .module import ReductionModule, freeze_parameters

log = logging.getLogger(__name__)

USER_ERRORS = (ReductionConfigError, WeightsError, BackboneError, DataError)


# --- pieces ----------------------------------------------------------------------------------------
def plain(node: Any) -> Any:
    """A resolved plain container (dict / list) of a config node; None stays None."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("mixup", None)
    dm = hydra.utils.instantiate(data_cfg)
    if hasattr(dm, "validate"):
        if "need_train" in dm.validate.__code__.co_varnames:
            dm.validate(need_train=bool(cfg.train))
        else:
            dm.validate()
    return dm


def check_config(cfg: DictConfig) -> None:
    """Build the model without weights and apply the method to it, so bad sizes or method
    parameters fail here, before weights are downloaded or a quickstart teacher is trained."""
    skeleton, _ = build_model(plain(cfg.model), cfg.method.name, plain(cfg.method.get("params")),
                              plain(cfg.get("schedule")), weights=False)
    freeze_parameters(skeleton, (plain(cfg.get("optim")) or {}).get("frozen_params") or [])


def build_module(cfg: DictConfig, checkpoint: Optional[str] = None) -> ReductionModule:
    """The LightningModule of `cfg`: the student from build_model (bare model -> method -> weights of
    `checkpoint` or model.checkpoint), the teacher its unreduced copy."""
    student, _ = build_model(plain(cfg.model), cfg.method.name, plain(cfg.method.get("params")),
                             plain(cfg.get("schedule")), checkpoint=checkpoint)
    return ReductionModule(
        student, num_classes=int(cfg.model.num_classes),
        optim=plain(cfg.get("optim")), distill=plain(cfg.get("distill")), ema=plain(cfg.get("ema")),
        mixup=plain(cfg.data.get("mixup")), batch_size=int(cfg.data.batch_size),
    )


def build_loggers(cfg: DictConfig) -> List[Any]:
    loggers = []
    for _, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is not None and "_target_" in lg_cfg:
            if lg_cfg._target_.endswith("WandbLogger"):  # sweep group, run id kept for resuming
                lg_cfg = prepare_wandb(plain(lg_cfg), str(cfg.paths.output_dir))
            loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers


def build_callbacks(cfg: DictConfig) -> List[Any]:
    callbacks = [hydra.utils.instantiate(c) for _, c in (cfg.get("callbacks") or {}).items()
                 if c is not None and "_target_" in c]
    tokens = token_images_callback(plain(cfg.get("logger")))  # logger=wandb: token pictures
    return callbacks + ([tokens] if tokens is not None else [])


def build_trainer(cfg: DictConfig, loggers: List[Any], callbacks: List[Any]) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def profile_device(cfg: DictConfig) -> str:
    wanted = str(cfg.get("profile", {}).get("device", "auto"))
    if wanted != "auto":
        return wanted
    accel = str(cfg.trainer.get("accelerator", "auto"))
    return "cuda" if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else "cpu"


def profile(module: ReductionModule, cfg: DictConfig) -> Dict[str, float]:
    """Counted GMACs, parameters and side-by-side throughput of student and teacher."""
    img, chans = int(cfg.model.img_size), int(cfg.model.in_chans)
    device = profile_device(cfg)
    student, teacher = module.student, module.teacher
    student_gmacs, student_side_gmacs = count_gmacs_split(student, img, chans)
    out = {
        "student_gmacs": student_gmacs, "student_side_gmacs": student_side_gmacs,  # side: see profile.py
        "teacher_gmacs": count_gmacs(teacher, img, chans),
        "student_params": float(count_params(student)), "teacher_params": float(count_params(teacher)),
    }
    originals = {n: next(m.parameters()).device for n, m in (("student", student), ("teacher", teacher))}
    try:
        student.to(device), teacher.to(device)
        tp = measure_throughput({"student": student, "teacher": teacher},
                                batch_size=int(cfg.profile.get("batch_size", 64)), img_size=img, in_chans=chans,
                                device=device, precision=str(cfg.trainer.get("precision", "32")))
    finally:
        student.to(originals["student"]), teacher.to(originals["teacher"])
    out.update(student_throughput=tp["student"], teacher_throughput=tp["teacher"])
    out["throughput_device"] = device  # type: ignore[assignment]
    return out


# --- the quickstart teacher ------------------------------------------------------------------------
def teacher_cache_path(cfg: DictConfig) -> Path:
    """Where the unreduced model trained for this model + data + bootstrap config is cached."""
    keyed = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                 if k not in ("num_workers", "eval_batch_size")},
        "seed": cfg.seed,
    }
    for key in ("checkpoint", "checkpoint_ema"):  # how a run loads weights does not change the teacher
        keyed["model"].pop(key, None)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / "teachers" / f"{cfg.model.name}-{digest}.safetensors"


def bootstrap_teacher(cfg: DictConfig) -> str:
    """Train the unreduced model once with the same module/trainer (method none, no distillation),
    cache its weights, and return the path. A cached file is reused."""
    path = teacher_cache_path(cfg)
    if path.is_file():
        log.info("Reusing the cached quickstart teacher %s", path)
        return str(path)
    boot = cfg.model.bootstrap
    tcfg = cfg.copy()
    with open_dict(tcfg):
        tcfg.method = OmegaConf.create({"name": "none", "params": {}})
        tcfg.schedule = None
        tcfg.distill = OmegaConf.create({"type": "none", "weight": 0.0, "tau": 1.0})
        tcfg.ema = OmegaConf.create({"enabled": False})
        tcfg.trainer.max_epochs = int(boot.epochs)
        tcfg.trainer.min_epochs = 1
        # the teacher is trained on whole epochs unless the bootstrap itself says otherwise
        tcfg.trainer.limit_train_batches = boot.get("limit_train_batches")
        tcfg.optim.lr = float(boot.lr)
        tcfg.optim.warmup_epochs = float(boot.get("warmup_epochs", 0))
        tcfg.optim.backbone_freeze_epochs = 0
        tcfg.optim.backbone_lr_scale = 1.0
        tcfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "teacher")
        tcfg.trainer.default_root_dir = tcfg.paths.output_dir
    log.info("Training the quickstart teacher (unreduced, %d epochs); cached at %s", boot.epochs, path)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(tcfg)
    dm = build_datamodule(tcfg)
    loggers = [hydra.utils.instantiate(OmegaConf.create({
        "_target_": "lightning.pytorch.loggers.csv_logs.CSVLogger", "save_dir": tcfg.paths.output_dir,
        "name": "csv", "version": ""}))]
    trainer = build_trainer(tcfg, loggers, callbacks=[])
    trainer.fit(module, datamodule=dm)
    top1 = float(trainer.callback_metrics["val/top1"])
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.student.state_dict().items()}, str(tmp),
              metadata={"val_top1": f"{top1:.2f}", "epochs": str(boot.epochs)})
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written teacher
    log.info("Quickstart teacher: val top-1 %.2f%%", top1)
    return str(path)


# --- run -------------------------------------------------------------------------------------------
def _weights_source(cfg: DictConfig) -> Optional[str]:
    if cfg.model.get("checkpoint"):
        return None  # build_model reads it (after applying the method)
    boot = cfg.model.get("bootstrap") or {}
    if boot.get("enabled", False):
        return bootstrap_teacher(cfg)
    return None


def summarise(cfg: DictConfig, module: ReductionModule, prof: Dict[str, Any], metrics: Dict[str, float],
              best_ckpt: Optional[str], last_ckpt: Optional[str]) -> Dict[str, Any]:
    summary = {
        "model": cfg.model.name, "method": cfg.method.name,
        "method_params": repr(getattr(module.student, "reduction", "none")),
        "train": bool(cfg.train),
        "teacher_val_top1": module.teacher_val_top1,
        "student_val_top1": metrics.get("val/top1"), "student_val_top5": metrics.get("val/top5"),
        "ema_val_top1": metrics.get("val/ema_top1"),
        # the method's own metrics of the last epoch, e.g. DynamicViT's train/val keep ratios and targets
        **{k.replace("/", "_"): metrics[k] for k in sorted(module.method_metric_keys) if k in metrics},
        **prof,
        "best_checkpoint": best_ckpt, "last_checkpoint": last_ckpt,
        "output_dir": str(cfg.paths.output_dir),
        "accuracy_unit": "percent",
    }
    return summary


def format_summary(s: Dict[str, Any]) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"=== summary: {s['model']} + {s['method']} {s['method_params']} ===",
        f"val top-1   teacher {num(s['teacher_val_top1'], '.2f')}%   reduced student {num(s['student_val_top1'], '.2f')}%"
        + (f"   (EMA {s['ema_val_top1']:.2f}%)" if s.get("ema_val_top1") is not None else ""),
    ]
    if "student_gmacs" in s:
        lines += [
            f"GMACs       teacher {s['teacher_gmacs']:.4f}   student {s['student_gmacs']:.4f}"
            f"   ({s['student_gmacs'] / s['teacher_gmacs']:.2f}x)"
            + (f"   + side work {s['student_side_gmacs']:.2g}" if s.get("student_side_gmacs") else ""),
            f"throughput  teacher {s['teacher_throughput']:.0f} img/s   student {s['student_throughput']:.0f} img/s"
            f"   ({s['student_throughput'] / s['teacher_throughput']:.2f}x, {s['throughput_device']}, measured side by side)",
        ]
    if s.get("best_checkpoint") or s.get("last_checkpoint"):
        lines.append(f"checkpoint  best {s['best_checkpoint']}   last {s['last_checkpoint']}")
    lines.append(f"logs        {s['output_dir']}   (summary.json there)")
    return "\n".join(lines)


def _log_through_root_only() -> None:
    """Lightning, imported before Hydra configures logging, gives its loggers their own console
    handlers; once Hydra's root handlers (console + the run's log file) exist, every Lightning line
    was printed twice. Route Lightning's records through the root handlers alone."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(handler)
        lg.propagate = True


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train (or with train=false only evaluate) as configured; returns the summary dict."""
    check_values(cfg)  # every value's type / range / choices first (one line, exit code 2)
    _log_through_root_only()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    # "last": Lightning's newest last*.ckpt in this run folder's checkpoints (none yet: start fresh)
    if cfg.get("ckpt_path") not in (None, "last") and not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise WeightsError(f"ckpt_path={cfg.ckpt_path} is not a file; give the last.ckpt of the run to resume")
    dm = unpadded_validation(build_datamodule(cfg))  # data errors before any model is built; exact DDP val
    check_config(cfg)  # size / method errors before weights or a quickstart teacher
    checkpoint = _weights_source(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, checkpoint=checkpoint)

    loggers = build_loggers(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)
    # profiled once, by the global rank 0 (the only one that writes the summary)
    prof: Dict[str, Any] = profile(module, cfg) if cfg.get("profile", {}).get("enabled", True) and is_global_zero() else {}
    for lg in loggers:
        lg.log_metrics({f"profile/{k}": v for k, v in prof.items() if isinstance(v, float)}, step=0)
    log.info("Profile: %s", prof)

    callbacks = build_callbacks(cfg) if cfg.train else []
    trainer = build_trainer(cfg, loggers, callbacks)
    best = last = None
    if cfg.train:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None:
            best, last = ckpt_cb.best_model_path or None, ckpt_cb.last_model_path or None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        if module.teacher_val_top1 is None:  # e.g. resumed after the last epoch
            metrics.update({k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()})
    else:
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}

    summary = summarise(cfg, module, prof, metrics, best, last)
    if not trainer.is_global_zero:  # DDP: one summary, written by rank 0
        return summary
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for lg in loggers:
        lg.log_metrics({f"summary/{k}": float(v) for k, v in summary.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=trainer.global_step)
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    finish_wandb(loggers)  # close the W&B run: the next job of a multirun (same process) starts its own
    print(format_summary(summary), flush=True)
    return summary
