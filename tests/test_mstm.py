"""MSTM (reconstructed): token counts, protected prefix tokens, conservation on hand-made inputs,
exact off-the-shelf fusion, learned fusion, determinism, gradients, parameter errors, DeiT-S GMACs."""

from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from src.models.profile import count_gmacs
from src.models.reduction import ReductionConfigError, apply_reduction, remove_reduction
from src.models.reduction.mstm import MultiScaleFusion, merge_into_crucial
from tests.tiny import images32 as images
from tests.tiny import tiny_grid8 as tiny

CONF = Path(__file__).resolve().parents[1] / "conf" / "method" / "mstm.yaml"


def perturb_fusion(model) -> None:
    with torch.no_grad():
        for p in model.mstm_fusion.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)


def test_keep_rate_one_is_the_unpatched_model():
    model, x = tiny(), images()
    ref = model(x)
    apply_reduction(model, "mstm", keep_rate=1.0, locations=[1, 2])
    assert torch.equal(model(x), ref)


def test_fusion_is_exactly_zero_at_init():
    x = images()
    plain = apply_reduction(tiny(), "mstm", keep_rate=0.5, locations=[1, 2], fusion=False)(x)
    model = apply_reduction(tiny(), "mstm", keep_rate=0.5, locations=[1, 2])
    assert torch.equal(model(x), plain)
    perturb_fusion(model)  # once learned, the fusion changes the output
    assert not torch.allclose(model(x), plain)


def test_fusion_adds_pooled_coarse_maps():
    torch.manual_seed(0)
    fusion = MultiScaleFusion(4, scales=(2, 4))
    with torch.no_grad():
        for proj in fusion.proj:
            proj.weight.copy_(torch.eye(4))
    patches = torch.randn(1, 8, 8, 4)
    # coarse maps by reshaping into blocks (independent of the pooling op), normalised, broadcast back
    expected = patches.clone()
    for s in (2, 4):
        blocks = patches.reshape(1, 8 // s, s, 8 // s, s, 4).mean(dim=(2, 4))
        coarse = torch.nn.functional.layer_norm(blocks, (4,))
        expected += coarse.repeat_interleave(s, 1).repeat_interleave(s, 2)
    torch.testing.assert_close(fusion(patches), expected)


def test_fusion_is_trained_through_the_method_parameter_mechanism():
    model = apply_reduction(tiny().train(), "mstm", keep_rate=0.5, locations=[1, 2])
    assert model.reduction.new_module_names() == ["mstm_fusion"]
    assert isinstance(model.mstm_fusion, MultiScaleFusion)
    model(images(2)).logsumexp(-1).sum().backward()
    for proj in model.mstm_fusion.proj:  # zero-initialised, yet they get a gradient at once
        assert proj.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if name.startswith("mstm_fusion.norm"):
            continue  # its output is multiplied by the zero projection at init
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert apply_reduction(tiny(), "mstm", fusion=False, locations=[1]).reduction.new_module_names() == []


def test_reapplying_keeps_the_trained_fusion_module():
    model = apply_reduction(tiny(), "mstm", keep_rate=0.5, locations=[1, 2])
    perturb_fusion(model)
    module = model.mstm_fusion
    apply_reduction(model, "mstm", keep_rate=0.6, locations=[1, 2])
    assert model.mstm_fusion is module
    # other scales: re-applying would re-initialise the trained module, so it is refused
    with pytest.raises(ReductionConfigError, match="mstm_fusion"):
        apply_reduction(model, "mstm", keep_rate=0.6, locations=[1, 2], scales=[2])
    assert model.mstm_fusion is module
    apply_reduction(remove_reduction(model, drop_modules=True), "mstm", keep_rate=0.6, locations=[1, 2], scales=[2])
    assert model.mstm_fusion is not module and model.mstm_fusion.scales == (2,)


def test_token_counts_per_block():
    # M=64: keep ceil(0.5*64)=32 crucial tokens (+CLS) -> 33; M=32: 16 -> 17; nothing else is appended
    model = apply_reduction(tiny(), "mstm", keep_rate=0.5, locations=[1, 2])
    assert model.forward_tokens(images()).tokens_per_block == [65, 33, 17, 17]
    model = apply_reduction(tiny(), "mstm", keep_rate=[0.3, 0.9], locations=[0, 3])
    # per-location rates: ceil(0.3*64)=20 -> 21, then ceil(0.9*20)=18 -> 19
    assert model.forward_tokens(images()).tokens_per_block == [21, 21, 21, 19]


def test_merge_into_crucial_on_hand_made_tokens():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [2.0], [1.0]]])
    source = torch.eye(5)[None]
    crucial, rest = torch.tensor([[0, 1]]), torch.tensor([[2, 3, 4]])
    out, new_size, new_source = merge_into_crucial(x, size, source, crucial, rest)
    # token 2 -> token 0 (cos 1, weight 1 * 1); token 3 -> token 1 (cos 1, weight 2 * 1);
    # token 4 -> token 1 (cos 0 with token 1 beats cos -1 with token 0: weight 1 * (1 + 0) / 2)
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 2]) / 2)
    torch.testing.assert_close(out[0, 1], (x[0, 1] + 2 * x[0, 3] + 0.5 * x[0, 4]) / 3.5)
    assert new_size[0, :, 0].tolist() == [2.0, 4.0]
    assert new_source[0].tolist() == [[1, 0, 1, 0, 0], [0, 1, 0, 1, 1]]


@pytest.mark.parametrize("distilled", [False, True])
def test_prefix_tokens_are_protected_and_nothing_is_discarded(distilled):
    model = apply_reduction(tiny(distilled), "mstm", trace_source=True, keep_rate=0.4, locations=[0, 1, 2])
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
    assert all(seen.values()) and len(seen) == 4
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(3, p, p))
    assert state.source[:, :p, p:].sum() == 0 and state.source[:, p:, :p].sum() == 0
    assert torch.equal(state.source[:, p:, p:].sum(1), torch.ones(3, 64))  # every patch kept in one token
    assert torch.equal(state.size[:, :, 0], state.source.sum(-1))


def test_deterministic_and_batch_independent():
    model = apply_reduction(tiny(), "mstm", keep_rate=0.5, locations=[1, 2])
    perturb_fusion(model)
    x = images(3)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(keep_rate=0.0), "keep_rate must be a number in \\(0, 1\\], got 0.0"),
        (dict(keep_rate=1.01), "got 1.01"),
        (dict(keep_rate=[0.5]), "1 entries but there are 2 locations"),
        (dict(locations=[2, 7]), "location 7 is not a block index"),
        (dict(locations=[2, 2]), "must not repeat"),
        (dict(locations=[]), "at least one location"),
        (dict(scales=[1]), "pooling windows >= 2"),
        (dict(scales=[2, 16]), "must not exceed the 8x8 patch grid"),
        (dict(fusion="yes"), "fusion must be true or false"),
        (dict(ratio=0.5), "does not take \\['ratio'\\]"),
    ],
)
def test_bad_parameters_raise_at_apply_time(params, match):
    params = {"locations": [1, 2], **params}
    with pytest.raises(ReductionConfigError, match=match):
        apply_reduction(tiny(), "mstm", **params)


def test_needs_a_class_token():
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, class_token=False, global_pool="avg"
    )
    with pytest.raises(ReductionConfigError, match="needs a model with a class token"):
        apply_reduction(model, "mstm", locations=[0])


def test_config_file_applies():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    assert cfg["name"] == "mstm"
    model = apply_reduction(tiny(), cfg["name"], **{**cfg["params"], "locations": [1, 2], "scales": [2, 4]})
    assert model.forward_tokens(images()).tokens_per_block == [65, 46, 33, 33]  # ceil(.7*64)=45, ceil(.7*45)=32


def test_default_schedule_saves_about_a_third_of_deit_s_compute():
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    full = count_gmacs(model)
    apply_reduction(model, "mstm")
    with torch.no_grad():
        counts = model.forward_tokens(torch.randn(1, 3, 224, 224)).tokens_per_block
    assert counts == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    saving = 1 - count_gmacs(model) / full
    assert 0.31 <= saving <= 0.35, saving  # the paper's headline: 33% fewer


def test_unsorted_locations_pair_with_their_keep_rates(deit_tiny):
    """A per-location keep-rate list pairs with the locations as given, in any order."""
    from src.models import apply_reduction

    counts = (
        apply_reduction(deit_tiny, "mstm", keep_rate=[0.5, 0.9], locations=[6, 2])
        .forward_tokens(torch.randn(1, 3, 224, 224))
        .tokens_per_block
    )
    assert counts[2] == 1 + 177 and counts[6] == 1 + 89  # ceil(0.9 * 196) at block 2, then ceil(0.5 * 177)
