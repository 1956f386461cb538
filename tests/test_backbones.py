"""Today's timm backbones with every method (random init, small widths): DINOv2 with register tokens,
global-average-pool models (MAE-style), CLIP (pre-norm), DeiT-III (LayerScale), AugReg-L, SigLIP
(attention-pool head) run or are refused with a clear error; Eva and parallel blocks are refused.
Method configs are relative to the model: the same config gives the papers' settings on DeiT-S/B
and scales to ViT-L and DINOv2 at 518 px."""

import pytest
import timm
import torch

from src.bench import build_reduced, compose_config
from src.data.folder import model_preprocessing
from src.models import ReductionConfigError, apply_reduction

SMALL = dict(depth=4, embed_dim=64, num_heads=2, num_classes=10)
# name, extra timm kwargs, input size
FAMILIES = {
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56), 56),
    "mae_gap": ("vit_base_patch16_224.mae", dict(global_pool="avg", img_size=64), 64),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64), 64),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64), 64),
    "augreg_l": ("vit_large_patch16_224.augreg_in21k_ft_in1k", dict(img_size=64), 64),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64), 64),
}
METHODS = {
    "tome": dict(r=2),
    "evit": {},
    "gtp": dict(r=2, num_neighbours=4),
    "dynamicvit": {},
    "bat": {},
    "mstm": dict(scales=[2]),
    "stvit": dict(pool_size=2),
}
# the pairs that cannot work, and the words of their error
REFUSED = {
    ("mae_gap", "dynamicvit"): "classifies from its class token",
    ("siglip", "evit"): "needs a model with a class token",
    ("siglip", "gtp"): "needs a model with one",
    ("siglip", "dynamicvit"): "classifies from its class token",
    ("siglip", "bat"): "needs a model with a class token",
    ("siglip", "mstm"): "needs a model with a class token",
}


def small(family, seed=0):
    name, kw, size = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **SMALL, **kw).eval(), size


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_on_backbone_runs_or_is_refused_clearly(family, method):
    model, size = small(family)
    if (family, method) in REFUSED:
        with pytest.raises(ReductionConfigError, match=REFUSED[(family, method)]):
            apply_reduction(model, method, **METHODS[method])
        return
    apply_reduction(model, method, trace_source=True, **METHODS[method])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        state = model.forward_tokens(x)
        logits = model(x)
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
    p = model.num_prefix_tokens
    n0 = p + model.patch_embed.num_patches
    assert state.tokens_per_block[-1] < n0  # it reduced
    # every prefix token (CLS, registers) is protected: it still stands for itself only
    if state.source is not None:
        eye = torch.eye(n0)
        for j in range(p):
            assert torch.equal(state.source[:, j], eye[j].expand(2, -1)), (family, method, j)


@pytest.mark.parametrize("family", FAMILIES)
def test_none_equals_the_unpatched_backbone(family):
    model, size = small(family)
    ref, _ = small(family)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(apply_reduction(model, "none")(x), ref(x), rtol=0, atol=1e-5)


def test_register_tokens_are_all_protected_by_tome():
    model, size = small("dinov2_reg")
    assert model.num_prefix_tokens == 5
    apply_reduction(model, "tome", r=3, trace_source=True)
    state = model.forward_tokens(torch.randn(2, 3, size, size))  # 4 x 4 patches + CLS + 4 registers
    assert state.tokens_per_block == [21 - 3 * (i + 1) for i in range(4)]
    assert torch.equal(state.source[:, :5, :5], torch.eye(5).expand(2, 5, 5))
    assert torch.equal(state.source.sum(1), torch.ones(2, 21))  # every input token in exactly one token


def test_average_pooling_weighs_merged_tokens_by_their_size():
    """A GAP head on a merged model pools as if every patch still carried its token's features."""
    model, size = small("mae_gap")
    apply_reduction(model, "tome", r=3, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, size, size))
        p = model.num_prefix_tokens
        # each input patch takes the features of the token that stands for it
        per_patch = state.source[:, p:, p:].transpose(1, 2) @ state.x[:, p:]
        expected = model.head(model.fc_norm(per_patch.mean(1)))
        torch.testing.assert_close(model.forward_head_state(state), expected, rtol=1e-5, atol=1e-6)
        plain = model.forward_head(state.x)  # timm's unweighted mean differs: the sizes matter
    assert not torch.allclose(plain, expected, atol=1e-4)


@pytest.mark.parametrize(
    "name,match",
    [
        ("eva02_tiny_patch14_224", "Eva .*rotary position embeddings"),
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock .*no .attn"),
    ],
)
def test_unsupported_backbones_are_refused_clearly(name, match):
    model = timm.create_model(name, pretrained=False, depth=2, img_size=64)
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(model, "tome", r=2)


# --- method configs relative to the model -----------------------------------------------------------
PAPER_SETTINGS = {  # (model, method) -> the reference's absolute settings, reproduced by the default config
    ("deit_s", "tome"): {"r": [13] * 12},
    ("deit_s", "evit"): {"locations": [3, 6, 9]},
    ("deit_s", "bat"): {"locations": [3, 6, 9]},
    ("deit_s", "mstm"): {"locations": [3, 6, 9]},
    ("deit_s", "dynamicvit"): {"locations": [3, 6, 9]},
    ("deit_s", "stvit"): {"block": 4},
    ("deit_b", "gtp"): {"r": [8] * 12},
    ("deit_b", "tome"): {"r": [13] * 12},
}


@pytest.mark.parametrize("model_name,method", PAPER_SETTINGS)
def test_relative_defaults_reproduce_the_papers_on_deit(model_name, method):
    reduced, _ = build_reduced(compose_config([f"model={model_name}", f"method={method}"]))
    for key, value in PAPER_SETTINGS[(model_name, method)].items():
        assert getattr(reduced.reduction, key) == value, (key, getattr(reduced.reduction, key))


def test_relative_defaults_scale_to_vit_l_and_dinov2_at_518():
    large = apply_reduction(
        timm.create_model("vit_large_patch16_224", pretrained=False, embed_dim=64, num_heads=2), "evit"
    )
    assert large.reduction.locations == [6, 12, 18]  # the quarter points of 24 blocks
    tome_cfg = compose_config(["model=deit_s", "method=tome"]).method.params.r
    large = apply_reduction(
        timm.create_model("vit_large_patch16_224", pretrained=False, embed_dim=64, num_heads=2), "tome", r=tome_cfg
    )
    assert large.reduction.r == [6] * 24  # 0.8 of 196 patches over 24 blocks
    dino = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=518, embed_dim=64, num_heads=2)
    assert dino.patch_embed.num_patches == 37 * 37
    assert apply_reduction(dino, "tome", r=tome_cfg).reduction.r == [91] * 12


def test_evaluation_preprocessing_comes_from_the_model():
    deit = compose_config(["model=deit_s"]).model
    assert model_preprocessing(deit.name, deit.data_config) == {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
    }
    augreg = model_preprocessing("vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert augreg["mean"] == (0.5, 0.5, 0.5) and augreg["crop_pct"] == 0.9
    clip = model_preprocessing("vit_base_patch16_clip_224.openai")
    assert clip["mean"] == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
    assert model_preprocessing("vit_small_patch14_reg4_dinov2.lvd142m")["crop_pct"] == 1.0
    assert model_preprocessing("no_such_model")["mean"] == (0.485, 0.456, 0.406)  # ImageNet's defaults
