"""ToFu: Token Fusion (Kim et al., WACV 2024), as the port in hchautran/PiToMe at 550b5de (``algo/tofu``:
``merge.py`` and ``patch/{deit,timm}.py``). The ToFu authors released no code; that port is the only
public implementation, and it is what this file reproduces (not the paper where the two differ).

Every block reduces between the attention residual and the MLP. With N tokens (CLS included, unlike
PiToMe), r = floor(N - N * ratio) (Python float arithmetic). ToMe's bipartite matching runs on the
head-mean keys of all tokens: alternate split into A (even positions) and B (odd), every A token's most
similar B token by cosine similarity, the CLS row at -inf, and the r A tokens with the best matches
become sources. The block's strategy decides what happens to them:

- ``prune``: the sources are dropped (default for blocks 0 .. depth // 2);
- ``tofu`` (the port's MLERP merge, default for the later blocks): a B token with sources becomes the
  plain mean m of itself and its sources, rescaled to m * max(|b|, |sources|) / |b|, where |b| is the
  norm of the B token *before* merging (the paper's MLERP divides by |m|; the port does not, and the
  port is reproduced). The port applies the rescaling to every B token, so one without sources is
  b / |b| * |b| (equal to b up to rounding), as here;
- ``mean``: plain mean; ``amax``: elementwise maximum.

Output order, as the reference: [unmerged A in token order (CLS first), B]. No sizes are tracked and
there is no proportional attention (the port never stores sizes). With source tracing, the source map
is merged by maximum in every strategy, as the reference's ``merge_source`` (a pruned token's patches
join its matched B token there). Exact: matching, strategies and token counts are the reference's
(golden logits within float rounding); the merge sums through ``index_add_`` rather than
``scatter_reduce``, so a mean may differ in the last bit. The matching product runs inside
``profile.side_work()``: the port's FLOP count, like the golden manifest's, leaves it out.

Extensions beyond the reference:
- Every prefix token is protected: protected A tokens are never sources, protected B tokens (DeiT's
  distillation token) never destinations, and they keep their order in front (ToMe's rule; see tome.py).
  The reference protects only CLS, so its distillation token can absorb merged tokens.
- r is capped at (N - prefix) // 2 so that a protected token can never be a source: the reference
  has no cap and with ratio near 0.5 drops CLS itself (even N). Ratios below 0.5 are refused (the
  reference fails there).
- ``strategy`` may be one string for every block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

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
    take_rows,
)
from .pitome import check_ratio, per_block
from .tome import merge_destinations

Tensor = torch.Tensor

STRATEGIES = ("prune", "tofu", "mean", "amax")


def _strategy(value, what: str) -> str:
    if isinstance(value, str) and value in STRATEGIES:
        return value
    raise ReductionConfigError(
        f"tofu {what}={value!r} is not a strategy; use one of {', '.join(STRATEGIES)} (or null for the "
        "reference's default: prune up to block depth // 2, tofu after)"
    )


def bipartite_plan(metric: Tensor, r: int, num_protected: int):
    """ToMe's matching on `metric` (B, t, d) with r sources: (src_idx, dst_idx, unm_idx) as A/B indices.
    Protected A tokens (rows) and B tokens (columns) get -inf; the unmerged A tokens are in token order
    when there are protected tokens, else in match order (the reference's class_token rule)."""
    p = num_protected
    in_a, in_b = (p + 1) // 2, p // 2
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    if in_a:
        scores[:, :in_a, :] = -math.inf
    if in_b:
        scores[:, :, :in_b] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)
    unm, src = edge[:, r:], edge[:, :r]
    if p:
        unm = unm.sort(dim=1)[0]
    return src, node_idx.gather(1, src), unm


@register
class ToFu(ReductionMethod):
    """ToMe matching in every block, then pruning or MLERP merging per block; `ratio` of tokens kept."""

    name = "tofu"
    #: dense map: merged and pruned patches take the final features of their matched B token (source map)
    dense_restore = "source"
    claims_every_patch = True  # sources are merged by maximum: no patch is ever left unclaimed
    module_names = ()
    static_schedule = True  # every block's count follows from the token count alone
    exportable = True

    def __init__(self, model, ratio: float = 0.9, strategy: str | Sequence[str] | None = None):
        self.depth = depth = len(model.blocks)
        self.ratio = check_ratio(ratio, "tofu")
        if strategy is None:
            self.strategy: list[str] = ["tofu" if i > depth // 2 else "prune" for i in range(depth)]
        else:
            self.strategy = per_block(strategy, depth, "strategy", "tofu", _strategy)

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        return NO_REQUEST  # the keys come with every attention result

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        p = state.num_protected
        B, t, _ = state.x.shape
        if self.ratio >= 1.0:
            return state
        r = min(math.floor(t - t * self.ratio), (t - p) // 2)  # Python floats, as the reference
        if r <= 0:
            return state
        out_len = t - r
        in_b = p // 2
        with torch.no_grad():
            with side_work():
                src, dst, unm = bipartite_plan(res.metric, r, p)
            target = merge_destinations(src, dst, unm, t, in_b)  # (B, t) output row of every token
            # the token each output row is built on: unmerged A tokens and every B token
            base = torch.cat([2 * unm, torch.arange(1, t, 2, device=unm.device).expand(B, t // 2)], dim=1)
            order = torch.empty_like(base).scatter_(1, target.gather(1, base), base)
            rows = state.batch_rows()
            flat = (target + rows * out_len).reshape(-1)
            flat_base = (order + rows * t).reshape(-1)
        if state.source is not None:
            state.source = merge_rows(state.source, flat, out_len, "amax")
        x, strategy = state.x, self.strategy[i]
        if strategy == "prune":
            state.x = take_rows(x, flat_base, out_len)
        elif strategy in ("mean", "amax"):
            state.x = merge_rows(x, flat, out_len, strategy)
        else:  # MLERP as the port: mean * max(|b|, |sources|) / |b| on the B rows
            mean = merge_rows(x, flat, out_len, "mean")
            norm = x.norm(dim=-1, keepdim=True)
            scaled = mean / take_rows(norm, flat_base, out_len) * merge_rows(norm, flat, out_len, "amax")
            u = unm.shape[1]
            is_b = torch.zeros(out_len, 1, dtype=torch.bool, device=x.device)
            is_b[u + in_b :] = True
            is_b[1 : 2 * in_b : 2] = True
            state.x = torch.where(is_b, scaled, mean)
        return state

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, strategy={self.strategy}"
