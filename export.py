"""Write a (token-reduced) model as ONNX and check it against PyTorch with onnxruntime.

    python export.py model=deit_s method=tome [out=model.onnx] [batch=1] [model.checkpoint=PATH]
                     [pretrained=false] [check=true] [any Hydra override: method.params.r=8, schedule=...]

The model is built as every entry point builds it (model config -> method and schedule -> weights:
timm's pretrained weights or model.checkpoint; pretrained=false exports random weights, for a quick
check) and exported with torch.onnx.export(dynamo=True) for one batch size (src/models/export.py).
The file is then run in onnxruntime on a seeded input and compared with PyTorch: the report gives
max |difference| relative to max |logits| (must be <= 1e-4). Same as `python bench.py export=PATH ...`.
"""

from __future__ import annotations

import sys

import src  # noqa: F401  (first: sets OpenMP's wait policy before torch is imported)
from bench import split_args
from src.bench import export_model


def main(argv: list[str]) -> int:
    from src.models.export import ExportError

    try:
        own, overrides = split_args([a.replace("out=", "export=", 1) if a.startswith("out=") else a for a in argv])
        own.setdefault("export", "model.onnx")
        export_model(own, overrides)
    except (ValueError, ExportError) as err:
        print(f"export.py: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
