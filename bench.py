"""Benchmark token-reduction methods against the unpatched model, timed side by side in one run.

    python bench.py model=deit_s                      # every method, batch 32, eager, fp32: one table
    python bench.py model=deit_s method=tome,evit batch=1,32 mode=eager,compile,onnx precision=32,bf16 \\
                    [device=cpu|cuda] [threads=N] [rounds=R] [iters=1] [warmup=2] [json=bench.json] [plot=bench.png]
                    [compile_mode=max-autotune] [freeze=true] [onnx_dir=DIR] [any Hydra override ...]
    python bench.py model=deit_s method=tome export=model.onnx [batch=1] [pretrained=false]

Matrix: every method (default: every registered one) x batch sizes x modes (eager PyTorch,
torch.compile, onnxruntime on the exported model) x precisions (autocast; onnx runs float32). In each
(batch, precision) all models of all modes are timed in the same alternating rounds (`rounds` rounds of
`iters` calls each, the order reversed every other round); a model's speedup is the median over rounds
of (unpatched model's time / its time) in the same mode, printed with the quartiles of those ratios, and
set against the ideal speedup, the ratio of counted GMACs. The "best" column compares each side in its
fastest mode. Compilation and export happen before the timing (setup_s in the JSON rows); every ONNX
file is checked against PyTorch (max relative difference in the rows).

`export=PATH` writes the model of the config (its method, schedule and weights: timm pretrained or
model.checkpoint; pretrained=false for random ones) as ONNX for one batch size, checks it with
onnxruntime and prints the report (same as `python export.py ...`).

Every `key=value` that is not one of the benchmark's own keys is a Hydra override of the training
config applied to every method (e.g. `schedule=flops schedule.gmacs=3.0` or `method.params.r=8`).
Benchmark weights are timm's random initialisation: speed and GMACs do not depend on the values.
"""

from __future__ import annotations

import sys

import src  # noqa: F401  (first: sets OpenMP's wait policy before torch is imported)
from src.bench import BENCH_KEYS, export_model, plot_rows, run_benchmark, write_json


def split_args(argv: list[str]):
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"arguments are key=value, got {arg!r}")
        (own.__setitem__(key, value) if key in BENCH_KEYS else overrides.append(arg))
    return own, overrides


def main(argv: list[str]) -> int:
    try:
        own, overrides = split_args(argv)
        if own.get("export"):
            export_model(own, overrides)
            return 0
        rows = run_benchmark(own, overrides)
    except ValueError as err:  # bad input: one clear message, no stack trace
        print(f"bench.py: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from src.models.export import ExportError

        if isinstance(err, ExportError):
            print(f"bench.py: {err}", file=sys.stderr)
            return 1
        raise
    if own.get("json"):
        write_json(rows, own["json"])
        print(f"wrote {own['json']}")
    if own.get("plot"):
        print(f"wrote {plot_rows(rows, own['plot'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
