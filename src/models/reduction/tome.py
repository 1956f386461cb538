"""ToMe: Token Merging (Bolya et al., ICLR 2023), as facebookresearch/ToMe at af95e4b.

Between attention and MLP of every block, split the tokens alternately into sets A (even
positions) and B (odd), match every A token to its most similar B token by cosine similarity of the
head-mean keys, and merge the r best-matched A tokens into their partners by a size-weighted
average. The CLS token (position 0, in A) is never a source and the distillation token (position 1,
B[0]) never a destination. The output order is [unmerged A, B] (CLS and distillation token kept in
front), exactly as the reference, because the next block's even/odd split depends on it.
Proportional attention adds log(size) to the attention logits.

Extension: register tokens (DINOv2-reg, ...) are protected by the same rule as CLS and the
distillation token (never a source in A, never a destination in B, kept in order in front).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .base import (
    AttentionRequest,
    AttentionResult,
    NO_REQUEST,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    register,
    resolve_r,
)

Tensor = torch.Tensor
RSpec = Union[int, float, Sequence[int], Tuple[int, float]]


def parse_r(depth: int, r: RSpec, num_patches: Optional[int] = None) -> List[int]:
    """ToMe's schedule: an int for every block, a per-block list (padded with 0), (r, inflect), or a
    float in (0, 1): that fraction of the `num_patches` patch tokens removed over all blocks, as a
    constant r (base.resolve_r: 0.8 -> r=13 on DeiT at 224 px).

    (r, inflect) is the linear schedule through r at the middle block, e.g. (16, -1) gives
    32, 29, ..., 2, 0 for 12 blocks. A 2-element list is read as (r, inflect), like the golden
    manifest, unless the model has exactly 2 blocks.
    """
    if isinstance(r, bool):
        raise ReductionConfigError(f"r must be an int, a list or (r, inflect), got {r!r}")
    if isinstance(r, float) and num_patches is not None:
        r = resolve_r(r, depth, num_patches, "ToMe r")
    if isinstance(r, int):
        out = [r] * depth
    elif isinstance(r, (list, tuple)) and len(r) == 2 and (isinstance(r, tuple) or depth != 2):
        base, inflect = r
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (depth - 1)
        out = [int(lo + step * i) for i in range(depth)]
    elif isinstance(r, (list, tuple)):
        if len(r) > depth:
            raise ReductionConfigError(f"r has {len(r)} entries but the model has {depth} blocks")
        out = [int(v) for v in r] + [0] * (depth - len(r))
    else:
        raise ReductionConfigError(f"r must be an int, a list or (r, inflect), got {r!r}")
    if any(v < 0 for v in out):
        raise ReductionConfigError(f"r must be >= 0 in every block, got {out}")
    return out


def check_total_removal(per_block: Sequence[int], num_tokens: int, num_protected: int, what: str) -> None:
    """A schedule may not ask to remove more tokens than there are patch tokens (one must stay)."""
    available = num_tokens - num_protected - 1
    if sum(per_block) > available:
        raise ReductionConfigError(
            f"{what} removes {sum(per_block)} tokens in total ({list(per_block)}) but the model has only "
            f"{num_tokens - num_protected} patch tokens; lower it to at most {available} in total "
            f"(for a constant schedule: r <= {available // len(per_block)})"
        )


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int) -> Tuple[Callable[[Tensor, str], Tensor], int]:
    """Returns merge(x, mode) applying ToMe's matching on `metric` (B, N, d), and the r actually used.

    The first `num_protected` tokens (CLS, distillation, register tokens) are never merged. As in the
    reference they take part in the alternate split: a protected token in A is never a source (its
    row is -inf), one in B never a destination (its column is -inf). With one protected token this is
    the reference's `class_token`, with two its `class_token` + `distill_token`; more (register tokens)
    follow the same rule, and the protected tokens keep their order at the front of the output."""
    p = num_protected
    t = metric.shape[1]
    r = min(r, (t - p) // 2)
    if r <= 0:
        return (lambda x, mode="mean": x), 0
    in_a, in_b = (p + 1) // 2, p // 2  # protected tokens at even (A) and odd (B) positions

    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[..., ::2, :], m[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if in_a:
            scores[..., :in_a, :] = -float("inf")
        if in_b:
            scores[..., :, :in_b] = -float("inf")
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if p:
            unm_idx = unm_idx.sort(dim=1)[0]  # protected A tokens first, in order

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if not in_b:
            return torch.cat([unm, dst], dim=1)
        # protected tokens back in their order A0 B0 A1 B1 ..., then the rest as [unmerged A, B]
        prefix = torch.stack([unm[:, :in_b], dst[:, :in_b]], dim=2).flatten(1, 2)
        return torch.cat([prefix, unm[:, in_b:], dst[:, in_b:]], dim=1)

    return merge, r


def merge_wavg(merge: Callable, x: Tensor, size: Tensor | None) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge; returns the merged tokens and their new sizes."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


@register
class ToMe(ReductionMethod):
    name = "tome"

    def __init__(self, model, r: RSpec = 0, prop_attn: bool = True):
        self.depth = len(model.blocks)
        self.r = parse_r(self.depth, r, model.patch_embed.num_patches)
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        check_total_removal(self.r, num_tokens, model.num_prefix_tokens, f"ToMe r={r!r}")
        self.prop_attn = bool(prop_attn)

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        if self.prop_attn and state.size is not None:
            return AttentionRequest(need="keys", bias=state.size.log()[:, None, None, :, 0])
        return NO_REQUEST

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        if self.r[i] <= 0:
            return state
        merge, used = bipartite_soft_matching(res.metric, self.r[i], state.num_protected)
        if used == 0:
            return state
        if state.source is not None:
            state.source = merge(state.source, mode="amax")
        state.x, state.size = merge_wavg(merge, state.x, state.size)
        return state

    def extra_repr(self) -> str:
        return f"r={self.r}, prop_attn={self.prop_attn}"
