"""MCTF: Multi-Criteria Token Fusion with one-step-ahead attention (Lee et al., CVPR 2024), as
mlvlab/MCTF at 2004da0 (``utils/mctf.py``, ``models/modules/blocks.py``).

In every active block (``layers``) up to r tokens are fused by a bidirectional bipartite matching
on the tokens themselves (the block input; not keys). Tokens split alternately into A (even positions,
CLS first) and B (odd). The weight of a pair multiplies three criteria, each raised to 1/tau (tau 0
switches one off): similarity ((cos + 1) / 2), informativeness (both tokens receive little attention:
inverse head- and query-mean attention, divided by its image maximum) and size (both tokens are small:
inverse size, divided by its image maximum). Stage 1: the r // 2 best-scored A tokens join their best B
token; the other A tokens return to index order. Stage 2 (``bidirectional``): with the same weights, the
r - r // 2 best B tokens join their best remaining A token; the other B tokens keep the descending
order of that stage's scores. Output order: [remaining A, remaining B], which the next active block
splits again. Groups are pooled by ``pooling``: "attn" (weights = received attention x size / the
image's largest size), "size" (size-weighted), "max" (elementwise) or "mean"; sizes add up.

``one_step_ahead``: 1 (official) merges before the attention, with this block's attention map of the
unmerged tokens, and reuses that map merged the same way (key columns summed, query rows pooled with
the tokens' weights; no new softmax, no size bias); only the values of the merged tokens are projected.
2 computes that map without gradient, merges, and recomputes the attention of the merged tokens. 0
merges after the MLP with the block's own attention map, matching the block's output tokens. Blocks
outside ``layers`` are plain blocks, with proportional attention (log size bias) when ``prop_attn``.
r per step: an int, or a float < 1 = that fraction of the non-protected tokens (int); an int r is
lowered so that at least 10 tokens remain, then every r is capped at half the non-protected tokens.

Training: the reference trains the student (r) together with a second pass of the same network at a
random r (``torch.randint(0, r_max)``, or ``randint(0, 100 r_max) / 100`` for a fraction; one draw per
forward pass, shared by all active blocks): cross-entropy on that pass's logits (weight 1) and, for
the images whose student probability of the label exceeds a threshold (0.4), the mean squared distance
between the student's final class token and the detached one of the random-r pass (weight 3). Here
``aux_r_max`` > 0 enables it (0, the default, trains the student alone); the terms are the method's
``losses`` ("mctf_aux_ce", "mctf_consistency"). Differences: the random-r pass runs after the student
pass (the reference runs both block by block; same result), it needs the trainer's soft targets,
so "the label" is every class whose target exceeds the smoothing floor (the two mixed classes under
mixup, as the reference's label + flipped label; a class mixed with itself counts once here, twice in
the reference), and the compared features are the pre-logits (the class token after the final norm for
a class-token model, as the reference; the pooled features otherwise).

Not exact / extensions: several prefix tokens (distillation, registers; the reference has only CLS)
are never sources or destinations in either stage and lead the output in their own order; sorts are
stable (the reference's ties are undefined). Merging sums each group in one pass (the reference sums
stage 1 into B, then stage 2 into A): the same sums in another order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from .base import (
    NO_REQUEST,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    merge_rows,
    parse_locations,
    register,
    run_block,
)

Tensor = torch.Tensor
POOLINGS = ("attn", "size", "max", "mean")
MIN_TOKENS = 10  # an int r leaves at least this many tokens (the reference's rule)


def step_r(r: float, t: int, p: int) -> int:
    """Tokens one step removes from t tokens (p protected): the reference's rules, in its order."""
    if t - r < MIN_TOKENS:
        r = t - MIN_TOKENS
    r = int((t - p) * r) if r < 1 else int(r)
    return min(r, (t - p) // 2)


def parse_layers(layers, depth: int) -> list[int]:
    """Active blocks: a list of 0-based indices / fractions of the depth, or a slice string "a:b"
    ("1:" = every block but the first, the official setting), or "all"."""
    if isinstance(layers, str):
        text = layers.strip()
        if text == "all":
            return list(range(depth))
        parts = text.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            bounds = [int(v) if v.strip() else None for v in parts]
        except ValueError:
            raise ReductionConfigError(
                f"MCTF layers={layers!r}: a string must be a slice of the blocks such as '1:' (every block but "
                "the first), '3:9' or ':-1', or 'all'; or give a list of 0-based block indices"
            ) from None
        out = list(range(depth))[slice(*bounds)]
        if not out:
            raise ReductionConfigError(f"MCTF layers={layers!r} selects no block of this {depth}-block model")
        return out
    return sorted(parse_locations(layers, depth, "MCTF"))


def parse_r_per_block(r, depth: int) -> list[int | float]:
    def check(v, what):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ReductionConfigError(f"MCTF {what} must be an int >= 0 or a fraction in (0, 1), got {v!r}")
        if isinstance(v, int) or float(v).is_integer():
            if v < 0:
                raise ReductionConfigError(f"MCTF {what} must be >= 0 (tokens fused per block), got {v!r}")
            return int(v)
        if not 0.0 < float(v) < 1.0:
            raise ReductionConfigError(
                f"MCTF {what}={v!r}: a non-integer r is the fraction of the non-class tokens fused per block and "
                "must be in (0, 1) (e.g. 0.35, MCTF-Fast); or give an int number of tokens"
            )
        return float(v)

    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise ReductionConfigError(
                f"MCTF r list has {len(r)} entries but the model has {depth} blocks; give one entry per block "
                "(used where `layers` is active) or a single int / fraction"
            )
        return [check(v, f"r[{i}]") for i, v in enumerate(r)]
    return [check(r, "r")] * depth


def _check_tau(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or float(value) < 0 or not math.isfinite(float(value)):
        raise ReductionConfigError(f"MCTF {what} must be a number >= 0 (0 switches the criterion off), got {value!r}")
    return float(value)


def attention_probs(attn: Attention, x: Tensor, size: Tensor | None) -> Tensor:
    """softmax(q k^T * scale + log size over keys) (B, H, N, N) of normalised tokens `x`: only the q and k
    projections (the reference's one-step-ahead map; its values are projected after the merge)."""
    B, N, _ = x.shape
    d = attn.num_heads * attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    qk = F.linear(x, w[: 2 * d], None if b is None else b[: 2 * d])
    q, k = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0].to(logits.dtype)
    return logits.softmax(dim=-1)


def merge_plan(
    metric: Tensor,
    attn: Tensor | None,
    size: Tensor | None,
    r: int,
    p: int,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
    bidirectional: bool,
) -> Tensor:
    """MCTF's two-stage matching: the output row (B, t) of every token, among t - r rows."""
    B, t, _ = metric.shape
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    in_a, in_b = (p + 1) // 2, p // 2
    t1, t2 = (t + 1) // 2, t // 2
    dev = metric.device
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]
        if tau_sim:
            w = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
        else:
            w = m.new_ones(B, t1, t2)
        if tau_info and attn is not None:
            inv = 1 / attn.mean(dim=[1, 2])
            inv = inv / inv.max(1, keepdim=True)[0]
            w = w * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_info)
        if tau_size and size is not None:
            inv = 1 / size[..., 0].to(m.dtype)
            inv = inv / inv.max(1, keepdim=True)[0]
            w = w * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_size)
        scores = w
        if in_a:
            scores[:, :in_a, :] = -math.inf
        if in_b:
            scores[:, :, :in_b] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.sort(dim=-1, descending=True, stable=True).indices
        src, unm = order[:, :r1], order[:, r1:]
        dst = node_idx.gather(1, src)
        if p:
            unm = unm.sort(dim=1).values  # remaining A back in index order, protected ones first
        u1 = t1 - r1
        rows_b = torch.arange(u1, u1 + t2, device=dev).expand(B, t2)
        if r2:
            s2 = scores.gather(1, unm[:, :, None].expand(B, u1, t2)).transpose(1, 2)  # (B, t2, u1)
            if in_b:
                s2[:, :in_b, :] = -math.inf  # protected B tokens never move (and sort last)
            node_max2, node_idx2 = s2.max(dim=-1)
            order2 = node_max2.sort(dim=-1, descending=True, stable=True).indices
            src2, unm2 = order2[:, :r2], order2[:, r2:]
            rows_b = torch.empty_like(rows_b)
            rows_b.scatter_(1, unm2, torch.arange(u1, u1 + t2 - r2, device=dev).expand(B, -1))
            rows_b.scatter_(1, src2, node_idx2.gather(1, src2))
        rows_a = torch.empty(B, t1, dtype=torch.long, device=dev)
        rows_a.scatter_(1, unm, torch.arange(u1, device=dev).expand(B, -1))
        rows_a.scatter_(1, src, rows_b.gather(1, dst))
        rows = torch.empty(B, t, dtype=torch.long, device=dev)
        rows[:, ::2], rows[:, 1::2] = rows_a, rows_b
        if in_b:  # several prefix tokens: their rows (the same in every image) move to the front, in order
            prot = rows[0, :p]
            rest = torch.ones(t - r, dtype=torch.long, device=dev).index_fill_(0, prot, 0)
            lut = (rest.cumsum(0) + (p - 1)).index_copy_(0, prot, torch.arange(p, device=dev))
            rows = lut[rows]
        return rows


@register
class MCTF(ReductionMethod):
    name = "mctf"
    #: dense map: fused patches take the final features of the token they were fused into
    dense_restore = "source"

    def __init__(
        self,
        model,
        r: float | Sequence[int | float] = 16,
        layers: str | Sequence[int | float] = "1:",
        one_step_ahead: int = 1,
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        pooling: str = "attn",
        prop_attn: bool = True,
        aux_r_max: float = 0,
        aux_weight: float = 1.0,
        consistency_weight: float = 3.0,
        consistency_threshold: float = 0.4,
    ):
        self.depth = len(model.blocks)
        self.r = parse_r_per_block(r, self.depth)
        self.layers = parse_layers(layers, self.depth)
        if isinstance(one_step_ahead, bool) or one_step_ahead not in (0, 1, 2):
            raise ReductionConfigError(
                f"MCTF one_step_ahead must be 0 (merge after the MLP), 1 (merge before the attention and reuse "
                f"the merged map, official) or 2 (merge, then recompute the attention), got {one_step_ahead!r}"
            )
        self.one_step_ahead = int(one_step_ahead)
        self.tau_sim, self.tau_info, self.tau_size = (
            _check_tau(tau_sim, "tau_sim"),
            _check_tau(tau_info, "tau_info"),
            _check_tau(tau_size, "tau_size"),
        )
        for name, value in (("bidirectional", bidirectional), ("prop_attn", prop_attn)):
            if not isinstance(value, bool):
                raise ReductionConfigError(f"MCTF {name} must be true or false, got {value!r}")
        self.bidirectional, self.prop_attn = bidirectional, prop_attn
        if pooling not in POOLINGS:
            raise ReductionConfigError(
                f"MCTF pooling={pooling!r} is not one of {', '.join(POOLINGS)} (reference pooling types 1, 0, 2, 3; "
                "'attn' is the official one)"
            )
        self.pooling = pooling
        if (
            isinstance(aux_r_max, bool)
            or not isinstance(aux_r_max, Real)
            or aux_r_max < 0
            or (not float(aux_r_max).is_integer() and aux_r_max >= 1)
        ):
            raise ReductionConfigError(
                f"MCTF aux_r_max must be 0 (no random-r training pass), an int > 0 or a fraction in (0, 1), "
                f"got {aux_r_max!r}"
            )
        self.aux_r_max = int(aux_r_max) if float(aux_r_max).is_integer() else float(aux_r_max)
        for name, value in (
            ("aux_weight", aux_weight),
            ("consistency_weight", consistency_weight),
            ("consistency_threshold", consistency_threshold),
        ):
            if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
                raise ReductionConfigError(f"MCTF {name} must be a number >= 0, got {value!r}")
        self.aux_weight, self.consistency_weight = float(aux_weight), float(consistency_weight)
        self.consistency_threshold = float(consistency_threshold)
        self.active = {i: v for i, v in enumerate(self.r) if i in self.layers}

    # --- helpers ---------------------------------------------------------------------------------
    def _bias(self, state: TokenState) -> Tensor | None:
        if self.prop_attn and state.size is not None:
            return state.size.log()[:, None, None, :, 0].to(state.x.dtype)
        return None

    def _step_r(self, i: int, state: TokenState) -> int:
        r = self.active.get(i)
        if r is None:
            return 0
        return step_r(r, state.num_tokens, state.num_protected)

    def _merge(self, state: TokenState, attn: Tensor | None, r: int, merge_map: bool) -> Tensor | None:
        """Fuse r tokens of `state` (metric: the tokens themselves); returns the merged map if asked."""
        x, size, p = state.x, state.size, state.num_protected
        B, t, _C = x.shape
        rows = merge_plan(x, attn, size, r, p, self.tau_sim, self.tau_info, self.tau_size, self.bidirectional)
        n = t - r
        flat = (rows + torch.arange(B, device=x.device)[:, None] * n).reshape(-1)
        ones = size is None
        size = x.new_ones(B, t, 1) if ones else size.to(x.dtype)
        if state.source is not None:
            state.source = merge_rows(state.source, flat, n, "amax")
        weight = None  # per-token weights of the query rows (and tokens); None: max pooling
        if self.pooling == "attn":
            with torch.no_grad():
                received = attn.mean(dim=[1, 2])[..., None]  # (B, t, 1)
                weight = received * (size / size.amax(dim=-2, keepdim=True))
        elif self.pooling == "size":
            weight = size
        elif self.pooling == "mean":
            weight = x.new_ones(B, t, 1)
        if weight is None:
            new_x = merge_rows(x, flat, n, "amax")
        else:
            norm = merge_rows(weight, flat, n)
            new_x = merge_rows(x * weight, flat, n) / norm
        state.x = new_x
        state.size = merge_rows(size, flat, n)
        if not merge_map:
            return None
        H = attn.shape[1]
        # key columns: probability mass of the members adds up
        idx = rows[:, None, None, :].expand(B, H, t, t)
        cols = attn.new_zeros(B, H, t, n).scatter_add_(-1, idx, attn)
        # query rows: pooled with the tokens' weights (max pooling: elementwise maximum)
        idx = rows[:, None, :, None].expand(B, H, t, n)
        if weight is None:
            return cols.new_full((B, H, n, n), -math.inf).scatter_reduce_(2, idx, cols, reduce="amax")
        w = weight[:, None]  # (B, 1, t, 1)
        merged = cols.new_zeros(B, H, n, n).scatter_add_(2, idx, cols * w)
        return merged / norm[:, None]

    # --- hooks -----------------------------------------------------------------------------------
    def init_state(self, model, state: TokenState) -> TokenState:
        if state.training and self.aux_r_max and torch.is_grad_enabled():
            # what the random-r pass of `losses` needs: the model and the tokens entering the blocks
            state.extras["mctf_aux"] = {"model": model, "tokens": state.x}
        return state

    def before_block(self, i: int, block, state: TokenState) -> TokenState:
        if not self.one_step_ahead:
            return state
        r = self._step_r(i, state)
        if r <= 0:
            return state
        normed = block.norm1(state.x)
        size = state.size if self.prop_attn else None
        if self.one_step_ahead == 1:
            attn = attention_probs(block.attn, normed, size)
            state.extras["mctf_probs"] = self._merge(state, attn, r, merge_map=True)
        else:
            with torch.no_grad():
                attn = attention_probs(block.attn, normed, size)
            self._merge(state, attn, r, merge_map=False)
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        probs = state.extras.pop("mctf_probs", None)
        if probs is not None:
            return AttentionRequest(probs=probs)
        bias = self._bias(state)
        if not self.one_step_ahead and i in self.active:
            return AttentionRequest(need="map", bias=bias)
        return NO_REQUEST if bias is None else AttentionRequest(bias=bias)

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        if not self.one_step_ahead and res.attn is not None:
            state.extras["mctf_attn"] = res.attn
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        attn = state.extras.pop("mctf_attn", None)
        if attn is None:
            return state
        r = self._step_r(i, state)
        if r > 0:
            self._merge(state, attn, r, merge_map=False)
        return state

    # --- training --------------------------------------------------------------------------------
    def _aux_copy(self, r) -> MCTF:
        other = copy.copy(self)
        other.r = [r] * self.depth
        other.active = {i: r for i in self.layers}
        other.aux_r_max = 0
        return other

    def draw_aux_r(self) -> int | float:
        """The reference's random r of the second training pass (one draw per forward pass)."""
        if isinstance(self.aux_r_max, float):
            return int(torch.randint(0, int(self.aux_r_max * 100), (1,))) / 100
        return int(torch.randint(0, self.aux_r_max, (1,)))

    def losses(
        self, state: TokenState, *, logits: Tensor | None = None, targets: Tensor | None = None, **context: Any
    ) -> dict[str, Tensor]:
        """The random-r pass's cross-entropy and the class-token consistency (see the module doc)."""
        aux = state.extras.get("mctf_aux")
        if aux is None or not state.training:
            return {}
        if logits is None or targets is None:
            raise ValueError("mctf losses need the student's logits and the (soft) targets of the batch")
        model = aux["model"]
        method = self._aux_copy(self.draw_aux_r())
        other = TokenState(
            x=aux["tokens"],
            num_protected=state.num_protected,
            grid_size=state.grid_size,
            training=True,
            trace_source=False,
        )
        checkpointing = model.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(model.blocks):
            other = run_block(block, other, method, i, checkpointing)
        other = method.finalize(model, other)
        other.x = model.norm(other.x)
        aux_logits = model.forward_head_state(other)
        if targets.ndim == 1:
            targets = F.one_hot(targets, logits.shape[-1]).to(logits.dtype)
        out = {"mctf_aux_ce": self.aux_weight * (-targets * aux_logits.log_softmax(-1)).sum(-1).mean()}
        with torch.no_grad():
            labels = targets > targets.amin(dim=-1, keepdim=True)
            confidence = (logits.softmax(-1) * labels).sum(-1)
            passed = (confidence > self.consistency_threshold).to(logits.dtype)
        student = model.forward_head_state(state, pre_logits=True)
        teacher = model.forward_head_state(other, pre_logits=True).detach()
        per_image = ((teacher - student) ** 2).mean(dim=-1)
        out["mctf_consistency"] = self.consistency_weight * (per_image * passed).sum() / passed.sum().clamp_min(1.0)
        return out

    def extra_repr(self) -> str:
        r = self.r[0] if len(set(self.r)) == 1 else self.r
        return (
            f"r={r}, layers={self.layers}, one_step_ahead={self.one_step_ahead}, tau=({self.tau_sim:g}, "
            f"{self.tau_info:g}, {self.tau_size:g}), bidirectional={self.bidirectional}, pooling={self.pooling!r}, "
            f"prop_attn={self.prop_attn}, aux_r_max={self.aux_r_max}"
        )
