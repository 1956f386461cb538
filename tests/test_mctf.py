"""MCTF properties (the golden logits are checked in test_golden.py)."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.base import TokenState
from src.models.reduction.mctf import MCTF
from tests.tiny import images as tiny_images
from tests.tiny import tiny_vit


def expected_counts(r, layers, n=197, depth=12, p=1):
    """The reference's per-step rule, written out: at least 10 tokens stay (int r), at most half go."""
    out = []
    for i in range(depth):
        if i in layers:
            k = r if n - r >= 10 else n - 10
            k = int((n - p) * k) if k < 1 else k
            n -= max(0, min(k, (n - p) // 2))
        out.append(n)
    return out


@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_token_counts_per_block(deit_tiny, images, one_step_ahead):
    state = apply_reduction(deit_tiny, "mctf", r=16, one_step_ahead=one_step_ahead).forward_tokens(images[:1])
    assert state.tokens_per_block == expected_counts(16, range(1, 12))
    assert state.tokens_per_block[-1] == 21 and state.tokens_per_block[0] == 197


def test_fraction_r_and_slice_layers():
    model = tiny_vit(depth=6)  # 64 patches
    state = apply_reduction(model, "mctf", r=0.35, layers=[0.5, 0.75]).forward_tokens(tiny_images(1))
    assert state.tokens_per_block == expected_counts(0.35, [3, 5], n=65, depth=6)  # 0.75 * 6 -> block 5
    state = apply_reduction(model, "mctf", r=30, layers="-2:").forward_tokens(tiny_images(1))
    assert state.tokens_per_block == [65, 65, 65, 65, 35, 18]  # 65 - 30; then 10 must stay, at most 17 go
    assert apply_reduction(model, "mctf", r=4, layers="all").reduction.layers == list(range(6))


def test_r0_equals_unpatched(deit_tiny, images):
    ref = copy.deepcopy(deit_tiny)
    with torch.no_grad():
        got = apply_reduction(deit_tiny, "mctf", r=0)(images)
        torch.testing.assert_close(got, ref(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["attn", "size", "max", "mean"])
def test_cls_first_and_sources_partition_the_image(pooling):
    model = apply_reduction(tiny_vit(), "mctf", r=6, layers="all", pooling=pooling, trace_source=True)
    state = model.forward_tokens(tiny_images(3))
    src = state.source
    assert src.shape == (3, 65 - 24, 65) and state.tokens_per_block == [59, 53, 47, 41]
    assert torch.equal(src[:, 0], torch.eye(65)[0].expand(3, -1))  # CLS stands for itself only, first
    assert torch.equal(src.sum(1), torch.ones(3, 65))  # every input token in exactly one token
    torch.testing.assert_close(state.size[..., 0], src.sum(-1))


def test_distillation_token_is_protected(images):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    for bidirectional in (True, False):
        state = apply_reduction(model, "mctf", r=12, bidirectional=bidirectional, trace_source=True).forward_tokens(
            images[:2]
        )
        eye = torch.eye(198)
        assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
        assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))
        assert torch.equal(state.source.sum(1), torch.ones(2, 198))


def test_merged_attention_map_is_a_distribution():
    """One-step-ahead: the merged map's rows still sum to 1 (attn / size / mean pooling), keys summed."""
    torch.manual_seed(0)
    B, H, t = 2, 3, 21
    for pooling in ("attn", "size", "mean"):
        method = MCTF(tiny_vit(), r=6, pooling=pooling)
        size = torch.randint(1, 4, (B, t, 1)).float()
        state = TokenState(x=torch.randn(B, t, 8), num_protected=1, grid_size=(4, 5), size=size)
        attn = torch.randn(B, H, t, t).softmax(-1)
        merged = method._merge(state, attn, 6, merge_map=True)
        assert merged.shape == (B, H, t - 6, t - 6) and state.x.shape == (B, t - 6, 8)
        torch.testing.assert_close(merged.sum(-1), torch.ones(B, H, t - 6))
        torch.testing.assert_close(state.size.sum(1), size.sum(1))  # sizes add up


def test_batch_independence():
    model = apply_reduction(tiny_vit(), "mctf", r=6, layers="all")
    x = tiny_images(3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("one_step_ahead", [0, 1, 2])
def test_gradients_flow_in_train_mode(one_step_ahead):
    model = apply_reduction(tiny_vit().train(), "mctf", r=6, layers="all", one_step_ahead=one_step_ahead)
    model(tiny_images(2)).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    qk = model.blocks[1].attn.qkv.weight.grad[: 2 * 48]
    # mode 1 reuses the merged map of the merging block: q and k get gradients through it
    assert qk.abs().sum() > 0


def test_float64_state_follows_the_input():
    model = apply_reduction(tiny_vit(), "mctf", r=6, layers="all").double()
    state = model.forward_tokens(tiny_images(2).double())
    assert state.x.dtype == torch.float64 and state.size.dtype == torch.float64


def test_training_losses_random_r_pass_and_consistency():
    model = apply_reduction(tiny_vit().train(), "mctf", r=8, aux_r_max=4, consistency_threshold=0.0)
    x = tiny_images(4)
    targets = F.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    torch.manual_seed(0)
    state = model.forward_tokens(x)
    logits = model.forward_head_state(state)
    terms = model.reduction.losses(state, logits=logits, targets=targets)
    assert set(terms) == {"mctf_aux_ce", "mctf_consistency"}
    assert terms["mctf_aux_ce"] > 0 and terms["mctf_consistency"] > 0  # r in [0, 4) never equals 8
    sum(terms.values()).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # gate: no image reaches an impossible confidence -> no consistency term
    model.reduction.consistency_threshold = 1.5
    state = model.forward_tokens(x)
    terms = model.reduction.losses(state, logits=model.forward_head_state(state), targets=targets)
    assert terms["mctf_consistency"].item() == 0.0 and terms["mctf_aux_ce"] > 0
    # eval mode, or no second pass configured: no terms
    with torch.no_grad():
        assert model.eval().reduction.losses(model.forward_tokens(x), logits=logits, targets=targets) == {}
    plain = apply_reduction(tiny_vit().train(), "mctf", r=8)
    assert plain.reduction.losses(plain.forward_tokens(x), logits=logits, targets=targets) == {}


@pytest.mark.parametrize(
    "params,match",
    [
        ({"one_step_ahead": 3}, "one_step_ahead must be 0"),
        ({"pooling": "avg"}, "pooling='avg' is not one of attn, size, max, mean"),
        ({"r": -1}, "r must be >= 0"),
        ({"r": 1.5}, "must be in \\(0, 1\\)"),
        ({"r": [4, 4]}, "r list has 2 entries but the model has 4 blocks"),
        ({"layers": [7]}, "not a block index"),
        ({"layers": "x"}, "slice of the blocks"),
        ({"layers": "5:"}, "selects no block"),
        ({"tau_info": -1}, "tau_info must be a number >= 0"),
        ({"bidirectional": "yes"}, "bidirectional must be true or false"),
        ({"aux_r_max": 2.5}, "aux_r_max must be 0"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "mctf", **params)


def test_gmacs_deit_s_published():
    """MCTF DeiT-S r=16: 2.60 GFLOPs in the paper (fvcore, merged map reused: the attention of a merging
    block projects q, k on the tokens before and v on the tokens after the merge)."""
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert abs(count_gmacs(apply_reduction(model, "mctf", r=16)) - 2.60) <= 0.04
