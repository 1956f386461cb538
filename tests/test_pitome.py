"""PiToMe properties (the golden logits are checked in test_golden.py)."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from src.models import ReductionConfigError, apply_reduction, load_weights
from src.models.profile import count_gmacs
from src.models.reduction.base import AttentionResult, TokenState
from src.models.reduction.pitome import PiToMe
from tests import golden
from tests.tiny import images as tiny_images
from tests.tiny import tiny_vit


def expected_counts(n, ratio, depth, prefix=1):
    out = []
    for _ in range(depth):
        t = n - prefix
        n -= math.floor(t - t * ratio)
        out.append(n)
    return out


@pytest.mark.parametrize("ratio", [0.9, 0.95, 0.8, 0.5])
def test_token_counts_per_block(ratio):
    model = apply_reduction(tiny_vit(0), "pitome", ratio=ratio)  # 64 patches, 4 blocks
    state = model.forward_tokens(tiny_images(1))
    assert state.tokens_per_block == expected_counts(65, ratio, 4)
    assert state.tokens_per_block[-1] < 65


def test_token_counts_of_deit_at_224(deit_tiny, images):
    state = apply_reduction(deit_tiny, "pitome", ratio=0.9).forward_tokens(images[:1])
    assert state.tokens_per_block == [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]


def test_ratio_one_equals_unpatched_timm_exactly():
    ref, x = tiny_vit(0), tiny_images(2)
    model = apply_reduction(copy.deepcopy(ref), "pitome", ratio=1.0)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert model.forward_tokens(x).tokens_per_block == [65] * 4


def test_cls_first_sizes_and_sources_partition_the_image():
    model = apply_reduction(tiny_vit(0), "pitome", ratio=0.8, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(tiny_images(3))
    src = state.source  # (B, N, 65)
    assert src.shape[1] == state.tokens_per_block[-1] < 40
    assert torch.equal(src[:, 0], torch.eye(65)[0].expand(3, -1))  # CLS stands for itself only, first
    assert torch.equal(src.sum(1), torch.ones(3, 65))  # every input token in exactly one token
    torch.testing.assert_close(state.size[..., 0], src.sum(-1))  # sizes count the merged patches


def test_distilled_deit_protects_both_prefix_tokens():
    model = apply_reduction(
        tiny_vit(0, cls=timm.models.deit.VisionTransformerDistilled), "pitome", ratio=0.8, trace_source=True
    )
    with torch.no_grad():
        state = model.forward_tokens(tiny_images(2))
    eye = torch.eye(66)
    assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
    assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))
    assert state.tokens_per_block == expected_counts(66, 0.8, 4, prefix=2)
    assert model(tiny_images(2)).shape == (2, 10)


def _naive(x, keys, size, ratio, margin, alpha, bsm, p=1):
    """The reference's block merge written out per image with Python lists."""
    out_x, out_size = [], []
    for b in range(x.shape[0]):
        m = F.normalize(keys[b, p:], dim=-1)
        sim = m @ m.T
        T = sim.shape[0]
        r = math.floor(T - T * ratio)
        order = torch.argsort(F.elu(sim - margin, alpha=alpha).mean(-1), descending=True).tolist()
        groups = {}  # destination token -> its sources
        if bsm:
            a, bb = order[0::2], order[1::2]
            best = [max(bb, key=lambda j: sim[i, j].item()) for i in a]
            score = [sim[i, j].item() for i, j in zip(a, best)]
            ranked = sorted(range(len(a)), key=lambda k: -score[k])
            kept = [a[k] for k in ranked[r:]] + bb
            for k in ranked[:r]:
                groups.setdefault(best[k], []).append(a[k])
        else:
            a, bb = order[: 2 * r : 2], order[1 : 2 * r : 2]
            kept = order[2 * r :] + bb
            for i in a:
                groups.setdefault(max(bb, key=lambda j: sim[i, j].item()), []).append(i)
        rows, sizes = [x[b, k] for k in range(p)], [size[b, k] for k in range(p)]
        for t in kept:
            members = [t] + groups.get(t, [])
            s = sum(size[b, p + j] for j in members)
            rows.append(sum(x[b, p + j] * size[b, p + j] for j in members) / s)
            sizes.append(s)
        out_x.append(torch.stack(rows))
        out_size.append(torch.stack(sizes))
    return torch.stack(out_x), torch.stack(out_size)


@pytest.mark.parametrize("bsm", [True, False])
@pytest.mark.parametrize("margin,alpha,ratio", [(0.5, 1.0, 0.8), (0.1, 0.3, 0.6)])
def test_merge_matches_a_naive_per_image_reading_of_the_reference(bsm, margin, alpha, ratio):
    g = torch.Generator().manual_seed(3)
    B, N, C, H = 2, 17, 6, 2
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    keys = torch.randn(B, H, N, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    method = PiToMe(tiny_vit(0), ratio=ratio, margin=margin, alpha=alpha, use_bsm_pitome=bsm)
    state = TokenState(x=x.clone(), num_protected=1, grid_size=(4, 4), size=size.clone())
    state = method.after_attention(0, state, AttentionResult(out=x, keys=keys))
    want_x, want_size = _naive(x, keys.mean(1), size, ratio, margin, alpha, bsm)
    assert state.x.shape == want_x.shape and state.x.shape[1] < N
    torch.testing.assert_close(state.x, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.size, want_size, rtol=0, atol=0)


def test_default_margins_and_splits_follow_the_depth():
    m = PiToMe(tiny_vit(0, depth=12))
    assert m.margin == [0.75 - 0.75 * i / 12 for i in range(12)] and m.margin[0] == 0.75
    assert m.use_bsm == [True] * 6 + [False] * 6
    m4 = PiToMe(tiny_vit(0, depth=4))
    assert m4.margin == [0.75, 0.5625, 0.375, 0.1875] and m4.use_bsm == [True, True, False, False]
    assert PiToMe(tiny_vit(0, depth=3)).use_bsm == [True, True, False]  # ceil(depth / 2)


def test_settings_change_the_result():
    x = tiny_images(2)
    with torch.no_grad():
        base = apply_reduction(tiny_vit(0), "pitome", ratio=0.8)(x)
        for kw in ({"use_bsm_pitome": False}, {"margin": 0.0}, {"alpha": 0.1}):
            assert not torch.allclose(apply_reduction(tiny_vit(0), "pitome", ratio=0.8, **kw)(x), base), kw


def test_float64_runs_in_float64():
    model = apply_reduction(tiny_vit(0).double(), "pitome", ratio=0.8)
    with torch.no_grad():
        state = model.forward_tokens(tiny_images(2).double())
    assert state.x.dtype == torch.float64 and state.size.dtype == torch.float64


def test_batch_independence():
    model, x = apply_reduction(tiny_vit(0), "pitome", ratio=0.8), tiny_images(3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_gradients_flow_in_train_mode():
    model = apply_reduction(tiny_vit(0).train(), "pitome", ratio=0.8)
    model(tiny_images(2)).square().mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the keys' effect on the output
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "params,match",
    [
        ({"ratio": 0.4}, r"ratio=0\.4.*\[0\.5, 1\].*ratio=0\.9"),
        ({"ratio": 1.5}, r"ratio=1\.5.*\[0\.5, 1\]"),
        ({"ratio": "0.9"}, r"ratio='0\.9'"),
        ({"ratio": True}, r"ratio=True"),
        ({"margin": [0.5] * 3}, r"margin has 3 entries but the model has 4 blocks"),
        ({"margin": 2.0}, r"margin=2\.0.*\[-1, 1\]"),
        ({"margin": [0.5, 0.5, "x", 0.5]}, r"margin\[2\]='x'"),
        ({"use_bsm_pitome": "yes"}, r"use_bsm_pitome='yes'.*true or false"),
        ({"use_bsm_pitome": [True] * 5}, r"use_bsm_pitome has 5 entries"),
        ({"alpha": 0}, r"alpha=0.*positive"),
        ({"r": 4}, r"does not take \['r'\]"),
    ],
)
def test_bad_parameters_are_clear_errors_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(0), "pitome", **params)


def test_counted_gmacs_equal_the_golden_manifest():
    golden.require_golden()
    cases = golden.cases("pitome")
    assert cases
    for case in cases:
        torch.manual_seed(case["seed"])
        model = timm.create_model(case["model"], pretrained=False)
        load_weights(model, golden.case_state_dict(case))
        apply_reduction(model, case["method"], **case["params"])
        assert abs(count_gmacs(model, 224, 3) - case["gmacs"]) <= 0.005, case["id"]
