"""The STViT-R detection backbone: pyramid shapes for several sizes, torchvision Faster R-CNN steps."""

import pytest
import timm
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator

from src.models import ReductionConfigError, apply_reduction
from src.models.detection import ViTDetBackbone


def _vit(method="stvit", **params):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=0,
        dynamic_img_size=True,
    )
    if method == "stvit":
        apply_reduction(vit, "stvit", block=1, pool_size=2, recover=True, **params)
    return vit


@pytest.mark.parametrize("method", ["stvit", "none"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (160, 96)])
def test_pyramid_levels_for_several_image_sizes(method, size):
    bb = ViTDetBackbone(_vit(method), out_channels=16, scale_factors=(2.0, 1.0, 0.5, 0.25)).eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3", "pool"] and bb.strides == [4, 8, 16, 32, 64]
    for name, stride in zip(out, bb.strides):
        assert out[name].shape == (2, 16, -(-size[0] // stride), -(-size[1] // stride)), name


def _detector(backbone):
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        backbone, num_classes=11, min_size=64, max_size=64, rpn_anchor_generator=anchors, box_detections_per_img=10
    )


def test_faster_rcnn_training_step_reaches_recovery_and_pyramid():
    bb = ViTDetBackbone(_vit(), out_channels=16, scale_factors=(2.0, 1.0, 0.5, 0.25))
    model = _detector(bb).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 34.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[20.0, 10.0, 50.0, 44.0], [2.0, 2.0, 18.0, 20.0]]), "labels": torch.tensor([1, 7])},
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    vit = bb.vit
    assert vit.stvit_recover.q.weight.grad.abs().sum() > 0
    assert vit.stvit_centre.weight.grad.abs().sum() > 0
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert bb.levels[0][0].weight.grad.abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        det = model([torch.rand(3, 64, 64)])
    assert set(det[0]) == {"boxes", "labels", "scores"}


def test_backbone_refuses_maps_it_cannot_build():
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=0,
    )
    apply_reduction(vit, "stvit", block=1, pool_size=2)
    with pytest.raises(ReductionConfigError, match="recover=True"):
        ViTDetBackbone(vit)
    bb = ViTDetBackbone(_vit(), out_channels=16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb(torch.randn(1, 3, 60, 64))


def test_new_module_names_resolve():
    bb = ViTDetBackbone(_vit(), out_channels=16)
    assert bb.new_module_names() == ["norm", "levels", "vit.stvit_centre", "vit.stvit_recover"]
    for name in bb.new_module_names():
        assert isinstance(bb.get_submodule(name), torch.nn.Module)


# --- the detection demo (scripts/detection_demo.py) --------------------------------------------------
def _demo_args(*extra):
    from scripts.detection_demo import parse_args

    return parse_args(
        [
            "--init",
            "scratch",
            "--canvas",
            "64",
            "--dim",
            "32",
            "--depth",
            "3",
            "--heads",
            "2",
            "--channels",
            "16",
            "--box-head",
            "32",
            "--batch-size",
            "2",
            "--val",
            "3",
            "--pool-size",
            "2",
            *extra,
        ]
    )


def test_demo_split_has_every_class_on_both_sides_and_no_shared_digit():
    # the first version split the class-sorted digits at index 4000: validation held only 8s and 9s
    from scripts.detection_demo import digit_splits

    train_x, train_y, val_x, val_y = digit_splits()
    assert set(train_y.tolist()) == set(range(10)) == set(val_y.tolist())
    assert len(val_y) == 1000 and len(train_y) == 4000
    train_images = {x.numpy().tobytes() for x in train_x}
    assert not any(x.numpy().tobytes() in train_images for x in val_x)


def test_demo_canvases_have_exact_boxes_and_perfect_predictions_score_map_1():
    import numpy as np
    from torchmetrics.detection import MeanAveragePrecision

    from scripts.detection_demo import digit_splits, make_canvas

    digits, labels = digit_splits()[:2]
    rng = np.random.default_rng(0)
    metric = MeanAveragePrecision(iou_type="bbox")
    seen = set()
    for _ in range(8):
        img, target = make_canvas(digits, labels, rng, 128)
        assert img.shape == (1, 128, 128) and 1 <= len(target["boxes"]) <= 3
        for (x0, y0, x1, y1), label in zip(target["boxes"].long().tolist(), target["labels"].tolist()):
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and 1 <= label <= 10
            ink = img[0, y0:y1, x0:x1] > 0.2
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()  # tight box
            assert 10 <= y1 - y0 <= 40  # digits pasted at 24..40 px: about 4x4 patches of 8
            seen.add(label)
        metric.update([dict(target, scores=torch.ones(len(target["labels"])))], [target])
    assert metric.compute()["map"].item() == pytest.approx(1.0)
    assert len(seen) >= 5


def test_demo_vit_takes_the_digit_teacher_weights_with_resampled_patch_embedding():
    """A quickstart-shaped teacher (patch 7, 28 px, grey, 10-class head) loads into the demo's patch-8
    canvas ViT: blocks copied, 4x4 position grid interpolated, patch kernel resampled so a digit resized
    by 8/7 gives (nearly) the teacher's patch tokens."""
    from scripts.detection_demo import make_vit

    torch.manual_seed(1)
    teacher = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        in_chans=1,
        num_classes=10,
    )
    weights = {k: v for k, v in teacher.state_dict().items() if not k.startswith("head.")}
    vit = make_vit(_demo_args(), weights)
    assert torch.equal(vit.blocks[2].mlp.fc2.weight, teacher.blocks[2].mlp.fc2.weight)
    assert torch.equal(vit.cls_token, teacher.cls_token)
    assert vit.patch_embed.proj.weight.shape == (32, 1, 8, 8) and vit.pos_embed.shape == (1, 1 + 8 * 8, 32)
    from scripts.detection_demo import digit_splits

    digit = digit_splits()[0][:4]
    with torch.no_grad():
        ref = teacher.patch_embed.proj(digit)
        got = vit.patch_embed.proj(
            torch.nn.functional.interpolate(digit, size=(32, 32), mode="bilinear", align_corners=False)
        )
    assert got.shape == ref.shape == (4, 32, 4, 4)
    assert torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.9


def test_demo_pyramid_strides_are_the_roi_pooler_scales():
    # torchvision rounds each level's scale to a power of two: a patch-7 grid would be pooled at 1/8
    from scripts.detection_demo import build, parse_args

    model = build("none", _demo_args(), None).eval()
    with torch.no_grad():
        model([torch.rand(1, 64, 64)])
    assert model.roi_heads.box_roi_pool.scales == [1 / s for s in model.backbone.strides[:4]]
    with pytest.raises(SystemExit):
        parse_args(["--patch", "7", "--canvas", "112"])


def test_demo_one_training_step_and_evaluation():
    import numpy as np

    from scripts.detection_demo import digit_splits, make_canvas, train_and_eval

    args = _demo_args("--steps", "1")
    train_x, train_y, val_x, val_y = digit_splits()
    rng = np.random.default_rng(0)
    val_set = [make_canvas(val_x, val_y, rng, 64, scale=(16, 24)) for _ in range(3)]
    out = {m: train_and_eval(m, args, None, (train_x, train_y), val_set) for m in ("stvit", "none")}
    for r in out.values():
        assert 0.0 <= r["map"] <= 1.0 and 0.0 <= r["map_50"] <= 1.0
        assert all(np.isfinite(v) for curve in r["curves"].values() for v in curve)
        assert set(r["curves"]) == {"loss", "loss_box_reg", "loss_classifier", "loss_objectness", "loss_rpn_box_reg"}
    # STViT-R runs its later blocks on 4 semantic tokens: fewer ViT MACs than the unreduced ViT, same pyramid
    assert out["stvit"]["vit_gmacs"] < out["none"]["vit_gmacs"]
    assert out["stvit"]["backbone_gmacs"] - out["stvit"]["vit_gmacs"] == pytest.approx(
        out["none"]["backbone_gmacs"] - out["none"]["vit_gmacs"], rel=1e-3
    )


def test_demo_teacher_is_the_quickstart_teacher_at_its_own_epochs(tmp_path):
    """At the quickstart's epochs the demo reuses `python train.py`'s cached teacher (same cache key);
    fewer epochs are a separate cached teacher. Nothing is trained here."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from scripts.detection_demo import ROOT, parse_args, quickstart_config
    from src.trainer.run import teacher_cache_path

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        plain = compose("train", overrides=[f"paths.cache_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig().set_config(plain)
    with open_dict(plain):
        del plain.hydra
    epochs = int(plain.model.bootstrap.epochs)
    same = quickstart_config(parse_args(["--cache-dir", str(tmp_path), "--teacher-epochs", str(epochs)]))
    short = quickstart_config(parse_args(["--cache-dir", str(tmp_path), "--teacher-epochs", "4"]))
    assert teacher_cache_path(same) == teacher_cache_path(plain)
    assert teacher_cache_path(short) != teacher_cache_path(plain)
    assert short.model.bootstrap.epochs == 4 and short.model.bootstrap.warmup_epochs <= 1
    assert not any(tmp_path.iterdir())
