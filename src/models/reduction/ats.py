"""ATS: Adaptive Token Sampling (Fayyaz et al., ECCV 2022), as the authors' adaptivetokensampling/ATS at
9271257 (``libs/models/transformers/{ats_block,transformer_block,vit}.py``; DeiT-S config: ATS in
blocks 3..11, NUM_TOKENS 197, DROP_TOKENS true).

In an ATS block, between the attention and the MLP, every patch token gets a significance score: the
attention the CLS query pays it (summed over heads) times the norm of its value vector, normalised to
sum one. The scores are sorted ascending and their cumulative sum, rescaled to [0, 1] per image, is
inverted at evenly spaced heights from the smallest non-zero value to 1 (one height per patch token
of the input image): each height picks the token whose rescaled cumulative score is nearest. The
distinct picks are kept (CLS first, then the picks in ascending score order), so each image keeps
its own number of tokens. The block output of a kept token is its block input plus its attention
output; the MLP then runs on the kept tokens only.

Images of a batch keep different numbers of tokens, so they are carried in padded rows with a 0/1
policy (``state.size``: 1 for a real token, 0 for a padding row; average pooling weighs by it).
Padding rows are zero, and as in the reference every attention (every block, once the method is
applied, not only ATS blocks) is the reference's masked softmax: subtract the row maximum, mask the
padding columns (a row's own column always stays), add eps/N to every column and divide by the
row sum + eps (eps = 1e-6, N the padded row length). The exponentials are taken in float32 or wider
(float64 models stay float64). In ATS blocks the padding rows' queries, keys and values are zero.

Batch dependence (``drop_tokens=True``, the official setting, as the reference): the rows are cut
to the largest kept count of the batch, so an image keeps padding rows unless it has the most tokens
of its batch. A padding row scores exactly 0, which changes the per-image rescaling of the
cumulative scores (its minimum becomes 0 instead of the lowest real score, and only a token at
exactly 0 can never be picked): **an image's result depends on the other images of its batch**
(the logits of an image alone and in a batch differ, by up to ~0.2 on the golden DeiT-T case). With
``drop_tokens=False`` no row is ever removed (the compute is not reduced, only masked) and every image
is independent of its batch after the first ATS block.

Parameters (as the reference's config): ``blocks`` (0-based ATS blocks; ints or fractions of the
depth; default from a quarter of the depth to the last block: 3..11 of 12), ``num_tokens`` (an int or
one per block; the released code samples N - 1 times whatever it says and fails for values below the
current token count, so it must be at least the model's token count; default that count) and
``drop_tokens``.

What is exact: scores, sampling, kept sets and order, the masked softmax with its eps and the padding
(so the batch dependence) reproduce the reference's logits (golden case in float32 and float64; the
token counts per block are the padded row counts of the batch). Sorting ties have no defined order in
the reference; here the sorts are stable. With ``blocks=[]`` the model is exactly the timm model (the
reference would still add its eps). Extension: every prefix token (CLS, distillation, registers) is
kept like CLS and never scored.

Capabilities: the number of tokens depends on the image, so ``static_schedule = False`` (no ONNX
export; torch.compile with graph breaks). Counted GMACs are the work that runs: padded rows included,
so a batch costs what its largest image costs (``count_gmacs`` runs one image: no padding). Every
attention is the explicit map (the eps softmax has no fused kernel), so it is slower per token than
the fused attention of the unreduced model.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

from .base import (
    NO_REQUEST,
    AttentionRequest,
    AttentionResult,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    parse_locations,
    register,
    resolve_block,
)

Tensor = torch.Tensor

#: eps of the reference's masked softmax
EPS = 1e-6


def masked_softmax(logits: Tensor, policy: Tensor | None, ats_block: bool) -> Tensor:
    """The reference's softmax with a padding policy (B, N, 1) (None: no padding yet).

    In an ATS block the padding rows' keys and values are zero: their logits are 0 (they still take
    part in the row maximum) and they add nothing to the output (their columns are zeroed here)."""
    n = logits.shape[-1]
    work = torch.promote_types(logits.dtype, torch.float32)
    col = None
    if policy is not None:
        col = policy.reshape(policy.shape[0], 1, 1, n).to(logits.dtype)
        if ats_block:
            logits = logits * col
    e = (logits - logits.amax(dim=-1, keepdim=True)).to(work).exp()
    if col is not None:
        colw = col.to(work)
        eye = torch.eye(n, dtype=work, device=logits.device)
        e = e * (colw + (1.0 - colw) * eye)  # a padding query still sees itself
    a = (e + EPS / n) / (e.sum(dim=-1, keepdim=True) + EPS)
    if col is not None and ats_block:
        a = a * col.to(work)
    return a.to(logits.dtype)


class _Softmax:
    """The attention's softmax for one block (a small object rather than a lambda: picklable, and
    torch.compile traces it like a function)."""

    def __init__(self, policy: Tensor | None, ats_block: bool):
        self.policy, self.ats_block = policy, ats_block

    def __call__(self, logits: Tensor) -> Tensor:
        return masked_softmax(logits, self.policy, self.ats_block)


def sample_tokens(score: Tensor, num_samples: int):
    """Inverse transform sampling of the reference on significance scores `score` (B, M), summing to
    one per image. Returns the token order by ascending score (B, M), the picked positions of that
    order as a mask (B, M) and their count per image (B,)."""
    sorted_scores, order = torch.sort(score, dim=1, stable=True)
    cdf = torch.cumsum(sorted_scores, dim=1)
    lo, hi = cdf.min(dim=1).values[:, None], cdf.max(dim=1).values[:, None]
    c = (cdf - lo) / (hi - lo)
    # heights from the smallest non-zero c to 1, in the reference's arithmetic
    start = (c + (c == 0).to(c.dtype) * 1e8).min(dim=1).values[:, None]
    ys = torch.linspace(0.0, 1.0, num_samples, dtype=c.dtype, device=c.device)[None]
    steps = torch.arange(num_samples, dtype=c.dtype, device=c.device)[None]
    ys = start + ((ys * (num_samples - 1)) - start * steps) / (num_samples - 1)
    picks = (ys[:, :, None] - c[:, None, :]).abs().argmin(dim=2)  # (B, S): first nearest position
    mask = torch.zeros_like(c, dtype=torch.bool).scatter_(1, picks, True)
    return order, mask, mask.sum(dim=1)


def parse_num_tokens(num_tokens, depth: int, total: int) -> list[int]:
    if num_tokens is None:
        return [total] * depth
    values = list(num_tokens) if isinstance(num_tokens, Sequence) and not isinstance(num_tokens, str) else None
    if values is not None and len(values) != depth:
        raise ReductionConfigError(
            f"ats num_tokens has {len(values)} entries but the model has {depth} blocks; give one int, one per "
            f"block, or null (the model's {total} tokens)"
        )
    for v in values if values is not None else [num_tokens]:
        if isinstance(v, bool) or not isinstance(v, Real) or not float(v).is_integer() or v < total:
            raise ReductionConfigError(
                f"ats num_tokens={num_tokens!r}: the reference samples N - 1 tokens whatever num_tokens says and "
                f"fails for a value below the current token count, so every value must be an int >= {total} (the "
                "model's tokens, CLS included); use null or the token count (197 on DeiT at 224 px)"
            )
    return [int(v) for v in values] if values is not None else [int(num_tokens)] * depth


@register
class ATS(ReductionMethod):
    name = "ats"
    #: dense map: a token sampled out leaves its last features; padding rows (zero source) claim nothing
    dense_restore = "source"
    needs_class_token = True
    static_schedule = False

    def __init__(
        self,
        model,
        blocks: Sequence[int | float] | None = None,
        num_tokens: None | int | Sequence[int] = None,
        drop_tokens: bool = True,
    ):
        self.depth = len(model.blocks)
        if blocks is None:
            first = resolve_block(0.25, self.depth, "ats first block")
            self.blocks = list(range(first, self.depth))
        else:
            self.blocks = sorted(parse_locations(blocks, self.depth, "ats blocks"))
        total = model.patch_embed.num_patches + model.num_prefix_tokens
        self.num_tokens = parse_num_tokens(num_tokens, self.depth, total)
        if not isinstance(drop_tokens, bool):
            raise ReductionConfigError(
                f"ats drop_tokens={drop_tokens!r} must be true (cut padding rows to the batch's largest kept count, "
                "the official setting) or false (keep every row, masked)"
            )
        self.drop_tokens = drop_tokens
        self._ats = frozenset(self.blocks)

    # --- hooks ---------------------------------------------------------------------------------
    def init_state(self, model, state: TokenState) -> TokenState:
        # the reference samples once per patch token of the input image, in every ATS block
        state.extras["ats_num_samples"] = state.num_tokens - state.num_protected
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        if not self._ats:
            return NO_REQUEST
        ats = i in self._ats
        return AttentionRequest(need="cls" if ats else "none", softmax=_Softmax(state.size, ats))

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        if i not in self._ats:
            if state.size is not None:
                state.x = state.x * state.size
            return state
        p, n = state.num_protected, state.num_tokens
        B = state.x.shape[0]
        with torch.no_grad():
            work = torch.promote_types(res.cls_attn.dtype, torch.float32)  # float32 or float64
            value_norm = res.values.transpose(1, 2).reshape(B, n, -1).norm(dim=-1)  # heads concatenated
            score = (res.cls_attn.to(work).sum(dim=1) * value_norm.to(work))[:, p:]
            score = score / score.sum(dim=1, keepdim=True)
            order, picked, count = sample_tokens(score, state.extras["ats_num_samples"])
            m = n - p
            pos = torch.arange(m, device=score.device)
            positions = torch.sort(torch.where(picked, pos, pos + m), dim=1).indices  # picks first, ascending
            rows = int(count.max()) if self.drop_tokens else m
            idx = order.gather(1, positions[:, :rows])
            real = pos[:rows][None] < count[:, None]  # (B, rows)
        state.keep(idx)
        policy = torch.cat([real.new_ones(B, p), real], dim=1).to(state.x.dtype)[..., None]
        state.x = state.x * policy
        state.size = policy
        if state.source is not None:
            state.source = state.source * policy.to(state.source.dtype)
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        if state.size is not None:
            state.x = state.x * state.size
            kept = state.size[:, :, 0].sum(dim=1)
        else:
            kept = torch.full((state.x.shape[0],), state.num_tokens, device=state.x.device)
        state.extras.setdefault("tokens_per_image", []).append(kept.round().long())
        return state

    def metrics(self, state: TokenState) -> dict[str, float]:
        counts = state.extras.get("tokens_per_image")
        return {"tokens_out_mean": float(counts[-1].float().mean())} if counts else {}

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, num_tokens={self.num_tokens}, drop_tokens={self.drop_tokens}"
