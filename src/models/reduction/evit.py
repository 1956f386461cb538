"""EViT: token reorganisation by CLS attention (Liang et al., ICLR 2022), as youweiliang/evit at 5ca95a7.

At each reduction location (0-based blocks, default 3, 6, 9), between the attention residual and
the MLP, the non-protected tokens are ranked by the head-averaged attention the CLS query pays to
them. The top ``ceil(keep_rate * (N - 1))`` are kept in descending attention order (``torch.topk``
sorted, as the reference); ``N - 1`` counts every non-CLS token, including a token fused at an earlier
location. With ``fuse_token`` the inattentive rest is summed into one extra token weighted by its raw
CLS attention (an UNNORMALISED weighted sum: the weights sum to less than 1, exactly as the
reference code; the paper says "weighted average"), appended last. If the keep count equals the
current count the location is a no-op (no fused token), as in the reference.

Extensions beyond the reference, documented here:
- Distilled DeiT (and any prefix token): the reference ranks the distillation token like a patch.
  Here every prefix token (CLS, distillation, registers) is protected like CLS: only tokens after
  them are ranked, by the CLS query's row, and ``N - 1`` becomes ``N - num_prefix_tokens``.
- ``keep_rate`` may be one float for every location or a list with one rate per location (staged
  schedules).
- Only the CLS row of the attention is computed explicitly (``need="cls"``); the block output uses
  the fused SDPA kernel. The CLS row is therefore taken before attention dropout (identical in eval
  and whenever ``attn_drop`` is 0, as for every DeiT/ViT checkpoint).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .base import (
    QUARTER_POINTS,
    AttentionResult,
    KeepRateMethod,
    ReductionConfigError,
    TokenState,
    register,
)

Tensor = torch.Tensor


@register
class EViT(KeepRateMethod):
    name = "evit"
    #: dense map: dropped tokens leave their own last features (the fused token claims none of them)
    dense_restore = "source"
    label = "EViT"

    def __init__(
        self,
        model,
        keep_rate: Union[float, Sequence[float]] = 0.7,
        locations: Sequence[Union[int, float]] = QUARTER_POINTS,
        fuse_token: bool = True,
    ):
        self._set_schedule(model, keep_rate, locations)
        if not isinstance(fuse_token, bool):
            raise ReductionConfigError(f"EViT fuse_token must be true or false, got {fuse_token!r}")
        self.fuse_token = fuse_token

    def reduce(self, state: TokenState, res: AttentionResult, left: int) -> TokenState:
        p = state.num_protected
        # CLS query row, averaged over heads, over the non-protected tokens: (B, N - p)
        cls_attn = res.cls_attn[:, :, p:].mean(dim=1)
        _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
        if not self.fuse_token:
            state.keep(idx)
            return state
        # Fused token: sum over the complement of (CLS attention * token), no normalisation. The weights
        # are the CLS attention with the kept tokens zeroed, and the weighted sum is one batched
        # matrix-vector product (the reference multiplies and sums: the same sum, in another order).
        weights = cls_attn.scatter(1, idx, 0.0)
        fused = torch.bmm(weights.unsqueeze(1).to(state.x.dtype), state.x[:, p:])
        fused_source = None
        if state.source is not None:
            # the fused token stands for every patch any of its members stood for
            dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter_(1, idx, False)
            fused_source = state.source[:, p:].masked_fill(~dropped.unsqueeze(-1), 0).amax(dim=1, keepdim=True)
        state.keep(idx, extra=fused, extra_source=fused_source)
        return state

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rates}, locations={self.locations}, fuse_token={self.fuse_token}"
