"""PPT: adaptive token Pruning and Pooling (Wu et al., arXiv 2310.01812), as xjwu1024/PPT at 706bcdd
(``ppt_deit.py``, ``tome.py``).

At each location (0-based blocks, default 3, 6, 9), between the attention residual and the MLP, every
patch token gets a significance score: the attention the CLS query pays to it, summed over heads, times
the norm of its value vector (all heads concatenated), normalised to sum 1 over the patch tokens. An
image whose scores vary little (unbiased variance below ``threshold``) is pooled: ToMe's bipartite
matching on the head-mean keys merges r tokens by size-weighted averaging (output [unmerged A, B]). Any
other image is pruned: its tokens, sorted by score in descending order (CLS first), keep the first
N - r in that order, with their sizes. r (one int, or one per location) is capped at half the patch
tokens. Every block uses proportional attention (log size bias) once sizes exist, if ``prop_attn``.

Both branches have N - r tokens, so the count per block is static; each image takes its own branch
(both are computed for the batch and selected per image: one graph for compile and ONNX export).

Not exact / extensions:
- With ``prop_attn`` off the reference resets the sizes to ones at each location (so pooling is a
  plain mean of the members); the pooling here does the same, but ``state.size`` keeps counting the
  patches each token stands for (only size-weighted average-pool heads read it; DeiT's CLS head does not).
- Several prefix tokens (distillation, registers): all are protected (never scored, pruned or merged)
  and the scores, their variance and the cap use the N - prefix patch tokens; the reference scores a
  distillation token like a patch.
- The CLS row is taken before attention dropout (identical in eval and for DeiT/ViT checkpoints);
  sorts are stable (the reference's ties are undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

from .base import (
    NO_REQUEST,
    QUARTER_POINTS,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    merge_rows,
    parse_locations,
    register,
)
from .tome import merge_plan

Tensor = torch.Tensor


def significance(res: AttentionResult, p: int) -> Tensor:
    """Scores (B, N - p) of the non-protected tokens: CLS attention summed over heads x value norm,
    normalised to sum 1."""
    v = res.values
    B, H, N, hd = v.shape
    v_norm = torch.linalg.norm(v.transpose(1, 2).reshape(B, N, H * hd), ord=2, dim=2)
    score = (res.cls_attn.sum(dim=1) * v_norm)[:, p:]
    return score / score.sum(dim=1, keepdim=True)


@register
class PPT(ReductionMethod):
    name = "ppt"
    #: dense map: pooled patches take their pooled token's final features, pruned ones their last features
    dense_restore = "source"
    needs_class_token = True

    def __init__(
        self,
        model,
        r: int | Sequence[int] = 50,
        locations: Sequence[int | float] = QUARTER_POINTS,
        threshold: float = 7e-5,
        prop_attn: bool = True,
    ):
        self.depth = len(model.blocks)
        locs = sorted(parse_locations(locations, self.depth, "PPT"))
        self.locations = locs
        per_loc = self._parse_r(r, len(locs))
        self.r_at = {loc: v for loc, v in zip(locs, per_loc)}
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or not float(threshold) >= 0:
            raise ReductionConfigError(
                f"PPT threshold must be a number >= 0 (an image is pooled when the variance of its token scores "
                f"is below it; 0 prunes every image), got {threshold!r}"
            )
        self.threshold = float(threshold)
        if not isinstance(prop_attn, bool):
            raise ReductionConfigError(f"PPT prop_attn must be true or false, got {prop_attn!r}")
        self.prop_attn = prop_attn

    def _parse_r(self, r, n_locs: int) -> list[int]:
        def check(v, what):
            if isinstance(v, bool) or not isinstance(v, Real) or not float(v).is_integer() or v < 0:
                raise ReductionConfigError(f"PPT {what} must be an int >= 0 (tokens removed at a location), got {v!r}")
            return int(v)

        if isinstance(r, (list, tuple)):
            if len(r) == n_locs:
                return [check(v, f"r[{j}]") for j, v in enumerate(r)]
            if len(r) == self.depth:  # a per-block list (the shared schedules): the entries at the locations
                return [check(r[loc], f"r[{loc}]") for loc in self.locations]
            raise ReductionConfigError(
                f"PPT r list has {len(r)} entries; give one per location ({n_locs}: blocks {self.locations}), one "
                f"per block ({self.depth}) or a single int"
            )
        return [check(r, "r")] * n_locs

    def _bias(self, state: TokenState):
        if self.prop_attn and state.size is not None:
            return state.size.log()[:, None, None, :, 0].to(state.x.dtype)
        return None

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        bias = self._bias(state)
        if i in self.r_at:
            return AttentionRequest(need="cls", bias=bias)
        return NO_REQUEST if bias is None else AttentionRequest(bias=bias)

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        r = self.r_at.get(i)
        if r is None:
            return state
        p, x = state.num_protected, state.x
        B, N, C = x.shape
        r = min(r, (N - p) // 2)
        if r <= 0:
            return state
        score = significance(res, p)  # (B, N - p)
        pool = (score.var(dim=1) < self.threshold)[:, None, None]  # (B, 1, 1)
        n = N - r
        size = state.size.to(x.dtype) if state.size is not None else x.new_ones(B, N, 1)
        # pooling: ToMe's matching on the head-mean keys, averaging weighted by sizes (ones without prop_attn)
        flat, _ = merge_plan(res.metric, r, p)
        weight = size if self.prop_attn else x.new_ones(B, N, 1)
        den = merge_rows(weight, flat, n)
        pooled_x = merge_rows(x * weight, flat, n) / den
        pooled_size = den if self.prop_attn else merge_rows(size, flat, n)
        # pruning: the protected tokens first (in order), then the patch tokens by score, the best N - p - r
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, : N - p - r] + p
        if p:
            order = torch.cat([torch.arange(p, device=x.device).expand(B, p), order], dim=1)
        keep = state.flat_index(order, N)
        pruned_x = x.reshape(B * N, C).index_select(0, keep).view(B, n, C)
        pruned_size = size.reshape(B * N, 1).index_select(0, keep).view(B, n, 1)
        state.x = torch.where(pool, pooled_x, pruned_x)
        state.size = torch.where(pool, pooled_size, pruned_size)
        if state.source is not None:
            S = state.source
            pooled_src = merge_rows(S, flat, n, "amax")
            pruned_src = S.reshape(B * N, -1).index_select(0, keep).view(B, n, -1)
            state.source = torch.where(pool, pooled_src, pruned_src)
        return state

    def extra_repr(self) -> str:
        return (
            f"r={[self.r_at[loc] for loc in self.locations]}, locations={self.locations}, "
            f"threshold={self.threshold:g}, prop_attn={self.prop_attn}"
        )
