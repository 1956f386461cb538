"""ToFu properties (the golden logits are checked in test_golden.py)."""

import copy
import math

import pytest
import timm
import torch

from src.models import ReductionConfigError, apply_reduction, load_weights
from src.models.profile import count_gmacs
from src.models.reduction.base import AttentionResult, TokenState
from src.models.reduction.tofu import ToFu
from tests import golden
from tests.tiny import images as tiny_images
from tests.tiny import tiny_vit


def expected_counts(n, ratio, depth, prefix=1):
    out = []
    for _ in range(depth):
        n -= min(math.floor(n - n * ratio), (n - prefix) // 2)  # N includes the prefix tokens
        out.append(n)
    return out


@pytest.mark.parametrize("ratio", [0.9, 0.95, 0.8, 0.5])
def test_token_counts_per_block(ratio):
    model = apply_reduction(tiny_vit(0), "tofu", ratio=ratio)  # 64 patches, 4 blocks
    state = model.forward_tokens(tiny_images(1))
    assert state.tokens_per_block == expected_counts(65, ratio, 4)
    assert state.tokens_per_block[-1] < 65


def test_token_counts_of_deit_at_224(deit_tiny, images):
    state = apply_reduction(deit_tiny, "tofu", ratio=0.9).forward_tokens(images[:1])
    assert state.tokens_per_block == [178, 161, 145, 131, 118, 107, 97, 88, 80, 72, 65, 59]


def test_ratio_one_equals_unpatched_timm_exactly():
    ref, x = tiny_vit(0), tiny_images(2)
    model = apply_reduction(copy.deepcopy(ref), "tofu", ratio=1.0)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert model.forward_tokens(x).tokens_per_block == [65] * 4


def test_cls_stays_first_and_alone():
    model = apply_reduction(tiny_vit(0), "tofu", ratio=0.6, strategy="mean", trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(tiny_images(3))
    assert state.source.shape[1] == state.tokens_per_block[-1] < 20
    assert torch.equal(state.source[:, 0], torch.eye(65)[0].expand(3, -1))
    assert torch.equal(state.source.sum(1), torch.ones(3, 65))  # merged by max: every patch in one token
    assert state.size is None  # the port tracks no sizes


def test_distilled_deit_protects_both_prefix_tokens():
    model = apply_reduction(
        tiny_vit(0, cls=timm.models.deit.VisionTransformerDistilled),
        "tofu",
        ratio=0.6,
        strategy="tofu",
        trace_source=True,
    )
    with torch.no_grad():
        state = model.forward_tokens(tiny_images(2))
    eye = torch.eye(66)
    assert torch.equal(state.source[:, 0], eye[0].expand(2, -1))
    assert torch.equal(state.source[:, 1], eye[1].expand(2, -1))  # never a destination
    assert state.tokens_per_block == expected_counts(66, 0.6, 4, prefix=2)
    assert model(tiny_images(2)).shape == (2, 10)


def _naive(x, keys, ratio, strategy, p=1):
    """The port's block merge written out per image with Python lists."""
    outs = []
    t = x.shape[1]
    r = min(math.floor(t - t * ratio), (t - p) // 2)
    for b in range(x.shape[0]):
        m = keys[b] / keys[b].norm(dim=-1, keepdim=True)
        a, bb = list(range(0, t, 2)), list(range(1, t, 2))
        best, score = {}, {}
        for i in a:
            cands = [j for j in bb if j >= p]
            best[i] = max(cands, key=lambda j: (m[i] @ m[j]).item())
            score[i] = -math.inf if i < p else (m[i] @ m[best[i]]).item()
        ranked = sorted(a, key=lambda i: -score[i])
        src = ranked[:r]
        unm = sorted(ranked[r:])
        groups = {j: [i for i in src if best[i] == j] for j in bb}
        rows = [x[b, i] for i in unm]
        for j in bb:
            members = [x[b, j]] + [x[b, i] for i in groups[j]]
            if strategy == "prune":
                rows.append(x[b, j])
            elif strategy == "amax":
                rows.append(torch.stack(members).amax(0))
            else:
                mean = torch.stack(members).mean(0)
                if strategy == "tofu":
                    mean = mean / x[b, j].norm() * max(v.norm() for v in members)
                rows.append(mean)
        outs.append(torch.stack(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("strategy", ["prune", "tofu", "mean", "amax"])
@pytest.mark.parametrize("ratio", [0.8, 0.55])
def test_strategies_match_a_naive_per_image_reading_of_the_port(strategy, ratio):
    g = torch.Generator().manual_seed(5)
    B, N, C, H = 2, 17, 6, 2
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    keys = torch.randn(B, H, N, 4, generator=g, dtype=torch.float64)
    method = ToFu(tiny_vit(0), ratio=ratio, strategy=strategy)
    state = TokenState(x=x.clone(), num_protected=1, grid_size=(4, 4))
    state = method.after_attention(0, state, AttentionResult(out=x, keys=keys))
    want = _naive(x, keys.mean(1), ratio, strategy)
    assert state.x.shape == want.shape and state.x.shape[1] < N
    torch.testing.assert_close(state.x, want, rtol=1e-12, atol=1e-12)


def test_default_strategy_follows_the_depth():
    assert ToFu(tiny_vit(0, depth=12)).strategy == ["prune"] * 7 + ["tofu"] * 5
    assert ToFu(tiny_vit(0, depth=4)).strategy == ["prune"] * 3 + ["tofu"]
    assert ToFu(tiny_vit(0), strategy="mean").strategy == ["mean"] * 4


def test_strategies_change_the_result():
    x = tiny_images(2)
    with torch.no_grad():
        outs = [
            apply_reduction(tiny_vit(0), "tofu", ratio=0.8, strategy=s)(x) for s in ("prune", "tofu", "mean", "amax")
        ]
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j])


def test_float64_runs_in_float64():
    model = apply_reduction(tiny_vit(0).double(), "tofu", ratio=0.8, strategy="tofu")
    with torch.no_grad():
        assert model.forward_tokens(tiny_images(2).double()).x.dtype == torch.float64


def test_batch_independence():
    model, x = apply_reduction(tiny_vit(0), "tofu", ratio=0.8, strategy="tofu"), tiny_images(3)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["prune", "tofu"])
def test_gradients_flow_in_train_mode(strategy):
    model = apply_reduction(tiny_vit(0).train(), "tofu", ratio=0.8, strategy=strategy)
    model(tiny_images(2)).square().mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "params,match",
    [
        ({"ratio": 0.4}, r"ratio=0\.4.*\[0\.5, 1\].*ratio=0\.9"),
        ({"ratio": 1.01}, r"ratio=1\.01"),
        ({"ratio": None}, r"ratio=None"),
        ({"strategy": "merge"}, r"strategy='merge' is not a strategy; use one of prune, tofu, mean, amax"),
        ({"strategy": ["prune"] * 12}, r"strategy has 12 entries but the model has 4 blocks"),
        ({"strategy": ["prune", "tofu", "sum", "mean"]}, r"strategy\[2\]='sum'"),
        ({"keep_rate": 0.5}, r"does not take \['keep_rate'\]"),
    ],
)
def test_bad_parameters_are_clear_errors_at_apply_time(params, match):
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny_vit(0), "tofu", **params)


def test_counted_gmacs_equal_the_golden_manifest():
    golden.require_golden()
    cases = golden.cases("tofu")
    assert cases
    for case in cases:
        torch.manual_seed(case["seed"])
        model = timm.create_model(case["model"], pretrained=False)
        load_weights(model, golden.case_state_dict(case))
        apply_reduction(model, case["method"], **case["params"])
        assert abs(count_gmacs(model, 224, 3) - case["gmacs"]) <= 0.005, case["id"]
