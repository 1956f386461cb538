"""Schedules: how much each block reduces, chosen independently of the method.

A method is parameterised either by tokens removed per block (`r`: ToMe, GTP) or by keep rates at
chosen blocks (`keep_rate` + `locations`: EViT, DynamicViT, BAT, MSTM); which one is read off the
method's constructor. A schedule fills in that parameter:

    constant    {r}                    r tokens in every block
    decreasing  {r, inflect}           ToMe's linear schedule through r (inflect -1: 2r ... 0)
    list        {r: [..]}              an explicit per-block list
    staged      {keep_rate, locations} keep rates at chosen blocks (EViT / DynamicViT convention)
    flops       {gmacs}                the per-block counts (or keep rate) that hit a GMACs budget,
                                       found by counting the patched model's GMACs — so methods can be
                                       compared at equal compute, which none of the reference
                                       codebases offers
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .base import REGISTRY, ReductionConfigError, apply_reduction
from .tome import parse_r

SCHEDULES = ("constant", "decreasing", "list", "staged", "flops")


def schedule_kind(method: str) -> Optional[str]:
    """'r', 'keep_rate' or 'ratio' (a kept fraction per block, as PiToMe's): which parameter a schedule
    sets for `method`, read off its constructor (None: no schedule applies)."""
    if method not in REGISTRY:
        raise ReductionConfigError(f"unknown reduction method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    names = inspect.signature(REGISTRY[method].__init__).parameters
    if "r" in names:
        return "r"
    if "keep_rate" in names:
        return "keep_rate"
    if "ratio" in names:
        return "ratio"
    return None


def resolve_params(
    model, method: str, params: Mapping[str, Any], schedule: Optional[Mapping[str, Any]]
) -> Dict[str, Any]:
    """`params` (the method's own config) with the schedule's counts / keep rates filled in."""
    out = dict(params or {})
    if not schedule:
        return out
    schedule = dict(schedule)
    name = schedule.pop("name", None)
    if name not in SCHEDULES:
        raise ReductionConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    kind = schedule_kind(method)
    if kind is None:
        raise ReductionConfigError(
            f"method '{method}' takes none of r, keep_rate or ratio, so schedule={name} does not apply; "
            "remove the schedule override (the method's own parameters set its reduction)"
        )
    depth = len(model.blocks)

    if name == "flops":
        return solve_for_gmacs(model, method, out, kind, **schedule)
    needs = {"constant": "r", "decreasing": "r", "list": "r", "staged": "keep_rate"}[name]
    if needs != kind:
        fits = {"keep_rate": "schedule=staged or ", "r": "schedule=constant|decreasing|list or "}.get(kind, "")
        raise ReductionConfigError(
            f"schedule '{name}' sets {needs!r} but method '{method}' is parameterised by {kind!r}; "
            f"use {fits}schedule=flops"
        )
    if name == "constant":
        out["r"] = parse_r(depth, _int(schedule.pop("r"), "schedule.r"))
    elif name == "decreasing":
        out["r"] = parse_r(depth, (_int(schedule.pop("r"), "schedule.r"), float(schedule.pop("inflect", -1))))
    elif name == "list":
        r = list(schedule.pop("r"))
        if len(r) != depth:
            raise ReductionConfigError(f"schedule.r lists {len(r)} blocks but the model has {depth}: {r}")
        out["r"] = parse_r(depth, [_int(v, "schedule.r[i]") for v in r])
    else:  # staged
        out["keep_rate"] = schedule.pop("keep_rate")
        if schedule.get("locations") is not None:
            out["locations"] = list(schedule.pop("locations"))
        schedule.pop("locations", None)
    if schedule:
        raise ReductionConfigError(f"schedule '{name}' does not take {sorted(schedule)}")
    return out


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise ReductionConfigError(f"{what} must be a whole number, got {v!r}")
    return int(v)


def solve_for_gmacs(
    model,
    method: str,
    params: Dict[str, Any],
    kind: str,
    gmacs: float,
    img_size=None,
    in_chans=None,
    tolerance: float = 0.03,
) -> Dict[str, Any]:
    """Find the reduction that brings the counted GMACs of `method` on `model` closest to `gmacs`.

    r-methods: the largest constant r whose cost stays >= the target, plus one more token in the
    first k blocks (earlier blocks save more), k chosen to land closest. keep-rate and ratio methods:
    bisection on the kept fraction (at the method's locations; values the method refuses count as
    too low). Raises when the closest setting misses the target by
    more than `tolerance` (relative), naming what is reachable.
    """
    from ..profile import count_gmacs

    if gmacs is None or float(gmacs) <= 0:
        raise ReductionConfigError(f"schedule.gmacs must be a positive number, got {gmacs!r}")
    target = float(gmacs)
    img = img_size or model.patch_embed.img_size
    chans = in_chans or model.patch_embed.proj.in_channels
    scratch = copy.deepcopy(model)
    depth = len(scratch.blocks)
    cache: Dict[Any, float] = {}

    def cost(value) -> float:
        key = tuple(value) if isinstance(value, list) else value
        if key not in cache:
            try:
                apply_reduction(scratch, method, **{**params, kind: value})
            except ReductionConfigError:
                cache[key] = float("nan")  # not a valid setting (e.g. removes too many tokens)
                return cache[key]
            cache[key] = count_gmacs(scratch, img, chans)
        return cache[key]

    base = count_gmacs(_unreduced(scratch), img, chans)
    if target > base + 1e-9:
        raise ReductionConfigError(f"schedule.gmacs={target} is above the unreduced model's {base:.4g} GMACs")

    if kind == "r":
        best = _solve_r(cost, depth, target)
    else:
        best = _solve_keep(cost, target)
    achieved = cost(best)
    if abs(achieved - target) > tolerance * target:
        lowest = min(v for v in cache.values() if v == v)
        raise ReductionConfigError(
            f"method '{method}' cannot reach {target} GMACs within {tolerance:.0%} (closest: {achieved:.4g} at "
            f"{kind}={best}; lowest found {lowest:.4g}, unreduced {base:.4g})"
        )
    return {**params, kind: best}


def _unreduced(model):
    apply_reduction(model, "none")
    return model


def _solve_r(cost: Callable, depth: int, target: float) -> List[int]:
    lo, hi = 0, 1
    while cost([hi] * depth) == cost([hi] * depth) and cost([hi] * depth) > target:  # grow until below / invalid
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: cost(lo) >= target; cost(hi) < target or invalid
        mid = (lo + hi) // 2
        c = cost([mid] * depth)
        if c == c and c >= target:
            lo = mid
        else:
            hi = mid
    candidates: List[Tuple[float, List[int]]] = []
    for k in range(depth + 1):  # one more token in the first k blocks
        r = [lo + 1] * k + [lo] * (depth - k)
        c = cost(r)
        if c == c:
            candidates.append((abs(c - target), r))
        if c != c or c < target:
            break
    return min(candidates, key=lambda t: t[0])[1]


def _solve_keep(cost: Callable, target: float) -> float:
    lo, hi = 0.0, 1.0  # cost grows with the keep rate
    best, best_err = 1.0, abs(cost(1.0) - target)
    for _ in range(30):
        mid = round((lo + hi) / 2, 6)
        c = cost(mid)
        if c == c and abs(c - target) < best_err:
            best, best_err = mid, abs(c - target)
        if c != c or c < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-5:
            break
    return best
