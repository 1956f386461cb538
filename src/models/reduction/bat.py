"""BAT: Beyond Attentive Tokens (Long et al., CVPR 2023, arXiv 2211.11315), reconstructed from the paper.

No public code exists (the authors' repository holds only a README, logs and figures), so this is a
reconstruction; docs/methods/bat.md lists every choice and why. At each location (0-based blocks,
default 3, 6, 9), between the attention residual and the MLP:

1. Decouple: rank the non-protected tokens by the CLS query's attention averaged over heads; the top
   ``K = ceil(keep_rate * M)`` (M = non-protected tokens, EViT's convention) are *attentive*, the rest
   (I = M - K) *inattentive*.
2. Inattentive tokens: a deterministic simplified DPC-KNN on the token features (k-nearest-neighbour
   density, distance to the nearest denser token, the ``ceil(cluster_ratio * I)`` tokens with the
   largest density x distance become centres, every token joins its nearest centre). Each cluster
   becomes one token: the average of its members weighted by their CLS attention.
3. Attentive tokens: ToMe's bipartite matching on the head-mean keys (alternate split in attention
   order, every A token's most similar B token by cosine similarity) merges the
   ``floor(pair_ratio * K)`` most similar pairs by a size-weighted average.

Output order: protected tokens, unmatched A tokens, B tokens, cluster tokens. Sizes add up and the
source row of a merged token is the maximum of its members'. No new parameters.

Default ``cluster_ratio`` / ``pair_ratio`` (the paper's values are not public): ``pair_ratio`` 0.2 and
``cluster_ratio`` interpolated from a table calibrated so that counted GMACs of DeiT-S match the
published compute at the published keep rates (see ``DEFAULT_CLUSTER_RATIO``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .base import (
    QUARTER_POINTS,
    AttentionResult,
    KeepRateMethod,
    ReductionConfigError,
    TokenState,
    check_fraction,
    keep_count,
    rank_by_cls_attention,
    register,
    take_rows,
    weighted_merge,
)
from .tome import merge_destinations

Tensor = torch.Tensor

#: Default pair ratio: the fraction of attentive tokens merged away by bipartite matching.
DEFAULT_PAIR_RATIO = 0.2
#: Default cluster ratio at the published keep rates (clusters = ceil(ratio * inattentive tokens)),
#: calibrated with ``count_gmacs`` on DeiT-S at 224 px against the BAT README's logged GMACs
#: (0.7: 3.005, 0.6: 2.583, 0.5: 2.344, 0.4: 2.083, 0.3: 1.823, 0.2: 1.645) with pair ratio 0.2.
#: Other keep rates interpolate linearly; below 0.2 / above 0.7 the end values are used.
DEFAULT_CLUSTER_RATIO = {0.2: 0.05, 0.3: 0.08, 0.4: 0.16, 0.5: 0.23, 0.6: 0.26, 0.7: 0.45}


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances (B, N, N) through a matmul (counted by the GMACs counter, unlike cdist)."""
    sq = (x * x).sum(-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(-1, -2))
    return d2.clamp_min(0.0).sqrt()


# --- the two merging steps -------------------------------------------------------------------------
def default_cluster_ratio(keep_rate: float) -> float:
    """Piecewise-linear interpolation of DEFAULT_CLUSTER_RATIO in the keep rate (ends held)."""
    pts = sorted(DEFAULT_CLUSTER_RATIO.items())
    if keep_rate <= pts[0][0]:
        return pts[0][1]
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if keep_rate <= k1:
            return v0 + (v1 - v0) * (keep_rate - k0) / (k1 - k0)
    return pts[-1][1]


def bat_counts(
    num_candidates: int, keep_rate: float, cluster_ratio: float, pair_ratio: float
) -> Tuple[int, int, int, int]:
    """(attentive K, inattentive I, clusters, pairs) at a location with `num_candidates` tokens."""
    k = keep_count(keep_rate, num_candidates)
    i = num_candidates - k
    clusters = math.ceil(cluster_ratio * i) if i > 0 else 0
    pairs = math.floor(pair_ratio * k)
    return k, i, clusters, pairs


def dpc_knn_assign(x: Tensor, num_clusters: int, k: int) -> Tensor:
    """Simplified DPC-KNN (TCFormer's, without its random density noise): cluster index (B, I) of
    every token of x (B, I, C); cluster j is the j-th centre by density x distance."""
    B, n, C = x.shape
    dist = pairwise_distances(x) / math.sqrt(C)
    knn = dist.topk(min(k, n), dim=-1, largest=False).values  # includes the token itself (distance 0)
    density = (-(knn**2).mean(dim=-1)).exp()
    # [b, i, j]: token j is denser than token i. Exact ties (duplicate tokens) go to the earlier token,
    # a deterministic stand-in for the reference's random noise: without it, every tied token would be
    # a density peak and the centres would be picked among duplicates.
    d_i, d_j = density[:, :, None], density[:, None, :]
    order = torch.arange(n, device=x.device)
    denser = (d_j > d_i) | ((d_j == d_i) & (order[None, :] < order[:, None]))
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    # distance to the nearest denser token; the densest token gets the largest distance
    delta = torch.where(denser, dist, dist_max).min(dim=-1).values
    centres = (density * delta).topk(num_clusters, dim=-1).indices  # (B, clusters)
    assign = dist.gather(1, centres[:, :, None].expand(-1, -1, n)).argmin(dim=1)  # nearest centre
    # a centre always leads its own cluster (ties in distance could send it elsewhere)
    return assign.scatter(1, centres, torch.arange(num_clusters, device=x.device).expand(B, -1))


def cluster_merge(
    assign: Tensor, num_clusters: int, x: Tensor, weight: Tensor, size: Tensor, source: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One token per cluster: members' weighted average (weight (B, I)), summed sizes, max source."""
    return weighted_merge(x, weight.unsqueeze(-1), size, source, assign, num_clusters)


def pair_destinations(metric: Tensor, pairs: int) -> Tensor:
    """ToMe's bipartite soft matching within one token set (B, k, d): A = even, B = odd positions; the
    `pairs` A tokens most similar (cosine of `metric`) to their best B token merge into it. Returns
    the output row (B, k) of every token: [unmatched A (in order), B] (k - pairs rows)."""
    k = metric.shape[1]
    with torch.no_grad():
        m = F.normalize(metric, dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
        best, dst = scores.max(dim=-1)
        edges = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src_idx = edges[:, :pairs]
        unm_idx = edges[:, pairs:].sort(dim=-1).values  # keep the attention order
        return merge_destinations(src_idx, dst.gather(1, src_idx), unm_idx, k)


def bipartite_pair_merge(
    metric: Tensor, pairs: int, x: Tensor, size: Tensor, source: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """ToMe's bipartite soft matching within one token set: A = even, B = odd positions; the `pairs`
    A tokens most similar (cosine of `metric`) to their best B token merge into it by size-weighted
    average. Returns [unmatched A (in order), B] tokens, sizes and sources."""
    if pairs <= 0:
        return x, size, source
    return weighted_merge(x, size, size, source, pair_destinations(metric, pairs), x.shape[1] - pairs)


@register
class BAT(KeepRateMethod):
    name = "bat"
    #: dense map: paired and clustered patches take the final features of their merged token
    dense_restore = "source"
    label = "BAT"

    def __init__(
        self,
        model,
        keep_rate: Union[float, Sequence[float]] = 0.7,
        locations: Sequence[Union[int, float]] = QUARTER_POINTS,
        cluster_ratio: Optional[float] = None,
        pair_ratio: Optional[float] = None,
        knn: int = 5,
    ):
        self._set_schedule(model, keep_rate, locations)
        if isinstance(knn, bool) or not isinstance(knn, int) or knn < 1:
            raise ReductionConfigError(f"BAT knn (neighbours for the DPC-KNN density) must be an int >= 1, got {knn!r}")
        self.knn = knn
        if cluster_ratio is not None:
            # 0 clusters would discard the inattentive tokens, which BAT never does
            cluster_ratio = check_fraction(cluster_ratio, "cluster_ratio", "BAT", 0.0, 1.0, True)
        if pair_ratio is not None:
            # at most every second attentive token can find a partner in the bipartite split
            pair_ratio = check_fraction(pair_ratio, "pair_ratio", "BAT", 0.0, 0.5, False)
        if all(k == 1.0 for k in self.keep_rates) and (cluster_ratio or pair_ratio):
            raise ReductionConfigError(
                "BAT with keep_rate 1 keeps every token unchanged (identity), so cluster_ratio/pair_ratio "
                f"would be ignored (got {cluster_ratio!r}/{pair_ratio!r}); lower keep_rate or drop them"
            )
        self.cluster_ratio, self.pair_ratio = cluster_ratio, pair_ratio
        # block -> (keep rate, cluster ratio, pair ratio); keep rate 1 is the identity, as in EViT
        self.plan: Dict[int, Tuple[float, float, float]] = {
            loc: (
                k,
                default_cluster_ratio(k) if cluster_ratio is None else cluster_ratio,
                DEFAULT_PAIR_RATIO if pair_ratio is None else pair_ratio,
            )
            for loc, k in self.rate_at.items()
        }
        self.expected_tokens = self.token_counts(
            model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens
        )

    def token_counts(self, num_tokens: int, num_protected: int) -> List[int]:
        """Tokens leaving every block for an input of `num_tokens` tokens (what forward will produce)."""
        out = []
        for i in range(self.depth):
            if i in self.plan:
                k, n_in, clusters, pairs = bat_counts(num_tokens - num_protected, *self.plan[i])
                num_tokens = num_protected + k - pairs + clusters
            out.append(num_tokens)
        return out

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        plan = self.plan.get(i)
        if plan is None:
            return state
        p = state.num_protected
        k, n_in, clusters, pairs = bat_counts(state.num_tokens - p, *plan)
        if n_in == 0 and pairs == 0:
            return state
        B, N, _ = state.x.shape
        if state.size is None:
            state.size = state.x.new_ones(B, N, 1)
        score, order = rank_by_cls_attention(res, p)
        att_idx, in_idx = order[:, :k], order[:, k:]
        # Where every token goes, ranked tokens first: attentive ones to their row of the pair merge
        # ([unmatched A, B], k - pairs rows), inattentive ones to their cluster's row after those; and its
        # weight: its size for the size-weighted pair merge, its CLS attention for the attention-weighted
        # cluster average (floored so an all-underflow cluster, in half precision, is not NaN).
        keys = res.keys.mean(dim=1)  # ToMe's matching metric: head-mean keys
        att_rows = state.flat_index(att_idx + p, N)
        if pairs > 0:
            ranked_dest = pair_destinations(take_rows(keys, att_rows, k), pairs)
        else:
            ranked_dest = torch.arange(k, device=order.device).expand(B, k)
        ranked_weight = take_rows(state.size, att_rows, k)[..., 0]
        if n_in > 0:
            x_in = take_rows(state.x, state.flat_index(in_idx + p, N), n_in)
            with torch.no_grad():
                assign = dpc_knn_assign(x_in.detach(), clusters, self.knn)
            ranked_dest = torch.cat([ranked_dest, assign + (k - pairs)], dim=1)
            ranked_weight = torch.cat([ranked_weight, score.gather(1, in_idx).clamp_min(1e-12)], dim=1)
        # back to token order (order is a permutation), the protected tokens first in their own rows
        dest = torch.empty_like(order).scatter_(1, order, ranked_dest + p)
        weight = torch.empty_like(ranked_weight).scatter_(1, order, ranked_weight)
        if p:
            dest = torch.cat([torch.arange(p, device=dest.device).expand(B, p), dest], dim=1)
            weight = torch.cat([weight.new_ones(B, p), weight], dim=1)
        state.x, state.size, state.source = weighted_merge(
            state.x, weight.unsqueeze(-1).to(state.x.dtype), state.size, state.source, dest, p + k - pairs + clusters
        )
        return state

    def extra_repr(self) -> str:
        return (
            f"keep_rate={self.keep_rates}, locations={self.locations}, "
            f"cluster/pair ratios={ {i: v[1:] for i, v in self.plan.items()} }, knn={self.knn}"
        )
