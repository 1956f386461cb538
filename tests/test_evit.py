"""EViT: token counts, protected tokens, fused token, reference semantics, identity, errors, GMACs."""

import math

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.base import AttentionResult, TokenState
from tests.tiny import images, tiny_vit


# --- an independent, loop-by-block rendering of youweiliang/evit (explicit attention) ---------------
def evit_reference_logits(model, x, keep_rates, fuse_token):
    """keep_rates: one rate per block (1 = no reduction), as the reference's per-depth tuple."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk, rate in zip(model.blocks, keep_rates):
        B, N, C = t.shape
        a = blk.attn
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        t = t + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        left = math.ceil(rate * (N - 1))
        if rate < 1 and left != N - 1:
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            rest = t[:, 1:]
            kept = rest.gather(1, idx[..., None].expand(-1, -1, C))
            parts = [t[:, :1], kept]
            if fuse_token:
                marked = torch.arange(N - 1).expand(B, -1).scatter(1, idx, -1)
                compl = marked.sort(dim=1)[0][:, left:]  # ascending original order, as complement_idx
                w = cls_attn.gather(1, compl)
                dropped = rest.gather(1, compl[..., None].expand(-1, -1, C))
                parts.append((dropped * w[..., None]).sum(dim=1, keepdim=True))
            t = torch.cat(parts, dim=1)
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize(
    "keep_rate,locations,fuse",
    [(0.7, [1, 2, 3], True), (0.5, [0, 2], False), ([0.9, 0.6, 0.5], [0, 1, 3], True), (0.35, [0], True)],
)
def test_matches_reference_semantics(keep_rate, locations, fuse):
    model = tiny_vit().double()
    x = images().double()
    rates = [1.0] * len(model.blocks)
    for j, loc in enumerate(locations):
        rates[loc] = keep_rate[j] if isinstance(keep_rate, list) else keep_rate
    with torch.no_grad():
        expected = evit_reference_logits(model, x, rates, fuse)
        apply_reduction(model, "evit", keep_rate=keep_rate, locations=locations, fuse_token=fuse)
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_token_counts_deit_tiny():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        apply_reduction(model, "evit", keep_rate=0.7, locations=[3, 6, 9], fuse_token=True)
        fused = model.forward_tokens(x).tokens_per_block
        apply_reduction(model, "evit", keep_rate=0.7, locations=[3, 6, 9], fuse_token=False)
        plain = model.forward_tokens(x).tokens_per_block
    # ceil(0.7 * 196) = 138 kept + CLS + fused; the fused token counts among the next 139 candidates
    assert fused == [197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72, 72]
    assert plain == [197, 197, 197, 139, 139, 139, 98, 98, 98, 69, 69, 69]


@pytest.mark.parametrize(
    "img_size,patch_size,keep,expected",
    [
        (160, 16, 0.7, [101, 72, 72, 52, 38, 38]),  # 100 patches: 70, 50, 36 kept (+CLS +fused)
        (224, 32, 0.5, [27, 15, 15, 9, 9, 9]),  # 49 patches: 25, 13, 7 kept
    ],
)
def test_token_counts_other_sizes(img_size, patch_size, keep, expected):
    model = tiny_vit(img_size=img_size, patch_size=patch_size, depth=6)
    apply_reduction(model, "evit", keep_rate=keep, locations=[1, 3, 4] if img_size == 160 else [0, 1, 3])
    with torch.no_grad():
        state = model.forward_tokens(images(2, img_size))
    assert state.tokens_per_block == expected


def test_fused_token_is_unnormalised_attention_weighted_sum_and_differentiable():
    model = tiny_vit()
    method = apply_reduction(model, "evit", keep_rate=0.5, locations=[0]).reduction
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5, requires_grad=True)  # CLS + 6 tokens
    attn = torch.softmax(torch.randn(2, 3, 7) * 3, dim=-1)
    state = TokenState(x=x, num_protected=1, grid_size=(2, 3))
    res = AttentionResult(out=torch.zeros_like(x), keys=torch.zeros(2, 3, 7, 4), cls_attn=attn)
    out = method.after_attention(0, state, res).x
    w = attn[:, :, 1:].mean(1)  # (2, 6)
    order = w.argsort(dim=1, descending=True)
    assert out.shape == (2, 1 + 3 + 1, 5)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # CLS untouched, first
    for b in range(2):
        kept, dropped = order[b, :3], order[b, 3:]
        torch.testing.assert_close(out[b, 1:4], x[b, 1 + kept])  # descending attention order
        expected = (w[b, dropped, None] * x[b, 1 + dropped]).sum(0)  # no division by the weights' sum
        torch.testing.assert_close(out[b, 4], expected)
        assert w[b, dropped].sum() < 1
    # gradients flow into the fused members with their attention weights
    (grad,) = torch.autograd.grad(out[:, 4].sum(), x)
    for b in range(2):
        dropped = order[b, 3:]
        torch.testing.assert_close(grad[b, 1 + dropped], w[b, dropped, None].expand(-1, 5).detach())


def test_gradients_reach_every_block_in_training():
    model = tiny_vit().train()
    apply_reduction(model, "evit", keep_rate=0.5, locations=[0, 2])
    model(images(2)).logsumexp(-1).sum().backward()
    for i, blk in enumerate(model.blocks):
        g = blk.attn.qkv.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"block {i}"


def test_protected_tokens_and_source_partition():
    model = tiny_vit(cls=VisionTransformerDistilled)
    apply_reduction(model, "evit", trace_source=True, keep_rate=0.6, locations=[0, 1, 2])
    with torch.no_grad():
        state = model.forward_tokens(images(2))
    assert model.num_prefix_tokens == 2
    # 64 patches: ceil(.6*64)=39 (+2 prefix +fused = 42), ceil(.6*40)=24 -> 27, ceil(.6*25)=15 -> 18
    assert state.tokens_per_block == [42, 27, 18, 18]
    src = state.source
    assert torch.equal(src[:, 0], torch.eye(66)[0].expand(2, -1))  # CLS stands for itself only
    assert torch.equal(src[:, 1], torch.eye(66)[1].expand(2, -1))  # distillation token too
    # every patch is represented by exactly one token (a kept one or the fused one)
    assert torch.equal(src[:, 2:, 2:].sum(1), torch.ones(2, 64))
    assert src[:, -1].sum(-1).min() > 1  # the fused token stands for many patches


def test_batch_independence():
    model = tiny_vit()
    apply_reduction(model, "evit", keep_rate=0.5, locations=[0, 1, 3])
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        dict(keep_rate=1.0, locations=[0, 2]),
        dict(keep_rate=0.5, locations=[]),
        dict(keep_rate=[1, 1], locations=[1, 3]),
    ],
)
def test_keep_one_is_the_unpatched_model(params):
    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        apply_reduction(model, "evit", **params)
        got = model(x)
    assert model.forward_tokens(x).tokens_per_block == [65] * 4
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(keep_rate=0.0), "keep_rate"),
        (dict(keep_rate=1.5), "keep_rate"),
        (dict(keep_rate=-0.2), "keep_rate"),
        (dict(keep_rate="0.7"), "keep_rate"),
        (dict(keep_rate=[0.7, 0.7]), "one keep rate per location"),
        (dict(keep_rate=[0.7, 2.0, 0.7]), r"keep_rate\[1\]"),
        (dict(locations=[4]), "location 4"),
        (dict(locations=[-1]), "location -1"),
        (dict(locations=[1, 1]), "repeat"),
        (dict(locations=3), "list of block indices"),
        (dict(fuse_token="yes"), "fuse_token"),
        (dict(keep=0.7), "does not take"),
    ],
)
def test_bad_params_raise_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(), "evit", **{"locations": [0, 1, 2], **params})


def test_model_without_class_token_is_rejected():
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=False, global_pool="avg"
    )
    with pytest.raises(ReductionConfigError, match="class token"):
        apply_reduction(model, "evit")


@pytest.mark.parametrize("keep,published", [(0.7, 3.0), (0.5, 2.3)])
def test_gmacs_deit_small(keep, published):
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    apply_reduction(model, "evit", keep_rate=keep, locations=[3, 6, 9], fuse_token=True)
    assert abs(count_gmacs(model) - published) <= 0.05
