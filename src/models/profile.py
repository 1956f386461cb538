"""Counted GMACs and measured throughput.

GMACs are counted by running the model under ``torch.utils.flop_counter.FlopCounterMode`` (every
matmul, linear, convolution and attention kernel the forward pass really executes, including a
method's own matching, scoring and propagation products) and reported in the papers' convention: one
multiply-add is one "FLOP", so GMACs = counted FLOPs / 2 / 1e9 per image.

Work a method marks with ``side_work()`` is counted too, but reported apart ("side GMACs") instead of
in the headline, because the method's paper leaves it out of its figures: GTP's per-image semantic
graph (GTP reports the GMACs of ToMe at the same r). Nothing is hidden: benchmarks print both.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

from .compile import eager

_aten = torch.ops.aten

# FlopCounterMode knows the CUDA attention kernels; the CPU flash kernel needs the same formula.
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _cpu_sdpa = _aten._scaled_dot_product_flash_attention_for_cpu
    try:

        @register_flop_formula(_cpu_sdpa, get_raw=True)
        def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_flop(query.shape, key.shape, value.shape)
    except (ValueError, RuntimeError):  # a later torch registers it itself
        pass


# FLOP accumulators of the count_gmacs calls in progress (innermost last)
_SIDE_FLOPS: List[int] = []


@contextmanager
def side_work() -> Iterator[None]:
    """Marks computation that the method's paper leaves out of its GMACs; count_gmacs reports it as
    side GMACs. Outside a count it costs nothing."""
    if not _SIDE_FLOPS:
        yield
        return
    # a nested counter sees only this block; the outer one still counts everything
    with FlopCounterMode(display=False) as inner:
        yield
    _SIDE_FLOPS[-1] += inner.get_total_flops()


def count_gmacs_split(
    model: nn.Module, img_size=224, in_chans: int = 3, device="cpu", dtype=torch.float32
) -> Tuple[float, float]:
    """(GMACs, side GMACs) of one image through `model` (eval mode, batch 1), counted, not estimated."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    x = torch.randn(1, in_chans, *img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    _SIDE_FLOPS.append(0)
    try:
        counter = FlopCounterMode(display=False)
        # a compiled model is counted through its eager code: dynamo does not trace under a dispatch mode
        with torch.no_grad(), eager(model), counter:
            model(x)
    finally:
        side = _SIDE_FLOPS.pop()
        model.train(was_training)
    return (counter.get_total_flops() - side) / 2 / 1e9, side / 2 / 1e9


def count_gmacs(model: nn.Module, img_size=224, in_chans: int = 3, device="cpu", dtype=torch.float32) -> float:
    """GMACs of one image through `model` in the papers' convention (side work excluded, see module doc)."""
    return count_gmacs_split(model, img_size, in_chans, device, dtype)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PRECISIONS = ("32", "16", "bf16")


def autocast_context(device, precision: str):
    """torch.autocast for precision "16" / "bf16" (also "16-mixed", "bf16-mixed"), else a no-op."""
    device = torch.device(device)
    if precision in ("16", "16-mixed", "bf16", "bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
    return nullcontext()


def time_alternating(
    runners: Dict[str, Callable[[], object]],
    rounds: int = 10,
    iters: int = 1,
    warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
) -> Dict[str, List[float]]:
    """Seconds per call of every runner in each of `rounds` rounds (after `warmup` calls each).

    Every round calls each runner `iters` times in turn, the order reversed every other round, so a
    machine whose speed drifts (other processes, clocks) slows all runners of a round alike: the
    ratio of two runners' times *within* a round is far steadier than the ratio of their medians
    taken at different times. Compare runners through per-round ratios (`ratio_stats`)."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = runners[name]
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of the per-round ratios numerator[r] / denominator[r]."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": ratios[0], "max": ratios[-1]}


def measure_throughput(
    models: Dict[str, nn.Module],
    batch_size: int = 32,
    img_size=224,
    in_chans: int = 3,
    device="cpu",
    precision: str = "32",
    warmup: int = 3,
    iters: int = 10,
    rounds: int = 3,
) -> Dict[str, float]:
    """Images per second of each model, measured side by side in one run.

    Models are timed in alternating rounds (warm-up iterations excluded, see `time_alternating`) and
    the median round is reported, so slow drifts of the machine hit all models alike.
    """
    device = torch.device(device)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    x = torch.randn(batch_size, in_chans, *img_size, device=device)
    states = {name: m.training for name, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        with torch.no_grad(), autocast_context(device, precision):
            times = time_alternating(
                {name: (lambda m=m: m(x)) for name, m in models.items()},
                rounds=rounds,
                iters=iters,
                warmup=warmup,
                sync=lambda: _sync(device),
            )
    finally:
        for name, m in models.items():
            m.train(states[name])
    return {name: batch_size / statistics.median(v) for name, v in times.items()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
