"""Access to ../shared/golden: reference logits of the public implementations (see its README)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("TR_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden"
IMAGENET_VAL = SHARED / "data" / "imagenet-val-1300"


#: methods whose cases live in manifest-new-methods.json (same weights and inputs as manifest.json)
NEW_METHODS = ("mctf", "ppt", "diffrate", "pitome", "tofu", "ats")


def manifest() -> dict:
    """manifest.json with the cases of NEW_METHODS from manifest-new-methods.json appended."""
    path = GOLDEN / "manifest.json"
    if not path.is_file():
        return {"cases": [], "weights": {}}
    m = json.loads(path.read_text())
    extra = GOLDEN / "manifest-new-methods.json"
    if extra.is_file():
        new = json.loads(extra.read_text())
        m["weights"] = {**new.get("weights", {}), **m["weights"]}
        m["cases"] = m["cases"] + [c for c in new["cases"] if c["method"] in NEW_METHODS]
    return m


def require_shared(path: Path, what: str) -> None:
    """Skip when `path` (in the shared folder) is missing, but fail in CI (TR_REQUIRE_SHARED=1, set
    by .ci/run), so the golden cases can never silently stop running."""
    if path.exists():
        return
    message = f"{what} not found at {path} (set TR_SHARED_DIR to the shared folder)"
    if os.environ.get("TR_REQUIRE_SHARED") == "1":
        pytest.fail(message + "; TR_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(message)


def require_golden() -> dict:
    require_shared(GOLDEN / "manifest.json", "golden reference files")
    return manifest()


def cases(method: str) -> list:
    return [c for c in manifest()["cases"] if c["method"] == method]


def case_ids(method: str) -> list:
    return [c["id"] for c in cases(method)] or ["no-golden-cases"]


def load_tensors(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name))


def case_state_dict(case: dict) -> dict:
    m = manifest()
    sd = {}
    for key in case["weights"]:
        sd.update(load_tensors(m["weights"][key]["file"]))
    return sd


def inputs() -> torch.Tensor:
    return load_tensors(manifest()["input"]["file"])["images"]


def check_case(case: dict, dtype: str, build) -> None:
    """Build the case's model with `build(case)`, run it, and compare with the golden logits."""
    golden = load_tensors(case["golden"]["file"])[case["golden"]["keys"][dtype]]
    model = build(case).eval()
    x = inputs()
    if dtype == "float64":
        model = model.double()
        x = x.double()
    with torch.no_grad():
        out = model(x)
    tol = (1e-4 if dtype == "float32" else 1e-8) * max(1.0, golden.abs().max().item())
    diff = (out.to(golden.dtype) - golden).abs().max().item()
    assert diff <= tol, f"{case['id']} {dtype}: max|diff| {diff:.3e} > {tol:.3e}"
    assert torch.equal(out.argmax(-1), golden.argmax(-1)), f"{case['id']} {dtype}: argmax differs"
