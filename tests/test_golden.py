"""Every case in ../shared/golden reproduces the reference implementation's logits."""

import pytest
import timm
import torch

from src.models import apply_reduction, load_weights
from tests import golden

ALL = golden.manifest()["cases"]


def build(case):
    torch.manual_seed(case["seed"])
    model = timm.create_model(case["model"], pretrained=False)
    sd = golden.case_state_dict(case)
    if case["load_order"].startswith("create, apply_reduction"):
        apply_reduction(model, case["method"], **case["params"])
        load_weights(model, sd)
    else:
        load_weights(model, sd)
        apply_reduction(model, case["method"], **case["params"])
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ALL or [None], ids=[c["id"] for c in ALL] or ["none"])
def test_golden_case(case, dtype):
    golden.require_golden()
    from src.models import REGISTRY

    if case["method"] not in REGISTRY:
        pytest.fail(f"method {case['method']} of golden case {case['id']} is not implemented")
    golden.check_case(case, dtype, build)


@pytest.mark.parametrize("case", ALL or [None], ids=[c["id"] for c in ALL] or ["none"])
def test_golden_token_counts(case):
    golden.require_golden()
    model = build(case).eval()
    # per-image token counts (ATS): the manifest's counts are the padded rows of the whole stored batch
    per_image = case.get("tokens_out_per_image")
    with torch.no_grad():
        state = model.forward_tokens(golden.inputs() if per_image else golden.inputs()[:2])
    assert state.tokens_per_block == case["tokens_out"]
    if per_image:
        assert torch.stack(state.extras["tokens_per_image"], 1).tolist() == per_image
