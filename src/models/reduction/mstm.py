"""MSTM: Multi-Scale And Token Mergence (Bian et al., arXiv 2306.04897), reconstructed from the paper.

No public code exists; docs/methods/mstm.md lists what follows the paper and what is reconstructed.

Token mergence, at each location (0-based blocks, default 3, 6, 9), between the attention residual
and the MLP: the head-mean CLS attention ranks the non-protected tokens; the top
``ceil(keep_rate * M)`` are *crucial* (EViT's keep-rate convention, descending attention order) and
every other token is merged into its most similar crucial token (cosine similarity of the token
features), so nothing is discarded. A crucial token becomes the weighted average of itself (weight:
its size) and the tokens merged into it (weight: size x (1 + cos) / 2, the similarity mapped to
[0, 1] so every member counts). Sizes add up; the source row is the maximum of the members'.

Multi-scale fusion, once, at the input of the first location's block (before any token is pruned,
while the patch tokens still lie on the grid): the patch-token map is average-pooled to coarser
scales (default 2x2 and 4x4 windows), each coarse map goes through a LayerNorm and a zero-initialised
Linear and is added back to the patches it covers. The fusion module is attached to the model as
``model.mstm_fusion`` and trained at the full learning rate (``new_module_names``); at
initialisation its contribution is exactly zero, so MSTM is usable off-the-shelf and equals the
method without fusion.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (
    QUARTER_POINTS,
    AttentionResult,
    KeepRateMethod,
    ReductionConfigError,
    TokenState,
    rank_by_cls_attention,
    register,
    take_rows,
    weighted_merge,
)

Tensor = torch.Tensor
FUSION_ATTR = "mstm_fusion"


class MultiScaleFusion(nn.Module):
    """Adds coarser views of the patch grid to every patch token; exactly zero at initialisation."""

    def __init__(self, dim: int, scales: Sequence[int] = (2, 4)):
        super().__init__()
        self.scales = tuple(scales)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in self.scales)
        for proj in self.proj:  # zero contribution until finetuning learns one
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return f"scales={self.scales}"

    def forward(self, patches: Tensor) -> Tensor:
        """patches: (B, H, W, C) -> the same map with every coarse scale added."""
        H, W = patches.shape[1:3]
        grid = patches.permute(0, 3, 1, 2)
        out = patches
        for s, proj in zip(self.scales, self.proj):
            # ceil_mode: edge windows of a grid not divisible by s average only the patches they cover
            coarse = F.avg_pool2d(grid, s, s, ceil_mode=True).permute(0, 2, 3, 1)
            coarse = proj(self.norm(coarse))  # project the few coarse tokens, then broadcast back
            out = out + coarse.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)[:, :H, :W]
        return out


def merge_into_crucial(
    x: Tensor, size: Tensor, source: Optional[Tensor], crucial: Tensor, rest: Tensor
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Merge every `rest` token into its most similar `crucial` token; returns the crucial tokens
    (in `crucial` order) with their new features, sizes and sources."""
    dest, factor = crucial_plan(x, crucial, rest)
    return weighted_merge(x, (size[..., 0] * factor).unsqueeze(-1), size, source, dest, crucial.shape[1])


def crucial_plan(x: Tensor, crucial: Tensor, rest: Tensor) -> Tuple[Tensor, Tensor]:
    """For tokens x (B, M, C) split into `crucial` (B, K) and `rest` (B, M-K): every token's output row
    (B, M) (a crucial token its rank, a rest token the rank of its most similar crucial token by cosine
    similarity of the features) and the factor (B, M) its size is weighted with (1 for a crucial token,
    (1 + cos) / 2 for a merged one), both in token order."""
    B, M, _ = x.shape
    K = crucial.shape[1]
    rows = torch.arange(B, device=x.device)[:, None] * M
    with torch.no_grad():
        xn = F.normalize(x.detach(), dim=-1)
        xc = take_rows(xn, (crucial + rows).reshape(-1), K)
        xr = take_rows(xn, (rest + rows).reshape(-1), M - K)
        best, dst = (xr @ xc.transpose(-1, -2)).max(dim=-1)  # (B, M - K)
    order = torch.cat([crucial, rest], dim=1)
    ranked_dest = torch.cat([torch.arange(K, device=x.device).expand(B, K), dst], dim=1)
    ranked_factor = torch.cat([best.new_ones(B, K), (1.0 + best) / 2.0], dim=1)
    dest = torch.empty_like(order).scatter_(1, order, ranked_dest)
    factor = torch.empty_like(ranked_factor).scatter_(1, order, ranked_factor)
    return dest, factor


@register
class MSTM(KeepRateMethod):
    name = "mstm"
    #: dense map: merged patches take the final features of their crucial token
    dense_restore = "source"
    module_names = (FUSION_ATTR,)
    label = "MSTM"

    def __init__(
        self,
        model,
        keep_rate: Union[float, Sequence[float]] = 0.7,
        locations: Sequence[Union[int, float]] = QUARTER_POINTS,
        fusion: bool = True,
        scales: Sequence[int] = (2, 4),
    ):
        self._set_schedule(model, keep_rate, locations)
        if not isinstance(fusion, bool):
            raise ReductionConfigError(f"MSTM fusion must be true or false, got {fusion!r}")
        self.fusion = fusion
        self.scales: Tuple[int, ...] = ()
        self.fusion_block: Optional[int] = None
        if fusion:
            if (
                isinstance(scales, (int, str))
                or not isinstance(scales, Sequence)
                or not scales
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in scales)
            ):
                raise ReductionConfigError(
                    f"MSTM scales must be a non-empty list of pooling windows >= 2 (e.g. [2, 4]), got {scales!r}"
                )
            grid = tuple(model.patch_embed.grid_size)
            if any(s > min(grid) for s in scales):
                raise ReductionConfigError(
                    f"MSTM scales {list(scales)} must not exceed the {grid[0]}x{grid[1]} patch grid"
                )
            if not self.locations:
                raise ReductionConfigError("MSTM fusion happens before the first location; give at least one location")
            self.scales = tuple(scales)
            self.fusion_block = min(self.locations)
            self._attach_fusion(model)

    def _attach_fusion(self, model) -> None:
        """Reuse an existing matching module (keeps loaded/trained weights), else attach a new one."""
        existing = getattr(model, FUSION_ATTR, None)
        dim = model.embed_dim
        if (
            isinstance(existing, MultiScaleFusion)
            and existing.scales == self.scales
            and existing.norm.normalized_shape == (dim,)
        ):
            return
        ref = next(model.parameters())
        setattr(model, FUSION_ATTR, MultiScaleFusion(dim, self.scales).to(device=ref.device, dtype=ref.dtype))

    def init_state(self, model, state: TokenState) -> TokenState:
        # the hooks get no model, so keep a handle on the fusion module for this forward pass
        if self.fusion:
            state.extras[FUSION_ATTR] = getattr(model, FUSION_ATTR)
        return state

    def before_block(self, i: int, block, state: TokenState) -> TokenState:
        if i != self.fusion_block:
            return state
        p, (H, W) = state.num_protected, state.grid_size
        B, N, C = state.x.shape
        if N - p != H * W:
            raise RuntimeError(f"MSTM fusion needs the {H}x{W} patch grid intact at block {i}, found {N - p} tokens")
        patches = state.extras[FUSION_ATTR](state.x[:, p:].reshape(B, H, W, C))
        state.x = torch.cat([state.x[:, :p], patches.reshape(B, H * W, C)], dim=1)
        return state

    def reduce(self, state: TokenState, res: AttentionResult, k: int) -> TokenState:
        p = state.num_protected
        B, N, _ = state.x.shape
        if state.size is None:
            state.size = state.x.new_ones(B, N, 1)
        _, order = rank_by_cls_attention(res, p)
        dest, factor = crucial_plan(state.x[:, p:], order[:, :k], order[:, k:])
        weight = state.size[:, p:, 0] * factor.to(state.size.dtype)
        if p:  # the protected tokens keep their own rows, weight 1
            dest = torch.cat([torch.arange(p, device=dest.device).expand(B, p), dest + p], dim=1)
            weight = torch.cat([weight.new_ones(B, p), weight], dim=1)
        state.x, state.size, state.source = weighted_merge(
            state.x, weight.unsqueeze(-1), state.size, state.source, dest, p + k
        )
        return state

    def new_module_names(self) -> List[str]:
        return [FUSION_ATTR] if self.fusion else []

    def extra_repr(self) -> str:
        return (
            f"keep_rate={self.keep_rates}, locations={self.locations}, fusion={self.fusion}, scales={list(self.scales)}"
        )
