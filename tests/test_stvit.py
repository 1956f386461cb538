"""STViT / STViT-R on DeiT: token counts, equality with a hand-written forward, recovery, GMACs."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.base import AttentionRequest, attention


def _tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def _cross_block(block, queries, keys):
    """A timm Block whose queries are `queries` and keys/values `keys` (explicit softmax)."""
    attn = block.attn
    C, h = queries.shape[-1], attn.num_heads
    qn, kn = block.norm1(queries), block.norm1(keys)
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(qn, w[:C], b[:C]).unflatten(-1, (h, C // h)).transpose(1, 2)
    k = F.linear(kn, w[C : 2 * C], b[C : 2 * C]).unflatten(-1, (h, C // h)).transpose(1, 2)
    v = F.linear(kn, w[2 * C :], b[2 * C :]).unflatten(-1, (h, C // h)).transpose(1, 2)
    a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    x = queries + attn.proj((a @ v).transpose(1, 2).flatten(2))
    return x + block.mlp(block.norm2(x))


def test_cross_attention_request_equals_leading_rows_of_self_attention(deit_tiny):
    x = torch.randn(2, 30, 192)
    attn = deit_tiny.blocks[3].attn
    full = attention(attn, x, AttentionRequest(need="cls")).out
    part = attention(attn, x, AttentionRequest(need="cls", queries=7))
    assert part.out.shape == (2, 7, 192)
    torch.testing.assert_close(part.out, full[:, :7], rtol=0, atol=1e-5)


@pytest.mark.parametrize("block,pool", [(2, "max"), (0, "avg"), (4, "max")])
def test_forward_equals_hand_written_reference(block, pool):
    model = _tiny_vit()
    ref = copy.deepcopy(model)
    apply_reduction(model, "stvit", block=block, pool_size=2, pool=pool)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t = ref._pos_embed(ref.patch_embed(x))
        for blk in ref.blocks[:block]:
            t = blk(t)
        cls, img = t[:, :1], t[:, 1:]
        grid = img.transpose(1, 2).reshape(2, 48, 8, 8)
        pooled = (F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d)(grid, 2).flatten(2).transpose(1, 2)
        s1 = _cross_block(ref.blocks[block], torch.cat([cls, pooled], 1), torch.cat([cls, pooled, img], 1))
        q2 = torch.cat([s1[:, :1], s1[:, 1:] + model.stvit_centre.weight], 1)
        t = _cross_block(ref.blocks[block + 1], q2, torch.cat([q2, img], 1))
        for blk in ref.blocks[block + 2 :]:
            t = blk(t)
        expected = ref.forward_head(ref.norm(t))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_token_counts_and_protected_cls(deit_tiny, images):
    apply_reduction(deit_tiny, "stvit")  # default block 4, 4x4 = 16 semantic tokens
    state = deit_tiny.forward_tokens(images[:2])
    assert state.tokens_per_block == [197] * 4 + [17] * 8
    assert state.x.shape == (2, 17, 192)
    assert deit_tiny.reduction.new_module_names() == ["stvit_centre"]


def test_distilled_deit_keeps_both_prefix_tokens():
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    apply_reduction(m, "stvit", block=6, pool_size=3)
    state = m.forward_tokens(torch.randn(1, 3, 224, 224))
    assert state.tokens_per_block == [198] * 6 + [11] * 6


def test_batch_independence():
    model = apply_reduction(_tiny_vit(), "stvit", block=1, pool_size=2, recover=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        both = model.forward_tokens(x)
        one = model.forward_tokens(x[1:2])
    torch.testing.assert_close(both.x[1:2], one.x, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.extras["recovered"][1:2], one.extras["recovered"], rtol=0, atol=1e-5)


def test_gradients_reach_new_modules_and_generation_blocks():
    model = apply_reduction(_tiny_vit(), "stvit", block=2, pool_size=2, recover=True).train()
    state = model.forward_tokens(torch.randn(2, 3, 64, 64))
    (model.forward_head(state.x).sum() + state.extras["recovered"].square().mean()).backward()
    for name in model.reduction.new_module_names():
        for pname, p in getattr(model, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (128, 160)])
def test_recovered_map_shape_for_several_image_sizes(size):
    model = apply_reduction(_tiny_vit(dynamic_img_size=True), "stvit", block=2, pool_size=2, recover=True)
    with torch.no_grad():
        state = model.forward_tokens(torch.randn(2, 3, *size))
    assert state.extras["recovered"].shape == (2, 48, size[0] // 8, size[1] // 8)
    assert state.tokens_per_block[-1] == 1 + 4


def test_recovery_initialised_from_last_block(deit_tiny):
    apply_reduction(deit_tiny, "stvit", recover=True)
    rec, last = deit_tiny.stvit_recover, deit_tiny.blocks[-1]
    torch.testing.assert_close(torch.cat([rec.q.weight, rec.kv.weight]), last.attn.qkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(rec.mlp.fc2.weight, last.mlp.fc2.weight, rtol=0, atol=0)
    assert deit_tiny.reduction.new_module_names() == ["stvit_centre", "stvit_recover"]


def test_deit_s_default_loses_about_60_percent_of_gmacs():
    full = count_gmacs(timm.create_model("deit_small_patch16_224", pretrained=False))
    reduced = count_gmacs(apply_reduction(timm.create_model("deit_small_patch16_224", pretrained=False), "stvit"))
    assert full == pytest.approx(4.60, abs=0.01)
    assert 0.55 <= 1 - reduced / full <= 0.62, (full, reduced)


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(block=11), r"block 11\): .* block must be in \[0, 10\]"),
        (dict(block=-1), r"block -1 is not a block index of this 12-block model; use a 0-based int in \[0, 11\]"),
        (dict(block=1.5), r"a float is a fraction of the depth in \[0, 1\)"),
        (dict(pool_size=15), "larger than the 14x14"),
        (dict(pool_size=0), ">= 1"),
        (dict(pool_size=[2, 2, 2]), "int or"),
        (dict(pool="mean"), "'max'"),
        (dict(unknown=1), "unexpected keyword|unknown"),
    ],
)
def test_bad_params_are_clear_errors(deit_tiny, params, match):
    with pytest.raises((ReductionConfigError, TypeError), match=match):
        apply_reduction(deit_tiny, "stvit", **params)
