"""PiToMe: energy-based token merging (Tran et al., NeurIPS 2024), as hchautran/PiToMe at 550b5de
(``algo/pitome``: ``merge.py`` and ``patch/{deit,timm}.py``).

Every block merges between the attention residual and the MLP. Of the T = N - 1 patch tokens,
r = floor(T - T * ratio) go (Python float arithmetic, so ``ratio`` is the fraction kept in each block).
The head-mean keys of the patch tokens are L2-normalised; every token's *energy* is the mean over all
T tokens (itself included) of ELU(cos - margin_l, alpha), with margin_l = 0.75 * (1 - l / depth) by
default. Tokens are ranked by energy, highest first (torch's argsort):

- "BSM" blocks (the first ceil(depth / 2) by default): the ranking is split alternately into sets A
  (ranks 0, 2, ...) and B (1, 3, ...); every A token finds its most similar B token, and the r A tokens
  with the best matches merge into theirs. Output: [CLS, unmerged A in match order, B in energy order].
- energy blocks (the rest): the 2r highest-energy tokens are split alternately into A and B, every A
  token merges into its most similar B token, the other T - 2r tokens are kept. Output:
  [CLS, kept tokens in energy order, B].

Merging is ToMe's size-weighted average (sizes start at 1 and add up); there is no proportional
attention (the reference's DeiT block never passes sizes to the attention). The output order is the
reference's, although only ties depend on it. Exact: the ranking, the splits, the matching, the merge
and the token counts reproduce the reference (golden logits within float rounding). The merge is
computed as one ``index_add_`` over every token's output row instead of the reference's gathers and
``scatter_reduce``, so sums may differ in the last bit; decisions do not (the golden cases have no
ties). The matching (the T x T similarity) is run inside ``profile.side_work()``: PiToMe's own FLOP
count, like the golden manifest's, leaves it out (``count_gmacs`` reports it as side GMACs).

Extensions beyond the reference:
- Every prefix token (CLS, DeiT's distillation token, registers) is protected like CLS and stays in
  front in order; the reference protects only CLS and ranks a distillation token like a patch.
  Models without a class token merge all tokens, as the reference with ``class_token=False``.
- ``margin`` and ``use_bsm_pitome`` may also be one value for every block, and ``alpha`` is exposed
  (the reference fixes it to 1).
- ``ratio`` must be in [0.5, 1]: below 0.5 the reference fails (it cannot pick 2r of T tokens).
- A block where r rounds to 0 (few tokens, ratio near 1) keeps every token, in energy order; the
  reference's energy split fails there (a max over an empty set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F

from ..profile import side_work
from .base import (
    NO_REQUEST,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    merge_rows,
    register,
)

Tensor = torch.Tensor


def check_ratio(ratio, method: str) -> float:
    """The fraction of tokens a block keeps: a number in [0.5, 1] (1 = no reduction)."""
    ok = isinstance(ratio, Real) and not isinstance(ratio, bool) and 0.5 <= float(ratio) <= 1.0
    if not ok:
        raise ReductionConfigError(
            f"{method} ratio={ratio!r}: ratio is the fraction of tokens every block keeps and must be a number "
            "in [0.5, 1] (1 keeps all; the reference cannot remove more than half of a block's tokens); "
            "e.g. ratio=0.9"
        )
    return float(ratio)


def per_block(value, depth: int, what: str, method: str, check) -> list:
    """One value per block, from a single value or a list of `depth` values, each passed through `check`."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != depth:
            raise ReductionConfigError(
                f"{method} {what} has {len(value)} entries but the model has {depth} blocks; give one entry "
                f"per block, a single value for every block, or null for the reference's default"
            )
        return [check(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return [check(value, what)] * depth


def _margin(value, what: str) -> float:
    if isinstance(value, Real) and not isinstance(value, bool) and -1.0 <= float(value) <= 1.0:
        return float(value)
    raise ReductionConfigError(
        f"pitome {what}={value!r}: a margin is subtracted from cosine similarities and must be a number in "
        "[-1, 1] (the reference uses 0.75 * (1 - l / depth) in block l: give null for that)"
    )


def _flag(value, what: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ReductionConfigError(
        f"pitome {what}={value!r} must be true or false (true: the BSM-style split of the energy ranking, "
        "false: the pure energy split); give null for the reference's default (BSM in the first half)"
    )


def energy_order(metric: Tensor, margin: float, alpha: float):
    """Cosine similarities (B, T, T) of `metric` (B, T, d) and the tokens' ranking by energy, highest first."""
    m = F.normalize(metric, p=2, dim=-1)
    sim = m @ m.transpose(-1, -2)
    energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
    return sim, torch.argsort(energy, dim=-1, descending=True)


def _similarity(sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """sim[b][rows[b]][:, cols[b]]: (B, len(rows), len(cols))."""
    B, T, _ = sim.shape
    s = sim.gather(-1, cols[:, None, :].expand(B, T, cols.shape[1]))
    return s.gather(-2, rows[:, :, None].expand(B, rows.shape[1], cols.shape[1]))


def _place(B: int, T: int, device, parts) -> Tensor:
    """Output row (B, T) of every token from (token indices (B, k), their rows (B, k) or (k,)) pairs."""
    target = torch.empty(B, T, dtype=torch.long, device=device)
    for idx, rows in parts:
        target.scatter_(1, idx, rows.expand(idx.shape) if rows.dim() == 1 else rows)
    return target


def bsm_plan(sim: Tensor, order: Tensor, r: int) -> Tensor:
    """BSM-style split of the energy ranking: output row (B, T) of every token, T - r rows."""
    B, T, _ = sim.shape
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    node_max, node_idx = _similarity(sim, a_idx, b_idx).max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)
    unm, src = edge[:, r:], edge[:, :r]
    u = unm.shape[1]
    dev = sim.device
    return _place(
        B,
        T,
        dev,
        [
            (a_idx.gather(1, unm), torch.arange(u, device=dev)),  # unmerged A, in match order
            (b_idx, torch.arange(u, u + b_idx.shape[1], device=dev)),  # B, in energy order
            (a_idx.gather(1, src), node_idx.gather(1, src) + u),  # merged A -> its B token's row
        ],
    )


def energy_plan(sim: Tensor, order: Tensor, r: int) -> Tensor:
    """Pure energy split: the 2r highest-energy tokens pair up, the rest are kept. Rows (B, T), T - r rows."""
    B, T, _ = sim.shape
    kept = T - 2 * r
    if r == 0:  # nothing merges; the tokens still leave in energy order
        return _place(B, T, sim.device, [(order, torch.arange(T, device=sim.device))])
    a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
    dst = _similarity(sim, a_idx, b_idx).max(dim=-1).indices
    dev = sim.device
    return _place(
        B,
        T,
        dev,
        [
            (order[:, 2 * r :], torch.arange(kept, device=dev)),  # kept, in energy order
            (b_idx, torch.arange(kept, kept + r, device=dev)),
            (a_idx, dst + kept),
        ],
    )


@register
class PiToMe(ReductionMethod):
    """Energy-based merging in every block; `ratio` of the patch tokens kept per block."""

    name = "pitome"
    #: dense map: merged patches take the final features of the token they were merged into
    dense_restore = "source"
    claims_every_patch = True  # sources are merged by maximum: no patch is ever left unclaimed
    module_names = ()
    static_schedule = True  # every block's count follows from the token count alone
    exportable = True

    def __init__(
        self,
        model,
        ratio: float = 0.9,
        margin: float | Sequence[float] | None = None,
        use_bsm_pitome: bool | Sequence[bool] | None = None,
        alpha: float = 1.0,
    ):
        self.depth = depth = len(model.blocks)
        self.ratio = check_ratio(ratio, "pitome")
        if margin is None:  # the reference's expression, for bit-equal margins
            self.margin = [0.75 - 0.75 * (i / depth) for i in range(depth)]
        else:
            self.margin = per_block(margin, depth, "margin", "pitome", _margin)
        if use_bsm_pitome is None:
            bsm = math.ceil(depth * 0.5)
            self.use_bsm = [True] * bsm + [False] * (depth - bsm)
        else:
            self.use_bsm = per_block(use_bsm_pitome, depth, "use_bsm_pitome", "pitome", _flag)
        if not (isinstance(alpha, Real) and not isinstance(alpha, bool) and float(alpha) > 0):
            raise ReductionConfigError(
                f"pitome alpha={alpha!r}: the ELU's alpha must be a positive number (the reference uses 1.0)"
            )
        self.alpha = float(alpha)

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        return NO_REQUEST  # the keys come with every attention result

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        p = state.num_protected
        B, N, _ = state.x.shape
        T = N - p
        if self.ratio >= 1.0 or T < 2:
            return state
        r = math.floor(T - T * self.ratio)  # Python floats, as the reference
        with torch.no_grad(), side_work():
            sim, order = energy_order(res.metric[:, p:], self.margin[i], self.alpha)
            plan = bsm_plan if self.use_bsm[i] else energy_plan
            target = plan(sim, order, r) + p
            if p:
                target = torch.cat([torch.arange(p, device=target.device).expand(B, p), target], dim=1)
            out_len = N - r
            flat = (target + state.batch_rows() * out_len).reshape(-1)
        if state.source is not None:
            state.source = merge_rows(state.source, flat, out_len, "amax")
        size = state.size
        if size is None:
            size = state.x.new_ones(B, N, 1)
        total = merge_rows(state.x * size, flat, out_len)
        state.size = merge_rows(size, flat, out_len)
        state.x = total / state.size
        return state

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, margin={self.margin}, use_bsm_pitome={self.use_bsm}, alpha={self.alpha}"
