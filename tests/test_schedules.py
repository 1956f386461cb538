"""Schedules turn a config into the method's per-block counts or keep rates."""

import pytest
import timm
import torch

from src.models import ReductionConfigError, apply_reduction
from src.models.profile import count_gmacs
from src.models.reduction.schedules import resolve_params, schedule_kind


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


def test_kinds_are_read_off_the_methods():
    assert schedule_kind("tome") == "r" and schedule_kind("mctf") == "r" and schedule_kind("ppt") == "r"
    assert schedule_kind("evit") == "keep_rate"
    assert schedule_kind("pitome") == "ratio" and schedule_kind("tofu") == "ratio"
    assert schedule_kind("none") is None and schedule_kind("diffrate") is None


def test_no_schedule_keeps_method_params(tiny):
    assert resolve_params(tiny, "tome", {"r": 8, "prop_attn": False}, None) == {"r": 8, "prop_attn": False}


def test_constant_decreasing_list(tiny):
    assert resolve_params(tiny, "tome", {}, {"name": "constant", "r": 5})["r"] == [5] * 12
    assert resolve_params(tiny, "tome", {}, {"name": "decreasing", "r": 16, "inflect": -1})["r"] == [
        32,
        29,
        26,
        23,
        20,
        17,
        14,
        11,
        8,
        5,
        2,
        0,
    ]
    r = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert resolve_params(tiny, "tome", {}, {"name": "list", "r": r})["r"] == r


def test_staged_sets_keep_rates():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    out = resolve_params(model, "evit", {"fuse_token": True}, {"name": "staged", "keep_rate": 0.5, "locations": [2, 5]})
    assert out == {"fuse_token": True, "keep_rate": 0.5, "locations": [2, 5]}


@pytest.mark.parametrize(
    "schedule,match",
    [
        ({"name": "list", "r": [1, 2]}, "lists 2 blocks but the model has 12"),
        ({"name": "staged", "keep_rate": 0.7}, "parameterised by 'r'"),
        ({"name": "constant", "r": 2.5}, "whole number"),
        ({"name": "nope"}, "unknown schedule"),
        ({"name": "constant", "r": 3, "inflect": 1}, "does not take"),
        ({"name": "flops", "gmacs": -1}, "positive"),
        ({"name": "flops", "gmacs": 9.0}, "above the unreduced"),
    ],
)
def test_bad_schedules_fail_clearly(tiny, schedule, match):
    with pytest.raises(ReductionConfigError, match=match):
        resolve_params(tiny, "tome", {}, schedule)


def test_schedule_on_method_without_parameter(tiny):
    with pytest.raises(ReductionConfigError, match="does not apply"):
        resolve_params(tiny, "none", {}, {"name": "constant", "r": 3})


def test_flops_schedule_hits_the_budget_for_r_methods(tiny):
    params = resolve_params(tiny, "tome", {"prop_attn": True}, {"name": "flops", "gmacs": 0.8})
    achieved = count_gmacs(apply_reduction(tiny, "tome", **params))
    assert abs(achieved - 0.8) <= 0.01, (params, achieved)
    assert params["r"] == sorted(params["r"], reverse=True)  # extra tokens go to the early blocks


def test_flops_schedule_hits_the_budget_for_keep_rate_methods(tiny):
    params = resolve_params(tiny, "evit", {"locations": [3, 6, 9]}, {"name": "flops", "gmacs": 0.9})
    achieved = count_gmacs(apply_reduction(tiny, "evit", **params))
    assert 0 < params["keep_rate"] < 1 and abs(achieved - 0.9) <= 0.01, (params, achieved)


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_flops_schedule_hits_the_budget_for_ratio_methods(tiny, method):
    """A kept fraction per block (PiToMe, ToFu): bisection like keep rates; ratios the method refuses
    (below 0.5) count as too low."""
    params = resolve_params(tiny, method, {}, {"name": "flops", "gmacs": 0.8})
    achieved = count_gmacs(apply_reduction(tiny, method, **params))
    assert 0.5 <= params["ratio"] < 1 and abs(achieved - 0.8) <= 0.01, (params, achieved)
    with pytest.raises(ReductionConfigError, match="parameterised by 'ratio'; use schedule=flops"):
        resolve_params(tiny, method, {}, {"name": "constant", "r": 3})


def test_unreachable_budget_names_the_range(tiny):
    with pytest.raises(ReductionConfigError, match="cannot reach 0.1 GMACs"):
        resolve_params(tiny, "tome", {}, {"name": "flops", "gmacs": 0.1})
