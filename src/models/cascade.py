"""Cascade Mask R-CNN RoI heads for torchvision's ``MaskRCNN``: mmdetection v2's ``CascadeRoIHead`` as the
Swin / STViT-R configs build it (``cascade_mask_rcnn_swin_fpn.py`` + the ``..._giou_4conv1f_adamw_3x_coco.py``
overrides, mmdet 2.11):

    detector.roi_heads = cascade_roi_heads(num_classes=80)  # object classes; label 0 is the background

Three stages (IoU 0.5 / 0.6 / 0.7, loss weights 1 / 0.5 / 0.25), each a 4conv-1fc box head with GIoU loss on
decoded boxes and an FCN mask head; the RoIs of a stage are the previous stage's sampled RoIs moved by its
regression. Test: all proposals go through the three box heads, the class score is the softmax of the stages'
mean logits (mmdet 2.11's simple_test; not the mean of their softmax), the boxes come from the last stage, and
the mask is the mean of the three mask heads' probabilities. The box regression is per class, as the 3x configs
set (reg_class_agnostic=False; ``class_agnostic=True`` gives the base config's 4 outputs).

Labels follow torchvision (0 = background, 1..C objects); mmdet puts the background last (index C) and its
regression and mask layers have C class slots, no background slot: here class c uses slot c - 1.

Not matched exactly:
- the box head's norm is ``nn.BatchNorm2d`` (the config: SyncBN); under DDP set ``trainer.sync_batchnorm=true``
  (Lightning converts it; conf/trainer/ddp.yaml leaves it off for ViTs);
- mask targets clip the RoIs to the unpadded mask (mmdet: to the padded image; both are zero outside);
- mmdet's GIoU floors union and enclosing area at eps (1e-6), torchvision adds eps: a difference at ~1e-6;
- sampling is random (as mmdet's), so runs agree in distribution, not RoI for RoI;
- RoI features come from this module's pooler (mmdet's level rule and aligned RoIAlign), not from the
  ``MultiScaleRoIAlign(..., sampling_ratio=2)`` that build_detector gives torchvision's heads;
- weight init follows mmdet's ``init_weights`` (kaiming fan_out convs, xavier fc, N(0, .01) / N(0, .001) cls / reg).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss, roi_align

Tensor = torch.Tensor

STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_WEIGHTS = (1.0, 0.5, 0.25)
WH_CLIP = math.log(1000.0 / 16)  # mmdet's wh_ratio_clip=16/1000 -> |log| = torchvision's default bbox_xform_clip


def stage_coder(stds: Sequence[float]) -> BoxCoder:
    """mmdet's DeltaXYWH coder (means 0): it multiplies the deltas by `stds`, torchvision divides by its weights."""
    return BoxCoder(tuple(1.0 / s for s in stds), bbox_xform_clip=WH_CLIP)


def decode(coder: BoxCoder, deltas: Tensor, rois: Tensor) -> Tensor:
    """(N, 4k) deltas applied to (N, 4) rois -> (N, k, 4) boxes, as mmdet's delta2bbox without image clipping."""
    d = deltas.reshape(len(rois), deltas.shape[-1] // 4, 4)
    # mmdet clamps dw, dh to [-WH_CLIP, WH_CLIP], torchvision only from above: add the lower bound
    low = -WH_CLIP * d.new_tensor(coder.weights[2:])
    d = torch.cat([d[..., :2], torch.maximum(d[..., 2:], low)], -1)
    return coder.decode_single(d.flatten(1), rois).reshape(d.shape)


def _conv(cin: int, cout: int, norm: bool) -> List[nn.Module]:
    # mmcv ConvModule: conv (no bias before a norm) -> norm -> ReLU
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm), *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU()]


class ConvFCBoxHead(nn.Module):
    """mmdet ``ConvFCBBoxHead(num_shared_convs=4, num_shared_fcs=1)``: 4 x conv3x3 on the 7x7 RoI features,
    flatten, fc + ReLU, then the classifier (background at index 0) and the box deltas (4 or 4 x classes)."""

    def __init__(self, channels: int, dim: int, num_classes: int, class_agnostic: bool, norm: bool, size: int = 7):
        super().__init__()
        self.convs = nn.Sequential(*(m for _ in range(4) for m in _conv(channels, channels, norm)))
        self.fc = nn.Linear(channels * size * size, dim)
        self.cls = nn.Linear(dim, num_classes + 1)
        self.reg = nn.Linear(dim, 4 if class_agnostic else 4 * num_classes)
        for m in self.convs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        for layer, std in ((self.cls, 0.01), (self.reg, 0.001)):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu(self.fc(self.convs(x).flatten(1)))
        return self.cls(x), self.reg(x)


def fcn_mask_head(channels: int, dim: int, num_classes: int) -> nn.Sequential:
    """mmdet ``FCNMaskHead``: 4 x (conv3x3 + ReLU), 2x deconv + ReLU, 1x1 to one mask logit per object class."""
    head = nn.Sequential(*(m for i in range(4) for m in _conv(channels if i == 0 else dim, dim, False)))
    head.extend([nn.ConvTranspose2d(dim, dim, 2, 2), nn.ReLU(), nn.Conv2d(dim, num_classes, 1)])
    for m in head:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return head


class CascadeRoIHeads(nn.Module):
    """Drop-in for torchvision's ``RoIHeads`` of a ``MaskRCNN`` (same forward and outputs); see the module doc."""

    def __init__(
        self,
        box_heads: Sequence[nn.Module],
        mask_heads: Sequence[nn.Module],
        num_classes: int,
        class_agnostic: bool = False,
        stage_stds: Sequence[Sequence[float]] = STAGE_STDS,
        stage_ious: Sequence[float] = STAGE_IOUS,
        stage_weights: Sequence[float] = STAGE_WEIGHTS,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        giou_weight: float = 10.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        featmap_names: Sequence[str] = ("0", "1", "2", "3"),
        strides: Sequence[int] = (4, 8, 16, 32),
    ):
        super().__init__()
        self.box_heads, self.mask_heads = nn.ModuleList(box_heads), nn.ModuleList(mask_heads)
        self.num_classes, self.class_agnostic = num_classes, class_agnostic
        self.coders = [stage_coder(s) for s in stage_stds]
        # MaxIoUAssigner with pos = neg = min_pos thresholds and no low-quality matches: IoU >= thr is positive,
        # every other proposal background (torchvision's Matcher with low == high, nothing "between")
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in stage_ious]
        # RandomSampler: up to 25% positives of 512, negatives fill the rest (neg_pos_ub=-1)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.stage_weights, self.giou_weight = list(stage_weights), giou_weight
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.featmap_names, self.strides = list(featmap_names), list(strides)

    def pool(self, features: Dict[str, Tensor], boxes: List[Tensor], size: int) -> Tensor:
        """mmdet's SingleRoIExtractor: level floor(log2(sqrt(area) / 56)) of strides 4-32, RoIAlign with
        aligned=True and adaptive sampling (sampling_ratio=0), as mmcv's RoIAlign defaults."""
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
        feats = [features[k] for k in self.featmap_names]
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        level = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, len(feats) - 1)
        out = feats[0].new_zeros(len(rois), feats[0].shape[1], size, size)
        for i, (f, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(level == i)[0]
            out[idx] = roi_align(f, rois[idx], size, 1.0 / stride, 0, True).to(out.dtype)
        return out

    def select(self, reg: Tensor, fg: Tensor) -> Tensor:
        """The (N, 4) deltas of 0-based object class `fg` (mmdet's regress_by_class)."""
        return reg if self.class_agnostic else reg.view(len(reg), -1, 4)[torch.arange(len(reg), device=fg.device), fg]

    def sample(self, stage: int, proposals: List[Tensor], targets: List[Dict[str, Tensor]]):
        """Per image (rois, labels, matched gt, is-gt): positives first (ascending), then negatives, as mmdet."""
        out = []
        for p, t in zip(proposals, targets):
            gt = t["boxes"].to(p.dtype)
            boxes = torch.cat([gt, p])  # add_gt_as_proposals: mmdet puts the gt boxes in front
            idx = torch.full((len(boxes),), -1, dtype=torch.long, device=p.device)
            labels = torch.zeros_like(idx)  # no object: every proposal is background
            if len(gt):
                idx = self.matchers[stage](box_iou(gt, boxes))
                idx[: len(gt)] = torch.arange(len(gt), device=p.device)  # add_gt_: each gt box is its own match
                labels = torch.where(idx >= 0, t["labels"][idx.clamp(min=0)], 0)
            pos, neg = self.sampler([labels])
            keep = torch.cat([torch.where(pos[0])[0], torch.where(neg[0])[0]])
            out.append((boxes[keep], labels[keep], idx[keep].clamp(min=0), keep < len(gt)))
        return out

    def mask_loss(self, logits: Tensor, boxes, labels, matched, targets) -> Tensor:
        """mmdet's mask_target + mask_cross_entropy: binary CE (mean) of the label's mask against the gt mask
        cropped by RoIAlign (aligned, adaptive) from the RoI clipped to the mask, binarised at 0.5."""
        gts, cls = [], []
        for b, lab, idx, t in zip(boxes, labels, matched, targets):
            if len(b):
                m = t["masks"]
                rois = torch.cat([idx[:, None].to(b), clip_boxes_to_image(b, m.shape[-2:])], 1)
                gts.append(roi_align(m[:, None].to(b), rois, logits.shape[-1], 1.0, 0, True)[:, 0] >= 0.5)
                cls.append(lab - 1)
        if not gts:
            return logits.sum() * 0
        cls = torch.cat(cls)
        picked = logits[torch.arange(len(cls), device=cls.device), cls]
        return F.binary_cross_entropy_with_logits(picked, torch.cat(gts).to(picked))

    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads needs targets in training")
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def losses(self, features, proposals, image_shapes, targets) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        last = len(self.box_heads) - 1
        for s, (head, w) in enumerate(zip(self.box_heads, self.stage_weights)):
            rois, labels, matched, is_gt = zip(*self.sample(s, proposals, targets))
            cls, reg = (t.float() for t in head(self.pool(features, list(rois), 7)))  # mmdet: losses in fp32
            all_rois, all_labels = torch.cat(rois), torch.cat(labels)
            pos = all_labels > 0
            gt = torch.cat([t["boxes"][i[lab > 0]] for t, i, lab in zip(targets, matched, labels)]).to(reg)
            pred = decode(self.coders[s], self.select(reg[pos], all_labels[pos] - 1), all_rois[pos].float())[:, 0]
            # CE averaged over all sampled RoIs; GIoU summed over positives and divided by all sampled RoIs
            # (mmdet's avg_factor = bbox_targets.size(0)); each term times the stage weight
            losses[f"loss_classifier_s{s}"] = w * F.cross_entropy(cls, all_labels)
            giou = generalized_box_iou_loss(pred, gt, reduction="sum", eps=1e-6)
            losses[f"loss_box_reg_s{s}"] = w * self.giou_weight * giou / max(len(all_labels), 1)
            pos_boxes = [r[lab > 0] for r, lab in zip(rois, labels)]
            pos_labels = [lab[lab > 0] for lab in labels]
            pos_matched = [i[lab > 0] for i, lab in zip(matched, labels)]
            logits = self.mask_heads[s](self.pool(features, pos_boxes, 14))
            losses[f"loss_mask_s{s}"] = w * self.mask_loss(logits, pos_boxes, pos_labels, pos_matched, targets)
            if s < last:  # refine_bboxes: the sampled RoIs moved by this stage, the added gt boxes dropped
                with torch.no_grad():
                    # positives by their gt class, background RoIs by their best object class
                    fg = torch.where(pos, all_labels - 1, cls[:, 1:].argmax(1))
                    moved = decode(self.coders[s], self.select(reg, fg), all_rois)[:, 0]
                    moved = moved.split([len(r) for r in rois])
                    proposals = [clip_boxes_to_image(b, sh)[~g] for b, sh, g in zip(moved, image_shapes, is_gt)]
        return losses

    def detect(self, features, proposals, image_shapes) -> List[Dict[str, Tensor]]:
        counts, boxes, logits = [len(p) for p in proposals], list(proposals), 0
        for s, head in enumerate(self.box_heads):
            rois = torch.cat(boxes)
            cls, reg = (t.float() for t in head(self.pool(features, boxes, 7)))  # mmdet: boxes in fp32
            logits = logits + cls
            if s < len(self.box_heads) - 1:  # moved by this stage's regression of its best object class
                moved = decode(self.coders[s], self.select(reg, cls[:, 1:].argmax(1)), rois)[:, 0].split(counts)
                boxes = [clip_boxes_to_image(b, sh) for b, sh in zip(moved, image_shapes)]
        # mmdet averages the stages' logits and applies one softmax (BBoxHead.get_bboxes on the mean cls_score)
        scores = F.softmax(logits / len(self.box_heads), -1)[:, 1:]
        pred = decode(self.coders[-1], reg, rois).expand(-1, self.num_classes, 4)
        results = []
        for b, sc, shape in zip(pred.split(counts), scores.split(counts), image_shapes):
            # multiclass_nms: score > thr per class, per-class NMS, best `detections_per_img` (no size filter)
            lab = torch.arange(1, self.num_classes + 1, device=sc.device).expand_as(sc)
            keep = sc > self.score_thresh
            b, sc, lab = clip_boxes_to_image(b, shape)[keep], sc[keep], lab[keep]
            k = batched_nms(b, sc, lab, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[k], "labels": lab[k], "scores": sc[k]})
        # merge_aug_masks: the mean of the stages' mask probabilities on the final boxes, for the predicted class
        x = self.pool(features, [r["boxes"] for r in results], 14)
        probs = torch.stack([head(x).float().sigmoid() for head in self.mask_heads]).mean(0)
        labels = torch.cat([r["labels"] for r in results]) - 1
        probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
        for r, p in zip(results, probs.split([len(r["labels"]) for r in results])):
            r["masks"] = p
        return results


def cascade_roi_heads(
    num_classes: int,
    channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    box_batch_size_per_image: int = 512,
    detections_per_image: int = 100,
    conv_norm: bool = True,
    class_agnostic: bool = False,
    **kwargs,
) -> CascadeRoIHeads:
    """The Swin / STViT-R 3x config's heads for `num_classes` object classes over `channels`-wide FPN maps;
    `kwargs` go to :class:`CascadeRoIHeads`. The config regresses per class (reg_class_agnostic=False)."""
    n = len(kwargs.get("stage_stds", STAGE_STDS))
    boxes = [ConvFCBoxHead(channels, box_head_dim, num_classes, class_agnostic, conv_norm) for _ in range(n)]
    masks = [fcn_mask_head(channels, mask_head_dim, num_classes) for _ in range(n)]
    return CascadeRoIHeads(
        boxes,
        masks,
        num_classes,
        class_agnostic=class_agnostic,
        batch_size_per_image=box_batch_size_per_image,
        detections_per_img=detections_per_image,
        **kwargs,
    )


__all__ = ["CascadeRoIHeads", "ConvFCBoxHead", "cascade_roi_heads", "decode", "fcn_mask_head", "stage_coder"]
