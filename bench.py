"""Benchmark token-reduction methods against the unpatched model, timed side by side in one run.

    python bench.py model=deit_s method=tome,evit,gtp [batch=32] [precision=32|bf16] [device=cpu]
                    [iters=3] [rounds=8] [warmup=3] [json=bench.json] [any Hydra override ...]

Each round times every model for `iters` batches in turn; the median round counts. Many short
rounds keep a shared machine's drifts from landing on one model.

Every `key=value` that is not one of the benchmark's own keys is a Hydra override of the training
config applied to every method (e.g. `schedule=flops schedule.gmacs=3.0` or `method.params.r=8`).
Weights are timm's random initialisation: speed and GMACs do not depend on the values.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from src.bench import BENCH_KEYS, run_benchmark


def main(argv: list[str]) -> int:
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"bench.py: arguments are key=value, got {arg!r}", file=sys.stderr)
            return 2
        (own.__setitem__(key, value) if key in BENCH_KEYS else overrides.append(arg))
    try:
        rows = run_benchmark(own, overrides)
    except ValueError as err:  # bad input: one clear message, no stack trace
        print(f"bench.py: {err}", file=sys.stderr)
        return 2
    if own.get("json"):
        Path(own["json"]).write_text(json.dumps(rows, indent=2))
        print(f"wrote {own['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
