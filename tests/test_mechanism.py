"""The shared patching mechanism: identity, explicit state, parameter names, attention paths, GMACs."""

import copy

import pytest
import timm
import torch

from src.models import REGISTRY, ReductionConfigError, apply_reduction, remove_reduction
from src.models.profile import count_gmacs, count_gmacs_split, side_work
from src.models.reduction.base import AttentionRequest, attention


def test_none_equals_unpatched_timm(deit_tiny, images):
    ref = copy.deepcopy(deit_tiny)
    with torch.no_grad():
        expected = ref(images)
        out = apply_reduction(deit_tiny, "none")(images)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_parameter_names_and_values_unchanged(deit_tiny):
    before = {k: v.clone() for k, v in deit_tiny.state_dict().items()}
    apply_reduction(deit_tiny, "tome", r=8)
    after = deit_tiny.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_features_can_be_called_repeatedly(deit_tiny, images):
    """No per-forward state hides in the model: calling forward_features directly works every time."""
    apply_reduction(deit_tiny, "tome", r=8)
    with torch.no_grad():
        a = deit_tiny.forward_features(images)
        b = deit_tiny.forward_features(images)
    assert a.shape == (3, 197 - 12 * 8, 192)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reapply_replaces_and_remove_restores(deit_tiny, images):
    ref = copy.deepcopy(deit_tiny)
    apply_reduction(deit_tiny, "tome", r=8)
    apply_reduction(deit_tiny, "tome", r=4)
    assert deit_tiny.forward_tokens(images[:1]).tokens_per_block[-1] == 197 - 48
    remove_reduction(deit_tiny)
    assert type(deit_tiny) is type(ref) and not hasattr(deit_tiny, "reduction")
    with torch.no_grad():
        torch.testing.assert_close(deit_tiny(images), ref(images), rtol=0, atol=0)


def test_clear_errors_at_apply_time(deit_tiny):
    with pytest.raises(ReductionConfigError, match="unknown reduction method 'tomee'"):
        apply_reduction(deit_tiny, "tomee")
    with pytest.raises(ReductionConfigError, match="takes no parameters"):
        apply_reduction(deit_tiny, "none", r=3)
    with pytest.raises(ReductionConfigError, match="VisionTransformer"):
        apply_reduction(torch.nn.Linear(3, 3), "none")
    swin = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ReductionConfigError):
        apply_reduction(swin, "tome", r=2)


@pytest.mark.parametrize("need", ["none", "keys", "cls"])
def test_fused_paths_match_explicit_map(deit_tiny, need):
    """The SDPA path gives the explicit path's output, and the CLS row equals row 0 of the full map."""
    torch.manual_seed(0)
    x = torch.randn(2, 50, 192)
    attn = deit_tiny.blocks[0].attn
    bias = torch.randn(2, 1, 1, 50) * 0.1
    full = attention(attn, x, AttentionRequest(need="map", bias=bias))
    fused = attention(attn, x, AttentionRequest(need=need, bias=bias))
    assert fused.attn is None  # the full map is never materialised on the fused path
    torch.testing.assert_close(fused.out, full.out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.keys, full.keys)
    if need == "cls":
        torch.testing.assert_close(fused.cls_attn, full.attn[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,expected", [("deit_tiny_patch16_224", 1.25), ("deit_small_patch16_224", 4.6), ("deit_base_patch16_224", 17.6)]
)
def test_gmacs_unreduced_match_published(name, expected):
    model = timm.create_model(name, pretrained=False)
    assert abs(count_gmacs(model) - expected) <= 0.05
    assert abs(count_gmacs(apply_reduction(model, "none")) - expected) <= 0.05


def test_gmacs_counts_what_runs(deit_tiny):
    """Counted, not estimated: a model on a smaller image costs proportionally less."""
    small = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=112)
    assert count_gmacs(small, img_size=112) < count_gmacs(deit_tiny) / 3.5


def test_side_work_is_counted_apart():
    """Work marked side_work() leaves the headline GMACs but is reported, exactly; outside a count
    the marker changes nothing."""

    class TwoProducts(torch.nn.Module):
        def forward(self, x):
            y = x.flatten(1) @ torch.ones(x[0].numel(), 5)  # 1 x 5 x (3*8*8) MACs
            with side_work():
                z = y.T @ y  # 5 x 5 x 1 MACs
            return y.sum() + z.sum()

    gmacs, side = count_gmacs_split(TwoProducts(), img_size=8)
    assert gmacs == 5 * 3 * 8 * 8 / 1e9 and side == 25 / 1e9
    assert count_gmacs(TwoProducts(), img_size=8) == gmacs
    with side_work():  # no count running: a plain no-op
        assert torch.equal(torch.ones(2) @ torch.ones(2), torch.tensor(2.0))


@pytest.mark.parametrize("method", sorted(m for m in REGISTRY if m != "none"))
def test_unknown_parameter_is_a_config_error(deit_tiny, method):
    with pytest.raises(ReductionConfigError, match=f"method '{method}' does not take \\['bogus'\\]"):
        apply_reduction(deit_tiny, method, bogus=1)
