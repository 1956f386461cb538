"""Counted GMACs and measured throughput.

GMACs are counted by running the model under ``torch.utils.flop_counter.FlopCounterMode`` (every
matmul, linear, convolution and attention kernel the forward pass really executes, including a
method's own matching or graph products) and reported in the papers' convention: one multiply-add
is one "FLOP", so GMACs = counted FLOPs / 2 / 1e9 per image.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Dict, List

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


def count_gmacs(model: nn.Module, img_size=224, in_chans: int = 3, device="cpu", dtype=torch.float32) -> float:
    """GMACs of one image through `model` (eval mode, batch 1), counted, not estimated."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    x = torch.randn(1, in_chans, *img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


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
