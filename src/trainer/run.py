"""run(cfg): everything train.py does, in small steps other entry points can reuse.

    check data -> build backbone (train/cache the quickstart teacher first if needed) -> resolve the
    method's parameters -> LightningModule -> profile (GMACs, throughput) -> fit / validate -> summary

Every user error (bad method parameters, missing weights or data, a checkpoint for another model, a
callback that cannot work with the model) is raised before the trainer starts, as one of
USER_ERRORS, which the entry points print without a stack trace.

What the run prints is meant to be read: one log line per phase (with the time it will take where it
is long), Lightning's tips and bookkeeping lines filtered out (`NoiseFilter`, installed on Hydra's
handlers by conf/hydra/default.yaml), warnings nobody can act on silenced by message
(`quiet_third_party`), Lightning's model summary replaced by one line with our counted GMACs, and at
the end a small table: teacher vs student top-1, GMACs and images/s, and the run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data import DataError
from src.models.backbone import BackboneError, build_model
from src.models.profile import count_gmacs, count_gmacs_split, count_params, measure_throughput
from src.models.reduction import ReductionConfigError
from src.models.weights import WeightsError

from .callbacks import finish_wandb, prepare_wandb, token_images_callback
from .config_check import ConfigValueError, check_values
from .distributed import is_global_zero, unpadded_validation
from .module import ReductionModule, freeze_parameters

log = logging.getLogger(__name__)

USER_ERRORS = (ReductionConfigError, WeightsError, BackboneError, DataError)


# --- output a person wants to read ------------------------------------------------------------------
# Lightning's log lines that say nothing a user of this project can act on
NOISE_LINES = (
    re.compile(r"💡 Tip: "),  # advertising for litlogger / litmodels
    re.compile(r"Loading `train_dataloader` to estimate number of stepping batches"),
    re.compile(r"(TPU|HPU) available: False"),  # "GPU available: ..." stays: it says what the run uses
)
# warnings (matched from the start of the message) that no user can act on, and why
NOISE_WARNINGS = (
    # the frozen teacher (and an EMA copy) are in eval mode on purpose; the student trains
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning's own use of a torch API that torch has deprecated
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # pinned memory asked for on a machine without an accelerator: torch skips it, nothing changes
    r"'pin_memory' argument is set as true but no accelerator is found",
    # torchdata's StatefulDataLoader calls a deprecated torch function whenever a loader is built
    # (Lightning rebuilds it for overfit_batches and DDP samplers)
    r"'set_vital' is deprecated",
)


class NoiseFilter(logging.Filter):
    """Drops Lightning's NOISE_LINES; conf/hydra/default.yaml puts it on the console and log-file
    handlers (Hydra's job_logging), so neither the terminal nor train.log shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("lightning"):
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in NOISE_LINES)


def quiet_third_party() -> None:
    """Silence the NOISE_WARNINGS (by message only: every other warning still shows)."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class PhaseProgress(Callback):
    """A log line at the end of each training epoch: the validation top-1, the time per epoch and
    the time left. What the progress bar shows, kept in the run's log file too, and with the bar off
    (`trainer.enable_progress_bar=false`, batch jobs) the only sign of life."""

    def __init__(self, what: str):
        self.what = what
        self._start: Optional[float] = None
        self._first_epoch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._first_epoch = time.monotonic(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        done, total = trainer.current_epoch + 1, int(trainer.max_epochs or 0)
        per_epoch = (time.monotonic() - self._start) / max(1, done - self._first_epoch)
        metrics = trainer.callback_metrics
        top1, box, loss = metrics.get("val/top1"), metrics.get("val/box_map"), metrics.get("train/loss_epoch")
        log.info(
            "%s: epoch %d/%d%s%s%s, %s per epoch%s",
            self.what,
            done,
            total,
            f", train loss {float(loss):.3f}" if loss is not None else "",
            f", val top-1 {float(top1):.2f}%" if top1 is not None else "",
            f", val box AP {float(box):.2f}, mask AP {float(metrics['val/mask_map']):.2f}" if box is not None else "",
            _duration(per_epoch),
            f", about {_duration(per_epoch * (total - done))} left" if total > done else "",
        )


# --- pieces ----------------------------------------------------------------------------------------
def plain(node: Any) -> Any:
    """A resolved plain container (dict / list) of a config node; None stays None."""
    return (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node
    )


def is_detection(cfg: DictConfig) -> bool:
    return str((cfg.get("task") or {}).get("name", "classification")) == "detection"


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    for key in cfg.data:  # a required setting left at ??? (data.root of data=folder / imagenet / coco)
        if OmegaConf.is_missing(cfg.data, key):
            raise DataError(
                f"data.{key} is required by data={str(cfg.data.get('_target_', '?')).rsplit('.', 1)[-1]} and not "
                f"set; give it on the command line, e.g. data.{key}=/path/to/the/dataset"
            )
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
    parameters fail here, before weights are downloaded or a quickstart teacher is trained; then
    check what the callbacks and loggers need of that model (`check_callbacks`)."""
    skeleton, _ = build_model(
        plain(cfg.model), cfg.method.name, plain(cfg.method.get("params")), plain(cfg.get("schedule")), weights=False
    )
    freeze_parameters(skeleton, (plain(cfg.get("optim")) or {}).get("frozen_params") or [])
    check_callbacks(cfg, skeleton)


def check_callbacks(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Preconditions of the callbacks and loggers, checked on the (weightless) model before any
    training: the token pictures of logger=wandb (logger.token_images) draw one picture here, so a
    model they cannot draw fails now with what to do, not at the first picture after an epoch."""
    logger = cfg.get("logger") or {}
    # only the token_images node: the loggers' folders resolve from Hydra's run, absent in a bare compose
    if cfg.train and token_images_callback({"token_images": plain(logger.get("token_images"))}) is not None:
        from src.models.visualize import visualize_tokens

        img, chans = int(cfg.model.img_size), int(cfg.model.in_chans)
        try:
            visualize_tokens(model, torch.zeros(chans, img, img), mean=(0.0,) * chans, std=(1.0,) * chans)
        except Exception as err:  # anything the callback would hit after the first epoch
            raise ConfigValueError(
                f"logger.token_images cannot draw model={cfg.model.name} ({type(model).__name__}): "
                f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                "The token pictures need a timm ViT patched by apply_reduction. Turn them off with "
                "logger.token_images.enabled=false (W&B still logs every metric), or use a ViT model."
            ) from None


def build_module(cfg: DictConfig, checkpoint: Optional[str] = None) -> ReductionModule:
    """The LightningModule of `cfg`: the student from build_model (bare model -> method -> weights of
    `checkpoint` or model.checkpoint), the teacher its unreduced copy."""
    student, _ = build_model(
        plain(cfg.model),
        cfg.method.name,
        plain(cfg.method.get("params")),
        plain(cfg.get("schedule")),
        checkpoint=checkpoint,
    )
    return ReductionModule(
        student,
        num_classes=int(cfg.model.num_classes),
        optim=plain(cfg.get("optim")),
        distill=plain(cfg.get("distill")),
        ema=plain(cfg.get("ema")),
        mixup=plain(cfg.data.get("mixup")),
        batch_size=int(cfg.data.batch_size),
        # recorded in the checkpoint (hyper_parameters): which model, method and settings it holds
        model=plain(cfg.model),
        method_config=plain(cfg.method),
        schedule=plain(cfg.get("schedule")),
    )


def build_loggers(cfg: DictConfig) -> List[Any]:
    loggers = []
    for _, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is not None and "_target_" in lg_cfg:
            if lg_cfg._target_.endswith("WandbLogger"):  # sweep group, run id kept for resuming
                lg_cfg = prepare_wandb(plain(lg_cfg), str(cfg.paths.output_dir))
            loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers


def compile_models(models: Sequence[torch.nn.Module], cfg: DictConfig, what: str) -> None:
    """compile.enabled: torch.compile `models` in place (src.models.compile: one full graph per mode for
    a static token schedule): the student and frozen teacher, or the detector's backbone trunks (reduced
    and baseline; a new input size compiles again, then dynamo makes the size dynamic). Checkpoints, EMA
    copies and the parameter names are unchanged; the first training and validation steps compile."""
    ccfg = cfg.get("compile") or {}
    if not ccfg.get("enabled", False):
        return
    from src.models.compile import compile_model

    backend = str(ccfg.get("backend") or "inductor")
    for model in models:
        compile_model(model, mode=ccfg.get("mode"), backend=backend)
    log.info(
        "torch.compile: %s compiled (backend %s, mode %s); the first steps of training and validation "
        "compile their graphs",
        what,
        backend,
        ccfg.get("mode") or "default",
    )


def build_callbacks(cfg: DictConfig) -> List[Any]:
    callbacks = [
        hydra.utils.instantiate(c) for _, c in (cfg.get("callbacks") or {}).items() if c is not None and "_target_" in c
    ]
    # logger=wandb: token pictures of the classifier's tokens (not drawn for detection)
    tokens = None if is_detection(cfg) else token_images_callback(plain(cfg.get("logger")))
    return callbacks + ([tokens] if tokens is not None else [])


def build_trainer(cfg: DictConfig, loggers: List[Any], callbacks: List[Any]) -> L.Trainer:
    # Lightning's model summary counts no FLOPs for these models (a column of zeros beside our
    # counted GMACs) and lists the metric objects as modules; run() logs one line with parameters
    # and counted GMACs instead. trainer.enable_model_summary=true brings it back.
    extra = {} if "enable_model_summary" in cfg.trainer else {"enable_model_summary": False}
    return hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)


def profile_device(cfg: DictConfig) -> str:
    wanted = str(cfg.get("profile", {}).get("device", "auto"))
    if wanted != "auto":
        return wanted
    accel = str(cfg.trainer.get("accelerator", "auto"))
    return "cuda" if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else "cpu"


def profile(module: ReductionModule, cfg: DictConfig) -> Dict[str, float]:
    """Counted GMACs, parameters and side-by-side throughput of student and teacher, with a log line
    per phase (the timing says how long it will take: minutes for DeiT-B on a CPU)."""
    img, chans = int(cfg.model.img_size), int(cfg.model.in_chans)
    device = profile_device(cfg)
    pcfg = cfg.get("profile") or {}
    batch = int(pcfg.get("batch_size", 64))
    warmup, rounds, iters = int(pcfg.get("warmup", 2)), int(pcfg.get("rounds", 8)), int(pcfg.get("iters", 3))
    student, teacher = module.student, module.teacher
    student_gmacs, student_side_gmacs = count_gmacs_split(student, img, chans)
    out = {
        "student_gmacs": student_gmacs,
        "student_side_gmacs": student_side_gmacs,  # side: see profile.py
        "teacher_gmacs": count_gmacs(teacher, img, chans),
        "student_params": float(count_params(student)),
        "teacher_params": float(count_params(teacher)),
    }
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log.info(
        "Student %s: %s parameters (%s trainable), %.4g GMACs counted; teacher (frozen, unreduced): %.4g GMACs",
        describe_method(student),
        _count(out["student_params"]),
        _count(trainable),
        student_gmacs,
        out["teacher_gmacs"],
    )
    originals = {n: next(m.parameters()).device for n, m in (("student", student), ("teacher", teacher))}
    try:
        student.to(device), teacher.to(device)
        # one timed teacher batch says how long the measurement takes
        x = torch.randn(batch, chans, img, img, device=device)
        with torch.no_grad():
            was_training = teacher.training
            teacher.eval()
            start = time.perf_counter()
            teacher(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            per_batch = time.perf_counter() - start
            teacher.train(was_training)
        ratio = student_gmacs / max(out["teacher_gmacs"], 1e-12)
        log.info(
            "Timing student and teacher side by side on %s: %d alternating rounds of %d batches of %d "
            "images after %d warm-up batches, about %s",
            device,
            rounds,
            iters,
            batch,
            warmup,
            _duration(per_batch * (1 + ratio) * (warmup + rounds * iters)),
        )
        tp = measure_throughput(
            {"student": student, "teacher": teacher},
            batch_size=batch,
            img_size=img,
            in_chans=chans,
            device=device,
            precision=str(cfg.trainer.get("precision", "32")),
            warmup=warmup,
            iters=iters,
            rounds=rounds,
        )
    finally:
        student.to(originals["student"]), teacher.to(originals["teacher"])
    out.update(student_throughput=tp["student"], teacher_throughput=tp["teacher"])
    out["throughput_device"] = device  # type: ignore[assignment]
    out["throughput_batch"] = float(batch)
    return out


def _count(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} K" if n >= 1e3 else f"{n:.0f}"


def describe_method(model: torch.nn.Module) -> str:
    reduction = getattr(model, "reduction", None)
    return repr(reduction) if reduction is not None else "none"


def describe_architecture(model: torch.nn.Module) -> str:
    """What the model really is, read off the built model: for a timm ViT its input, patches, tokens,
    width, depth and heads (the quickstart's model.name is only the timm class it is built from)."""
    params = _count(sum(p.numel() for p in model.parameters()))
    try:
        pe = model.patch_embed
        (h, w), (ph, pw), grid = pe.img_size, pe.patch_size, pe.grid_size
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        return (
            f"ViT {h}x{w}x{pe.proj.in_channels} input, {ph}x{pw} patches -> {grid[0] * grid[1]} tokens"
            f"{f' + {prefix} prefix' if prefix else ''}, width {model.embed_dim}, {len(model.blocks)} blocks, "
            f"{model.blocks[0].attn.num_heads} heads, {params} parameters"
        )
    except (AttributeError, TypeError, IndexError, ValueError):
        return f"{type(model).__name__}, {params} parameters"


# --- the quickstart teacher ------------------------------------------------------------------------
def teacher_cache_path(cfg: DictConfig) -> Path:
    """Where the unreduced model trained for this model + data + bootstrap config is cached."""
    keyed = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("num_workers", "eval_batch_size")
        },
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
    log.info(
        "Training the quickstart teacher (the unreduced model, %d epochs; a line per epoch says how long "
        "it takes). It is cached at %s and reused by every later run with this model and data.",
        boot.epochs,
        path,
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(tcfg)
    dm = build_datamodule(tcfg)
    loggers = [
        hydra.utils.instantiate(
            OmegaConf.create(
                {
                    "_target_": "lightning.pytorch.loggers.csv_logs.CSVLogger",
                    "save_dir": tcfg.paths.output_dir,
                    "name": "csv",
                    "version": "",
                }
            )
        )
    ]
    trainer = build_trainer(tcfg, loggers, callbacks=[PhaseProgress("teacher")])
    trainer.fit(module, datamodule=dm)
    top1 = float(trainer.callback_metrics["val/top1"])
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in module.student.state_dict().items()},
        str(tmp),
        metadata={"val_top1": f"{top1:.2f}", "epochs": str(boot.epochs)},
    )
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written teacher
    log.info("Quickstart teacher: val top-1 %.2f%%, saved to %s", top1, path)
    return str(path)


# --- run -------------------------------------------------------------------------------------------
def _weights_source(cfg: DictConfig) -> Optional[str]:
    if cfg.model.get("checkpoint"):
        return None  # build_model reads it (after applying the method)
    boot = cfg.model.get("bootstrap") or {}
    if boot.get("enabled", False):
        return bootstrap_teacher(cfg)
    return None


def summarise(
    cfg: DictConfig,
    module: ReductionModule,
    prof: Dict[str, Any],
    metrics: Dict[str, float],
    best_ckpt: Optional[str],
    last_ckpt: Optional[str],
) -> Dict[str, Any]:
    detection = is_detection(cfg)  # DetectionModule: scores from its metrics, no teacher
    scores = (
        module.summary_metrics(metrics)
        if detection
        else {
            "teacher_val_top1": module.teacher_val_top1,
            "student_val_top1": metrics.get("val/top1"),
            "student_val_top5": metrics.get("val/top5"),
            "ema_val_top1": metrics.get("val/ema_top1"),
        }
    )
    trunk = module.trunk if detection else module.student
    summary = {
        "task": "detection" if detection else "classification",
        "model": cfg.model.name,
        "method": cfg.method.name,
        # what the model is: the config's display name (the quickstart's model.name is only the timm
        # class it is built from) and the architecture read off the built model
        "model_display_name": cfg.model.get("display_name") or cfg.model.name,
        "architecture": describe_architecture(trunk if detection else module.teacher),
        "method_params": describe_method(trunk),
        "train": bool(cfg.train),
        **scores,
        # the method's own metrics of the last epoch, e.g. DynamicViT's train/val keep ratios and targets
        **{k.replace("/", "_"): metrics[k] for k in sorted(module.method_metric_keys) if k in metrics},
        **prof,
        "best_checkpoint": best_ckpt,
        "last_checkpoint": last_ckpt,
        "output_dir": str(cfg.paths.output_dir),
        "accuracy_unit": "percent",
    }
    if prof.get("teacher_throughput"):
        summary["speedup"] = prof["student_throughput"] / prof["teacher_throughput"]
    return summary


def format_summary(s: Dict[str, Any]) -> str:
    """The run's result as a small table (teacher vs student: top-1, GMACs, images/s and their
    ratios) and where its files are."""

    def num(v, fmt, unit=""):
        return "n/a" if v is None else format(v, fmt) + unit

    profiled = s.get("student_gmacs") is not None and s.get("teacher_gmacs")
    if s.get("task") == "detection":  # the unreduced detector is only profiled, not trained
        scores = [("val box AP", None, "student_val_box_map"), ("val mask AP", None, "student_val_mask_map")]
        names = ("unreduced backbone", f"reduced ({s['method']})", "reduced vs unreduced", "backbone GMACs")
    else:
        scores = [("val top-1", "teacher_val_top1", "student_val_top1")]
        names = ("teacher (unreduced)", f"student ({s['method']})", "student vs teacher", "GMACs")
    # detection: the whole detector's images/s, and its backbone's (trunk + pyramid) alone
    speeds = ("throughput", "backbone_throughput") if s.get("task") == "detection" else ("throughput",)
    speed_titles = ("images/s", "backbone images/s")[: len(speeds)]
    rows = [("", *(title for title, _, _ in scores), names[3], *speed_titles)]

    def rate(v):  # a detector at 800x1344 on a CPU runs below one image per second: 3 significant digits
        return num(v, ",.0f" if (v or 0) >= 100 else ".3g")

    cost = lambda who: (  # noqa: E731
        num(s.get(f"{who}_gmacs"), ".4g") if profiled else "n/a",
        *(rate(s.get(f"{who}_{k}")) if profiled else "n/a" for k in speeds),
    )
    rows.append(
        (names[0], *(num(s.get(t) if t else None, ".2f", "%" if t else "") for _, t, _ in scores), *cost("teacher"))
    )
    rows.append((names[1], *(num(s.get(k), ".2f", "%" if t else "") for _, t, k in scores), *cost("student")))
    if s.get("ema_val_top1") is not None:
        rows.append(("student EMA", num(s["ema_val_top1"], ".2f", "%"), "", *("",) * len(speeds)))
    rows.append(
        (
            names[2],
            *("n/a" if not t or s.get(t) is None or s.get(k) is None else f"{s[k] - s[t]:+.2f}" for _, t, k in scores),
            f"{s['student_gmacs'] / s['teacher_gmacs']:.2f}x" if profiled else "n/a",
            *(
                f"{s[f'student_{k}'] / s[f'teacher_{k}']:.2f}x" if profiled and s.get(f"teacher_{k}") else "n/a"
                for k in speeds
            ),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = [
        "  " + "   ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    out = [f"=== {s.get('model_display_name') or s['model']} + {s['method_params']} ==="]
    if s.get("architecture"):
        out.append(f"model: {s['architecture']}")
    out += table
    if profiled:
        notes = [
            (f"backbone GMACs at {'x'.join(map(str, s['gmacs_input_size']))}; " if s.get("gmacs_input_size") else "")
            + f"images/s measured side by side on {s.get('throughput_device', '?')}"
            + (f", batch {s['throughput_batch']:.0f}" if s.get("throughput_batch") else "")
        ]
        if s.get("student_side_gmacs"):
            notes.append(f"student side work {s['student_side_gmacs']:.2g} GMACs not in the table (see README)")
        out.append("  (" + "; ".join(notes) + ")")
    folder = Path(str(s["output_dir"]))
    out.append(
        f"run folder: {folder}   (summary.json, {s.get('task_log', 'the run log')}"
        + (", checkpoints/" if s.get("last_checkpoint") else "")
        + ")"
    )
    for key, what in (("best_checkpoint", "best"), ("last_checkpoint", "last")):
        if s.get(key):
            path = Path(s[key])
            shown = path.relative_to(folder) if path.is_relative_to(folder) else path
            out.append(f"  {what} checkpoint: {shown}")
    return "\n".join(out)


def set_threads(cfg: DictConfig) -> None:
    """threads: torch's intra-op threads on the CPU (null: torch's default, one per core)."""
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))


def _task_log_name() -> Optional[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(str(HydraConfig.get().job_logging.handlers.file.filename)).name
    except Exception:  # run() called without Hydra (tests, scripts): no log file
        return None


def close_loggers(loggers: List[Any], status: str) -> None:
    """Finalise every logger and finish its W&B run, also when the run failed (W&B then marks it
    failed instead of leaving it running). On success run() has finalised them already."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if status != "success" and hasattr(lg, "finalize"):
            try:
                lg.finalize(status)
            except Exception as err:  # never hide the error that ended the run
                log.warning("Could not finalise the %s logger after the failure: %s", type(lg).__name__, err)
    if status == "success":
        finish_wandb(loggers)  # the next job of a multirun (same process) starts its own W&B run
        return
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish(exit_code=1)


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Train (or with train=false only evaluate) as configured; returns the summary dict."""
    check_values(cfg)  # every value's type / range / choices first (one line, exit code 2)
    quiet_third_party()
    set_threads(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    # "last": Lightning's newest last*.ckpt in this run folder's checkpoints (none yet: start fresh)
    if cfg.get("ckpt_path") not in (None, "last") and not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise WeightsError(f"ckpt_path={cfg.ckpt_path} is not a file; give the last.ckpt of the run to resume")
    dm = unpadded_validation(build_datamodule(cfg))  # data errors before any model is built; exact DDP val
    baseline = None
    if is_detection(cfg):
        from src.models.detector import backbone_trunk

        from .detection import build_detection

        # the weights come with the build (timm pretrained or model.checkpoint): no teacher to bootstrap
        module, baseline = build_detection(cfg, num_classes=dm.num_classes)
        compile_models((module.trunk, backbone_trunk(baseline)), cfg, "backbone trunks (reduced and baseline)")
    else:
        check_config(cfg)  # size / method / callback errors before weights or a quickstart teacher
        checkpoint = _weights_source(cfg)
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_module(cfg, checkpoint=checkpoint)
        compile_models((module.student, module.teacher), cfg, "student and teacher")

    loggers = build_loggers(cfg)
    status = "failed"
    try:  # the loggers are closed (a W&B run finished) however the run ends
        summary = _fit_and_summarise(cfg, module, dm, loggers, baseline)
        status = "success"
    except KeyboardInterrupt:
        status = "aborted"
        raise
    finally:
        close_loggers(loggers, status)
    if is_global_zero():
        print(format_summary(summary), flush=True)
    return summary


def _fit_and_summarise(cfg: DictConfig, module, dm, loggers: List[Any], baseline=None) -> Dict[str, Any]:
    """`module`: a ReductionModule, or a DetectionModule with its unreduced `baseline` detector."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)
    detection = is_detection(cfg)
    # profiled once, by the global rank 0 (the only one that writes the summary)
    prof: Dict[str, Any] = {}
    if cfg.get("profile", {}).get("enabled", True) and is_global_zero():
        if detection:
            from .detection import profile_detection

            prof = profile_detection(module, baseline, cfg)
        else:
            prof = profile(module, cfg)
    for lg in loggers:
        lg.log_metrics({f"profile/{k}": v for k, v in prof.items() if isinstance(v, float)}, step=0)
    if prof and detection:
        speeds = ("throughput", "backbone_throughput")
        log.info(
            "Profile: unreduced %.4g backbone GMACs, detector %.3g images/s, backbone %.3g images/s; reduced "
            "%.4g, %.3g, %.3g (%.2fx, backbone %.2fx)",
            *(prof[f"{who}_{k}"] for who in ("teacher", "student") for k in ("gmacs", *speeds)),
            prof["student_throughput"] / prof["teacher_throughput"],
            prof["student_backbone_throughput"] / prof["teacher_backbone_throughput"],
        )
    elif prof:
        log.info(
            "Profile: teacher %.4g GMACs, %.0f images/s; student %.4g GMACs, %.0f images/s (%.2fx)",
            prof["teacher_gmacs"],
            prof["teacher_throughput"],
            prof["student_gmacs"],
            prof["student_throughput"],
            prof["student_throughput"] / prof["teacher_throughput"],
        )

    callbacks = (build_callbacks(cfg) + [PhaseProgress("detector" if detection else "student")]) if cfg.train else []
    trainer = build_trainer(cfg, loggers, callbacks)
    best = last = None
    if cfg.train:
        if detection:
            log.info("Training the detector (%s) for %d epochs", describe_method(module.trunk), cfg.trainer.max_epochs)
        else:
            log.info(
                "Finetuning the reduced student for %d epochs (%s)",
                int(cfg.trainer.max_epochs),
                f"distillation: {cfg.distill.type}" if cfg.get("distill") else "no distillation",
            )
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None:
            best, last = ckpt_cb.best_model_path or None, ckpt_cb.last_model_path or None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        # e.g. resumed after the last epoch: nothing validated in this process
        if (module.teacher_val_top1 is None and not detection) or str(cfg.task.monitor) not in metrics:
            metrics.update({k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()})
    else:
        metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}

    summary = summarise(cfg, module, prof, metrics, best, last)
    summary["task_log"] = _task_log_name()
    if not trainer.is_global_zero:  # DDP: one summary, written by rank 0
        return summary
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for lg in loggers:
        lg.log_metrics(
            {
                f"summary/{k}": float(v)
                for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            step=trainer.global_step,
        )
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    return summary
