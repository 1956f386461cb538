"""The papers' recipes as experiment configs: they compose, carry the reference hyperparameters, and
their learning rate is the reference's at the reference global batch (and scales with it)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.bench import build_reduced
from src.models import apply_reduction
from src.trainer.module import ReductionModule

CONF = Path(__file__).resolve().parents[1] / "conf"
RECIPES = [
    "dynamicvit_deit_s",
    "dynamicvit_deit_b",
    "evit_finetune_deit_s",
    "tome_eval",
    "gtp_eval",
    "dynamicvit_digits",
    "compare_dynamicvit_digits",
]


def compose_experiment(name, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={name}", *overrides])


def lr_at(cfg, devices, batch=None, accumulate=1):
    """The trainer's effective lr (ReductionModule.effective_lr) for a given global batch layout."""
    fake = SimpleNamespace(
        trainer=SimpleNamespace(world_size=devices, accumulate_grad_batches=accumulate),
        batch_size=batch or int(cfg.data.batch_size),
        optim_cfg=OmegaConf.to_container(cfg.optim),
    )
    return ReductionModule.effective_lr(fake)


def global_batch(cfg):
    return (
        int(cfg.trainer.devices)
        * int(cfg.trainer.num_nodes)
        * int(cfg.data.batch_size)
        * int(cfg.trainer.accumulate_grad_batches)
    )


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_its_method_params_are_valid(name):
    cfg = compose_experiment(name)
    for node in ("model", "method", "optim", "data", "distill", "ema"):
        OmegaConf.to_container(cfg[node], resolve=True)  # no dangling interpolation
    if cfg.model.name.startswith(("deit", "vit_small")):
        kwargs = {"pretrained": False, "num_classes": int(cfg.model.num_classes)}
        model = timm.create_model(cfg.model.name.split(".")[0], **kwargs)
        apply_reduction(model, cfg.method.name, **OmegaConf.to_container(cfg.method.params))


def test_dynamicvit_deit_s_is_the_reference_recipe():
    cfg = compose_experiment("dynamicvit_deit_s")
    assert cfg.model.name == "deit_small_patch16_224" and cfg.model.drop_path_rate == 0.0
    p = cfg.method.params
    assert (cfg.method.name, p.keep_rate, list(p.locations)) == ("dynamicvit", 0.7, [3, 6, 9])
    assert (p.ratio_weight, p.distill_weight, p.token_distill_weight) == (2.0, 0.5, 0.5)
    assert cfg.trainer.max_epochs == 30 and cfg.optim.warmup_epochs == 5
    assert (cfg.optim.backbone_lr_scale, cfg.optim.backbone_freeze_epochs) == (0.01, 5)
    assert list(cfg.optim.frozen_params) == ["cls_token", "pos_embed"]
    assert cfg.optim.min_lr == 1e-6 and cfg.optim.weight_decay == 0.05
    assert cfg.distill.type == "none"  # the method brings its own KL and token distillation
    assert cfg.ema.enabled and cfg.ema.decay == 0.9999
    assert cfg.data.mixup.mixup_alpha == 0.8 and cfg.data.mixup.cutmix_alpha == 1.0
    assert cfg.data.mixup.label_smoothing == 0.1 and cfg.data.re_prob == 0.25
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1"
    assert global_batch(cfg) == 1024
    assert lr_at(cfg, devices=8) == pytest.approx(1e-3)  # 8 x 128, as the README command
    assert lr_at(cfg, devices=1, accumulate=8) == pytest.approx(1e-3)  # same global batch on 1 GPU
    assert lr_at(cfg, devices=64) == pytest.approx(8e-3)  # scales with the global batch
    assert lr_at(cfg, devices=1) == pytest.approx(1.25e-4)


def test_dynamicvit_deit_b_adds_drop_path_and_ratio_weight():
    cfg = compose_experiment("dynamicvit_deit_b")
    assert cfg.model.name == "deit_base_patch16_224"
    assert cfg.model.drop_path_rate == 0.2 and cfg.method.params.ratio_weight == 5.0
    assert cfg.method.params.keep_rate == 0.7 and cfg.trainer.max_epochs == 30
    assert lr_at(cfg, devices=8) == pytest.approx(1e-3)


def test_evit_finetune_is_the_reference_recipe():
    cfg = compose_experiment("evit_finetune_deit_s")
    assert cfg.method.name == "evit" and cfg.method.params.fuse_token is True
    assert cfg.method.params.keep_rate == 0.7 and list(cfg.method.params.locations) == [3, 6, 9]
    assert cfg.trainer.max_epochs == 30 and cfg.optim.warmup_epochs == 0
    assert (cfg.optim.min_lr, cfg.optim.weight_decay) == (2e-6, 1e-6)
    assert cfg.model.drop_path_rate == 0.0  # the reference finetunes in eval mode
    # DeiT's linear scaling: 2e-5 per 512 images -> 4e-5 at 8 x 128
    assert lr_at(cfg, devices=8) == pytest.approx(4e-5)
    assert lr_at(cfg, devices=4) == pytest.approx(2e-5)


@pytest.mark.parametrize(
    "name,model,method",
    [("tome_eval", "vit_small_patch16_224.augreg_in21k_ft_in1k", "tome"), ("gtp_eval", "deit_base_patch16_224", "gtp")],
)
def test_off_the_shelf_evals_do_not_train(name, model, method):
    cfg = compose_experiment(name)
    assert cfg.train is False
    assert cfg.model.name == model and cfg.method.name == method
    assert cfg.data.crop_pct == 0.9


def test_gtp_eval_uses_the_readme_p8_setting():
    p = compose_experiment("gtp_eval").method.params
    assert (p.r, p.sparsity, p.alpha, p.graph, p.selection, p.token_scale) == (
        8,
        0.6,
        0.1,
        "mixed",
        "mixed_attn_max",
        True,
    )


def test_dynamicvit_digits_fits_the_quickstart_model():
    cfg = compose_experiment("dynamicvit_digits")
    assert cfg.model.kwargs.depth == 4
    assert cfg.method.name == "dynamicvit" and build_reduced(cfg)[0].reduction.locations == [1, 2, 3]  # quarter points
    assert cfg.trainer.gradient_clip_val == 5.0  # the project default stays on here
    assert cfg.distill.type == "none" and cfg.ema.enabled


@pytest.mark.parametrize("method", ["dynamicvit", "evit", "tome"])
def test_compare_dynamicvit_digits_gives_each_method_its_own_recipe(method):
    """The DynamicViT recipe on the quickstart model comes with method=dynamicvit only; EViT and ToMe
    keep the default distillation finetune. All run 8 epochs at the same GMACs budget."""
    cfg = compose_experiment("compare_dynamicvit_digits", f"method={method}")
    assert cfg.schedule.name == "flops" and cfg.schedule.gmacs == 0.00176 and cfg.trainer.max_epochs == 8
    if method == "dynamicvit":
        assert cfg.method.params.ratio_weight == 100.0 and build_reduced(cfg)[0].reduction.locations == [1, 2, 3]
        assert cfg.distill.type == "none" and cfg.optim.backbone_lr_scale == 0.01
        assert list(cfg.optim.frozen_params) == ["cls_token", "pos_embed"]
    else:
        assert cfg.distill.type == "soft" and cfg.optim.backbone_lr_scale == 1.0
        assert list(cfg.optim.frozen_params) == []
