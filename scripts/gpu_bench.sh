#!/usr/bin/env bash
# The benchmark matrix on a GPU, prepared for a session that has one (none was available when it was
# written): DeiT-S, every registered method against the unpatched model, batch 1 / 64 / 256, fp32 and
# bf16 (autocast), eager and torch.compile (inductor, fullgraph for static token schedules), timed side
# by side in alternating rounds with CUDA synchronisation around every timed call.
#
#     scripts/gpu_bench.sh [OUT_DIR] [extra bench.py arguments, e.g. model=deit_b rounds=20]
#
# Writes OUT_DIR/gpu_bench.json (one row per batch x precision x mode x method, plus "best" rows),
# OUT_DIR/gpu_bench.png (measured vs ideal speedup per batch size and precision) and OUT_DIR/gpu_bench.log
# (the printed tables, the GPU, versions). Default OUT_DIR: logs/gpu_bench/<date_time>.
#
# Time: compilation is the bulk: 8 models x 2 precisions x 2 graphs (compile_dynamic=true: batch 1, then
# one graph with a symbolic batch dimension for 64 and 256), about 32 inductor compilations of DeiT-S
# (tens of seconds each), before any timing; the timing itself is 20 rounds x 5 calls per model. For a
# shorter pass give a subset: method=tome,evit or batch=1,256 or precision=bf16 (later arguments win).
# onnxruntime on the GPU needs onnxruntime-gpu (CUDAExecutionProvider); add mode=eager,compile,onnx
# when it is installed (bench.py skips onnx with a note otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-logs/gpu_bench/$(date +%Y-%m-%d_%H-%M-%S)}
shift || true
mkdir -p "$OUT"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
python - <<'PY' | tee "$OUT/gpu_bench.log"
import torch
assert torch.cuda.is_available(), "scripts/gpu_bench.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| bf16 supported:", torch.cuda.is_bf16_supported())
PY
python bench.py model=deit_s device=cuda batch=1,64,256 precision=32,bf16 mode=eager,compile \
    compile_dynamic=true rounds=20 iters=5 warmup=3 json="$OUT/gpu_bench.json" plot="$OUT/gpu_bench.png" "$@" 2>&1 | tee -a "$OUT/gpu_bench.log"
