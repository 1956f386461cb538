"""GTP-ViT: Graph-based Token Propagation (Xu et al., WACV 2024), as Ackesnal/GTP-ViT bb9991e models_v3.py.

Graph (once per forward pass, before block 0, over the M patch tokens only):
- spatial: 8-neighbourhood on the patch grid, no self loops;
- semantic: cosine similarity of the layer-0 input tokens (after patch_embed + pos_embed +
  norm_pre); an entry is 1 where it is >= the row's ``kthvalue(M - K)``, i.e. the K+1 largest
  including the token itself, then the identity is subtracted (so not symmetric; ties can add more);
- mixed: the bitwise OR of both.
It is degree-normalised once, ``D^-1/2 A D^-1/2`` with D the row sums, and later blocks only
sub-index it (never re-normalised, never rebuilt). The graph lives in ``state.extras`` together
with, for every current patch token, its row in that graph: sub-indexing ``A[kept][:, kept]`` as the
reference does is the same as indexing the original graph through those rows, which is what we do
(only the kept x propagated block W_prop is ever gathered).

Every block with r > 0 (between the attention residual and the MLP): score the non-protected tokens
on the attention map taken after softmax, dropout and sparsification (e.g. mixed_attn_max =
max_h diag(attn) * max_h column sums incl. the CLS query row), ``argsort`` descending, keep the
first N-1-r (in that order) and propagate the last r:
``x_kept + alpha * W_prop @ x_prop``. With ``token_scale`` every token carries a scale (1 at the
start, prefix tokens stay 1) updated the same way, ``s_kept + alpha * W_prop @ s_prop``, and the
attention adds log(scale) to the logits of the keys. ``sparsity`` < 1 zeroes, in every block, the
attention entries below the per-(image, head) ``kthvalue(int(N*N*(1-sparsity)))`` of the whole map,
with no renormalisation; this changes the block outputs as well as the scores.

Deviations from the reference, on purpose:
- r = 0 in a block is the identity there (the reference with a selection and P = 0 propagates every
  token because ``order[:, :-0]`` is empty); a block still applies token scales and sparsification.
- ``sparsity`` so close to 1 that ``int(N*N*(1-sparsity)) == 0`` zeroes nothing (the reference calls
  ``kthvalue(k=0)`` and fails).
- The spatial graph is built for the model's actual patch grid (H x W, also non-square), and graph
  and scales follow the input's dtype and device (the reference hard-codes float32 on CUDA).
- Distilled DeiT / prefix tokens (unsupported by the reference): every prefix token is protected
  like CLS: never scored, never in the graph, scale fixed at 1; the semantic graph uses
  ``kthvalue(M - K)`` with M the number of patches (exactly K neighbours, as the reference with one
  CLS token).
- The reference's ``Random`` selection is not provided (unseeded randomness).
"""

from __future__ import annotations

import functools
from numbers import Real
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ..profile import side_work
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
    register,
    resolve_r,
    take_rows,
)
from .tome import check_total_removal

Tensor = torch.Tensor
GRAPH_KEY = "gtp_graph"  # (B, M, M) normalised graph over the input's patch tokens
ROWS_KEY = "gtp_rows"  # (B, N - p) row of the graph for every current non-protected token


# --- selection scores: attn (B, H, N, N) -> (B, N - p), higher = keep -------------------------------
def _diag(attn: Tensor, p: int) -> Tensor:
    return torch.diagonal(attn, dim1=-2, dim2=-1)[:, :, p:]  # how much each token attends to itself


def _colsum(attn: Tensor, p: int) -> Tensor:
    return attn[:, :, :, p:].sum(dim=-2)  # attention each token receives from every query, CLS included


def _cos_sim(rows: Tensor) -> Tensor:
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return -(rows @ rows.transpose(-1, -2)).sum(dim=-1)  # tokens unlike the others rank high


SELECTIONS: Dict[str, Callable[[Tensor, int], Tensor]] = {
    "cls_attn_mean": lambda a, p: a[:, :, 0, p:].mean(1),
    "cls_attn_max": lambda a, p: a[:, :, 0, p:].max(1)[0],
    "img_attn_mean": lambda a, p: _colsum(a, p).mean(1),
    "img_attn_max": lambda a, p: _colsum(a, p).max(1)[0],
    "diag_attn_mean": lambda a, p: _diag(a, p).mean(1),
    "diag_attn_max": lambda a, p: _diag(a, p).max(1)[0],
    "mixed_attn_mean": lambda a, p: _diag(a, p).mean(1) * _colsum(a, p).mean(1),
    "mixed_attn_max": lambda a, p: _diag(a, p).max(1)[0] * _colsum(a, p).max(1)[0],
    "sum_attn_max": lambda a, p: _diag(a, p).max(1)[0] + _colsum(a, p).max(1)[0],
    "cos_sim_mean": lambda a, p: _cos_sim(a[:, :, p:, :].mean(1)),
    "cos_sim_max": lambda a, p: _cos_sim(a[:, :, p:, :].max(1)[0]),
}
GRAPHS = ("mixed", "spatial", "semantic")


# --- graph ------------------------------------------------------------------------------------------
def spatial_graph(grid: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """(M, M) 8-neighbourhood ("king moves") adjacency of an H x W patch grid, no self loops."""
    h, w = int(grid[0]), int(grid[1])
    idx = torch.arange(h * w, device=device)
    row, col = idx // w, idx % w
    near = ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)
    return near.to(dtype) - torch.eye(h * w, device=device, dtype=dtype)


def semantic_graph(patches: Tensor, num_neighbours: int) -> Tensor:
    """(B, M, M): 1 where the cosine similarity reaches the row's (K+1)-th largest, minus identity."""
    m = patches.shape[1]
    xn = patches / patches.norm(dim=-1, keepdim=True)
    sim = xn @ xn.transpose(-1, -2)
    # the reference's kthvalue(sim, M - K): the (K+1)-th largest value of each row, taken with topk
    # (the same value; ONNX has TopK but no kthvalue)
    threshold = torch.topk(sim, num_neighbours + 1, dim=-1).values[..., -1:]
    eye = torch.eye(m, device=patches.device, dtype=patches.dtype)
    return (sim >= threshold).to(patches.dtype) - eye


def build_graph(patches: Tensor, grid: Sequence[int], kind: str, num_neighbours: int) -> Tensor:
    """The reference's graph, degree-normalised once: (B, M, M) in the dtype/device of `patches`."""
    B, m, _ = patches.shape
    if kind == "semantic":
        graph = semantic_graph(patches, num_neighbours)
    else:
        graph = spatial_graph(grid, patches.device, patches.dtype).expand(B, m, m)
        if kind == "mixed":
            # integer OR of the two 0/1 graphs, as the reference
            graph = (semantic_graph(patches, num_neighbours).int() | graph.int()).to(patches.dtype)
    d = graph.sum(dim=-1) ** -0.5
    # D^-1/2 A D^-1/2: the reference's diag matmuls reduce exactly to (d_i * A_ij) * d_j
    return d.unsqueeze(-1) * graph * d.unsqueeze(-2)


def sparsify(attn: Tensor, sparsity: float) -> Tensor:
    """Zero the entries below the kthvalue of each (image, head) map; no renormalisation."""
    B, H, N, _ = attn.shape
    k = int(N * N * (1 - sparsity))
    if k < 1:
        return attn
    threshold = torch.kthvalue(attn.reshape(B, H, -1), k, dim=-1, keepdim=True)[0].unsqueeze(-1)
    return attn.masked_fill(attn < threshold, 0.0)


def biased_softmax(bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """softmax(logits + log-scale bias), in place on the fresh logits (autograd never needs them):
    spares two B x H x N x N allocations per block, which dominate GTP's overhead on CPU."""

    def softmax(logits: Tensor) -> Tensor:
        in_place = (
            not logits.requires_grad
            and logits.dtype in (torch.float32, torch.float64)
            and (bias is None or bias.dtype == logits.dtype)
        )
        if not in_place:  # training, or autocast (the reference promotes the biased logits to fp32)
            return (logits if bias is None else logits + bias).softmax(dim=-1)
        if bias is not None:
            logits.add_(bias)
        return torch.ops.aten._softmax.out(logits, -1, False, out=logits)

    return softmax


def _propagate(ranked: Tensor, w_prop: Tensor, p: int, r: int, alpha: float) -> Tensor:
    """ranked (B, N, D) = [protected, kept, propagated (last r)] -> [protected, kept + alpha * W_prop @
    propagated] (B, N - r, D), the product added to the kept tokens inside one batched GEMM."""
    N = ranked.shape[1]
    kept = torch.baddbmm(ranked[:, p : N - r], w_prop.to(ranked.dtype), ranked[:, N - r :], alpha=alpha)
    return torch.cat([ranked[:, :p], kept], dim=1) if p else kept


# --- parameters ---------------------------------------------------------------------------------------
def parse_gtp_r(depth: int, r, num_patches: int) -> List[int]:
    """An int for every block, one int per block, or a float in (0, 1): that fraction of the patch
    tokens propagated away over all blocks, as a constant r (base.resolve_r: 0.5 -> r=8 on DeiT)."""
    if isinstance(r, bool):
        raise ReductionConfigError(f"GTP r must be an int or a per-block list, got {r!r}")
    if isinstance(r, float):
        r = resolve_r(r, depth, num_patches, "GTP r")
    if isinstance(r, int):
        out = [r] * depth
    elif isinstance(r, Sequence) and not isinstance(r, str):
        if len(r) != depth or any(isinstance(v, bool) or not isinstance(v, int) for v in r):
            raise ReductionConfigError(f"GTP r as a list needs one int per block ({depth} blocks), got {list(r)!r}")
        out = list(r)
    else:
        raise ReductionConfigError(f"GTP r must be an int or a per-block list, got {r!r}")
    if any(v < 0 for v in out):
        raise ReductionConfigError(f"GTP r (tokens propagated per block) must be >= 0, got {out}")
    return out


@register
class GTP(ReductionMethod):
    name = "gtp"
    #: dense map: a propagated token leaves its features at propagation time
    dense_restore = "source"

    def __init__(
        self,
        model,
        r: Union[int, float, Sequence[int]] = 0.5,  # r=8 per block on 12 blocks x 196 patches
        alpha: float = 0.1,
        graph: str = "mixed",
        num_neighbours: int = 8,
        selection: str = "mixed_attn_max",
        sparsity: float = 1.0,
        token_scale: bool = True,
    ):
        if model.cls_token is None:
            raise ReductionConfigError(
                f"GTP keeps the class token out of its graph and needs a model with one; {type(model).__name__} "
                f"has none (global_pool={model.global_pool!r})"
            )
        self.depth = len(model.blocks)
        self.num_prefix = model.num_prefix_tokens
        num_patches = model.patch_embed.num_patches
        self.r_spec, self.num_patches = r, num_patches
        self.r = parse_gtp_r(self.depth, r, num_patches)
        check_total_removal(self.r, num_patches + self.num_prefix, self.num_prefix, f"GTP r={r!r}")
        if selection not in SELECTIONS:
            hint = (
                " (random selection is not provided: it is unseeded in the reference)"
                if selection in ("random", "Random")
                else ""
            )
            raise ReductionConfigError(
                f"unknown GTP selection {selection!r}{hint}; choose one of {', '.join(SELECTIONS)}"
            )
        if graph not in GRAPHS:
            raise ReductionConfigError(f"unknown GTP graph {graph!r}; choose one of {', '.join(GRAPHS)}")
        if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, int) or num_neighbours < 1:
            raise ReductionConfigError(f"GTP num_neighbours must be an int >= 1, got {num_neighbours!r}")
        if graph != "spatial" and num_neighbours >= num_patches:
            raise ReductionConfigError(
                f"GTP num_neighbours={num_neighbours} must be smaller than the number of patches "
                f"({num_patches}) for the {graph} graph"
            )
        if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 < float(sparsity) <= 1.0:
            raise ReductionConfigError(f"GTP sparsity (fraction of attention kept) must be in (0, 1], got {sparsity!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= float(alpha) < float("inf"):
            raise ReductionConfigError(f"GTP alpha (propagation magnitude) must be a finite number >= 0, got {alpha!r}")
        if not isinstance(token_scale, bool):
            raise ReductionConfigError(f"GTP token_scale must be true or false, got {token_scale!r}")
        self.alpha = float(alpha)
        self.graph = graph
        self.num_neighbours = num_neighbours
        self.selection = selection
        self.sparsity = float(sparsity)
        self.token_scale = token_scale
        # partial, not a lambda: the method is pickled with the model
        self._post_softmax = functools.partial(sparsify, sparsity=self.sparsity) if self.sparsity < 1.0 else None
        self.first_propagating_block = next((i for i, v in enumerate(self.r) if v > 0), self.depth)

    def init_state(self, model, state: TokenState) -> TokenState:
        p = state.num_protected
        patches = state.x[:, p:]
        B, m, _ = patches.shape
        r = state.extras[R_KEY] = counts_for_input(
            self.r_spec, self.r, self.num_patches, state, lambda n: parse_gtp_r(self.depth, self.r_spec, n)
        )
        if sum(r) > m - 1:
            raise ReductionConfigError(
                f"GTP r={r} removes {sum(r)} tokens but this input has only {m} patches "
                f"(grid {state.grid_size}); lower r"
            )
        if self.graph != "spatial" and self.num_neighbours >= m:
            raise ReductionConfigError(
                f"GTP num_neighbours={self.num_neighbours} must be smaller than the {m} patches of this input"
            )
        if any(r):
            # built from the layer-0 input and kept in the autograd graph, as the reference. Its cosine
            # similarity (M^2 C) is side work: the paper's GMACs are ToMe's at the same r
            with side_work():
                state.extras[GRAPH_KEY] = build_graph(patches, state.grid_size, self.graph, self.num_neighbours)
            state.extras[ROWS_KEY] = torch.arange(m, device=patches.device).expand(B, m)
        if self.token_scale and any(r):
            state.size = torch.ones(B, state.num_tokens, 1, device=state.x.device, dtype=state.x.dtype)
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        # scales are all 1 (a zero bias) until the first block that propagates has run
        scaled = self.token_scale and i > self.first_propagating_block
        bias = state.size.log()[:, None, None, :, 0] if scaled else None
        if state.extras[R_KEY][i] > 0:
            return AttentionRequest(
                need="map", softmax=biased_softmax(bias), post_softmax=self._post_softmax, transient_map=True
            )  # the map is read only in after_attention
        if self._post_softmax is not None:
            return AttentionRequest(need="none", softmax=biased_softmax(bias), post_softmax=self._post_softmax)
        return NO_REQUEST if bias is None else AttentionRequest(need="none", bias=bias)

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        r = state.extras[R_KEY][i]
        if r <= 0:
            return state
        p = state.num_protected
        B, N, _ = state.x.shape
        M = N - p
        order = torch.argsort(SELECTIONS[self.selection](res.attn, p), dim=1, descending=True)
        # one row index for x, scales and sources: [protected, kept (N-p-r, in score order), propagated (r)]
        idx = order + p
        if p:
            idx = torch.cat([torch.arange(p, device=idx.device).expand(B, p), idx], dim=1)
        flat = state.flat_index(idx, N)
        rows = state.extras[ROWS_KEY].gather(1, order)  # graph rows of the ranked tokens
        rows_kept, rows_prop = rows[:, : M - r], rows[:, M - r :]
        graph = state.extras[GRAPH_KEY]
        m = graph.shape[-1]
        # W_prop = graph[rows_kept][:, rows_prop]: only the (N-p-r) x r block is gathered
        w_prop = graph.flatten(1).gather(1, (rows_kept.unsqueeze(-1) * m + rows_prop.unsqueeze(1)).flatten(1))
        w_prop = w_prop.view(B, M - r, r)
        state.x = _propagate(take_rows(state.x, flat, N), w_prop, p, r, self.alpha)
        if state.size is not None:
            state.size = _propagate(take_rows(state.size, flat, N), w_prop, p, r, self.alpha)
        if state.source is not None:
            state.source = take_rows(state.source, flat, N)[:, : N - r]
        state.extras[ROWS_KEY] = rows_kept
        return state

    def extra_repr(self) -> str:
        return (
            f"{describe_counts(self.r_spec, self.r, self.num_patches)}, alpha={self.alpha}, graph={self.graph!r}, "
            f"num_neighbours={self.num_neighbours}, "
            f"selection={self.selection!r}, sparsity={self.sparsity}, token_scale={self.token_scale}"
        )
