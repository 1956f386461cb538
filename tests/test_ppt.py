"""PPT properties (the golden logits are checked in test_golden.py)."""

import copy

import pytest
import timm
import torch

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from tests.tiny import images as tiny_images
from tests.tiny import tiny_vit


def counts(r, locations, n=197, depth=12, p=1):
    out = []
    for i in range(depth):
        if i in locations:
            n -= min(r, (n - p) // 2)
        out.append(n)
    return out


def test_token_counts_per_block(deit_tiny, images):
    state = apply_reduction(deit_tiny, "ppt", r=50, locations=[3, 6, 9]).forward_tokens(images[:2])
    assert state.tokens_per_block == [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3
    state = apply_reduction(deit_tiny, "ppt", r=[90, 40], locations=[0.25, 0.5]).forward_tokens(images[:1])
    assert state.tokens_per_block == [197] * 3 + [107] * 3 + [67] * 6
    state = apply_reduction(deit_tiny, "ppt", r=120, locations=[0, 1]).forward_tokens(images[:1])
    assert state.tokens_per_block == counts(120, [0, 1])  # capped at half the patch tokens: 99, 50


def test_r0_equals_unpatched(deit_tiny, images):
    ref = copy.deepcopy(deit_tiny)
    with torch.no_grad():
        torch.testing.assert_close(apply_reduction(deit_tiny, "ppt", r=0)(images), ref(images), rtol=0, atol=1e-5)


def _final(threshold, x, **kw):
    model = apply_reduction(tiny_vit(), "ppt", r=10, locations=[1, 2], threshold=threshold, trace_source=True, **kw)
    with torch.no_grad():
        return model.forward_tokens(x)


def test_threshold_chooses_pooling_or_pruning():
    x = tiny_images(3)
    pooled = _final(float("inf"), x)  # every image pooled: sizes add up, every patch is kept somewhere
    assert torch.equal(pooled.source.sum(1), torch.ones(3, 65))
    assert pooled.size.max() > 1 and torch.equal(pooled.size.sum(1), torch.full((3, 1), 65.0))
    pruned = _final(0.0, x)  # every image pruned: single-patch tokens, the rest dropped
    assert torch.equal(pruned.size, torch.ones(3, 45, 1))
    assert torch.equal(pruned.source.sum(-1), torch.ones(3, 45)) and pruned.source.sum().item() == 3 * 45
    for state in (pooled, pruned):  # CLS first, standing for itself only
        assert state.tokens_per_block == [65, 55, 45, 45]
        assert torch.equal(state.source[:, 0], torch.eye(65)[0].expand(3, -1))


def test_each_image_takes_its_own_branch():
    """A batch mixing pooled and pruned images gives every image what it gets alone."""
    model = apply_reduction(tiny_vit(), "ppt", r=10, locations=[1])
    x = tiny_images(6)
    from src.models.reduction.ppt import significance

    seen = {}

    def spy(i, state, res, orig=model.reduction.after_attention):
        if i == 1:
            seen["var"] = significance(res, 1).var(dim=1)
        return orig(i, state, res)

    with torch.no_grad():
        model.reduction.after_attention = spy
        model(x)
        del model.reduction.after_attention
        var = seen["var"].sort().values
        model.reduction.threshold = float((var[2] + var[3]) / 2)  # 3 images pooled, 3 pruned at block 1
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
        pooled_only = apply_reduction(copy.deepcopy(model), "ppt", r=10, locations=[1], threshold=1.0)(x)
        pruned_only = apply_reduction(copy.deepcopy(model), "ppt", r=10, locations=[1], threshold=0.0)(x)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    differs_pool = (together - pooled_only).abs().amax(1) > 1e-6
    differs_prune = (together - pruned_only).abs().amax(1) > 1e-6
    # 3 images as if all were pooled, the other 3 as if all were pruned
    assert differs_pool.sum() == 3 and torch.equal(differs_prune, ~differs_pool)


def test_distillation_token_is_protected(images):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    eye = torch.eye(198)
    for threshold in (0.0, 1.0):
        state = apply_reduction(model, "ppt", r=40, threshold=threshold, trace_source=True).forward_tokens(images[:2])
        assert state.tokens_per_block[-1] == 198 - 120
        assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
        assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))


def test_gradients_flow_in_train_mode():
    for threshold in (0.0, 1.0):
        model = apply_reduction(tiny_vit().train(), "ppt", r=10, locations=[1, 2], threshold=threshold)
        model(tiny_images(2)).sum().backward()
        assert model.patch_embed.proj.weight.grad.abs().sum() > 0
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_float64_state_follows_the_input():
    model = apply_reduction(tiny_vit(), "ppt", r=10, locations=[1, 2], threshold=1.0).double()
    state = model.forward_tokens(tiny_images(2).double())
    assert state.x.dtype == torch.float64 and state.size.dtype == torch.float64


@pytest.mark.parametrize(
    "params,match",
    [
        ({"r": -1}, "r must be an int >= 0"),
        ({"r": 2.5}, "r must be an int >= 0"),
        ({"r": [10, 10]}, "r list has 2 entries; give one per location \\(3"),
        ({"locations": [9]}, "not a block index"),
        ({"locations": [1, 1]}, "must not repeat"),
        ({"threshold": -1e-5}, "threshold must be a number >= 0"),
        ({"prop_attn": 1}, "prop_attn must be true or false"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "ppt", **params)


def test_needs_a_class_token():
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, class_token=False, global_pool="avg", img_size=64, depth=2
    )
    with pytest.raises(ReductionConfigError, match="needs a model with a class token"):
        apply_reduction(model, "ppt")


def test_gmacs_deit_s_published():
    """PPT DeiT-S r=50 at blocks 3, 6, 9: 2.944 GMACs in the README."""
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert abs(count_gmacs(apply_reduction(model, "ppt", r=50)) - 2.944) <= 0.01
