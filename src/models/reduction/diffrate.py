"""DiffRate: differentiable compression rate (Chen et al., ICCV 2023), inference with searched per-block
token counts, as OpenGVLab/DiffRate at 91ae3e3 (``DiffRate/patch/deit.py``, ``DiffRate/merge.py``).

Every block prunes and then merges, between the attention residual and the MLP:

1. rank the patch tokens by the attention the CLS query pays them, averaged over heads;
2. prune: keep CLS plus the ``prune_kept_num[i] - 1`` most attended tokens, in descending order;
3. merge: of those, the first ``merge_kept_num[i]`` stay; every other one goes to the staying token
   (CLS excluded) whose hidden state is most cosine-similar to its own. A staying token becomes the
   plain mean of itself and the tokens sent to it (not size-weighted), and its size grows by each
   sender's size times that sender's similarity (so sizes become non-integer).

Token sizes start at one and proportional attention (log size added to the attention logits) is
always on, as in the reference. ``prune_kept_num`` / ``merge_kept_num`` are the reference's
``set_kept_num`` lists: one count per block, CLS included. A count at or above the current number of
tokens is a no-op, so schedules need not decrease. The searched schedules of ``compression_rate.json``
(DeiT-T/S/B) are in ``conf/diffrate_schedule/``.

What is exact: the ranking, pruning, matching, merging and size rules above reproduce the reference's
inference logits (golden cases in float32 and float64). The reference re-sorts the tokens in every
block even when it removes none; here a block that removes nothing is the plain timm block (fused
attention, no sort): later blocks re-rank anyway, so only the order of float summations differs.
Sorting ties have no defined order in the reference (non-stable sort); here ``topk`` decides them.

Extensions beyond the reference, documented here:
- every prefix token (CLS, distillation, register tokens) is protected like CLS: never ranked, pruned,
  merged or chosen as a merge partner, and counted in the kept numbers;
- a count may also be a float in (0, 1]: that fraction of the model's patch tokens, plus the prefix
  tokens (so one schedule fits another resolution);
- training (finetuning with a fixed schedule) runs the same path as inference: tokens are physically
  removed and gradients flow through the kept and merged tokens (the reference only ever trains its
  rate search, below).

The search (``search_kept_numbers``, the reference's training path, ``ddp.py`` + ``DiffRateBlock`` in
train mode): each block holds two learnable softmax distributions over "keep k patch tokens" (block 0
never compresses). Their expected counts, ceiled with a straight-through gradient, give a differentiable
GMACs figure (paper formula); their 0/1 token masks (straight-through: the probability that each
importance rank survives) hide pruned and merged tokens in a masked softmax instead of removing them,
so the task loss reaches the rates too. With the backbone frozen, AdamW trains only the rates on
cross-entropy + weight * (GMACs - target)^2 (reference: 3 ImageNet epochs, lr 0.01 -> 0.001, weight 5);
the result is a ``(prune_kept_num, merge_kept_num)`` schedule for this method::

    prune, merge = search_kept_numbers(model, train_loader, target_gmacs=2.9)
    apply_reduction(model, "diffrate", prune_kept_num=prune, merge_kept_num=merge)

Differences: the backbone runs in eval mode during the search (the reference leaves dropout/drop-path
as configured), and the search is a Python API (no config entry point).

The cosine matching is run inside ``profile.side_work()``: the reference's FLOP count (and the golden
manifest's) leaves it out, so the headline GMACs are the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

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
Count = int | float


def parse_kept(value: Sequence[Count] | None, what: str, depth: int, num_patches: int, num_protected: int) -> list[int]:
    """One kept-token count per block (prefix tokens included) from a list of ints, or of floats in
    (0, 1] (fractions of the patch tokens). None: keep every token in every block."""
    total = num_patches + num_protected
    if value is None:
        return [total] * depth
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ReductionConfigError(
            f"diffrate {what}={value!r}: give a list with one kept-token count per block ({depth} for this "
            f"model, CLS included), e.g. the reference's compression_rate.json lists"
        )
    if len(value) != depth:
        raise ReductionConfigError(
            f"diffrate {what} has {len(value)} entries but the model has {depth} blocks; give one kept-token "
            f"count per block (a schedule of conf/diffrate_schedule/ made for a {len(value)}-block model does not fit)"
        )
    out = []
    for j, v in enumerate(value):
        if isinstance(v, Real) and not isinstance(v, (bool, int)):
            f = float(v)
            if not 0.0 < f <= 1.0:
                raise ReductionConfigError(
                    f"diffrate {what}[{j}]={v!r}: a float is the fraction of the {num_patches} patch tokens kept "
                    "and must be in (0, 1]; give an int for an absolute count (CLS included)"
                )
            out.append(num_protected + max(1, round(f * num_patches)))
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not num_protected < v <= total:
            raise ReductionConfigError(
                f"diffrate {what}[{j}]={v!r}: a kept-token count must be an int in [{num_protected + 1}, {total}] "
                f"(this model has {total} tokens, {num_protected} of them prefix tokens that always stay), or a "
                "fraction in (0, 1] of the patch tokens"
            )
        out.append(v)
    return out


def merge_into_kept(x: Tensor, size: Tensor, source: Tensor | None, kept: int, num_protected: int):
    """DiffRate's merge of tokens x (B, n, C) in importance order: tokens kept.. go to the most
    cosine-similar of the first `kept` (prefix tokens excluded as partners). Returns the merged x
    (plain mean of each partner group), the sizes (receiver + sum of sender size * similarity) and
    the source map (or None)."""
    B = x.shape[0]
    with torch.no_grad(), side_work():
        metric = x / x.norm(dim=-1, keepdim=True)
        sim = metric[:, kept:] @ metric[:, :kept].transpose(1, 2)  # (B, n - kept, kept)
        if num_protected:
            sim[..., :num_protected] = -float("inf")
        node_max, node_idx = sim.max(dim=-1)
    own = torch.arange(kept, device=x.device).expand(B, kept)
    dest = torch.cat([own, node_idx], dim=1)  # output row of every token
    flat = (dest + torch.arange(B, device=x.device)[:, None] * kept).reshape(-1)
    new_x = merge_rows(x, flat, kept, "mean")
    weighted = torch.cat([size[:, :kept], size[:, kept:] * node_max[..., None].to(size.dtype)], dim=1)
    new_size = merge_rows(weighted, flat, kept, "sum")
    new_source = merge_rows(source, flat, kept, "amax") if source is not None else None
    return new_x, new_size, new_source


@register
class DiffRate(ReductionMethod):
    name = "diffrate"
    #: dense map: merged patches take their token's final features, pruned ones their last features
    dense_restore = "source"
    needs_class_token = True

    def __init__(
        self, model, prune_kept_num: Sequence[Count] | None = None, merge_kept_num: Sequence[Count] | None = None
    ):
        self.depth = len(model.blocks)
        p, patches = model.num_prefix_tokens, model.patch_embed.num_patches
        self.prune_kept_num = parse_kept(prune_kept_num, "prune_kept_num", self.depth, patches, p)
        self.merge_kept_num = parse_kept(merge_kept_num, "merge_kept_num", self.depth, patches, p)

    def _targets(self, i: int, n: int):
        """(tokens left after pruning, after merging) in block i with n tokens coming in."""
        pruned = min(self.prune_kept_num[i], n)
        return pruned, min(self.merge_kept_num[i], pruned)

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        reduces = self._targets(i, state.num_tokens)[1] < state.num_tokens
        bias = None if state.size is None else state.size.log()[:, None, None, :, 0]
        if not reduces and bias is None:
            return NO_REQUEST
        return AttentionRequest(need="cls" if reduces else "none", bias=bias)

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        n, p = state.num_tokens, state.num_protected
        pruned, merged = self._targets(i, n)
        if merged >= n:
            return state
        if state.size is None:
            state.size = state.x.new_ones(state.x.shape[0], n, 1)
        score = res.cls_attn[:, :, p:].mean(dim=1)  # (B, n - p)
        order = torch.topk(score, pruned - p, dim=1, largest=True, sorted=True).indices
        state.keep(order)  # prefix tokens, then the kept tokens by descending importance
        if merged < pruned:
            state.x, state.size, state.source = merge_into_kept(state.x, state.size, state.source, merged, p)
        return state

    def extra_repr(self) -> str:
        return f"prune_kept_num={self.prune_kept_num}, merge_kept_num={self.merge_kept_num}"


# --- DiffRate's differentiable search of the kept counts (the reference's training path) ------------
class RateChoice(nn.Module):
    """DiffRate's differentiable discrete proxy for one block: a softmax over the candidate numbers of
    kept patch tokens (all of them down to 1). Its expected count, rounded up with a straight-through
    gradient, feeds the FLOPs penalty; its token mask (hard 0/1 forward, the probability that each
    importance rank is kept backward) feeds the attention. `fixed`: only the all-tokens candidate (the
    reference never compresses block 0)."""

    def __init__(self, num_patches: int, num_protected: int, fixed: bool = False):
        super().__init__()
        candidates = torch.arange(num_patches, 0, -1).float()[: 1 if fixed else None]
        self.register_buffer("candidates", candidates)
        total = num_patches + num_protected
        # kept[j, c]: importance rank j survives candidate c
        self.register_buffer("kept", (torch.arange(total)[:, None] < candidates[None] + num_protected).float())
        self.logits = nn.Parameter(torch.zeros_like(candidates))
        self.num_protected = num_protected

    def expected(self) -> Tensor:
        """Expected kept count (prefix tokens included), ceiled with a straight-through gradient."""
        e = self.candidates @ self.logits.softmax(-1)
        return e + (e.ceil() - e).detach() + self.num_protected

    def token_mask(self, kept: int, upto: int) -> Tensor:
        """(N0,) mask zero at ranks kept..upto-1, with the keep probabilities' gradient."""
        prob = self.kept @ self.logits.softmax(-1)
        hard = torch.ones_like(prob)
        hard[kept:upto] = 0
        return hard - prob.detach() + prob


class RateSearch(nn.Module):
    """The prune and merge RateChoice of every block of `model`."""

    def __init__(self, model):
        super().__init__()
        p, patches = model.num_prefix_tokens, model.patch_embed.num_patches
        depth = len(model.blocks)
        self.prune = nn.ModuleList(RateChoice(patches, p, fixed=i == 0) for i in range(depth))
        self.merge = nn.ModuleList(RateChoice(patches, p, fixed=i == 0) for i in range(depth))

    def kept_numbers(self) -> tuple[list[int], list[int]]:
        """The searched schedule: (prune_kept_num, merge_kept_num), prefix tokens included."""
        with torch.no_grad():
            return ([int(r.expected()) for r in self.prune], [int(r.expected()) for r in self.merge])


def _min_ste(n: Tensor, prune: Tensor, merge: Tensor) -> Tensor:
    """min(n, prune, merge) whose gradient goes to prune and merge alike (never to n), as the reference."""
    value = torch.minimum(n.detach(), torch.minimum(prune, merge)).detach()
    return value + (prune - prune.detach()) + (merge - merge.detach())


def search_forward(model, rates: RateSearch, x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's training forward: every block sorts by CLS attention, and pruned or merged tokens
    stay in the sequence behind the rate masks (masked attention softmax) instead of leaving it.
    Returns the logits and the differentiable GMACs of one image (paper formula: attention on the
    tokens entering a block, MLP on those leaving it, patch embedding and head)."""
    from .ats import (
        masked_softmax,  # the same masked softmax (eps 1e-6, float32 or wider)
    )
    from .base import attention

    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    B, total, C = t.shape
    p = model.num_prefix_tokens
    size, mask = t.new_ones(B, total, 1), t.new_ones(B, total)
    dev = t.device
    n = torch.tensor(float(total), device=dev, dtype=t.dtype)
    real = total  # tokens not masked yet (the same for every image)
    flops = t.new_zeros(())
    for i, blk in enumerate(model.blocks):
        policy = mask[..., None]
        req = AttentionRequest(
            need="cls",
            bias=size.log()[:, None, None, :, 0],
            softmax=lambda logits, policy=policy: masked_softmax(logits, policy, False),
        )
        res = attention(blk.attn, blk.norm1(t), req)
        t = t + blk.drop_path1(blk.ls1(res.out))
        order = res.cls_attn[:, :, p:].mean(dim=1).argsort(dim=1, descending=True) + p
        order = torch.cat([torch.arange(p, device=dev).expand(B, p), order], dim=1)
        t = t.gather(1, order[..., None].expand(-1, -1, C))
        size, mask = size.gather(1, order[..., None]), mask.gather(1, order)
        prune, merge = rates.prune[i].expected(), rates.merge[i].expected()
        flops = flops + 4 * n * C * C + 2 * n * n * C
        if int(prune) < real:
            mask = mask * rates.prune[i].token_mask(int(prune), real)
        mid = min(real, int(prune))
        k = int(merge)
        if k < mid:
            with torch.no_grad():
                unit = t[:, :mid] / t[:, :mid].norm(dim=-1, keepdim=True)
                sim = unit[:, k:] @ unit[:, :k].transpose(1, 2)
                sim[..., :p] = -float("inf")
                node_max, node_idx = sim.max(dim=-1)
            dest = torch.cat([torch.arange(k, device=dev).expand(B, k), node_idx], dim=1)
            flat = (dest + torch.arange(B, device=dev)[:, None] * k).reshape(-1)
            merged = merge_rows(t[:, :mid], flat, k, "mean")
            sizes = torch.cat([size[:, :k], size[:, k:mid] * node_max[..., None]], dim=1).clamp(min=1)
            t = torch.cat([merged, t[:, k:]], dim=1)  # the merged-away tokens stay, masked
            size = torch.cat([merge_rows(sizes, flat, k, "sum"), sizes[:, k:], size[:, mid:]], dim=1)
            mask = mask * rates.merge[i].token_mask(k, mid)
        real = min(real, int(prune), k)
        n = _min_ste(n, prune, merge)
        flops = flops + 8 * n * C * C
        t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
    patch = model.patch_embed.proj
    flops = flops + model.patch_embed.num_patches * C * patch.weight[0].numel() + C * model.num_classes
    return model.forward_head(model.norm(t)), flops / 1e9


def search_kept_numbers(
    model,
    batches,
    target_gmacs: float,
    epochs: int = 3,
    lr: float = 0.01,
    min_lr: float = 0.001,
    flops_weight: float = 5.0,
    label_smoothing: float = 0.1,
    rates: RateSearch | None = None,
) -> tuple[list[int], list[int]]:
    """DiffRate's search: train only the per-block rate distributions (backbone frozen, in eval mode)
    on `batches` of (images, labels) for `epochs` passes with AdamW (no weight decay, cosine lr from
    `lr` to `min_lr` per epoch) on cross-entropy + flops_weight * (GMACs - target)^2, the reference's
    recipe (3 epochs of ImageNet, lr 0.01 -> 0.001, weight 5). Returns (prune_kept_num, merge_kept_num)
    for `apply_reduction(model, "diffrate", ...)`. `model` is a plain timm ViT (or reduced with any
    method: its blocks are run directly) and is left unchanged."""
    if not target_gmacs > 0:
        raise ReductionConfigError(f"diffrate search target_gmacs={target_gmacs!r} must be a positive number of GMACs")
    rates = rates if rates is not None else RateSearch(model)
    ref = next(model.parameters())
    rates.to(device=ref.device, dtype=ref.dtype)
    opt = torch.optim.AdamW(rates.parameters(), lr=lr, weight_decay=0.0)
    frozen = [(q, q.requires_grad) for q in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for q, _ in frozen:
            q.requires_grad_(False)
        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / max(1, epochs)))
            for images, labels in batches:
                logits, gmacs = search_forward(model, rates, images.to(ref.device, ref.dtype))
                loss = F.cross_entropy(logits, labels.to(ref.device), label_smoothing=label_smoothing)
                loss = loss + flops_weight * (gmacs - target_gmacs) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for q, flag in frozen:
            q.requires_grad_(flag)
        model.train(was_training)
    return rates.kept_numbers()
