"""ONNX export of a (token-reduced) model, checked against PyTorch with onnxruntime.

    from src.models.export import export_onnx
    report = export_onnx(model, "model.onnx", batch_size=1, img_size=224)
    print(report)        # path, size, export time, max |onnxruntime - PyTorch| relative to max |logits|

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). It captures the whole
forward pass as one static graph, which is what a method with a static token schedule is: the number
of tokens every block keeps follows from the input's shape, while which tokens are kept, merged or
propagated stays data-dependent inside the graph (TopK, Gather, ScatterND). The TorchScript exporter
(``dynamo=False``) is deprecated in torch 2.9+ and traces Python control flow at the example input;
the dynamo exporter also reports unsupported ops clearly at conversion time.

Two aten ops the methods use have no ONNX translation in onnxscript; `_translations` supplies them:
- ``sort.stable`` (the CLS-attention ranking of BAT and MSTM, BAT's pair matching): ONNX TopK over the
  whole axis. TopK breaks ties by the lower index, which is exactly a stable sort (either direction);
- ``kthvalue`` (GTP's attention sparsification): TopK(k, smallest) and its k-th value.
The methods avoid the others in their own code: GTP's semantic graph takes its threshold with topk
(the same value as the reference's kthvalue), STViT pools with gathered windows instead of
``adaptive_max_pool2d`` (ONNX has no adaptive pooling for grids the output does not divide).

A method whose token counts depend on the pixel values (``static_schedule = False``) cannot be one
static ONNX graph; `export_onnx` refuses it with the reason (`export_blocker`), as it refuses a method
that says ``exportable = False``. Shared code reads these capabilities, never a method's name.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported model does not match PyTorch."""


def reduction_of(model: nn.Module):
    """The model's ReductionMethod (None for an unpatched model)."""
    return getattr(model, "reduction", None)


def export_blocker(model: nn.Module) -> Optional[str]:
    """None when `model` can be exported to ONNX, else why not (from its method's capabilities)."""
    method = reduction_of(model)
    if method is None:
        return None
    if not getattr(method, "static_schedule", True):
        return (
            f"method '{method.name}' keeps a number of tokens that depends on the image (static_schedule="
            "False), so its forward pass is not one static graph; ONNX export needs a static token schedule. "
            "Deploy it with eager PyTorch or torch.compile(fullgraph=False)"
        )
    if not getattr(method, "exportable", True):
        reason = getattr(method, "not_exportable_reason", "") or "the method says it cannot be exported"
        return f"method '{method.name}' cannot be exported to ONNX: {reason}"
    return None


# --- translations of aten ops onnxscript does not cover ----------------------------------------------
def _translations() -> Dict[Any, Any]:
    from onnxscript import opset18 as op

    def sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
        # ONNX TopK: "the element with the lower index appears first" among equal values = stable sort
        size = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim), axis=0), op.Constant(value_ints=[1]))
        values, indices = op.TopK(self, size, axis=dim, largest=1 if descending else 0, sorted=1)
        return values, indices

    def kthvalue(self, k: int, dim: int = -1, keepdim: bool = False):
        values, indices = op.TopK(self, op.Constant(value_ints=[k]), axis=dim, largest=0, sorted=1)
        last = op.Constant(value_ints=[k - 1])
        values, indices = op.Gather(values, last, axis=dim), op.Gather(indices, last, axis=dim)
        if not keepdim:
            axes = op.Constant(value_ints=[dim])
            values, indices = op.Squeeze(values, axes), op.Squeeze(indices, axes)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.kthvalue.default: kthvalue}


@dataclass
class ExportReport:
    path: str
    batch_size: int
    img_size: Tuple[int, int]
    method: str
    opset: int
    export_s: float
    file_mb: float
    checked: bool = False
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")  # max |onnxruntime - PyTorch| / max |PyTorch|
    rtol: float = 1e-4
    providers: List[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return self.checked and self.max_rel_diff <= self.rtol

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["matches"] = self.matches
        return d

    def __str__(self) -> str:
        s = (
            f"wrote {self.path} ({self.file_mb:.1f} MB, method {self.method}, batch {self.batch_size}, "
            f"{self.img_size[0]}x{self.img_size[1]}, opset {self.opset}, exported in {self.export_s:.1f} s)"
        )
        if self.checked:
            s += (
                f"; onnxruntime matches PyTorch: max |diff| {self.max_abs_diff:.2e} = {self.max_rel_diff:.2e} of "
                f"max |logits| (tolerance {self.rtol:g})"
            )
        return s


def _size2(img_size) -> Tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def onnx_session(
    path: Union[str, Path],
    threads: Optional[int] = None,
    providers: Optional[Sequence[str]] = None,
    spinning: bool = False,
):
    """An onnxruntime InferenceSession of `path` with all graph optimisations, `threads` intra-op
    threads (default: torch's thread count) and, by default, the CPU provider.

    `spinning`: onnxruntime's worker threads spin while they wait for work by default; on a CPU shared
    with other processes that makes every small op wait for a descheduled spinner (the same effect as
    OpenMP's active wait policy, see src/__init__.py), so they sleep unless you ask for spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    batch_size: int = 1,
    img_size: Union[int, Sequence[int]] = 224,
    in_chans: int = 3,
    check: bool = True,
    rtol: float = 1e-4,
    opset: int = 18,
    example: Optional[torch.Tensor] = None,
    seed: int = 0,
    optimize: bool = True,
) -> ExportReport:
    """Export `model` (eval mode, float32, CPU) for inputs (batch_size, in_chans, *img_size) to the ONNX
    file `path`; with `check`, run it in onnxruntime on a seeded input (or `example`) and compare with
    PyTorch: ExportError when max |diff| > rtol * max |PyTorch logits|. Returns an ExportReport.
    `optimize`: run onnxscript's graph optimiser (constant folding, fusions) on the exported graph;
    onnxruntime optimises the graph again when it loads it, so False only makes the file larger and the
    export faster.

    Raises ExportError before any work when the model's method cannot be exported (`export_blocker`)."""
    blocker = export_blocker(model)
    if blocker:
        raise ExportError(blocker)
    hw = _size2(img_size)
    if example is None:
        example = torch.randn(batch_size, in_chans, *hw, generator=torch.Generator().manual_seed(seed))
    example = example.to("cpu", torch.float32)
    batch_size = example.shape[0]
    method = reduction_of(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                custom_translation_table=_translations(),
                input_names=["images"],
                output_names=["logits"],
                verbose=False,
                report=False,
                optimize=optimize,
            )
            program.save(str(path))
        with torch.no_grad():
            expected = model(example)
    except ExportError:
        raise
    except Exception as err:  # the exporter's own message names the op and the step
        raise ExportError(
            f"exporting {type(model).__name__} (method {getattr(method, 'name', 'none')}) to ONNX failed: "
            f"{type(err).__name__}: {_first_lines(str(err))}"
        ) from err
    finally:
        model.train(was_training)
    report = ExportReport(
        path=str(path),
        batch_size=int(batch_size),
        img_size=hw,
        method=getattr(method, "name", "none"),
        opset=opset,
        export_s=time.perf_counter() - start,
        file_mb=os.path.getsize(path) / 2**20,
        rtol=rtol,
    )
    if check:
        session = onnx_session(path)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: example.numpy()})[0])
        report.providers = list(session.get_providers())
        report.checked = True
        report.max_abs_diff = float((got - expected).abs().max())
        report.max_rel_diff = report.max_abs_diff / max(float(expected.abs().max()), 1e-12)
        if not report.matches:
            raise ExportError(
                f"onnxruntime's output differs from PyTorch's: max |diff| {report.max_abs_diff:.3e} is "
                f"{report.max_rel_diff:.3e} of max |logits|, above the tolerance {rtol:g} ({path})"
            )
    return report


def _first_lines(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])
