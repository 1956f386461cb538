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
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

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
        with torch.no_grad(), counter:
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

    Models are timed in alternating rounds (warm-up iterations excluded) and the median round is
    reported, so slow drifts of the machine hit all models alike.
    """
    device = torch.device(device)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    x = torch.randn(batch_size, in_chans, *img_size, device=device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
        if precision in ("16", "16-mixed", "bf16", "bf16-mixed")
        else nullcontext()
    )
    results: Dict[str, List[float]] = {name: [] for name in models}
    states = {name: m.training for name, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        with torch.no_grad(), autocast:
            for m in models.values():
                for _ in range(warmup):
                    m(x)
            _sync(device)
            for _ in range(rounds):
                for name, m in models.items():
                    _sync(device)
                    start = time.perf_counter()
                    for _ in range(iters):
                        m(x)
                    _sync(device)
                    results[name].append(batch_size * iters / (time.perf_counter() - start))
    finally:
        for name, m in models.items():
            m.train(states[name])
    return {name: statistics.median(v) for name, v in results.items()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
