"""ToMe properties (the golden logits are checked in test_golden.py)."""

import copy

import pytest
import timm
import torch

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.tome import parse_r


def test_parse_r_matches_reference_schedules():
    assert parse_r(12, 8) == [8] * 12
    assert parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r(12, [16, -1]) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert parse_r(12, [4, 4, 4]) == [4, 4, 4] + [0] * 9
    with pytest.raises(ReductionConfigError, match=">= 0"):
        parse_r(12, -1)
    with pytest.raises(ReductionConfigError, match="13 entries"):
        parse_r(12, [1] * 13)


def test_r0_equals_unpatched(deit_tiny, images):
    ref = copy.deepcopy(deit_tiny)
    with torch.no_grad():
        torch.testing.assert_close(apply_reduction(deit_tiny, "tome", r=0)(images), ref(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("r,final", [(4, 149), (8, 101), (13, 41), (16, 11)])
def test_token_counts_per_block(deit_tiny, images, r, final):
    state = apply_reduction(deit_tiny, "tome", r=r).forward_tokens(images[:1])
    n, expected = 197, []
    for _ in range(12):
        n -= min(r, (n - 1) // 2)  # the reference's 50% cap (r=16 is clipped to 10 in the last block)
        expected.append(n)
    assert state.tokens_per_block == expected and expected[-1] == final


def test_too_large_r_is_an_error_at_apply_time(deit_tiny):
    with pytest.raises(ReductionConfigError, match="at most 195"):
        apply_reduction(deit_tiny, "tome", r=17)


def test_cls_never_merged_and_sources_partition_the_image(deit_tiny, images):
    apply_reduction(deit_tiny, "tome", r=13, trace_source=True)
    state = deit_tiny.forward_tokens(images)
    src = state.source  # (B, N, 197)
    assert src.shape == (3, 41, 197)
    assert torch.equal(src[:, 0], torch.eye(197)[0].expand(3, -1))  # CLS stands for itself only
    assert torch.equal(src.sum(1), torch.ones(3, 197))  # every input token in exactly one token
    torch.testing.assert_close(state.size[..., 0], src.sum(-1))  # sizes count the merged patches


def test_distillation_token_is_protected(images):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    state = apply_reduction(model, "tome", r=8, trace_source=True).forward_tokens(images[:2])
    eye = torch.eye(198)
    assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
    assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))


def test_batch_independence(deit_tiny, images):
    apply_reduction(deit_tiny, "tome", r=8)
    with torch.no_grad():
        together = deit_tiny(images)
        alone = torch.cat([deit_tiny(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_gradients_flow_through_merges(deit_tiny, images):
    apply_reduction(deit_tiny.train(), "tome", r=8)
    deit_tiny(images[:2]).sum().backward()
    assert deit_tiny.patch_embed.proj.weight.grad.abs().sum() > 0
    assert deit_tiny.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("r,expected", [(8, 3.4), (13, 2.7), (16, 2.3)])
def test_gmacs_match_published_deit_s(r, expected):
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert abs(count_gmacs(apply_reduction(model, "tome", r=r)) - expected) <= 0.05


def test_other_image_and_patch_sizes():
    model = timm.create_model("vit_small_patch32_224", pretrained=False, img_size=160).eval()
    state = apply_reduction(model, "tome", r=2).forward_tokens(torch.randn(1, 3, 160, 160))
    assert state.tokens_per_block[0] == 26 - 2 and state.grid_size == (5, 5)


@pytest.mark.parametrize("method", ["tome", "gtp"])
def test_fraction_r_follows_each_input_size_and_int_r_stays_absolute(method):
    """dynamic_img_size (the detection task): a fraction r is that fraction of every input's patches
    (int(f * patches / depth) per block), an int r the same count at every size, as the references."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, depth=4).eval()
    fraction = apply_reduction(copy.deepcopy(model), method, r=0.5)
    absolute = apply_reduction(copy.deepcopy(model), method, r=12)
    with torch.no_grad():
        for size, patches in (((224, 224), 196), ((320, 480), 600), ((128, 160), 80)):
            x = torch.randn(1, 3, *size)
            per_block = int(0.5 * patches / 4)
            counts = fraction.forward_tokens(x).tokens_per_block
            assert counts == [1 + patches - per_block * (i + 1) for i in range(4)], (size, counts)
            counts = absolute.forward_tokens(x).tokens_per_block
            assert counts == [1 + patches - 12 * (i + 1) for i in range(4)], (size, counts)
