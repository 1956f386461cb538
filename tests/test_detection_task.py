"""task=detection: Mask R-CNN over a reduced ViT or the STViT-R Swin backbone, built from the config,
trained and evaluated through train.py (COCO box and mask mAP, backbone GMACs, side-by-side timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import src  # noqa: F401
from src.models.detector import backbone_trunk, build_detector
from src.models.profile import count_gmacs
from src.models.reduction import ReductionConfigError
from src.trainer.config_check import ConfigValueError, check_values
from src.trainer.detection import DetectionModule
from tests.test_train_e2e import train  # train.py as a subprocess, offline

ROOT = Path(__file__).resolve().parents[1]
SMALL_VIT = dict(
    name="vit_tiny_patch16_224",
    pretrained=False,
    num_classes=10,
    img_size=64,
    in_chans=3,
    drop_path_rate=0.0,
    kwargs=dict(patch_size=8, embed_dim=48, depth=4, num_heads=3),
)
SMALL_HEAD = dict(fpn_channels=32, box_head_dim=64, mask_head_dim=16, box_batch_size_per_image=32)


def _targets(sizes):
    out = []
    for i, (h, w) in enumerate(sizes):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 8:30, 10:40] = 1
        out.append({"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1 + i]), "masks": masks})
    return out


def _compose(*overrides):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# --- the detector --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("none", {}), ("tome", {"r": 8}), ("evit", {"keep_rate": 0.5})])
def test_vit_detector_trains_and_detects(method, params):
    torch.manual_seed(0)
    det, base = build_detector(SMALL_VIT, method, params, None, num_classes=3, head=SMALL_HEAD)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]  # any multiple of the patch size
    det.train()
    losses = det(images, _targets([(64, 64), (48, 64)]))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trunk = backbone_trunk(det)
    assert trunk.patch_embed.proj.weight.grad is not None  # the loss reaches the ViT through the dense map
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[1]["masks"].shape[-2:] == (48, 64)
    # the baseline: same pyramid and heads (shared objects), the unreduced ViT with the same weights
    assert base.roi_heads is det.roi_heads and base.rpn is det.rpn
    assert base.backbone.levels is det.backbone.levels
    plain = backbone_trunk(base)
    assert getattr(plain, "reduction", None) is None or plain.reduction.name == "none"
    assert torch.equal(plain.patch_embed.proj.weight, trunk.patch_embed.proj.weight)
    ours, ref = count_gmacs(trunk, (64, 64)), count_gmacs(plain, (64, 64))
    assert (ours < ref) if method != "none" else (ours == ref), (ours, ref)


def test_cascade_heads_replace_torchvision_roi_heads_in_both_detectors():
    from src.models.cascade import CascadeRoIHeads

    torch.manual_seed(0)
    head = {**SMALL_HEAD, "roi_heads": "cascade"}
    det, base = build_detector(SMALL_VIT, "tome", {"r": 8}, None, num_classes=3, head=head)
    assert isinstance(det.roi_heads, CascadeRoIHeads) and base.roi_heads is det.roi_heads
    assert (
        len(det.roi_heads.box_heads) == 3 and det.roi_heads.box_heads[0].fc.out_features == SMALL_HEAD["box_head_dim"]
    )
    det.train()
    losses = det([torch.rand(3, 64, 64)], _targets([(64, 64)]))
    stages = {f"loss_{k}_s{s}" for k in ("classifier", "box_reg", "mask") for s in range(3)}
    assert set(losses) == stages | {"loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_swin_detector_against_its_swin_baseline():
    cfg = _compose("task=detection", "model=stvit_swin_t", "method=none", "data=scenes")
    torch.manual_seed(0)
    from src.trainer.run import plain

    det, base = build_detector(plain(cfg.model), "none", None, None, num_classes=10, head=SMALL_HEAD)
    assert type(backbone_trunk(det)).__name__ == "STViTRSwinDet"
    assert type(backbone_trunk(base)).__name__ == "FeatureListNet"  # timm's Swin-T, features_only
    assert base.backbone.fpn is det.backbone.fpn
    ours, ref = count_gmacs(backbone_trunk(det), (224, 320)), count_gmacs(backbone_trunk(base), (224, 320))
    assert (round(ours, 3), round(ref, 3)) == (5.408, 6.642)  # the counts of tests/test_stvit_swin_det.py
    det.eval(), base.eval()
    with torch.no_grad():
        for model in (det, base):
            out = model([torch.rand(3, 96, 128)])
            assert out[0]["boxes"].shape[-1] == 4


def test_a_method_on_a_features_only_backbone_is_refused():
    cfg = _compose("task=detection", "model=stvit_swin_t", "method=tome", "data=scenes")
    from src.trainer.run import plain

    with pytest.raises(ReductionConfigError, match="method=none"):
        build_detector(plain(cfg.model), "tome", {}, None, num_classes=10)


def test_param_groups_split_trunk_and_heads():
    det, _ = build_detector(SMALL_VIT, "tome", {"r": 4}, None, num_classes=2, head=SMALL_HEAD)
    module = DetectionModule(det, optim={"backbone_lr_scale": 0.1}, num_classes=2)
    assert {k.split(".")[0] for k in module.state_dict()} == {"detector"}  # each weight saved once
    groups = module.param_groups(0.05)
    ids = {part: {id(p) for g in groups if g["group"] == part for p in g["params"]} for part in ("backbone", "new")}
    assert ids["backbone"] == {id(p) for p in backbone_trunk(det).parameters()}
    assert ids["backbone"] | ids["new"] == {id(p) for p in det.parameters()}
    assert {g["lr_scale"] for g in groups if g["group"] == "backbone"} == {0.1}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(backbone_trunk(det).pos_embed) in no_decay and id(det.roi_heads.box_head.fc6.bias) in no_decay


def test_validation_scores_in_the_files_pixels_and_perfect_predictions_score_100():
    det, _ = build_detector(SMALL_VIT, "none", {}, None, num_classes=3, head=SMALL_HEAD)
    module = DetectionModule(det, num_classes=3)
    image = torch.rand(3, 64, 96)  # resized by the DataModule from a 32x48 file
    masks = torch.zeros(2, 64, 96, dtype=torch.uint8)
    masks[0, 4:20, 8:40], masks[1, 30:60, 50:90] = 1, 1
    target = {
        "boxes": torch.tensor([[8.0, 4.0, 40.0, 20.0], [50.0, 30.0, 90.0, 60.0]]),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
        "orig_size": [32, 48],
    }
    perfect = {
        "boxes": target["boxes"].clone(),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": target["labels"].clone(),
        "masks": masks[:, None].float(),
    }
    pred, tgt = module._in_original_pixels(image, perfect, target)
    assert torch.allclose(tgt["boxes"], torch.tensor([[4.0, 2.0, 20.0, 10.0], [25.0, 15.0, 45.0, 30.0]]))
    assert tgt["masks"].shape == pred["masks"].shape == (2, 32, 48)
    assert tgt["masks"].sum() == (16 * 32 + 30 * 40) // 4
    module.val_map.update([pred], [tgt])
    result = module.val_map.compute()
    assert float(result["bbox_map"]) == pytest.approx(1.0) and float(result["segm_map"]) == pytest.approx(1.0)


# --- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,message",
    [
        ("++task.head.fpn_width=64", "task.head.fpn_width is not a Mask R-CNN setting"),
        ("task.name=segmentation", "task.name"),
        ("task.input_size=[800]", "task.input_size"),
        ("task.mask_threshold=1.5", "task.mask_threshold"),
        ("++task.head.roi_heads=htc", "task.head.roi_heads=htc is not a detector"),
        ("task.checkpoint_heads=maybe", "task.checkpoint_heads=maybe must be true or false"),
        ("optim.sched=multistep +optim.decay_rate=2", "optim.decay_rate"),
    ],
)
def test_bad_task_settings_fail_before_work(override, message):
    cfg = _compose("task=detection", *override.split())
    with pytest.raises(ConfigValueError, match=message.replace("[", r"\[")):
        check_values(cfg, environment=False)


def test_recipes_compose_and_check():
    cascade = ("stvit_r_cascade_mask_rcnn_swin_s_3x", "stvit_r_cascade_mask_rcnn_swin_b_3x")
    for name in ("stvit_r_mask_rcnn_swin_t_3x", "stvit_r_mask_rcnn_swin_s_3x", "swin_mask_rcnn_swin_t_3x", *cascade):
        cfg = _compose(f"experiment={name}", "data.root=/data/coco")
        check_values(cfg, environment=False)
        assert cfg.task.name == "detection" and cfg.method.name == "none"
        assert cfg.task.head.get("roi_heads", "standard") == ("cascade" if name in cascade else "standard")
        assert cfg.optim.sched == "multistep" and list(cfg.optim.decay_epochs) == [27, 33]
        assert cfg.callbacks.model_checkpoint.monitor == "val/box_map"


# --- end to end: train.py task=detection ------------------------------------------------------------------
TINY = [
    "task=detection",
    # 64 px scenes of small digits, 8 training and 4 validation scenes, one epoch of two steps
    "data.scene_size=64",
    "data.digit_sizes=[12,24]",
    "data.num_train=8",
    "data.num_val=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    # small Mask R-CNN heads (the Swin model's defaults are torchvision's full-size ones)
    "++task.head.fpn_channels=32",
    "++task.head.box_head_dim=64",
    "++task.head.mask_head_dim=16",
    "++task.head.box_batch_size_per_image=32",
    "++task.head.detections_per_image=10",
    "profile.rounds=1",
    "profile.warmup=0",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone",
    [
        ["model.kwargs.depth=3", "model.img_size=64", "method=tome"],  # a reduced ViT: ToMe unmerges
        # STViT-R Swin: four maps into an FPN, Cascade Mask R-CNN heads (the released detector's)
        ["model=stvit_swin_t", "method=none", "++task.head.roi_heads=cascade"],
    ],
    ids=["vit_tome", "stvit_r_swin_t_cascade"],
)
def test_train_py_detection_end_to_end(tmp_path, backbone):
    proc, run = train(tmp_path, *TINY, *backbone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["task"] == "detection"
    for key in ("student_val_box_map", "student_val_mask_map", "student_val_box_map_50", "student_val_mask_map_50"):
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 100.0, (key, s[key])
    assert s["gmacs_input_size"] == [64, 64]  # data.val_scale follows the scene size
    assert 0 < s["student_gmacs"] < s["teacher_gmacs"], (s["student_gmacs"], s["teacher_gmacs"])
    for who in ("student", "teacher"):  # the whole detector and its backbone alone, timed side by side
        assert s[f"{who}_throughput"] > 0 and s[f"{who}_backbone_throughput"] > 0
    assert "val box AP" in proc.stdout and "backbone GMACs" in proc.stdout and "backbone images/s" in proc.stdout
    # the best checkpoint reloads strictly into the detector the config builds
    ckpt = torch.load(s["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["task"]["name"] == "detection"
    from src.trainer.detection import build_detection

    module, _ = build_detection(_compose(*TINY, *backbone), num_classes=10, weights=False)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    if backbone[0].startswith("model.kwargs"):
        # eval.py evaluates the checkpoint: the same mAP as the epoch that wrote it
        cmd = [sys.executable, str(ROOT / "eval.py"), f"paths.cache_dir={tmp_path / 'cache'}"]
        cmd += [f"hydra.run.dir={tmp_path / 'eval'}", *TINY, *backbone, f"model.checkpoint={s['best_checkpoint']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        e = json.loads((tmp_path / "eval" / "summary.json").read_text())
        assert e["student_val_box_map"] == pytest.approx(s["student_val_box_map"], abs=1e-4)
        assert e["student_val_mask_map"] == pytest.approx(s["student_val_mask_map"], abs=1e-4)
        # resuming continues the run (one more epoch)
        proc, run = train(tmp_path, *TINY, *backbone, "trainer.max_epochs=2", "ckpt_path=last")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "epoch 2/2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_train_py_detection_missing_coco_fails_clearly(tmp_path):
    proc, _ = train(tmp_path, "task=detection", "data=coco", f"data.root={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert "data.root" in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.parametrize("backbone", ["vit_tome", "stvit_r_swin_t"])
def test_compiled_backbone_trunk_is_one_graph_per_size_and_detects_as_eager(backbone):
    """compile.enabled with task=detection compiles the trunks (run.compile_models): the dense pass of
    a reduced ViT and the STViT-R Swin trunk each run as one full graph per input size, same detections."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from src.models.compile import compile_model

    torch.manual_seed(0)
    if backbone == "vit_tome":
        det, _ = build_detector(SMALL_VIT, "tome", {"r": 0.5}, None, num_classes=3, head=SMALL_HEAD)
    else:
        cfg = _compose("task=detection", "model=stvit_swin_t", "method=none", "data=scenes")
        det, _ = build_detector(dict(cfg.model), "none", {}, None, num_classes=3, head=SMALL_HEAD, weights=False)
    det.eval()
    sizes = [(3, 64, 64), (3, 48, 80)]
    images = [[torch.rand(*s)] for s in sizes]
    torch._dynamo.reset()
    with torch.no_grad():
        expected = [det(x)[0] for x in images]
        counter = CompileCounterWithBackend("eager")
        compile_model(backbone_trunk(det), backend=counter, dynamic=False)  # fullgraph: a break raises
        got = [det(x)[0] for x in images] + [det(images[0])[0]]
    torch._dynamo.reset()
    assert counter.frame_count == 2  # one graph per input size, the repeated size reuses its graph
    for g, e in zip(got, expected + expected[:1]):
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g["masks"], e["masks"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_train_py_detection_ddp_two_processes_scores_as_one(tmp_path):
    """trainer=ddp on CPU (gloo, 2 processes): 5 validation scenes over 2 ranks, each scored once (no
    sampler padding), so the synced mAP equals a single-process eval.py of the checkpoint; rank 0 alone
    prints the summary and writes the checkpoints."""
    vit = ["model.kwargs.depth=3", "model.img_size=64", "method=tome", "data.num_val=5", "data.eval_batch_size=2"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    proc, run = train(tmp_path, *TINY, *vit, *ddp, env={"OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "distributed_backend=gloo" in out and "Starting with 2 processes" in out
    assert out.count("reduced vs unreduced") == 1, "only the global rank 0 prints the summary"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best-epoch000.ckpt",
        "last-step.ckpt",
        "last.ckpt",
    ]
    s = json.loads((run / "summary.json").read_text())
    cmd = [sys.executable, str(ROOT / "eval.py"), f"paths.cache_dir={tmp_path / 'cache'}"]
    cmd += [f"hydra.run.dir={tmp_path / 'eval'}", *TINY, *vit, f"model.checkpoint={s['last_checkpoint']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    e = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for key in ("student_val_box_map", "student_val_mask_map", "student_val_box_map_50"):
        assert e[key] == pytest.approx(s[key], abs=1e-4), (key, e[key], s[key])


def _mmdet_layout(detector):
    """This project's cascade detector -> an mmdetection v2 Cascade Mask R-CNN state dict (the released
    STViT-R files), written independently of src.models.detector: backbone.* in the official backbone
    layout, neck / rpn_head / roi_head by mmdet's module names, the background class last."""
    from tests.test_stvit_swin_det import to_official

    sd = detector.state_dict()
    out = to_official({k[len("backbone.body.") :]: v for k, v in sd.items() if k.startswith("backbone.body.")}, True)
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("backbone.fpn."):  # inner_blocks.i.0.w / layer_blocks.i.0.w
            kind = {"inner_blocks": "lateral_convs", "layer_blocks": "fpn_convs"}[parts[2]]
            out[f"neck.{kind}.{parts[3]}.conv.{parts[-1]}"] = v
        elif k.startswith("rpn.head."):
            name = {"conv": "rpn_conv", "cls_logits": "rpn_cls", "bbox_pred": "rpn_reg"}[parts[2]]
            out[f"rpn_head.{name}.{parts[-1]}"] = v
        elif k.startswith("roi_heads.box_heads."):
            stage, layer = parts[2], parts[3]
            if layer == "convs":  # (conv, bn, relu) x 4
                i, j = divmod(int(parts[4]), 3)
                out[f"roi_head.bbox_head.{stage}.shared_convs.{i}.{'conv' if j == 0 else 'bn'}.{parts[-1]}"] = v
            elif layer == "cls":
                out[f"roi_head.bbox_head.{stage}.fc_cls.{parts[-1]}"] = torch.cat([v[1:], v[:1]])
            else:
                name = {"fc": "shared_fcs.0", "reg": "fc_reg"}[layer]
                out[f"roi_head.bbox_head.{stage}.{name}.{parts[-1]}"] = v
        elif k.startswith("roi_heads.mask_heads."):
            stage, i = parts[2], int(parts[3])
            name = f"convs.{i // 2}.conv" if i < 8 else {8: "upsample", 10: "conv_logits"}[i]
            out[f"roi_head.mask_head.{stage}.{name}.{parts[-1]}"] = v
    return out


def test_released_mmdet_cascade_detector_loads_whole_and_bad_fits_fail_clearly(tmp_path):
    from src.models.weights import WeightsError
    from src.trainer.detection import build_detection

    head = [f"++task.head.{k}={v}" for k, v in SMALL_HEAD.items()] + ["++task.head.roi_heads=cascade"]
    base = ["task=detection", "model=stvit_swin_t", "method=none", "data=scenes", *head]
    torch.manual_seed(0)
    reference, _ = build_detection(_compose(*base), num_classes=3, weights=False)
    official = _mmdet_layout(reference.detector)
    assert "roi_head.bbox_head.2.shared_convs.3.bn.running_var" in official and "neck.fpn_convs.3.conv.bias" in official
    path = tmp_path / "cascade_mask_rcnn_stvit_r_swin_t.pth"
    torch.save({"meta": {"epoch": 36}, "state_dict": official}, path)

    torch.manual_seed(1)  # other initial weights: everything must come from the file
    module, _ = build_detection(_compose(*base, f"model.checkpoint={path}"), num_classes=3)
    ours, ref = module.detector.state_dict(), reference.detector.state_dict()
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    image = [torch.rand(3, 96, 128)]
    reference.detector.eval(), module.detector.eval()
    with torch.no_grad():
        expected, got = reference.detector(image)[0], module.detector(image)[0]
    assert torch.equal(expected["boxes"], got["boxes"]) and torch.equal(expected["masks"], got["masks"])

    with pytest.raises(WeightsError, match="for 3 object classes but the data has 5.*checkpoint_heads=false"):
        build_detection(_compose(*base, f"model.checkpoint={path}"), num_classes=5)
    standard = [o for o in base if "roi_heads" not in o]
    with pytest.raises(WeightsError, match="is a Cascade Mask R-CNN.*task.head.roi_heads=cascade"):
        build_detection(_compose(*standard, f"model.checkpoint={path}"), num_classes=3)
    with pytest.raises(WeightsError, match="do not fit this detector.*shape"):
        build_detection(_compose(*base, "++task.head.box_head_dim=32", f"model.checkpoint={path}"), num_classes=3)
    # the backbone alone, for new classes: the trunk from the file, fresh heads
    only, _ = build_detection(_compose(*base, f"model.checkpoint={path}", "task.checkpoint_heads=false"), num_classes=5)
    trunk = {k: v for k, v in only.detector.state_dict().items() if k.startswith("backbone.body.")}
    assert trunk and all(torch.equal(v, ref[k]) for k, v in trunk.items())
    assert not torch.equal(
        only.detector.state_dict()["backbone.fpn.inner_blocks.0.0.weight"], ref["backbone.fpn.inner_blocks.0.0.weight"]
    )


@pytest.mark.slow
def test_detection_multirun_with_wandb_offline_and_summary(tmp_path):
    """A Hydra multirun of task=detection (two methods) logs to W&B (offline) in one group per sweep, and
    summarize.py tables the runs by box mAP against backbone GMACs."""
    sweep = tmp_path / "det_sweep"
    vit = ["model.kwargs.depth=3", "model.img_size=64", "method=none,tome"]
    proc, _ = train(
        tmp_path,
        "hydra.mode=MULTIRUN",
        *TINY,
        *vit,
        "logger=wandb",
        "logger.token_images.enabled=false",
        f"hydra.sweep.dir={sweep}",
        env={"WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(s["method"] for s in summaries.values()) == ["none", "tome"]
    for job in summaries:
        (run,) = (sweep / job / "wandb").glob("offline-run-*")
        blob = b"".join(p.read_bytes() for p in run.rglob("*.wandb"))
        assert b"val/box_map" in blob and sweep.name.encode() in blob
    proc = subprocess.run([sys.executable, str(ROOT / "summarize.py"), str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = (sweep / "summary.md").read_text()
    assert "| box AP | mask AP |" in table
    for s in summaries.values():
        assert f"| {s['student_val_box_map']:.2f} | {s['student_val_mask_map']:.2f} |" in table
