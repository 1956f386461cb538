"""The detection / instance-segmentation task: a Mask R-CNN over a (token-reduced) backbone.

    loss = torchvision Mask R-CNN's losses (RPN objectness + box, RoI classifier + box + mask)

Validation computes COCO box and mask mAP with torchmetrics' ``MeanAveragePrecision`` (pycocotools'
evaluation), logged in percent as ``val/box_map``, ``val/box_map_50``, ``val/mask_map``, ... The
optimiser and schedule are the classification task's (``ScheduledOptimization``: timm factories,
per-step cosine with warmup); the backbone trunk is the "backbone" part (``optim.backbone_lr_scale``,
``optim.backbone_freeze_epochs``), the pyramid and heads are new modules at the full rate.

There is no teacher: the unreduced detector (``baseline``, same pyramid and heads) exists only for the
profile's side-by-side GMACs and timing, and is neither trained nor saved.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.detection import MeanAveragePrecision

from src.models.detector import backbone_trunk
from src.models.reduction.base import ReductionMethod

from .distributed import gather_list_states
from .module import ScheduledOptimization

Tensor = torch.Tensor
# the COCO numbers logged per epoch and reported in summary.json (torchmetrics' names after the iou type)
LOGGED_MAP = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


class DetectionModule(ScheduledOptimization, L.LightningModule):
    """Mask R-CNN training and COCO evaluation; `detector` as ``build_detector`` returns it."""

    def __init__(
        self,
        detector: nn.Module,
        optim: Optional[Mapping] = None,
        batch_size: int = 2,
        num_classes: int = 1,
        mask_threshold: float = 0.5,
        model: Optional[Mapping] = None,
        method_config: Optional[Mapping] = None,
        task: Optional[Mapping] = None,
    ):
        super().__init__()
        # what the checkpoint holds (plain containers): model, method, classes and task settings
        self.save_hyperparameters(ignore=["detector"], logger=False)
        self.detector = detector
        self.optim_cfg = dict(optim or {})
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.mask_threshold = float(mask_threshold)
        self.reduction = getattr(self.trunk, "reduction", None)
        if self.reduction is not None and type(self.reduction).losses is not ReductionMethod.losses:
            # DynamicViT's keep-ratio + distillation terms, MCTF's random-r pass: defined on class logits
            logging.getLogger(__name__).warning(
                "method %s has its own training losses, defined on classification logits; detection trains "
                "it with the detector's losses only (its modules learn from them, its own terms are not added)",
                self.reduction.name,
            )
        # pycocotools' evaluation (torchmetrics' default backend), boxes and masks in one pass; synced
        # over DDP ranks by gather_list_states (torchmetrics' own sync needs equal image counts per rank)
        self.val_map = MeanAveragePrecision(iou_type=tuple(IOU_TYPES), backend="pycocotools", sync_on_compute=False)
        self.method_metric_keys: set = set()
        self.teacher_val_top1 = None  # the classification summary's field; no teacher here

    @property
    def trunk(self) -> nn.Module:
        """The backbone trunk (a property: registered once, under detector.*, in the state dict)."""
        return backbone_trunk(self.detector)

    def forward(self, images: List[Tensor]) -> List[Dict[str, Tensor]]:
        return self.detector(images)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite detection loss at step {self.global_step}: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
                + "; lower optim.lr or enable trainer.gradient_clip_val"
            )
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True)
        for k, v in losses.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        preds = self.detector(images)
        pairs = [self._in_original_pixels(img, p, t) for img, p, t in zip(images, preds, targets)]
        self.val_map.update([p for p, _ in pairs], [t for _, t in pairs])

    def _in_original_pixels(self, image: Tensor, pred: Dict[str, Tensor], target: Dict[str, Tensor]):
        """Prediction and target for the metric, in the pixels of the image file (the DataModule resized
        it): COCO's small / medium / large areas are defined there. Masks: predicted probabilities
        resized bilinearly then thresholded, targets resized nearest."""
        h, w = image.shape[-2:]
        h0, w0 = (int(v) for v in target.get("orig_size", (h, w)))
        masks_p, masks_t = pred["masks"][:, :1].float(), target["masks"][:, None].float()
        boxes_p, boxes_t = pred["boxes"], target["boxes"]
        if (h0, w0) != (h, w):
            scale = boxes_p.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
            boxes_p, boxes_t = boxes_p * scale, boxes_t * scale
            if len(masks_p):
                masks_p = F.interpolate(masks_p, size=(h0, w0), mode="bilinear", align_corners=False)
            if len(masks_t):
                masks_t = F.interpolate(masks_t, size=(h0, w0), mode="nearest")
        pred_out = {
            "boxes": boxes_p,
            "scores": pred["scores"],
            "labels": pred["labels"],
            "masks": masks_p.reshape(-1, h0, w0) > self.mask_threshold,
        }
        target_out = {"boxes": boxes_t, "labels": target["labels"], "masks": masks_t.reshape(-1, h0, w0) > 0.5}
        if "iscrowd" in target:
            target_out["iscrowd"] = target["iscrowd"]
        return pred_out, target_out

    def on_validation_epoch_end(self) -> None:
        gather_list_states(self.val_map)  # every rank's images (unpadded: ranks may differ by one)
        result = self.val_map.compute()
        self.val_map.reset()
        for iou, short in IOU_TYPES.items():
            for name in LOGGED_MAP:
                value = result[f"{iou}_{name}"]
                # -1: no object of that size in the validation set (COCO's convention), kept as is
                self.log(f"val/{short}_{name}", 100.0 * value if value >= 0 else value, prog_bar=name == "map")

    # --- optimisation (the schedule: ScheduledOptimization) ------------------------------------
    def param_groups(self, weight_decay: float) -> List[dict]:
        """The backbone trunk (its method's new modules included: they are part of the token path) at
        backbone_lr_scale, the pyramid and heads at the full rate; timm's rule for what decays."""
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        skip = sorted(self.trunk.no_weight_decay()) if hasattr(self.trunk, "no_weight_decay") else []
        prefix = next(n for n, m in self.detector.named_modules() if m is self.trunk) + "."
        skip = [prefix + s for s in skip]
        parts: Dict[str, list] = {"backbone": [], "new": []}
        for name, p in self.detector.named_parameters():
            parts["backbone" if id(p) in trunk_ids else "new"].append((name, p))
        return self.tagged_groups(parts, weight_decay, skip)

    def summary_metrics(self, metrics: Mapping[str, float]) -> Dict[str, Any]:
        """summary.json's task fields from the logged metrics."""
        return {f"student_val_{k[4:]}": metrics.get(k) for k in sorted(metrics) if k.startswith("val/")}


# --- building and profiling from the config (run() calls these for task=detection) ------------------
def detection_checkpoint(path) -> Optional[Dict[str, Tensor]]:
    """The detector state dict of a task=detection Lightning checkpoint (``detector.*`` keys), or None for
    any other weights file (backbone weights: build_model loads those)."""
    if not path or not str(path).endswith(".ckpt"):
        return None
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # not a Lightning file (build_model reports what it is)
        return None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(sd, dict) and any(k.startswith("detector.") for k in sd):
        return sd
    return None


def mmdet_checkpoint(path, ema: bool = False) -> Optional[Dict[str, Tensor]]:
    """The state dict of an mmdetection detector file, e.g. the released STViT-R Cascade Mask R-CNN
    (``state_dict`` with ``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``), or None for any other
    file. Read once: build_detection loads its backbone and its heads from it."""
    from src.models.detector import MMDET_PARTS
    from src.models.weights import read_checkpoint

    if not path or str(path).endswith((".ckpt", ".safetensors")):
        return None
    sd = read_checkpoint(path, ema=ema)
    return sd if any(k.startswith(MMDET_PARTS) for k in sd) else None


def _load_mmdet_heads(detector: nn.Module, parts: Mapping[str, Tensor], where: str, num_classes: int) -> None:
    """Load an mmdetection file's neck and heads into `detector` (its trunk is loaded already): every
    tensor outside the trunk must come from the file with its shape, else a WeightsError with the fix."""
    from src.models.cascade import CascadeRoIHeads
    from src.models.weights import WeightsError

    only_backbone = "or task.checkpoint_heads=false to take only its backbone (new heads for your classes)"
    if not any(k.startswith("roi_heads.box_heads.") for k in parts):
        raise WeightsError(
            f"model.checkpoint={where} is an mmdetection detector whose RoI heads are not a Cascade Mask R-CNN's "
            f"(e.g. {next((k for k in parts if k.startswith('roi_head')), '?')}); only the released cascade heads are "
            f"converted: use task.checkpoint_heads=false to take only its backbone"
        )
    if not isinstance(detector.roi_heads, CascadeRoIHeads):
        raise WeightsError(
            f"model.checkpoint={where} is a Cascade Mask R-CNN (mmdetection); set task.head.roi_heads=cascade "
            f"(as experiment=stvit_r_cascade_mask_rcnn_swin_s_3x does), {only_backbone}"
        )
    file_classes = parts["roi_heads.box_heads.0.cls.weight"].shape[0] - 1
    if file_classes != num_classes:
        raise WeightsError(
            f"model.checkpoint={where} is a detector for {file_classes} object classes but the data has "
            f"{num_classes}: evaluate it on data with its classes (COCO: 80), {only_backbone}"
        )
    trunk = next(n for n, m in detector.named_modules() if m is backbone_trunk(detector)) + "."
    own = {k: v for k, v in detector.state_dict().items() if not k.startswith(trunk)}
    missing, unexpected = sorted(set(own) - set(parts)), sorted(set(parts) - set(own))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs detector {tuple(own[k].shape)}"
        for k, v in parts.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"model.checkpoint={where}: its neck and heads do not fit this detector ("
            + "; ".join(
                f"{what} ({len(keys)}): {', '.join(keys[:4])}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                if keys
            )
            + f"); use the released sizes (task.head defaults: FPN 256, box head 1024, mask head 256), {only_backbone}"
        )
    detector.load_state_dict(parts, strict=False)
    logging.getLogger(__name__).info(
        "model.checkpoint=%s: neck, RPN and cascade heads loaded (%d tensors)", where, len(parts)
    )


def build_detection(cfg, num_classes: int, weights: bool = True):
    """(DetectionModule, baseline detector) of `cfg` for a dataset with `num_classes` object classes.
    ``model.checkpoint`` may be a whole detector: a task=detection checkpoint (loads strictly: eval.py
    task=detection model.checkpoint=<run>/checkpoints/last.ckpt) or an mmdetection Cascade Mask R-CNN file
    (the released STViT-R detectors: backbone, neck, RPN and heads converted); with
    ``task.checkpoint_heads=false``, or for a plain backbone file, only the backbone trunk loads."""
    from src.models.detector import build_detector
    from src.trainer.run import plain as _plain

    task = _plain(cfg.task) or {}
    data = cfg.data
    model_cfg = _plain(cfg.model)
    heads = weights and bool(task.get("checkpoint_heads", True))
    whole = detection_checkpoint(model_cfg.get("checkpoint")) if heads else None
    if whole is not None:  # the detector's own weights replace the backbone's initial ones below
        model_cfg = dict(model_cfg, checkpoint=None, pretrained=False)
    mmdet = None
    if heads and whole is None:
        mmdet = mmdet_checkpoint(model_cfg.get("checkpoint"), ema=bool(model_cfg.get("checkpoint_ema")))
    if mmdet is not None:  # its backbone.* part is loaded below, from the same read
        model_cfg = dict(model_cfg, checkpoint=None, pretrained=False)
    detector, baseline = build_detector(
        model_cfg,
        cfg.method.name,
        _plain(cfg.method.get("params")),
        _plain(cfg.get("schedule")),
        num_classes=num_classes,
        head=task.get("head"),
        mean=_plain(data.get("mean")),
        std=_plain(data.get("std")),
        weights=weights,
    )
    if mmdet is not None:
        from src.models.detector import mmdet_head_state_dict
        from src.models.weights import load_weights

        where = str(cfg.model.checkpoint)
        load_weights(backbone_trunk(detector), mmdet, fresh_modules=True, source=where)  # the trunk's filter converts
        _load_mmdet_heads(detector, mmdet_head_state_dict(mmdet), where, num_classes)
    module = DetectionModule(
        detector,
        optim=_plain(cfg.get("optim")),
        batch_size=int(data.batch_size),
        num_classes=num_classes,
        mask_threshold=float(task.get("mask_threshold", 0.5)),
        model=_plain(cfg.model),
        method_config=_plain(cfg.method),
        task=task,
    )
    if whole is not None:
        try:
            module.load_state_dict(whole, strict=True)
        except RuntimeError as err:
            from src.models.weights import WeightsError

            first = str(err).strip().splitlines()
            raise WeightsError(
                f"model.checkpoint={cfg.model.checkpoint} is a detector of another configuration "
                f"({' '.join(first[:2])[:300]}); use the model, method, task.head and data (class count) "
                "it was trained with, or task.checkpoint_heads=false to take only its backbone"
            ) from None
    return module, baseline


class _ImagesAsList(nn.Module):
    """A detector called as the profile calls models: one (B, 3, H, W) tensor."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor):
        return self.detector(list(x))


def profile_detection(module: DetectionModule, baseline: nn.Module, cfg) -> Dict[str, Any]:
    """Counted backbone GMACs at task.input_size (the papers' figure) and side-by-side images/s of the
    whole detector and of its backbone (trunk + pyramid) alone, reduced and unreduced (same pyramid
    and heads, eval mode): at high resolution the heads take a large share of a detector's time."""
    import logging

    from src.models.profile import count_gmacs, count_gmacs_split, count_params, measure_throughput

    log = logging.getLogger("src.trainer.run")
    # task.input_size, else a square of the validation scale (the embedded scenes: 128x128)
    size = tuple(int(s) for s in (cfg.task.get("input_size") or [cfg.data.val_scale] * 2))
    student, teacher = backbone_trunk(module.detector), backbone_trunk(baseline)
    gmacs, side = count_gmacs_split(student, size)
    out: Dict[str, Any] = {
        "student_gmacs": gmacs,
        "student_side_gmacs": side,
        "teacher_gmacs": count_gmacs(teacher, size),
        "student_params": float(count_params(module.detector)),
        "teacher_params": float(count_params(baseline)),
        "gmacs_input_size": list(size),
    }
    log.info(
        "Backbone GMACs at %dx%d: %.4g reduced vs %.4g unreduced (%.1f%% fewer)",
        *size,
        gmacs,
        out["teacher_gmacs"],
        100 * (1 - gmacs / max(out["teacher_gmacs"], 1e-12)),
    )
    pcfg = cfg.get("profile") or {}
    device = str(pcfg.get("device", "auto"))
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    batch = int(pcfg.get("batch_size", 2))
    was = next(module.detector.parameters()).device
    try:
        module.detector.to(device), baseline.to(device)
        tp = measure_throughput(
            {
                "student": _ImagesAsList(module.detector),
                "teacher": _ImagesAsList(baseline),
                "student_backbone": module.detector.backbone,  # trunk + pyramid: what the heads consume
                "teacher_backbone": baseline.backbone,
            },
            batch_size=batch,
            img_size=size,
            device=device,
            precision=str(cfg.trainer.get("precision", "32")),
            warmup=int(pcfg.get("warmup", 2)),
            iters=int(pcfg.get("iters", 3)),
            rounds=int(pcfg.get("rounds", 8)),
        )
    finally:
        module.detector.to(was), baseline.to(was)
    out.update({f"{k}_throughput": v for k, v in tp.items()}, throughput_device=device, throughput_batch=float(batch))
    return out


__all__ = ["DetectionModule", "build_detection", "profile_detection"]
