"""ONNX export (src.models.export.export_onnx): every method exports on a tiny model and onnxruntime
reproduces PyTorch within 1e-4 relative; a method with a dynamic token schedule is refused clearly."""

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from src.models import REGISTRY, apply_reduction  # noqa: E402
from src.models.export import ExportError, export_blocker, export_onnx, onnx_session  # noqa: E402
from src.models.reduction.base import ReductionMethod  # noqa: E402
from tests.tiny import images, tiny_vit  # noqa: E402

PARAMS = {
    "tome": dict(r=4),
    "evit": dict(keep_rate=0.5, locations=[1, 2]),
    "gtp": dict(r=4, sparsity=0.9),  # sparsification exercises the kthvalue translation
    "dynamicvit": dict(keep_rate=0.7, locations=[1, 2]),
    "bat": dict(keep_rate=0.5, locations=[1, 2]),  # stable sorts -> TopK
    "mstm": dict(keep_rate=0.5, locations=[1, 2]),
    "stvit": dict(block=1, pool_size=3),  # 8x8 grid -> 3x3: overlapping adaptive max-pool windows
    "mctf": dict(r=6),
    "ppt": dict(r=8, locations=[1, 2], threshold=4e-4),
    "diffrate": dict(prune_kept_num=[60, 50, 40], merge_kept_num=[56, 44, 36]),
}


def tiny(method):
    torch.manual_seed(0)
    model = apply_reduction(tiny_vit(depth=3), method, **PARAMS.get(method, {})).eval()
    # freshly initialised modules of a method (DynamicViT's predictors: std 0.02, zero bias) score all
    # tokens almost alike, so float rounding alone could reorder near-ties between the two runtimes;
    # sharpened as the golden cases sharpen them, the selections have clear margins
    with torch.no_grad():
        for name in model.reduction.new_module_names():
            for sub in getattr(model, name).modules():
                if isinstance(sub, torch.nn.Linear):
                    sub.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_exports_and_onnxruntime_matches(method, tmp_path):
    model = tiny(method)
    if export_blocker(model):  # a dynamic token schedule: refused before any work, with the reason
        with pytest.raises(ExportError, match=f"method '{method}'"):
            export_onnx(model, tmp_path / "model.onnx", batch_size=2, img_size=64)
        assert not (tmp_path / "model.onnx").exists()
        return
    # without onnxscript's optimiser (onnxruntime optimises at load time): half the export time
    report = export_onnx(model, tmp_path / "model.onnx", batch_size=2, img_size=64, optimize=False)
    assert report.checked and report.matches and report.max_rel_diff <= 1e-4
    # another input through the same file: the token choices are computed inside the graph
    x = images(2, seed=9)
    session = onnx_session(report.path)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_export_with_the_graph_optimiser(tmp_path):
    """The default export path (what bench.py and export.py run): optimised graph, report fields."""
    report = export_onnx(tiny("bat"), tmp_path / "bat.onnx", batch_size=1, img_size=64)
    assert report.matches and report.file_mb > 0 and report.providers == ["CPUExecutionProvider"]
    assert "onnxruntime matches PyTorch" in str(report) and report.to_dict()["matches"] is True


class _Sampler(ReductionMethod):
    name = "dynamic_test_only"
    static_schedule = False


class _NoOnnx(ReductionMethod):
    name = "no_onnx_test_only"
    exportable = False
    not_exportable_reason = "it calls an op ONNX lacks"


def test_non_exportable_methods_are_refused_with_the_reason(tmp_path):
    model = apply_reduction(tiny_vit(), "none")
    assert export_blocker(model) is None
    model.reduction = _Sampler(model)
    with pytest.raises(ExportError, match="depends on the image.*static token schedule"):
        export_onnx(model, tmp_path / "a.onnx", img_size=64)
    model.reduction = _NoOnnx(model)
    with pytest.raises(ExportError, match="no_onnx_test_only' cannot be exported to ONNX: it calls an op ONNX lacks"):
        export_onnx(model, tmp_path / "b.onnx", img_size=64)
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
