"""BAT (reconstructed): token counts, protected prefix tokens, conservation on hand-made inputs,
determinism, gradients, parameter errors and the published DeiT-S compute."""

import math
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from src.models.profile import count_gmacs
from src.models.reduction import AttentionResult, ReductionConfigError, TokenState, apply_reduction
from src.models.reduction.bat import (
    BAT,
    bipartite_pair_merge,
    cluster_merge,
    default_cluster_ratio,
    dpc_knn_assign,
)
from tests.tiny import images32 as images
from tests.tiny import tiny_grid8 as tiny

CONF = Path(__file__).resolve().parents[1] / "conf" / "method" / "bat.yaml"


def test_keep_rate_one_is_the_unpatched_model():
    model, x = tiny(), images()
    ref = model(x)
    apply_reduction(model, "bat", keep_rate=1.0, locations=[1, 2])
    assert torch.equal(model(x), ref)
    assert model.forward_tokens(x).tokens_per_block == [65] * 4


def test_token_counts_per_block():
    # M=64: K=ceil(0.5*64)=32 attentive, I=32 -> ceil(0.25*32)=8 clusters, floor(0.25*32)=8 pairs: 1+32-8+8=33
    # M=32: K=16, I=16 -> 4 clusters, 4 pairs: 1+16-4+4=17
    model = apply_reduction(tiny(), "bat", keep_rate=0.5, locations=[1, 2], cluster_ratio=0.25, pair_ratio=0.25)
    state = model.forward_tokens(images())
    assert state.tokens_per_block == [65, 33, 17, 17]
    assert model.reduction.expected_tokens == [65, 33, 17, 17]
    # uneven counts: M=64, keep 0.3 -> K=20, I=44 -> ceil(0.1*44)=5 clusters, floor(0.1*20)=2 pairs: 1+20-2+5=24
    model = apply_reduction(tiny(), "bat", keep_rate=0.3, locations=[2], cluster_ratio=0.1, pair_ratio=0.1)
    assert model.forward_tokens(images()).tokens_per_block == [65, 65, 24, 24]


def test_default_deit_s_token_counts():
    # keep 0.7: K=138, I=58 -> ceil(0.45*58)=27 clusters, floor(0.2*138)=27 pairs -> 139 tokens, then 98, 70
    model = apply_reduction(timm.create_model("deit_small_patch16_224", pretrained=False).eval(), "bat")
    with torch.no_grad():
        counts = model.forward_tokens(torch.randn(1, 3, 224, 224)).tokens_per_block
    assert counts == [197] * 3 + [139] * 3 + [98] * 3 + [70] * 3


@pytest.mark.parametrize("distilled", [False, True])
def test_prefix_tokens_are_protected(distilled):
    model = apply_reduction(
        tiny(distilled), "bat", trace_source=True, keep_rate=0.4, locations=[0, 1, 2], cluster_ratio=0.3, pair_ratio=0.3
    )
    p = model.num_prefix_tokens
    seen = {}
    inner = model.reduction.after_attention

    def spy(i, state, res):
        before = state.x[:, :p].clone()
        state = inner(i, state, res)
        seen[i] = torch.equal(state.x[:, :p], before)
        return state

    model.reduction.after_attention = spy
    state = model.forward_tokens(images())
    assert seen == {0: True, 1: True, 2: True, 3: True}
    # each prefix token stands only for itself, and no merged token contains a prefix token
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(3, p, p))
    assert state.source[:, :p, p:].sum() == 0 and state.source[:, p:, :p].sum() == 0
    # every patch is in exactly one token, and a token's size is the number of patches it stands for
    assert torch.equal(state.source[:, p:, p:].sum(1), torch.ones(3, 64))
    assert torch.equal(state.size[:, :, 0], state.source.sum(-1))


def test_dpc_knn_clusters_separated_groups_deterministically():
    # three groups of different tightness: the densest point of each becomes a centre
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.2, 5.0], [-5.0, 5.0], [-5.0, 5.3]])
    assign = dpc_knn_assign(pts[None], num_clusters=3, k=2)
    groups = [sorted((assign[0] == c).nonzero().flatten().tolist()) for c in range(3)]
    assert groups == [[0, 1, 2], [3, 4], [5, 6]]  # clusters in order of density x distance
    assert torch.equal(dpc_knn_assign(pts[None], 3, 2), assign)  # no random noise


def test_dpc_knn_duplicate_tokens_tie_break_by_order():
    # exact density ties: the earlier duplicate is the peak, so the two centres are 0 and 2, not 0 and 1
    pts = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 3.0], [3.0, 3.0]]])
    assert dpc_knn_assign(pts, num_clusters=2, k=2)[0].tolist() == [0, 0, 1, 1]


def test_cluster_merge_is_attention_weighted_average():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [0.0, 4.0]]])
    weight = torch.tensor([[0.1, 0.3, 0.2, 0.4]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [3.0]]])
    source = torch.eye(4)[None]
    assign = torch.tensor([[0, 0, 1, 0]])
    merged, new_size, new_source = cluster_merge(assign, 2, x, weight, size, source)
    expected0 = (0.1 * x[0, 0] + 0.3 * x[0, 1] + 0.4 * x[0, 3]) / 0.8
    torch.testing.assert_close(merged[0, 0], expected0)
    torch.testing.assert_close(merged[0, 1], x[0, 2])
    assert new_size[0, :, 0].tolist() == [6.0, 1.0]
    assert new_source[0].tolist() == [[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]


def test_pair_merge_is_size_weighted_average_of_the_best_pair():
    # A = positions 0, 2; B = 1, 3. Token 2 (A) matches token 1 (B) almost exactly; token 0 does not match.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]]])
    x = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 3.0], [7.0, 7.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0], [1.0]]])
    out, new_size, _ = bipartite_pair_merge(metric, 1, x, size, None)
    # [unmatched A (token 0), B (token 1 + token 2, token 3)]
    torch.testing.assert_close(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 1], (3.0 * x[0, 1] + 1.0 * x[0, 2]) / 4.0)
    torch.testing.assert_close(out[0, 2], x[0, 3])
    assert new_size[0, :, 0].tolist() == [1.0, 4.0, 1.0]


def test_hook_on_hand_made_tokens():
    """Whole BAT step on a hand-made state: which tokens are attentive, who merges with whom, weights."""
    model = tiny()
    bat = BAT(model, keep_rate=0.5, locations=[0], cluster_ratio=0.5, pair_ratio=0.25)
    cls = torch.tensor([[9.0, 9.0]])
    # attentive (high CLS attention) tokens t0..t3, inattentive t4..t7 (two tight pairs far apart)
    patches = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0], [10.0, 0.0], [10.2, 0.0], [-10.0, 0.0], [-10.0, 0.2]]
    )
    x = torch.cat([cls, patches])[None]
    attn = torch.tensor([0.2, 0.19, 0.18, 0.17, 0.16, 0.04, 0.02, 0.03, 0.01])
    keys = x.clone()  # metric = the features themselves: t2 matches t1 (cos 1)
    res = AttentionResult(out=x, keys=keys[:, None], cls_attn=attn[None, None])
    state = TokenState(x=x.clone(), num_protected=1, grid_size=(2, 4))
    out = bat.after_attention(0, state, res).x[0]
    assert out.shape == (1 + 4 - 1 + 2, 2)
    torch.testing.assert_close(out[0], cls[0])
    # attention order t0, t1, t2, t3: A = t0, t2; B = t1, t3; the one pair is t2 -> t1 (sizes 1: plain mean)
    torch.testing.assert_close(out[1:4], torch.stack([patches[0], (patches[1] + patches[2]) / 2, patches[3]]))
    clusters = sorted(out[4:].tolist())
    a = attn[1:]
    right = (a[4] * patches[4] + a[5] * patches[5]) / (a[4] + a[5])
    left = (a[6] * patches[6] + a[7] * patches[7]) / (a[6] + a[7])
    torch.testing.assert_close(torch.tensor(clusters), torch.stack([left, right]))
    assert state.size[0, :, 0].tolist()[:4] == [1.0, 1.0, 2.0, 1.0] and sorted(state.size[0, 4:, 0].tolist()) == [
        2.0,
        2.0,
    ]


def test_deterministic_and_batch_independent():
    model = apply_reduction(tiny(), "bat", keep_rate=0.5, locations=[1, 2])
    x = images(3)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[1:2], rtol=1e-5, atol=1e-5)


def test_gradients_flow():
    model = apply_reduction(tiny().train(), "bat", keep_rate=0.5, locations=[1, 2])
    model(images(2)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.blocks[3].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(keep_rate=0.0), "keep_rate must be a number in \\(0, 1\\], got 0.0"),
        (dict(keep_rate=1.5), "got 1.5"),
        (dict(keep_rate=True), "got True"),
        (dict(keep_rate=[0.5, 0.5]), "2 entries but there are 3 locations"),
        (dict(locations=[1, 4]), "location 4 is not a block index"),
        (dict(locations=[-1]), "location -1"),
        (dict(locations=[1, 1]), "must not repeat"),
        (dict(locations=3), "must be a list"),
        (dict(cluster_ratio=0.0), "cluster_ratio must be a number in \\(0, 1\\], got 0.0"),
        (dict(cluster_ratio=1.2), "got 1.2"),
        (dict(pair_ratio=0.6), "pair_ratio must be a number in \\[0, 0.5\\], got 0.6"),
        (dict(pair_ratio=-0.1), "got -0.1"),
        (dict(knn=0), "knn .* got 0"),
        (dict(keep_rate=1.0, pair_ratio=0.2), "identity"),
        (dict(clusters=4), "does not take \\['clusters'\\]"),
    ],
)
def test_bad_parameters_raise_at_apply_time(params, match):
    params = {"locations": [1, 2, 3], **params}
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny(), "bat", **params)


def test_needs_a_class_token():
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, class_token=False, global_pool="avg"
    )
    with pytest.raises(ReductionConfigError, match="needs a model with a class token"):
        apply_reduction(model, "bat", locations=[0])


def test_default_cluster_ratio_rule():
    assert default_cluster_ratio(0.7) == 0.45 and default_cluster_ratio(0.2) == 0.05
    assert math.isclose(default_cluster_ratio(0.65), (0.26 + 0.45) / 2)
    assert default_cluster_ratio(0.9) == 0.45 and default_cluster_ratio(0.1) == 0.05


def test_config_file_applies_with_the_class_defaults():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    assert cfg["name"] == "bat"
    model = apply_reduction(tiny(), cfg["name"], **{**cfg["params"], "locations": [1, 2]})
    assert model.reduction.plan == apply_reduction(tiny(), "bat", locations=[1, 2]).reduction.plan


# Published DeiT-S compute (BAT README / logs, torchprofile GMACs) per keep rate.
PUBLISHED_GMACS = {0.7: 3.005, 0.6: 2.583, 0.5: 2.344, 0.4: 2.083, 0.3: 1.823, 0.2: 1.645}


@pytest.mark.parametrize("keep_rate", sorted(PUBLISHED_GMACS))
def test_counted_gmacs_match_the_published_compute(keep_rate):
    model = apply_reduction(timm.create_model("deit_small_patch16_224", pretrained=False), "bat", keep_rate=keep_rate)
    assert abs(count_gmacs(model) - PUBLISHED_GMACS[keep_rate]) <= 0.03
