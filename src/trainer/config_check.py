"""Every config value checked before any work starts: `check_values(cfg)`.

One table of rules (key -> type / range / choices, with a hint) for every option a user can set:
the top-level keys, optim, distill, ema, profile, budget, model (and model.bootstrap), schedule, data
(and data.mixup), trainer (any Lightning `Trainer` argument), and the settings of each callback and
logger (rules per class, inherited: `StepCheckpoint` gets `ModelCheckpoint`'s). A few cross-checks
follow the table (e.g. an even batch under mixup, min_epochs <= max_epochs), and, unless
`environment=False`, whether the chosen accelerator / profile device exists on this machine.

The first problem raises `ConfigValueError` (a `ReductionConfigError`, so run.py's USER_ERRORS and
the entry points print it as one line and exit with code 2):

    optim.lr=-1 must be a number > 0 (the peak learning rate for optim.lr_base_batch images, ...)

Keys that no rule knows under the project's own groups (e.g. `+optim.lrr=1`; without `+` Hydra
itself refuses new keys) are reported with the known ones. `method.params` are left to
`apply_reduction`, which validates them; `paths` and `hydra` are not checked; `model.kwargs` go to
timm unchecked. A new config key needs a rule here: tests/test_config_values.py checks every shipped
config and reports a key without one as unknown.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import math
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.models.reduction import ReductionConfigError


class ConfigValueError(ReductionConfigError):
    """A config value outside its type, range or choices, or an unknown key: one line naming the key,
    the value and what is allowed."""


def _fail(message: str) -> None:
    raise ConfigValueError(" ".join(str(message).split()))  # always one line


def _fmt(v: Any) -> str:
    """A value as it would be written on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v and v.strip() == v else repr(v)
    if isinstance(v, (list, tuple, ListConfig)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, (dict, DictConfig)):
        return "{" + ", ".join(f"{k}: ..." for k in v) + "}"
    return str(v)


# --- rules -------------------------------------------------------------------------------------------
class Rule:
    """`text` says what is allowed ("a number > 0"); `test(value)` says whether `value` is."""

    __slots__ = ("text", "test")

    def __init__(self, text: str, test: Callable[[Any], Any]):
        self.text, self.test = text, test

    def ok(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError, AssertionError, KeyError):
            return False

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(f"{self.text} or {other.text}", lambda v: self.ok(v) or other.ok(v))

    def named(self, text: str) -> "Rule":
        return Rule(text, self.test)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _within(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))


def num(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite int or float (not a bool) within the bounds."""
    return Rule(
        "a number" + _bounds(lo, hi, lo_open, hi_open), lambda v: _is_num(v) and _within(v, lo, hi, lo_open, hi_open)
    )


def integer(lo=None, hi=None) -> Rule:
    """A whole number written as one (5, not 5.0 or '5')."""
    text = (
        f"an integer between {lo} and {hi}"
        if lo is not None and hi is not None
        else "an integer" + _bounds(lo, hi, False, False)
    )
    return Rule(text, lambda v: _is_int(v) and _within(v, lo, hi, False, False))


def one_of(*choices) -> Rule:
    return Rule(
        "one of " + ", ".join(_fmt(c) for c in choices), lambda v: any(type(v) is type(c) and v == c for c in choices)
    )


def list_of(item: Rule, length: Optional[int] = None, min_len: int = 0) -> Rule:
    size = f"{length} " if length is not None else ("non-empty " if min_len else "")
    return Rule(
        f"a {size}list, each {item.text}",
        lambda v: (
            isinstance(v, (list, tuple))
            and (length is None or len(v) == length)
            and len(v) >= min_len
            and all(item.ok(x) for x in v)
        ),
    )


NULL = Rule("null", lambda v: v is None)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STR = Rule("a string", lambda v: isinstance(v, str))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
MAPPING = Rule("a mapping (key: value)", lambda v: isinstance(v, (dict, DictConfig)))
PATH = Rule("null or a path", lambda v: v is None or isinstance(v, str))  # ${paths...}: not resolved here
POS_INT, NONNEG_INT = integer(1), integer(0)
POS_NUM, NONNEG_NUM = num(0, lo_open=True), num(0)
PROB = num(0, 1)
SHARE = num(0, 1, lo_open=True)  # (0, 1]
LIMIT_BATCHES = (NULL | POS_INT | SHARE).named(
    "null (all), an integer >= 1 (batches) or a number in (0.0, 1.0] (a fraction)"
)
DEVICE_NAME = Rule(
    "auto, cpu, cuda, cuda:<index> or mps",
    lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v),
)


def _devices_ok(v) -> bool:
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, str):  # Lightning's string forms: "auto", "-1", "2" (a count), "0,1" / "1," (indices)
        s = v.replace(" ", "")
        return s in ("auto", "-1") or (bool(re.fullmatch(r"\d+(,\d+)*,?", s)) and s != "0")
    if isinstance(v, (list, tuple)):
        return len(v) > 0 and all(_is_int(x) and x >= 0 for x in v) and len(set(v)) == len(v)
    return False


DEVICES = Rule(
    "an integer >= 1, -1 (all), auto, a list of distinct device indices or a string such as '0,1'", _devices_ok
)


def _strategy_ok(v) -> bool:
    from lightning.pytorch.strategies import StrategyRegistry

    return isinstance(v, str) and (v == "auto" or v in StrategyRegistry.available_strategies())


STRATEGY = Rule(
    "auto or a Lightning strategy name (ddp, ddp_spawn, ddp_find_unused_parameters_true, fsdp, deepspeed, ...)",
    _strategy_ok,
)
PRECISION = one_of(
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    32,
    16,
    64,
    "32",
    "16",
    "64",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
).named(
    "one of 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, 32, 16, 64, bf16, transformer-engine, "
    "transformer-engine-float16"
)


def _augment_ok(v) -> bool:
    """timm's own parser of the policy string (microseconds; no image needed)."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    if not isinstance(v, str) or not v:
        return False
    if v.startswith("rand"):
        rand_augment_transform(v, {})
    elif v.startswith("augmix"):
        augment_and_mix_transform(v, {})
    else:
        auto_augment_transform(v, {})
    return True


def _optimizer_ok(v) -> bool:
    from timm.optim import list_optimizers

    return isinstance(v, str) and v.lower() in list_optimizers()


OPTIMIZER = Rule(
    "a timm optimizer name (timm.optim.list_optimizers(): adamw, sgd, momentum, lamb, lion, adopt, ...)", _optimizer_ok
)


AUGMENT = Rule(
    "a timm augmentation policy: rand-m<magnitude>[-n<ops>-mstd<std>-inc1] (RandAugment), "
    "augmix-m<m>-w<w>-d<d>, or original / originalr / v0 / v0r / 3a (AutoAugment)",
    _augment_ok,
)

Spec = Union[Rule, Tuple[Rule, str]]  # a rule, or (rule, hint shown in brackets)

# --- the table ---------------------------------------------------------------------------------------
TOP: Dict[str, Spec] = {
    "task_name": (TEXT, "it names the logs/<task_name>/ folder"),
    "tags": NULL | list_of((TEXT | num()).named("a string")),
    "train": (BOOL, "false: evaluate off-the-shelf only"),
    "seed": (NULL | integer(0, 2**32 - 1), "numpy's seed range; null: not seeded"),
    "ckpt_path": (NULL | TEXT, "last, or the path of a Lightning checkpoint to resume"),
    "optimized_metric": NULL | TEXT | list_of(TEXT, min_len=2),
    "threads": (NULL | POS_INT, "torch's CPU threads; null: torch's default (one per core)"),
    # groups (checked below)
    "optim": MAPPING,
    "distill": MAPPING,
    "ema": MAPPING,
    "profile": MAPPING,
    "model": MAPPING,
    "method": MAPPING,
    "schedule": NULL | MAPPING,
    "data": MAPPING,
    "trainer": MAPPING,
    "logger": NULL | MAPPING,
    "callbacks": NULL | MAPPING,
    "paths": MAPPING,
    "budget": NULL | MAPPING,
    "hydra": MAPPING,
    "compile": MAPPING,
    "task": MAPPING,
}

GROUPS: Dict[str, Dict[str, Spec]] = {
    "optim": {  # conf/optim/<name>.yaml; keys without a rule here are checked against the optimizer's signature
        "name": (OPTIMIZER, "choose one with optim=adamw|sgd or set optim.name"),
        "sched": (one_of("cosine", "tanh", "constant", "multistep"), "timm's schedulers, stepped per optimizer step"),
        "decay_epochs": (NULL | list_of(POS_NUM, min_len=1), "sched=multistep: epochs at which the lr drops"),
        "decay_rate": (num(0, 1, lo_open=True, hi_open=True), "sched=multistep: the lr's factor at each drop"),
        "lr": (POS_NUM, "the peak learning rate for optim.lr_base_batch images, scaled by the global batch"),
        "lr_base_batch": (POS_INT, "the global batch optim.lr is given for"),
        "weight_decay": (NONNEG_NUM, "AdamW's decoupled weight decay"),
        "min_lr": (NONNEG_NUM, "where the cosine schedule ends"),
        "warmup_lr": (NONNEG_NUM, "where the linear warmup starts"),
        "warmup_epochs": (NONNEG_NUM, "linear warmup length in epochs; fractions allowed"),
        "betas": (list_of(num(0, 1, hi_open=True), length=2), "AdamW's [beta1, beta2]"),
        "eps": (POS_NUM, "AdamW's epsilon"),
        "momentum": (num(0, 1, hi_open=True), "SGD's momentum"),
        "nesterov": BOOL,
        "backbone_lr_scale": (NONNEG_NUM, "the backbone's lr relative to the method's new modules"),
        "backbone_freeze_epochs": (NONNEG_INT, "first epochs with the backbone at lr 0"),
        "frozen_params": (NULL | TEXT | list_of(TEXT), "student parameter names or module prefixes never trained"),
    },
    "distill": {
        "type": (one_of("none", "soft", "hard"), "soft: KL with temperature, hard: DeiT's hard label"),
        "weight": (NONNEG_NUM, "the distillation term's weight in the loss"),
        "tau": (POS_NUM, "the softmax temperature of soft distillation"),
    },
    "ema": {
        "enabled": BOOL,
        "decay": (num(0, 1, lo_open=True, hi_open=True), "the old average's weight per step, e.g. 0.9998"),
    },
    "compile": {
        "enabled": BOOL,
        "mode": (
            NULL | one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
            "torch.compile's mode; null: its default",
        ),
        "backend": (TEXT, "torch.compile's backend: inductor, or aot_eager / eager to check the capture quickly"),
    },
    "profile": {
        "enabled": BOOL,
        "batch_size": (POS_INT, "the batch of the throughput measurement"),
        "device": (DEVICE_NAME, "auto: cuda when the trainer uses it, else cpu"),
        "warmup": (NONNEG_INT, "untimed batches per model before the timing"),
        "rounds": (POS_INT, "alternating timing rounds; the median round counts"),
        "iters": (POS_INT, "batches per model and round"),
    },
    "budget": {  # hparams_search=gmacs_budget_optuna
        "gmacs": (NULL | POS_NUM, "an absolute GMACs budget"),
        "teacher_ratio": (NULL | SHARE, "the budget as a fraction of the unreduced teacher's GMACs"),
        "penalty": (NONNEG_NUM, "top-1 points subtracted per 100% over budget"),
    },
    "model": {
        "name": (TEXT, "a timm model name"),
        "display_name": (
            NULL | TEXT,
            "what summaries call the model when model.name is only the timm class it is built from",
        ),
        "pretrained": (BOOL, "timm's pretrained weights"),
        "checkpoint": (NULL | TEXT, "a local weights file"),
        "checkpoint_ema": (BOOL, "true: load the checkpoint's EMA weights"),
        "drop_head": (BOOL, "true: a fresh classifier head when the checkpoint has another class count"),
        "num_classes": POS_INT,
        "img_size": (POS_INT, "input height = width in pixels"),
        "in_chans": (POS_INT, "input channels"),
        "drop_path_rate": (num(0, 1, hi_open=True), "stochastic depth of the last block"),
        "kwargs": (NULL | MAPPING, "further timm.create_model arguments"),
        "data_config": (NULL | MAPPING, "preprocessing (mean, std, interpolation, crop_pct) over timm's"),
        "bootstrap": MAPPING,
        "baseline": (NULL | TEXT, "the unreduced timm model a detection run compares a features_only backbone with"),
    },
    "task": {  # conf/task/<name>.yaml
        "name": (one_of("classification", "detection"), "choose it with task=classification|detection"),
        "monitor": (TEXT, "the logged metric the best checkpoint maximises, e.g. val/top1, val/box_map"),
        "mask_threshold": (num(0, 1, lo_open=True, hi_open=True), "mask probability above which a pixel is in"),
        "input_size": (NULL | list_of(POS_INT, length=2), "[height, width] of the GMACs count and the timing"),
        "head": (NULL | MAPPING, "Mask R-CNN sizes: src/models/detector.py HEAD_DEFAULTS"),
        "checkpoint_heads": (BOOL, "true: a whole-detector model.checkpoint loads its neck and heads too"),
    },
    "model.bootstrap": {  # how run() trains the quickstart teacher
        "enabled": BOOL,
        "epochs": (POS_INT, "the teacher's training epochs"),
        "lr": (POS_NUM, "the teacher's peak learning rate for optim.lr_base_batch images"),
        "warmup_epochs": NONNEG_NUM,
        "limit_train_batches": LIMIT_BATCHES,
    },
    "method": {
        "name": TEXT,
        "params": (NULL | MAPPING, "checked by apply_reduction"),
    },
    "data": {  # the union over the project's data modules (a recipe's keys for another module are ignored)
        "_target_": TEXT,
        "batch_size": (POS_INT, "training images per device and step"),
        "eval_batch_size": (NULL | POS_INT, "validation images per device; null: data.batch_size"),
        "img_size": POS_INT,
        "in_chans": POS_INT,
        "num_workers": (NONNEG_INT, "DataLoader worker processes; 0 loads in the main process"),
        "mixup": MAPPING,
        # digits
        "val_per_class": (integer(1, 499), "each digit class has 500 images"),
        "split_seed": NONNEG_INT,
        "max_shift": (integer(0, 27), "random shift in pixels of the 28x28 digits"),
        # ImageFolder
        "root": (TEXT, "a folder with train/ and val/ ImageFolder sub-folders"),
        "train_dir": TEXT,
        "val_dir": TEXT,
        "num_classes": NULL | POS_INT,
        "model_name": NULL | TEXT,
        "model_data_config": (NULL | MAPPING, "the model's own preprocessing (model.data_config)"),
        "crop_pct": (
            NULL | SHARE,
            "evaluation resizes to img_size / crop_pct and center-crops img_size; null: the model's",
        ),
        "interpolation": NULL | one_of("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"),
        "auto_augment": NULL | AUGMENT,
        "color_jitter": (
            NULL
            | NONNEG_NUM
            | Rule(
                "a list of 3 or 4 numbers >= 0",
                lambda v: isinstance(v, list) and len(v) in (3, 4) and all(NONNEG_NUM.ok(x) for x in v),
            ),
            "inactive while RandAugment is on, as in timm",
        ),
        "re_prob": (PROB, "random-erasing probability"),
        "re_mode": one_of("pixel", "rand", "const"),
        "re_count": (POS_INT, "random-erasing regions per image"),
        "mean": (NULL | list_of(num(), min_len=1), "one value per channel; null: the model's"),
        "std": (NULL | list_of(POS_NUM, min_len=1), "one value per channel; null: the model's"),
    },
    "data.mixup": {  # timm Mixup, on the batch in the LightningModule
        "mixup_alpha": (NONNEG_NUM, "0: no mixup"),
        "cutmix_alpha": (NONNEG_NUM, "0: no cutmix"),
        "cutmix_minmax": (NULL | list_of(SHARE, length=2), "[min, max] cut area ratios; overrides cutmix_alpha"),
        "prob": (PROB, "probability of mixing a batch"),
        "switch_prob": (PROB, "probability of cutmix instead of mixup when both are on"),
        "mode": (one_of("batch", "pair", "elem"), "what shares one mixing factor"),
        "label_smoothing": num(0, 1, hi_open=True),
    },
    "trainer": {  # lightning.pytorch.Trainer arguments; unknown ones are checked against its signature
        "_target_": TEXT,
        "accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
        "strategy": STRATEGY,
        "devices": (DEVICES, "processes (devices) per node"),
        "num_nodes": POS_INT,
        "precision": PRECISION,
        "max_epochs": (POS_INT, "the cosine schedule spans them all, so -1 (endless) is not supported"),
        "min_epochs": NULL | NONNEG_INT,
        "max_steps": (
            Rule("-1 (no limit) or an integer >= 1", lambda v: _is_int(v) and (v == -1 or v >= 1)),
            "trainer.max_epochs still applies",
        ),
        "min_steps": NULL | NONNEG_INT,
        "max_time": (NULL | TEXT | MAPPING, "DD:HH:MM:SS or {days: .., hours: ..}"),
        "gradient_clip_val": (NULL | NONNEG_NUM, "null or 0: no clipping"),
        "gradient_clip_algorithm": NULL | one_of("norm", "value"),
        "accumulate_grad_batches": (POS_INT, "batches per optimizer step"),
        "check_val_every_n_epoch": NULL | POS_INT,
        "val_check_interval": (NULL | POS_INT | SHARE).named(
            "null, an integer >= 1 (training batches) or a number in (0.0, 1.0] (a fraction of an epoch)"
        ),
        "num_sanity_val_steps": (integer(-1), "-1: the whole validation set"),
        "log_every_n_steps": NULL | POS_INT,
        "limit_train_batches": LIMIT_BATCHES,
        "limit_val_batches": (LIMIT_BATCHES, "0 would skip the validation that top-1 and the teacher need"),
        "limit_test_batches": (NULL | NONNEG_INT | PROB).named("null, an integer >= 0 or a number in [0.0, 1.0]"),
        "limit_predict_batches": (NULL | NONNEG_INT | PROB).named("null, an integer >= 0 or a number in [0.0, 1.0]"),
        "overfit_batches": NONNEG_INT | PROB,
        "fast_dev_run": BOOL | NONNEG_INT,
        "deterministic": NULL | BOOL | one_of("warn"),
        "benchmark": NULL | BOOL,
        "inference_mode": BOOL,
        "use_distributed_sampler": BOOL,
        "sync_batchnorm": BOOL,
        "detect_anomaly": BOOL,
        "barebones": BOOL,
        "enable_checkpointing": NULL | BOOL,
        "enable_progress_bar": NULL | BOOL,
        "enable_model_summary": NULL | BOOL,
        "enable_autolog_hparams": BOOL,
        "reload_dataloaders_every_n_epochs": NONNEG_INT,
        "profiler": NULL | one_of("simple", "advanced", "pytorch", "xla"),
        "default_root_dir": PATH,
    },
    "logger.token_images": {  # logger=wandb: token pictures (src/trainer/callbacks.py TokenImages)
        "enabled": BOOL,
        "every_n_epochs": POS_INT,
        "num_images": POS_INT,
    },
}
# Trainer arguments run() passes itself
TRAINER_RESERVED = {
    "logger": "choose loggers with logger=<csv|tensorboard|wandb|many_loggers|null>",
    "callbacks": "choose callbacks with callbacks=<crash_safe|default|none>",
}

SCHEDULES: Dict[str, Dict[str, Spec]] = {
    "constant": {"r": (NONNEG_INT, "tokens removed in every block")},
    "decreasing": {
        "r": (NONNEG_INT, "tokens removed at the middle block"),
        "inflect": (num(), "ToMe's inflection: -1 gives 2r ... 0, 0 a constant r"),
    },
    "list": {"r": (list_of(NONNEG_INT, min_len=1), "tokens removed per block, one entry per block")},
    "staged": {
        "keep_rate": (SHARE | list_of(SHARE, min_len=1), "one rate, or one per location"),
        "locations": (NULL | list_of(NONNEG_NUM, min_len=1), "0-based block indices or fractions of the depth"),
    },
    "flops": {
        "gmacs": (POS_NUM, "the GMACs budget the schedule is solved for"),
        "tolerance": (POS_NUM, "the relative miss allowed"),
        "img_size": NULL | POS_INT,
        "in_chans": NULL | POS_INT,
    },
}

# callbacks / loggers: rules per class, inherited along the class's MRO (by class name)
TARGETS: Dict[str, Dict[str, Spec]] = {
    "ModelCheckpoint": {
        "dirpath": PATH,
        "filename": NULL | TEXT,
        "monitor": (
            NULL
            | Rule(
                "a logged metric (val/top1, val/top5, val/loss, train/loss, ..., epoch, step)",
                lambda v: isinstance(v, str) and re.fullmatch(r"(val|train)/[\w./-]+|epoch|step", v),
            ),
            "the metric that ranks the best checkpoints",
        ),
        "mode": one_of("max", "min"),
        "save_top_k": (integer(-1), "-1: all, 0: none"),
        "save_last": NULL | BOOL | one_of("link"),
        "save_on_exception": BOOL,
        "save_weights_only": BOOL,
        "auto_insert_metric_name": BOOL,
        "verbose": BOOL,
        "every_n_train_steps": NULL | NONNEG_INT,
        "every_n_epochs": NULL | NONNEG_INT,
        "save_on_train_epoch_end": NULL | BOOL,
        "enable_version_counter": BOOL,
    },
    "StepCheckpoint": {
        "every_n_train_steps": (
            POS_INT,
            "training steps between the crash-safe last-step.ckpt saves; callbacks=default has no mid-epoch checkpoint",
        ),
    },
    "CheckpointOnSigterm": {"filename": TEXT},
    "LearningRateMonitor": {
        "logging_interval": NULL | one_of("epoch", "step"),
        "log_momentum": BOOL,
        "log_weight_decay": BOOL,
    },
    "CSVLogger": {
        "save_dir": PATH,
        "name": NULL | STR,
        "version": NULL | STR | NONNEG_INT,
        "prefix": STR,
        "flush_logs_every_n_steps": POS_INT,
    },
    "TensorBoardLogger": {
        "save_dir": PATH,
        "name": NULL | STR,
        "version": NULL | STR | NONNEG_INT,
        "prefix": STR,
        "log_graph": BOOL,
        "default_hp_metric": BOOL,
        "sub_dir": NULL | STR,
    },
    "WandbLogger": {
        "project": NULL | TEXT,
        "name": NULL | STR,
        "save_dir": PATH,
        "offline": BOOL,
        "id": NULL | STR,
        "log_model": NULL | BOOL | one_of("all"),
        "group": NULL | STR,
        "job_type": NULL | STR,
        "tags": NULL | list_of((TEXT | num()).named("a string")),
        "prefix": STR,
        "anonymous": NULL | BOOL,
    },
}


# --- walking the config ------------------------------------------------------------------------------
_ABSENT = object()


def _get(node: DictConfig, key: str, path: str) -> Any:
    """node[key] resolved (lists as plain lists, mappings as nodes); _ABSENT for missing (???) values,
    which the consumer reports (e.g. data.root)."""
    if OmegaConf.is_missing(node, key):
        return _ABSENT
    try:
        value = node[key]
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail(f"{path} cannot be resolved: {first}")
    return value


def _spec(spec: Spec) -> Tuple[Rule, Optional[str]]:
    return spec if isinstance(spec, tuple) else (spec, None)


def _check_value(path: str, value: Any, spec: Spec) -> None:
    rule, hint = _spec(spec)
    if value is _ABSENT or rule.ok(value):
        return
    _fail(f"{path}={_fmt(value)} must be {rule.text}" + (f" ({hint})" if hint else ""))


def _unknown(path: str, node: DictConfig, key: str, known: Iterable[str], what: str) -> None:
    known = sorted(k for k in known if not k.startswith("_"))
    close = difflib.get_close_matches(str(key), known, n=1)
    try:
        shown = _fmt(_get(node, key, f"{path}.{key}" if path else key))
    except ConfigValueError:
        shown = "..."
    full = f"{path}.{key}" if path else str(key)
    _fail(
        f"{full}={shown} is not a setting of {what}"
        + (f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else "")
        + f"; known: {', '.join(known)}"
    )


def _check_node(
    node: Any, path: str, rules: Mapping[str, Spec], known: Optional[Iterable[str]] = None, what: Optional[str] = None
) -> None:
    """The keys of `node` under `rules`; with `known` (default: the rules' keys) other keys are unknown."""
    if not isinstance(node, DictConfig):
        return
    known = set(rules if known is None else known)
    for key in node.keys():
        if key not in known:
            _unknown(path, node, key, known, what or (path or "the top level"))
    for key, spec in rules.items():
        if key in node and not (spec is PATH and OmegaConf.is_interpolation(node, key)):
            _check_value(f"{path}.{key}" if path else key, _get(node, key, f"{path}.{key}" if path else key), spec)


def _target_class(node: DictConfig, path: str):
    import hydra.utils

    target = node.get("_target_")
    try:
        return hydra.utils.get_class(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError from Hydra's locator
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail(f"{path}._target_={_fmt(target)} cannot be imported ({first})")


def _signature_keys(cls) -> Tuple[set, bool]:
    """(named arguments, whether **kwargs are accepted) of `cls`'s constructor."""
    params = inspect.signature(cls).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_instantiated(node: Any, path: str) -> None:
    """A callback / logger entry: rules of its class (and bases), unknown keys by its signature."""
    if node is None:
        return
    if not isinstance(node, DictConfig) or "_target_" not in node:
        _fail(f"{path}={_fmt(node)} must be a mapping with a _target_ class (or null)")
    cls = _target_class(node, path)
    rules: Dict[str, Spec] = {}
    for base in reversed(inspect.getmro(cls)):
        rules.update(TARGETS.get(base.__name__, {}))
    named, var_kw = _signature_keys(cls)
    known = None if var_kw else named | {"_target_"}
    _check_node(node, path, rules, known=known if known is not None else set(node.keys()), what=f"{cls.__name__}")


def _optimizer_keys(node: Any) -> set:
    """The keyword arguments of the chosen timm optimizer (other optim keys go to it)."""
    name = node.get("name", "adamw") if isinstance(node, DictConfig) else "adamw"
    if not OPTIMIZER.ok(name):
        return set()  # the name's own rule reports it
    from timm.optim import get_optimizer_info

    return _signature_keys(get_optimizer_info(name.lower()).opt_class)[0] - {"params", "lr", "weight_decay"}


def _check_groups(cfg: DictConfig) -> None:
    _check_node(cfg, "", TOP, what="the training config")
    optim = cfg.get("optim")
    if isinstance(optim, DictConfig):
        _check_node(optim, "optim", GROUPS["optim"], known=set(GROUPS["optim"]) | _optimizer_keys(optim), what="optim")
    for group in ("distill", "ema", "compile", "profile", "budget", "model", "method", "task"):
        _check_node(cfg.get(group), group, GROUPS[group])
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        _check_node(model.get("bootstrap"), "model.bootstrap", GROUPS["model.bootstrap"])

    schedule = cfg.get("schedule")
    if isinstance(schedule, DictConfig):
        name = _get(schedule, "name", "schedule.name") if "name" in schedule else None
        _check_value("schedule.name", name, one_of(*SCHEDULES))
        _check_node(schedule, "schedule", SCHEDULES[name], known={"name", *SCHEDULES[name]}, what=f"schedule={name}")

    data = cfg.get("data")
    if isinstance(data, DictConfig):
        # the data module's constructor arguments; for the project's own modules also every key of the
        # table (a recipe's setting for another data module is ignored by this one, not an error)
        known = _signature_keys(_target_class(data, "data"))[0] | {"_target_", "mixup"}
        if str(data.get("_target_", "")).startswith("src.data."):
            known |= set(GROUPS["data"])
        _check_node(data, "data", GROUPS["data"], known=known, what=str(data.get("_target_")))
        _check_node(data.get("mixup"), "data.mixup", GROUPS["data.mixup"])

    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        for key, hint in TRAINER_RESERVED.items():
            if key in trainer:
                _fail(
                    f"trainer.{key}={_fmt(_get(trainer, key, 'trainer.' + key))} cannot be set: run() passes the "
                    f"trainer its {key} itself; {hint}"
                )
        named = _signature_keys(_target_class(trainer, "trainer"))[0] - set(TRAINER_RESERVED)
        _check_node(
            trainer, "trainer", GROUPS["trainer"], known=named | {"_target_"}, what=f"{trainer.get('_target_')}"
        )

    for group in ("callbacks", "logger"):
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for name in node.keys():
            if group == "logger" and name == "token_images":
                _check_node(node.get(name), "logger.token_images", GROUPS["logger.token_images"])
            else:
                _check_instantiated(_get(node, name, f"{group}.{name}"), f"{group}.{name}")


# --- cross-checks ------------------------------------------------------------------------------------
def _val(cfg: DictConfig, path: str, default: Any = None) -> Any:
    """A resolved value by dotted path (already type-checked by the table), or `default`."""
    node: Any = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if not isinstance(node, DictConfig) or parts[-1] not in node:
        return default
    value = _get(node, parts[-1], path)
    return default if value is _ABSENT else value


def _check_cross(cfg: DictConfig) -> None:
    # trainer
    min_e, max_e = _val(cfg, "trainer.min_epochs"), _val(cfg, "trainer.max_epochs")
    if _is_int(min_e) and _is_int(max_e) and min_e > max_e:
        _fail(f"trainer.min_epochs={min_e} must be <= trainer.max_epochs={max_e}")
    if _val(cfg, "trainer.accelerator") == "cpu":
        devices = _val(cfg, "trainer.devices", 1)
        if not (devices == "auto" or (_is_int(devices) and devices >= 1)):
            _fail(
                f"trainer.devices={_fmt(devices)} must be an integer >= 1 or auto with trainer.accelerator=cpu "
                "(processes on this machine; device lists are for GPUs)"
            )

    # optimizer: settings the chosen optimizer does not take (timm would drop them silently)
    name = _val(cfg, "optim.name", "adamw")
    if OPTIMIZER.ok(name):
        from timm.optim import get_optimizer_info

        info = get_optimizer_info(name.lower())
        for key, has in (("betas", info.has_betas), ("eps", info.has_eps), ("momentum", info.has_momentum)):
            if _val(cfg, f"optim.{key}") is not None and not has:
                _fail(
                    f"optim.{key}={_fmt(_val(cfg, f'optim.{key}'))} cannot be used with optim.name={name} "
                    f"({info.description}); remove it (~optim.{key}) or choose an optimizer that takes it"
                )

    # task=detection: the Mask R-CNN sizes build_detector knows
    head = _val(cfg, "task.head")
    if isinstance(head, DictConfig):
        from src.models.detector import HEAD_DEFAULTS

        for key in head:
            if key not in HEAD_DEFAULTS:
                _fail(f"task.head.{key} is not a Mask R-CNN setting; the settings are {sorted(HEAD_DEFAULTS)}")
        if head.get("roi_heads", "standard") not in ("standard", "cascade"):
            _fail(
                f"task.head.roi_heads={_fmt(head.roi_heads)} is not a detector; choose standard (Mask R-CNN) or "
                "cascade (Cascade Mask R-CNN)"
            )

    # data <-> model
    for key in ("img_size", "in_chans"):
        d, m = _val(cfg, f"data.{key}"), _val(cfg, f"model.{key}")
        if d is not None and m is not None and d != m:
            _fail(f"data.{key}={_fmt(d)} must equal model.{key}={_fmt(m)} (leave data.{key} at ${{model.{key}}})")
    d_classes, m_classes = _val(cfg, "data.num_classes"), _val(cfg, "model.num_classes")
    if d_classes is not None and m_classes is not None and d_classes != m_classes:
        _fail(
            f"data.num_classes={d_classes} must equal model.num_classes={m_classes} (the data's classes are the "
            f"model's outputs: choose a model for {d_classes} classes or set model.num_classes={d_classes})"
        )
    if str(_val(cfg, "data._target_", "")).endswith("DigitsDataModule") and _is_int(m_classes) and m_classes < 10:
        _fail(f"model.num_classes={m_classes} must be >= 10 on the digits (data=digits has 10 classes)")
    chans = _val(cfg, "data.in_chans")
    for key in ("mean", "std"):
        values = _val(cfg, f"data.{key}")
        if isinstance(values, list) and _is_int(chans) and len(values) != chans:
            _fail(f"data.{key}={_fmt(values)} must have one value per input channel: {chans} (model.in_chans={chans})")
    mixup, cutmix = _val(cfg, "data.mixup.mixup_alpha", 0.0), _val(cfg, "data.mixup.cutmix_alpha", 0.0)
    batch = _val(cfg, "data.batch_size")
    mixing = (mixup or 0) > 0 or (cutmix or 0) > 0 or _val(cfg, "data.mixup.cutmix_minmax") is not None
    if mixing and _is_int(batch) and batch % 2:
        _fail(
            f"data.batch_size={batch} must be even while mixup or cutmix is on (data.mixup.mixup_alpha={mixup}, "
            f"cutmix_alpha={cutmix}): timm's Mixup mixes each image with its mirror in the batch"
        )

    # the quickstart teacher needs its recipe
    if _val(cfg, "model.bootstrap.enabled") is True and not _val(cfg, "model.checkpoint"):
        for key in ("epochs", "lr"):
            if _val(cfg, f"model.bootstrap.{key}") is None:
                _fail(
                    f"model.bootstrap.enabled=true needs model.bootstrap.{key} (the teacher's training recipe; "
                    "see conf/model/quickstart.yaml), or set model.bootstrap.enabled=false"
                )

    # the sweep objective
    if _val(cfg, "budget.gmacs") is not None and _val(cfg, "budget.teacher_ratio") is not None:
        _fail(
            f"budget.gmacs={_val(cfg, 'budget.gmacs')} and budget.teacher_ratio={_val(cfg, 'budget.teacher_ratio')} "
            "are both set; set one of them and the other to null"
        )
    metric = _val(cfg, "optimized_metric")
    if isinstance(metric, list) and (
        _val(cfg, "budget.gmacs") is not None or _val(cfg, "budget.teacher_ratio") is not None
    ):
        _fail(
            f"optimized_metric={_fmt(metric)} (several objectives) cannot take a GMACs budget; "
            "set budget.gmacs=null budget.teacher_ratio=null or optimise one key"
        )

    # checkpoint callbacks: what Lightning would refuse only when it builds them (after the profile)
    callbacks = cfg.get("callbacks")
    for name in callbacks.keys() if isinstance(callbacks, DictConfig) else ():
        path = f"callbacks.{name}"
        monitor, top_k = _val(cfg, f"{path}.monitor"), _val(cfg, f"{path}.save_top_k", 1)
        if monitor is None and "save_top_k" in (callbacks.get(name) or {}) and top_k not in (-1, 0, 1):
            _fail(
                f"{path}.save_top_k={top_k} needs {path}.monitor (a metric to rank by); "
                "without one only -1, 0 or 1 are allowed"
            )
        if monitor == "val/ema_top1" and not _val(cfg, "ema.enabled"):
            _fail(f"{path}.monitor=val/ema_top1 needs ema.enabled=true")
        steps, epochs = _val(cfg, f"{path}.every_n_train_steps") or 0, _val(cfg, f"{path}.every_n_epochs") or 0
        if _is_int(steps) and _is_int(epochs) and steps >= 1 and epochs >= 1:
            _fail(
                f"{path}.every_n_train_steps={steps} and {path}.every_n_epochs={epochs} are both set; "
                "a checkpoint callback takes one of them"
            )


# --- this machine ------------------------------------------------------------------------------------
def check_environment(cfg: DictConfig) -> None:
    """Whether the accelerator, profile device and precision asked for exist here (Lightning would refuse
    them only when it builds the trainer)."""
    import torch

    accel = _val(cfg, "trainer.accelerator", "auto")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        _fail(
            f"trainer.accelerator={accel} needs a CUDA GPU, but none is available here "
            "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
        )
    mps = getattr(torch.backends, "mps", None)
    if accel == "mps" and not (mps is not None and mps.is_available()):
        _fail("trainer.accelerator=mps needs Apple's Metal (MPS), which is not available here; use cpu or auto")
    if accel == "tpu" and importlib.util.find_spec("torch_xla") is None:
        _fail("trainer.accelerator=tpu needs torch_xla, which is not installed; use cpu, gpu or auto")
    precision = str(_val(cfg, "trainer.precision", "32-true"))
    if precision.startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        _fail(
            f"trainer.precision={precision} needs NVIDIA's transformer_engine, which is not installed; "
            "use 16-mixed or bf16-mixed"
        )
    device = str(_val(cfg, "profile.device", "auto")) if _val(cfg, "profile.enabled", True) else "auto"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            _fail(f"profile.device={device} is not available here ({count} CUDA device(s)); use auto or cpu")
    if device == "mps" and not (mps is not None and mps.is_available()):
        _fail("profile.device=mps is not available here; use auto or cpu")


# --- entry point -------------------------------------------------------------------------------------
def check_values(cfg: DictConfig, environment: bool = True) -> None:
    """Raise ConfigValueError (one line: key=value, what is allowed, a hint) for the first config value
    outside its type, range or choices, the first unknown key, or the first inconsistent pair; with
    `environment`, also for an accelerator / profile device / precision this machine does not have.
    Cheap (no model, no data): call it before any work."""
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"check_values needs an OmegaConf DictConfig, got {type(cfg).__name__}")
    _check_groups(cfg)
    _check_cross(cfg)
    if environment:
        check_environment(cfg)


__all__ = ["ConfigValueError", "Rule", "check_environment", "check_values"]
