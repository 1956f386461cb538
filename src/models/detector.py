"""Mask R-CNN (torchvision) over a backbone of this project: the detector of ``task=detection``.

    detector, baseline = build_detector(model_cfg, "tome", {"r": 8}, None, num_classes=80, head=task_cfg)

Two kinds of backbone, chosen by what timm builds for ``model_cfg.name``:

- a timm ``VisionTransformer`` (DeiT, AugReg, ...) with any token-reduction method: built as every
  entry point builds it (``build_model``: method applied, weights loaded), with ``dynamic_img_size``
  so it runs at the detector's input sizes; the method restores the full spatial map of the last
  block (its declared dense-map capability) and ViTDet's simple feature pyramid
  (:class:`~src.models.detection.ViTDetBackbone`) makes the levels;
- any timm model with ``features_only`` (STViT-R Swin ``stvit_swin_t|s|b``, plain Swin, ConvNets):
  its four maps at strides 4-32 feed torchvision's FPN (plus a max-pooled fifth level), as the Swin
  and STViT-R Mask R-CNN configs do. Such a backbone is reduced by its architecture, so method=none.

torchvision's ``MaskRCNN`` supplies the RPN, RoI heads and losses; its transform normalises and pads
but does not resize (the DataModule has resized each image: the multi-scale recipe lives there, and a
second resize inside the model would undo it).

`baseline` is the same detector with the unreduced backbone: the ViT without its method (same
weights), or for a ``features_only`` model its declared ``baseline`` (timm's Swin for STViT-R Swin),
sharing the pyramid and heads, so that the profile compares backbones and nothing else.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import BackboneError, _timm_kwargs, build_model, is_patchable
from .cascade import cascade_roi_heads
from .detection import ViTDetBackbone
from .reduction.base import unreduced_copy

Tensor = torch.Tensor

# Mask R-CNN's head sizes (torchvision's and the Swin / STViT-R configs' values); the embedded scenes
# use smaller ones (conf/task/detection.yaml)
HEAD_DEFAULTS: Dict[str, Any] = {
    "roi_heads": "standard",  # or "cascade": Cascade Mask R-CNN's three stages (src/models/cascade.py)
    "fpn_channels": 256,
    "box_head_dim": 1024,
    "mask_head_dim": 256,
    "box_batch_size_per_image": 512,
    "rpn_batch_size_per_image": 256,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "detections_per_image": 100,
    "anchor_sizes": [32, 64, 128, 256, 512],
}


class FeaturePyramid(nn.Module):
    """A timm ``features_only`` trunk (NCHW or NHWC maps) + torchvision's FPN with a max-pooled fifth
    level: the ``{"0".."3", "pool"}`` dict and ``out_channels`` torchvision's detectors expect."""

    def __init__(self, body: nn.Module, out_channels: int, fpn: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        self.fpn = fpn or FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        maps = self.body(images)
        if self.channels_last:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class _NoResize(GeneralizedRCNNTransform):
    """Normalise and pad to a multiple of 32; the DataModule has already resized every image."""

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None):
        return image, target


def _probe(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The bare timm model of `model_cfg`, to see what kind it is: on the meta device (no memory, no
    weights) where its constructor allows, else on the CPU."""
    kwargs = _timm_kwargs(model_cfg)
    try:
        with torch.device("meta"):
            return timm.create_model(model_cfg["name"], pretrained=False, **kwargs)
    except (RuntimeError, NotImplementedError):  # a constructor that computes with its tensors
        pass
    try:
        return timm.create_model(model_cfg["name"], pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise BackboneError(f"timm cannot build model '{model_cfg['name']}' with {kwargs}: {err}") from None


def _features_cfg(model_cfg: Mapping[str, Any], name: Optional[str] = None) -> Dict[str, Any]:
    """`model_cfg` for timm's features_only trunk: four maps, any input size, no classifier."""
    cfg = dict(model_cfg)
    if name is not None:  # the baseline: timm's own model with its own defaults
        cfg.update(name=name, checkpoint=None, pretrained=False, kwargs=None)
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs.update(features_only=True, out_indices=(0, 1, 2, 3))
    if name is not None:
        kwargs["dynamic_img_size"] = True  # timm's Swin at any input size (a model config sets it for its own)
    cfg["kwargs"] = kwargs
    cfg.pop("img_size", None)
    return cfg


def build_backbones(
    model_cfg: Mapping[str, Any],
    method: str,
    params: Optional[Mapping[str, Any]],
    schedule: Optional[Mapping[str, Any]],
    out_channels: int,
    weights: bool = True,
) -> Tuple[nn.Module, nn.Module]:
    """(backbone, unreduced baseline sharing its pyramid), see the module doc."""
    if is_patchable(_probe(model_cfg)):
        cfg = dict(model_cfg, kwargs={**dict(model_cfg.get("kwargs") or {}), "dynamic_img_size": True})
        vit, _ = build_model(cfg, method, params, schedule, weights=weights)
        backbone = ViTDetBackbone(vit, out_channels)
        plain = ViTDetBackbone(unreduced_copy(vit), out_channels)
        plain.norm, plain.levels = backbone.norm, backbone.levels  # shared: only the token path differs
        return backbone, plain
    # apply_method refuses any method but none on a model that is not a timm ViT
    body, _ = build_model(_features_cfg(model_cfg), method, params, weights=weights)
    backbone = FeaturePyramid(body, out_channels)
    name = model_cfg.get("baseline") or model_cfg["name"]
    base_body, _ = build_model(_features_cfg(model_cfg, name=name), "none", weights=False)
    return backbone, FeaturePyramid(base_body, out_channels, fpn=backbone.fpn)


def build_detector(
    model_cfg: Mapping[str, Any],
    method: str,
    params: Optional[Mapping[str, Any]],
    schedule: Optional[Mapping[str, Any]],
    num_classes: int,
    head: Optional[Mapping[str, Any]] = None,
    mean: Optional[List[float]] = None,
    std: Optional[List[float]] = None,
    weights: bool = True,
) -> Tuple[MaskRCNN, MaskRCNN]:
    """(detector, baseline detector): Mask R-CNN (or Cascade Mask R-CNN: ``head.roi_heads="cascade"``) for
    `num_classes` object classes (background added) over the backbone of `model_cfg` + `method`; `head`
    overrides :data:`HEAD_DEFAULTS`."""
    h = {**HEAD_DEFAULTS, **{k: v for k, v in dict(head or {}).items() if k in HEAD_DEFAULTS}}
    channels = int(h["fpn_channels"])
    backbone, baseline_backbone = build_backbones(model_cfg, method, params, schedule, channels, weights=weights)
    sizes = tuple((int(s),) for s in h["anchor_sizes"])
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    detector = MaskRCNN(
        backbone,
        num_classes=int(num_classes) + 1,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head=TwoMLPHead(channels * 7 * 7, int(h["box_head_dim"])),
        mask_head=MaskRCNNHeads(channels, [int(h["mask_head_dim"])] * 4, 1),
        box_batch_size_per_image=int(h["box_batch_size_per_image"]),
        rpn_batch_size_per_image=int(h["rpn_batch_size_per_image"]),
        **{k: int(h[k]) for k in h if k.startswith("rpn_") and "nms_top_n" in k},
        box_detections_per_img=int(h["detections_per_image"]),
    )
    # torchvision sizes its default predictors for its default heads (1024, 256): ours fit the heads above
    detector.roi_heads.box_predictor = FastRCNNPredictor(int(h["box_head_dim"]), int(num_classes) + 1)
    dim = int(h["mask_head_dim"])
    detector.roi_heads.mask_predictor = MaskRCNNPredictor(dim, dim, int(num_classes) + 1)
    if h["roi_heads"] == "cascade":  # the released STViT-R / Swin detectors' heads (torchvision has none)
        detector.roi_heads = cascade_roi_heads(
            int(num_classes),
            channels,
            box_head_dim=int(h["box_head_dim"]),
            mask_head_dim=dim,
            box_batch_size_per_image=int(h["box_batch_size_per_image"]),
            detections_per_image=int(h["detections_per_image"]),
        )
    elif h["roi_heads"] != "standard":
        raise ValueError(f"task.head.roi_heads={h['roi_heads']!r}: choose standard (Mask R-CNN) or cascade")
    detector.transform = _NoResize(1, 1, list(mean or (0.485, 0.456, 0.406)), list(std or (0.229, 0.224, 0.225)))
    baseline = copy.copy(detector)  # same heads and transform, another backbone
    baseline._modules = OrderedDict(detector._modules, backbone=baseline_backbone)
    return detector, baseline


# mmdetection v2 names of the parts around the backbone in the released Cascade Mask R-CNN files
# (neck = FPN, rpn_head, roi_head) -> this detector's; the backbone.* keys are the trunk's, converted by
# its model's checkpoint_filter_fn through load_weights. ConvModule(conv, bn) pairs sit at 3i / 3i+1 of a
# box head's convs (conv, bn, relu), a mask head's convs at 2i (conv, relu), its deconv and logits at 8, 10.
_MMDET_RENAMES = [
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), lambda m: f"backbone.fpn.inner_blocks.{m[1]}.0."),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\."), lambda m: f"backbone.fpn.layer_blocks.{m[1]}.0."),
    (re.compile(r"^rpn_head\.rpn_conv\."), lambda m: "rpn.head.conv.0.0."),
    (re.compile(r"^rpn_head\.rpn_cls\."), lambda m: "rpn.head.cls_logits."),
    (re.compile(r"^rpn_head\.rpn_reg\."), lambda m: "rpn.head.bbox_pred."),
    (
        re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_convs\.(\d+)\.(conv|bn)\."),
        lambda m: f"roi_heads.box_heads.{m[1]}.convs.{3 * int(m[2]) + (m[3] == 'bn')}.",
    ),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.shared_fcs\.0\."), lambda m: f"roi_heads.box_heads.{m[1]}.fc."),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.fc_cls\."), lambda m: f"roi_heads.box_heads.{m[1]}.cls."),
    (re.compile(r"^roi_head\.bbox_head\.(\d+)\.fc_reg\."), lambda m: f"roi_heads.box_heads.{m[1]}.reg."),
    (
        re.compile(r"^roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\."),
        lambda m: f"roi_heads.mask_heads.{m[1]}.{2 * int(m[2])}.",
    ),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.upsample\."), lambda m: f"roi_heads.mask_heads.{m[1]}.8."),
    (re.compile(r"^roi_head\.mask_head\.(\d+)\.conv_logits\."), lambda m: f"roi_heads.mask_heads.{m[1]}.10."),
]
MMDET_PARTS = ("neck.", "rpn_head.", "roi_head.")


def mmdet_head_state_dict(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The neck, RPN and cascade RoI-head tensors of an mmdetection v2 Cascade Mask R-CNN state dict under
    this detector's names (see _MMDET_RENAMES). The classifier's background row moves from mmdet's last
    index to torchvision's 0; box regression and masks have no background slot in either. Keys outside
    the backbone that match no rule are kept as they are (the caller reports them as unexpected)."""
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(MMDET_PARTS):
            continue
        for pattern, name in _MMDET_RENAMES:
            m = pattern.match(key)
            if m:
                key = name(m) + key[m.end() :]
                break
        if re.match(r"^roi_heads\.box_heads\.\d+\.cls\.", key):
            value = torch.cat([value[-1:], value[:-1]])
        out[key] = value
    return out


def backbone_trunk(detector: MaskRCNN) -> nn.Module:
    """The part whose GMACs the papers report: the ViT (reduced or not) or the features_only trunk."""
    bb = detector.backbone
    return bb.vit if isinstance(bb, ViTDetBackbone) else bb.body


__all__ = [
    "FeaturePyramid",
    "HEAD_DEFAULTS",
    "MMDET_PARTS",
    "backbone_trunk",
    "build_backbones",
    "build_detector",
    "mmdet_head_state_dict",
]
