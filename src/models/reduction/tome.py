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
    NO_REQUEST,
    R_KEY,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    counts_for_input,
    describe_counts,
    merge_rows,
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
    follow the same rule, and the protected tokens keep their order at the front of the output.

    The matching is the reference's (same scores, same argsort); the merge is computed differently:
    instead of gathers and a scatter over channel-expanded indices (several passes over the tokens,
    each slow on CPU), every token gets the row it lands in (`merge_plan`) and one `index_add_` sums
    all tokens into their rows. The output order is the reference's: [unmerged A, B], with protected
    tokens first in their A0 B0 A1 B1 ... order."""
    t = metric.shape[1]
    r = min(r, (t - num_protected) // 2)
    if r <= 0:
        return (lambda x, mode="mean": x), 0
    flat, out_len = merge_plan(metric, r, num_protected)

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        return merge_rows(x, flat, out_len, mode)

    return merge, r


def merge_plan(metric: Tensor, r: int, num_protected: int) -> Tuple[Tensor, int]:
    """ToMe's bipartite matching on `metric` (B, t, d), r <= (t - num_protected) // 2 merges: the
    output row of every token, as a flat index (B*t,) into the (B*(t-r), .) flattened output, and t-r.

    A = even positions (t1 tokens), B = odd (t2). The u = t1 - r unmerged A tokens come first (in
    argsort order, or in token order when there are protected tokens, as the reference), then every
    B token; a merged A token lands in the row of its best B token. With protected B tokens (in_b > 0)
    the first 2 * in_b rows hold the protected tokens interleaved A0 B0 A1 B1 ..., exactly as the
    reference's output."""
    p = num_protected
    B, t, _ = metric.shape
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
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        if p:
            unm_idx = unm_idx.sort(dim=1)[0]  # protected A tokens first, in order
        target = merge_destinations(src_idx, dst_idx, unm_idx, t, in_b)
        rows = torch.arange(B, device=metric.device)[:, None] * (t - r)
        return (target + rows).reshape(-1), t - r


def merge_destinations(src_idx: Tensor, dst_idx: Tensor, unm_idx: Tensor, t: int, in_b: int = 0) -> Tensor:
    """Output row (B, t) of every one of t tokens split alternately into A (even) and B (odd positions)
    when the A tokens `src_idx` (B, r) merge into the B tokens `dst_idx` (B, r) and the A tokens
    `unm_idx` (B, u) stay, in that order: rows [unmerged A, B] (t - r rows). The first `in_b` B tokens
    are protected and interleave with the first in_b unmerged A tokens (then A-indices 0..in_b-1): rows
    A0 B0 A1 B1 ... (ToMe's distillation token rule)."""
    B, u = unm_idx.shape
    device = unm_idx.device
    # B token i = 2j + 1 -> row u + j, a protected one (j < in_b) row i; even entries are placeholders,
    # all overwritten below
    pos = torch.arange(t, device=device)
    target = (pos + (2 * u - 1)).div(2, rounding_mode="floor")
    if in_b:
        target[: 2 * in_b] = pos[: 2 * in_b]
    target = target.expand(B, t).clone()
    # unmerged A tokens: row = rank (+ in_b behind the interleaved protected pairs); the first in_b of
    # them are the protected A tokens 0..in_b-1, whose rows 0, 2, ... the base already holds
    target.scatter_(1, 2 * unm_idx[:, in_b:], torch.arange(2 * in_b, u + in_b, device=device).expand(B, -1))
    target.scatter_(1, 2 * src_idx, dst_idx + u)  # merged A tokens: their destination's row
    return target


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
    #: dense map: merged patches take the final features of the token they were merged into
    dense_restore = "source"
    claims_every_patch = True  # sources are merged by maximum: no patch is ever left unclaimed

    def __init__(self, model, r: RSpec = 0, prop_attn: bool = True):
        self.depth = len(model.blocks)
        self.r_spec, self.num_patches = r, model.patch_embed.num_patches
        self.r = parse_r(self.depth, r, self.num_patches)
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        check_total_removal(self.r, num_tokens, model.num_prefix_tokens, f"ToMe r={r!r}")
        self.prop_attn = bool(prop_attn)

    def init_state(self, model, state: TokenState) -> TokenState:
        state.extras[R_KEY] = counts_for_input(
            self.r_spec, self.r, self.num_patches, state, lambda m: parse_r(self.depth, self.r_spec, m)
        )
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        if self.prop_attn and state.size is not None:
            return AttentionRequest(need="keys", bias=state.size.log()[:, None, None, :, 0])
        return NO_REQUEST

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        t, p = state.num_tokens, state.num_protected
        r = min(state.extras[R_KEY][i], (t - p) // 2)
        if r <= 0:
            return state
        flat, out_len = merge_plan(res.metric, r, p)
        if state.source is not None:
            state.source = merge_rows(state.source, flat, out_len, "amax")
        # size-weighted average: sum(size * x) / sum(size); sizes start at 1 (x * 1 is x)
        size = state.size
        total = merge_rows(state.x if size is None else state.x * size, flat, out_len)
        if size is None:
            size = state.x.new_ones(state.x.shape[0], t, 1)
        state.size = merge_rows(size, flat, out_len)
        state.x = total / state.size
        return state

    def extra_repr(self) -> str:
        return f"{describe_counts(self.r_spec, self.r, self.num_patches)}, prop_attn={self.prop_attn}"
