"""The LightningModule: a token-reduced student, a frozen unreduced teacher, and the finetuning loss.

    loss = soft-target cross-entropy (mixup / cutmix / label smoothing)
         + distill.weight * distillation(student, teacher)      (none | soft | hard, as DeiT)
         + sum(student.reduction.losses(...))                   (already weighted by the method)

The student arrives built (``src.models.backbone.build_model``: bare model -> method applied ->
checkpoint loaded). The teacher is ``unreduced_copy(student)`` (the student's backbone weights without
the reduction or the method's modules), patched with method "none" (so it has ``forward_tokens`` too),
always in eval mode, without gradients, outside the optimizer and outside checkpoints (its keys are
dropped on save and refilled from the live teacher on load). With ``ema.enabled`` the EMA weights are
saved under the checkpoint's top-level ``state_dict_ema`` with plain student key names (timm's
convention; ``model.checkpoint_ema=true`` loads them). Accuracies are logged in percent.

The ecosystem's tools do the generic parts: timm's ``mixup_target`` (smoothed one-hot targets),
``param_groups_weight_decay`` (which parameters decay), ``create_optimizer_v2`` (any timm optimizer by
name: ``optim=adamw|sgd``) and ``create_scheduler_v2`` (cosine / tanh / constant with warmup, per step,
honouring each group's ``lr_scale``); the accuracies are torchmetrics objects logged as such (Lightning
computes, syncs and resets them). ``save_hyperparameters`` records in every checkpoint which model,
method and settings it holds (plain containers, so ``torch.load(weights_only=True)`` reads it).
Kept by hand, with the reason beside it: DeiT's distillation normalisation, the split of the
parameters into the method's new modules and the backbone, and the teacher-free checkpoints.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torchmetrics.classification import MulticlassAccuracy

from src.models.backbone import apply_method, is_patchable
from src.models.reduction import ReductionConfigError
from src.models.reduction.base import unreduced_copy

Tensor = torch.Tensor
DISTILL_TYPES = ("none", "soft", "hard")
# timm create_scheduler_v2 names; multistep divides the lr by 1 / optim.decay_rate at optim.decay_epochs
OPTIM_SCHEDULES = ("cosine", "tanh", "constant", "multistep")
# optim keys this module reads itself; every other key of the optim config is an argument of the
# optimizer (betas and eps of AdamW, momentum of SGD, ...)
OPTIM_KEYS = (
    "name",
    "lr",
    "lr_base_batch",
    "weight_decay",
    "sched",
    "min_lr",
    "warmup_lr",
    "warmup_epochs",
    "backbone_lr_scale",
    "backbone_freeze_epochs",
    "frozen_params",
    "decay_epochs",
    "decay_rate",
)


EMA_PREFIX = "ema.module."  # the EMA copy's keys inside the LightningModule's state dict


def reduce_backbone(model: nn.Module, method: str, params: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """apply_reduction for timm ViTs; other backbones (e.g. STViT-Swin) only with method none."""
    return apply_method(model, method, params)


def distillation_loss(kind: str, student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """DeiT's distillation terms (facebookresearch/deit losses.py).

    soft: KL(student/tau || teacher/tau) summed, times tau^2, divided by the number of logits (B x C),
    exactly as DeiT normalises it. hard: cross-entropy against the teacher's argmax.
    """
    if kind == "soft":
        return (
            F.kl_div(
                F.log_softmax(student / tau, dim=1),
                F.log_softmax(teacher / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / student.numel()
        )
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    raise ReductionConfigError(f"distill.type must be one of {DISTILL_TYPES}, got {kind!r}")


def soft_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot targets with label smoothing: timm's `mixup_target` without mixing (lam=1), the form
    timm's Mixup produces, so the loss is the same with and without mixup."""
    return mixup_target(y, num_classes, lam=1.0, smoothing=smoothing)


class PercentAccuracy(MulticlassAccuracy):
    """torchmetrics' accuracy in percent (the unit of every accuracy this project logs and reports)."""

    def compute(self) -> Tensor:
        return 100.0 * super().compute()


class _Named:
    """What timm's `param_groups_weight_decay` reads of a model: its named parameters (here a subset)."""

    def __init__(self, items):
        self.items = list(items)

    def named_parameters(self):
        return iter(self.items)


def freeze_parameters(model: nn.Module, names) -> None:
    """optim.frozen_params: parameters never trained (kept out of the optimizer), e.g. [cls_token,
    pos_embed] as DynamicViT's optimizer factory skips them. A name is a parameter name or a module
    prefix; one matching nothing is a config error."""
    if isinstance(names, str):
        names = [names]
    params = dict(model.named_parameters())
    for name in names:
        hits = [n for n in params if n == name or n.startswith(f"{name}.")]
        if not hits:
            raise ReductionConfigError(
                f"optim.frozen_params: {name!r} names no parameter of the student; top-level names are "
                f"{sorted({n.split('.')[0] for n in params})}"
            )
        for n in hits:
            params[n].requires_grad_(False)


class ScheduledOptimization:
    """The optimiser and learning-rate schedule of every task's LightningModule, from the optim config:
    a module sets ``optim_cfg`` and ``batch_size`` and says how its parameters split
    (``param_groups(weight_decay)``: groups tagged "backbone" or "new")."""

    optim_cfg: Dict[str, Any]
    batch_size: int

    # --- optimisation --------------------------------------------------------------------------
    def tagged_groups(self, parts: Dict[str, list], weight_decay: float, skip: List[str]) -> List[dict]:
        """Optimizer groups of `parts` ({"backbone" | "new": [(name, parameter), ...]}): within each part
        timm's `param_groups_weight_decay` says what decays (`skip`: names never decayed); each group is
        tagged with its part and that part's lr scale."""
        groups = []
        for part, named in parts.items():
            for group in param_groups_weight_decay(_Named(named), weight_decay=weight_decay, no_weight_decay_list=skip):
                groups.append({**group, "group": part, "lr_scale": self._lr_scale(part, epoch=0)})
        return groups

    def effective_lr(self) -> float:
        """optim.lr is given for optim.lr_base_batch images; scale it with the global batch."""
        trainer = self.trainer
        global_batch = trainer.world_size * self.batch_size * trainer.accumulate_grad_batches
        return float(self.optim_cfg.get("lr", 5e-4)) * global_batch / float(self.optim_cfg.get("lr_base_batch", 512))

    def _lr_scale(self, part: str, epoch: int) -> float:
        if part == "new":
            return 1.0
        if epoch < int(self.optim_cfg.get("backbone_freeze_epochs", 0)):
            return 0.0  # frozen: lr 0 changes nothing (AdamW's decoupled decay is lr-scaled too)
        return float(self.optim_cfg.get("backbone_lr_scale", 1.0))

    def configure_optimizers(self):
        """timm's optimizer factory (optim.name: adamw, sgd, lamb, ...; the other optim keys that are not
        ours go to the optimizer) and scheduler factory, stepped per optimizer step: the schedule's
        unit is one step (updates_per_epoch=1), so warmup and cosine are exact for any epoch length."""
        cfg = self.optim_cfg
        wd = float(cfg.get("weight_decay", 0.05))
        kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in cfg.items() if k not in OPTIM_KEYS}
        kwargs.setdefault("betas", (0.9, 0.999))
        kwargs.setdefault("eps", 1e-8)  # both dropped by timm for optimizers without them (SGD)
        optimizer = create_optimizer_v2(
            self.param_groups(wd), opt=str(cfg.get("name", "adamw")), lr=self.effective_lr(), weight_decay=wd, **kwargs
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, int(self.trainer.max_epochs or 1))
        sched = str(cfg.get("sched", "cosine"))
        if sched not in OPTIM_SCHEDULES:
            raise ReductionConfigError(f"optim.sched must be one of {OPTIM_SCHEDULES}, got {sched!r}")
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=sched,
            num_epochs=total,
            step_on_epochs=False,
            updates_per_epoch=1,
            warmup_epochs=int(round(float(cfg.get("warmup_epochs", 0)) * per_epoch)),
            warmup_lr=float(cfg.get("warmup_lr", 1e-6)),
            min_lr=float(cfg.get("min_lr", 1e-5)),
            warmup_prefix=False,  # DeiT's and timm's convention: the cosine spans all steps, warmup included
            # multistep (the detection recipes' 3x schedule): milestones in steps, like every unit here
            decay_milestones=[int(round(float(e) * per_epoch)) for e in cfg.get("decay_epochs") or []] or (90, 180),
            decay_rate=float(cfg.get("decay_rate", 0.1)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_train_epoch_start(self) -> None:
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        for group in opt.param_groups:
            group["lr_scale"] = self._lr_scale(group["group"], self.current_epoch)
        self.lr_schedulers().step_update(num_updates=self.global_step)
        self.log("train/lr", opt.param_groups[-1]["lr"] if opt.param_groups else 0.0, on_step=False, on_epoch=True)


class ReductionModule(ScheduledOptimization, L.LightningModule):
    """Student (backbone + reduction) and frozen teacher; see the module docstring for the loss.

    `student`: the model with its method applied and its final weights loaded, as
    ``build_model`` returns it; the teacher is its unreduced copy. `method` / `method_params`, when
    given, apply a method to `student` here first (Python use, tests); an unpatched timm ViT gets
    method none. `optim`, `distill`, `ema`, `mixup` are the config nodes of the same names (plain
    dicts). `batch_size` is the per-device batch used for the learning-rate scaling. `model` (the
    model config), `method_config` (method name and params as configured) and `schedule` only go
    into the checkpoint's hyper-parameters, to say what it holds; all must be plain containers.
    """

    def __init__(
        self,
        student: nn.Module,
        method: Optional[str] = None,
        method_params: Optional[Mapping] = None,
        num_classes: int = 1000,
        optim: Optional[Mapping] = None,
        distill: Optional[Mapping] = None,
        ema: Optional[Mapping] = None,
        mixup: Optional[Mapping] = None,
        batch_size: int = 64,
        model: Optional[Mapping] = None,
        method_config: Optional[Mapping] = None,
        schedule: Optional[Mapping] = None,
    ):
        super().__init__()
        # the checkpoint's "hyper_parameters": every argument but the student (its weights are the
        # state dict); not sent to the loggers, which get the whole resolved config from run()
        self.save_hyperparameters(ignore=["student"], logger=False)
        self.optim_cfg = dict(optim or {})
        self.distill_cfg = dict(distill or {})
        self.mixup_cfg = dict(mixup or {})
        self.ema_cfg = dict(ema or {})
        if method is not None or (is_patchable(student) and getattr(student, "reduction", None) is None):
            student = apply_method(student, method or "none", method_params)
        self.method = getattr(getattr(student, "reduction", None), "name", "none")
        # what the student holds, also when it arrived reduced: the method and its resolved settings
        self.hparams["reduction"] = {
            "method": self.method,
            "settings": repr(getattr(student, "reduction", None) or "none"),
        }
        self.num_classes, self.batch_size = int(num_classes), int(batch_size)
        self.distill_type = self.distill_cfg.get("type", "none")
        if self.distill_type not in DISTILL_TYPES:
            raise ReductionConfigError(f"distill.type must be one of {DISTILL_TYPES}, got {self.distill_type!r}")
        self.distill_weight = float(self.distill_cfg.get("weight", 0.0 if self.distill_type == "none" else 1.0))
        if self.distill_weight < 0:
            raise ReductionConfigError(f"distill.weight must be >= 0, got {self.distill_weight}")

        self.student = student
        self.tokens_api = is_patchable(self.student)  # forward_tokens / forward_head_state available
        freeze_parameters(self.student, self.optim_cfg.get("frozen_params") or [])
        self.teacher = apply_method(unreduced_copy(student), "none")  # backbone weights, no method modules
        self.teacher.eval().requires_grad_(False)
        self.needs_teacher = (self.distill_type != "none" and self.distill_weight > 0) or bool(
            getattr(getattr(self.student, "reduction", None), "needs_teacher", False)
        )

        self.mixup_fn = self._make_mixup()
        self.smoothing = float(self.mixup_cfg.get("label_smoothing", 0.0))
        self.criterion = SoftTargetCrossEntropy()
        self.ema = None
        if self.ema_cfg.get("enabled", False):
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=float(self.ema_cfg.get("decay", 0.9998)))
            self.ema.requires_grad_(False)
        metric = lambda k: PercentAccuracy(num_classes=self.num_classes, top_k=k, average="micro")  # noqa: E731
        self.val_top1, self.val_top5 = metric(1), metric(min(5, self.num_classes))
        self.teacher_top1, self.ema_top1 = metric(1), metric(1)
        self.teacher_val_done = False  # the teacher's val accuracy is computed once per run
        self.method_metric_keys: set = set()  # "train/<name>", "val/<name>" of the method's metrics()
        self.teacher_val_top1: Optional[float] = None

    # --- pieces --------------------------------------------------------------------------------
    def _make_mixup(self):
        m = self.mixup_cfg
        if float(m.get("mixup_alpha", 0.0)) <= 0 and float(m.get("cutmix_alpha", 0.0)) <= 0:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=float(m.get("mixup_alpha", 0.0)),
            cutmix_alpha=float(m.get("cutmix_alpha", 0.0)),
            cutmix_minmax=m.get("cutmix_minmax"),
            prob=float(m.get("prob", 1.0)),
            switch_prob=float(m.get("switch_prob", 0.5)),
            mode=m.get("mode", "batch"),
            label_smoothing=float(m.get("label_smoothing", 0.0)),
            num_classes=self.num_classes,
        )

    @staticmethod
    def run_model(model: nn.Module, x: Tensor, tokens_api: bool):
        """(logits, state); state is None for backbones without forward_tokens."""
        if tokens_api:
            state = model.forward_tokens(x)
            return model.forward_head_state(state), state
        return model(x), None

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never in training mode (dropout / drop-path off, BN frozen)
        if self.ema is not None:
            self.ema.module.eval()
        return self

    # --- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            x, targets = self.mixup_fn(x, y)
        else:
            targets = soft_targets(y, self.num_classes, self.smoothing)
        logits, state = self.run_model(self.student, x, self.tokens_api)
        t_logits = t_state = None
        if self.needs_teacher:
            with torch.no_grad():
                t_logits, t_state = self.run_model(self.teacher, x, self.tokens_api)
        terms: Dict[str, Tensor] = {"ce": self.criterion(logits, targets)}
        if self.distill_type != "none" and self.distill_weight > 0:
            tau = float(self.distill_cfg.get("tau", 1.0))
            terms["distill"] = self.distill_weight * distillation_loss(self.distill_type, logits, t_logits, tau)
        if state is not None:
            extra = self.student.reduction.losses(
                state,
                logits=logits,
                targets=targets,
                teacher_logits=t_logits,
                teacher_state=t_state,
                epoch=self.current_epoch,
                step=self.global_step,
            )
            clash = set(extra) & set(terms)
            if clash:
                raise ReductionConfigError(f"method loss names {sorted(clash)} clash with the built-in terms")
            terms.update(extra)
            self._log_method_metrics(state, "train")
        loss = sum(terms.values())
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # The EMA follows each optimizer step inside the step itself: Lightning writes step checkpoints
        # in on_train_batch_end, so an update there would be missing from the checkpoint and a resumed
        # run's EMA would differ from the uninterrupted run's.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.student, step=self.global_step + 1)

    def _log_method_metrics(self, state, stage: str) -> None:
        for name, value in self.student.reduction.metrics(state).items():
            self.method_metric_keys.add(f"{stage}/{name}")
            self.log(f"{stage}/{name}", float(value), on_step=False, on_epoch=True)

    # --- validation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # the teacher never changes: measure it once, on the first real validation pass
        self._teacher_this_epoch = not self.teacher_val_done and not self.trainer.sanity_checking

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits, state = self.run_model(self.student, x, self.tokens_api)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        # metric objects: Lightning computes them at the epoch end (summed over DDP ranks) and resets them
        self.val_top1.update(logits, y)
        self.val_top5.update(logits, y)
        self.log("val/top1", self.val_top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/top5", self.val_top5, on_step=False, on_epoch=True)
        if state is not None:
            self._log_method_metrics(state, "val")
        if self._teacher_this_epoch:
            self.teacher_top1.update(self.teacher(x), y)
            self.log("val/teacher_top1", self.teacher_top1, on_step=False, on_epoch=True)
        if self.ema is not None:
            self.ema_top1.update(self.ema.module(x), y)
            self.log("val/ema_top1", self.ema_top1, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self._teacher_this_epoch:
            # the summary's number (compute() is cached: Lightning's own compute returns the same value)
            self.teacher_val_top1 = float(self.teacher_top1.compute())
            self.teacher_val_done = True

    # --- optimisation (the schedule: ScheduledOptimization) ------------------------------------
    def param_groups(self, weight_decay: float) -> List[dict]:
        """Method modules at full lr, the backbone at backbone_lr_scale (this split is ours: timm has
        no notion of a method's new modules); within each part timm's `param_groups_weight_decay` says
        what decays (not biases, norms, 1-d parameters or the model's no_weight_decay(): position
        embeddings and special tokens). Frozen parameters (requires_grad False) are left out."""
        reduction = getattr(self.student, "reduction", None)
        new = set(reduction.new_module_names()) if reduction is not None else set()
        skip = sorted(self.student.no_weight_decay()) if hasattr(self.student, "no_weight_decay") else []
        parts: Dict[str, list] = {"backbone": [], "new": []}
        for name, p in self.student.named_parameters():
            parts["new" if name.split(".")[0] in new else "backbone"].append((name, p))
        return self.tagged_groups(parts, weight_decay, skip)

    # --- checkpoints: the teacher is rebuilt from the config, never stored; EMA apart ----------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]
        ema = [k for k in sd if k.startswith(EMA_PREFIX)]
        if ema:  # timm's convention: top-level state_dict_ema with the student's plain key names
            checkpoint["state_dict_ema"] = {k[len(EMA_PREFIX) :]: sd.pop(k) for k in ema}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.setdefault("state_dict", {})
        for k, v in self.teacher.state_dict().items():
            sd.setdefault(f"teacher.{k}", v)
        if self.ema is not None:  # resume: the saved EMA weights, else (trained without EMA) the live copy
            saved = checkpoint.get("state_dict_ema") or {}
            for k, v in self.ema.module.state_dict().items():
                sd.setdefault(f"{EMA_PREFIX}{k}", saved.get(k, v))


__all__ = [
    "PercentAccuracy",
    "ReductionModule",
    "ScheduledOptimization",
    "distillation_loss",
    "freeze_parameters",
    "reduce_backbone",
    "soft_targets",
    "is_patchable",
]
