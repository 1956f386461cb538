"""The one patching mechanism shared by every token-reduction method.

`apply_reduction(model, name, **params)` swaps the class of a timm ``VisionTransformer`` for a
subclass whose ``forward_features`` runs the blocks through :func:`run_block`, carrying an explicit
:class:`TokenState` (tokens, sizes, source map, method extras) from block to block. No module is
replaced and no parameter renamed, so timm, DeiT and official method checkpoints load unchanged.

A method is a :class:`ReductionMethod` subclass registered with :func:`register`. It says what it
needs from attention (:class:`AttentionRequest`) and acts through a few hooks:

    init_state      after patch embedding + position embedding (GTP builds its graph here)
    before_block    before a block's attention (DynamicViT prunes here)
    after_attention between the attention residual and the MLP (ToMe, EViT, GTP, BAT, MSTM)
    after_block     after the MLP residual
    finalize        after the last block, before the final norm
    losses          extra training losses from the final state (DynamicViT's keep-ratio loss)

The attention computes only what the method asked for: the fused
``F.scaled_dot_product_attention`` kernel whenever the full attention map is not needed (an extra
softmax over the CLS query row for CLS-attention methods), the explicit map otherwise.

Dense heads (detection, segmentation): ``forward_tokens(x, dense=True)`` also gives
``state.dense_map`` (B, C, H/p, W/p), the final features of every patch position taken before the
model's final norm, each method by the means it declares in ``ReductionMethod.dense_restore`` (see
:func:`source_dense_map`: merged patches take the final features of the token they were merged into,
removed ones the last features their token had when it was removed).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


class ReductionConfigError(ValueError):
    """A method, its parameters or the model do not fit together (raised at apply time)."""


@dataclass
class TokenState:
    """Everything one forward pass carries from block to block."""

    x: Tensor  # (B, N, C); the first `num_protected` tokens are CLS / distillation / register tokens
    num_protected: int
    grid_size: tuple  # (H, W) patch grid of the input
    size: Optional[Tensor] = None  # (B, N, 1) how many patches a token stands for (ToMe) or GTP's token scales
    source: Optional[Tensor] = None  # (B, N, N0) which input tokens each token stands for (when traced)
    extras: Dict[str, Any] = field(default_factory=dict)  # method state: GTP's graph, DynamicViT's policy ...
    tokens_per_block: List[int] = field(default_factory=list)  # tokens leaving each block
    block_index: int = -1
    training: bool = False  # the model's mode: methods with separate train/eval paths read it
    trace_source: bool = False  # when True, methods keep `source` up to date (visualisation)
    # dense pass by the shared mechanism (forward_tokens(x, dense=True), method.dense_restore == "source"):
    # `source` is traced and run_block records in `removed` the last features of every patch's token
    dense_tracking: bool = False
    record_removals: bool = False  # dense_tracking for a method that may leave a patch unclaimed
    # (B, M0, C) per input patch (prefix tokens excluded): the features its token had just before the last
    # hook that changed the source map while the patch was claimed (see record_removed); None until then
    removed: Optional[Tensor] = None
    dense_map: Optional[Tensor] = None  # (B, C, H, W) the final patch map of a dense pass (before the final norm)
    # one attention-map buffer for this forward pass, reused by every block that asks for a transient map
    map_buffer: Optional[Tensor] = None
    _batch_rows: Optional[Tensor] = field(default=None, repr=False)  # see batch_rows()

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def ensure_source(self) -> None:
        """Start the source map (identity over the current tokens) if tracing and not started."""
        if (self.trace_source or self.dense_tracking) and self.source is None:
            B, N, _ = self.x.shape
            self.source = torch.eye(N, device=self.x.device, dtype=self.x.dtype)[None].expand(B, N, N)

    def batch_rows(self) -> Tensor:
        """(B, 1) image index of every row of the batch (made once per forward pass)."""
        rows = self._batch_rows
        if rows is None:
            rows = self._batch_rows = torch.arange(self.x.shape[0], device=self.x.device)[:, None]
        return rows

    def flat_index(self, idx: Tensor, n: int) -> Tensor:
        """Per-image token indices `idx` (B, K) into a (B, n, .) tensor -> row indices (B*K,) of its
        (B*n, .) flattening, for one `index_select` / `index_add_` over the whole batch."""
        return (idx + self.batch_rows() * n).reshape(-1)

    def keep(self, idx: Tensor, extra: Optional[Tensor] = None, extra_source: Optional[Tensor] = None) -> None:
        """Keep the protected tokens plus the non-protected tokens `idx` (B, K), in that order, then
        optionally append `extra` tokens (B, E, C) whose source rows are `extra_source` (B, E, N0).
        x, size and source are gathered together, through one row index, so they never fall out of step.

        An `extra` token summarises removed tokens (EViT's fused token): `extra_source` says which patches
        it summarises (drawn by the visualisation), but in a dense pass (`dense_tracking`) it claims none of
        them: its source rows are zero there, so the removed patches keep their own last features in the
        dense map rather than all taking the summary's."""
        p = self.num_protected
        B, N, _ = self.x.shape
        if p:  # the protected rows join the index: one gather per tensor, no concatenation of tokens
            idx = torch.cat([torch.arange(p, device=idx.device).expand(B, p), idx + p], dim=1)
        flat = self.flat_index(idx, N)
        K = idx.shape[1]
        self.x = take_rows(self.x, flat, K)
        if self.size is not None:
            self.size = take_rows(self.size, flat, K)
        if self.source is not None:
            self.source = take_rows(self.source, flat, K)
        if extra is not None:
            self.x = torch.cat([self.x, extra], dim=1)
            if self.source is not None:
                if extra_source is None or self.dense_tracking:
                    extra_source = self.source.new_zeros(B, extra.shape[1], self.source.shape[-1])
                self.source = torch.cat([self.source, extra_source], dim=1)


def take_rows(x: Tensor, flat: Tensor, k: int) -> Tensor:
    """x: (B, N, C), flat: (B*k,) row indices of x.reshape(B*N, C) -> (B, k, C)."""
    B, N, C = x.shape
    return x.reshape(B * N, C).index_select(0, flat).view(B, k, C)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x: (B, N, C), idx: (B, K) -> (B, K, C).

    A row lookup on the flattened batch: on CPU several times faster than `gather` with an index
    expanded over the channels (it is on every reducing method's hot path)."""
    B, N, C = x.shape
    flat = (idx + torch.arange(B, device=idx.device)[:, None] * N).reshape(-1)
    return take_rows(x, flat, idx.shape[1])


def merge_rows(x: Tensor, flat: Tensor, out_len: int, mode: str = "sum") -> Tensor:
    """Sum (`mode` sum), average (mean) or maximum (amax) the tokens of x (B, t, C) that share an output
    row of `flat` (see merge_plan) -> (B, out_len, C)."""
    B, t, C = x.shape
    rows = x.reshape(B * t, C)
    if mode == "amax":
        out = x.new_full((B * out_len, C), -float("inf")).scatter_reduce_(
            0, flat[:, None].expand(-1, C), rows, reduce="amax"
        )
        return out.view(B, out_len, C)
    out = x.new_zeros(B * out_len, C).index_add_(0, flat, rows)
    if mode == "mean":
        out = out / x.new_zeros(B * out_len, 1).index_add_(0, flat, x.new_ones(B * t, 1))
    elif mode != "sum":
        raise ValueError(f"merge mode must be sum, mean or amax, got {mode!r}")
    return out.view(B, out_len, C)


def weighted_merge(
    x: Tensor, weight: Tensor, size: Tensor, source: Optional[Tensor], dest: Tensor, out_len: int
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Tokens x (B, n, C) with weights (B, n, 1) and sizes (B, n, 1) summed into the rows `dest`
    (B, n) of an (B, out_len) output: the weighted average of each row's members, their summed sizes
    and the maximum of their sources. One `index_add_` per tensor over the flattened batch (a
    scatter over channel-expanded indices is several times slower on CPU)."""
    B, n, C = x.shape
    flat = (dest + torch.arange(B, device=dest.device)[:, None] * out_len).reshape(-1)
    num = merge_rows(x * weight, flat, out_len)
    den = merge_rows(weight, flat, out_len)
    new_size = merge_rows(size, flat, out_len)
    new_source = merge_rows(source, flat, out_len, "amax") if source is not None else None
    return num / den, new_size, new_source


# --- dense maps (detection / segmentation heads) ---------------------------------------------------
def _claims(x: Tensor, source: Tensor, p: int) -> Tuple[Tensor, Tensor]:
    """(claimed (B, M0, 1) bool, features (B, M0, C)): whether a token claims each patch, and that token's
    features in `x` (the rows of a dense pass's source map are disjoint: at most one token per patch)."""
    claimed, owner = source[:, :, p:].max(dim=1)
    return (claimed > 0).unsqueeze(-1), gather_tokens(x, owner)


def record_removed(state: TokenState, x: Tensor, source: Optional[Tensor]) -> None:
    """After a hook of a dense pass; `x` and `source` are the tokens and the source map before it.

    A hook that removes or merges tokens replaces ``state.source`` (``keep``, ``merge_rows``, ... make new
    tensors; none edits it in place), so an unchanged source map means nothing left and there is
    nothing to do. Otherwise every patch claimed before the hook gets, in ``state.removed``, the features
    its token had then. The last such write of a patch is the hook that took its last claiming token
    away, so for a patch no final token claims ``removed`` holds the features its token had when it was
    removed (pruned, dropped, propagated, masked); for a claimed patch it is never read."""
    if source is None or state.source is source:
        return
    claimed, feats = _claims(x, source, state.num_protected)
    old = state.removed if state.removed is not None else torch.zeros_like(feats)
    state.removed = torch.where(claimed, feats, old.to(feats.dtype))


def source_dense_map(state: TokenState) -> Tensor:
    """(B, C, H, W) map of the final state of a dense pass by the shared mechanism: a patch that a final
    token claims (source entry > 0: the token it was merged into, or its own) takes that token's final
    features; any other patch (its token was pruned, dropped, propagated away, masked, or is an ATS
    padding row: zero source rows claim nothing) takes ``state.removed``, the last features its token had.
    Prefix tokens (CLS, distillation, registers) are not part of the map."""
    if state.source is None:
        raise ValueError("source_dense_map needs the source map of a dense pass: forward_tokens(x, dense=True)")
    p = state.num_protected
    gh, gw = state.grid_size
    if state.source.shape[-1] - p != gh * gw:
        columns = state.source.shape[-1] - p
        raise RuntimeError(f"the source map has {columns} patch columns for a {gh}x{gw} grid: no spatial map")
    claimed, out = _claims(state.x, state.source, p)  # out: (B, M0, C)
    if state.removed is not None:
        out = torch.where(claimed, out, state.removed.to(out.dtype))
    return out.transpose(1, 2).reshape(out.shape[0], -1, gh, gw)


def patch_token_map(state: TokenState, method: str = "none") -> Tensor:
    """(B, C, H, W) map of the final patch tokens themselves, for a method that keeps every patch token
    in grid order."""
    gh, gw = state.grid_size
    tokens = state.x[:, state.num_protected :]
    if tokens.shape[1] != gh * gw:
        raise RuntimeError(
            f"{tokens.shape[1]} patch tokens left for a {gh}x{gw} grid: method '{method}' declares "
            "dense_restore='tokens' (it keeps every patch token) but removed some; a method that removes or "
            "merges tokens declares dense_restore='source'"
        )
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


@dataclass
class AttentionRequest:
    """What a method needs from one block's attention.

    need: "none" (output only), "keys" (head-mean keys for matching), "cls" (the CLS query row of the
    attention, (B, H, 1, N)), or "map" (the full (B, H, N, N) map after softmax and dropout).
    bias: additive pre-softmax bias broadcastable to (B, H, N, N), e.g. log token sizes.
    softmax: replaces the softmax over the pre-softmax logits (DynamicViT's masked softmax).
    post_softmax: transforms the map after softmax and dropout and before it multiplies the values
    (GTP's attention sparsification). `softmax` and `post_softmax` force the explicit path.
    """

    need: str = "none"
    bias: Optional[Tensor] = None
    softmax: Optional[Callable[[Tensor], Tensor]] = None
    post_softmax: Optional[Callable[[Tensor], Tensor]] = None
    # Cross-attention: only the first `queries` tokens query (keys/values are all tokens) and only
    # they continue through the block's residual and MLP (STViT's semantic-token generation).
    queries: Optional[int] = None
    # The method reads the map only within this block (GTP): without autograd it may then live in one
    # buffer shared by all blocks instead of a fresh (B, H, N, N) allocation each time.
    transient_map: bool = False
    # Attention probabilities (B, H, N, N) the method already has for these tokens (e.g. a map it merged
    # along with the tokens): used instead of softmax(q k^T); only the values are projected (no q, k,
    # no bias, no softmax), then attention dropout, `post_softmax` and the value product as usual.
    # The result then has no keys (None).
    probs: Optional[Tensor] = None


NO_REQUEST = AttentionRequest()


@dataclass
class AttentionResult:
    out: Tensor  # (B, N, C) after the output projection
    keys: Optional[Tensor]  # (B, H, N, hd); None when the request gave `probs`
    attn: Optional[Tensor] = None  # (B, H, N, N) when need == "map"
    cls_attn: Optional[Tensor] = None  # (B, H, N) CLS query row when need in ("cls", "map")
    values: Optional[Tensor] = None  # (B, H, N, hd) the values the attention used (all tokens)

    @property
    def metric(self) -> Tensor:
        """ToMe's matching metric: keys averaged over heads, (B, N, hd)."""
        return self.keys.mean(1)


def transient_map_out(state: Optional["TokenState"], q: Tensor, n_q: int, n_k: int) -> Optional[Tensor]:
    """A (B, H, n_q, n_k) view of this forward pass's map buffer (grown when needed), or None when the
    map must be a tensor of its own (autograd may keep it; CUDA's caching allocator already reuses).

    On CPU every fresh multi-MB tensor is new kernel pages, and their page faults cost a map-reading
    method (GTP) about as much as its softmax; one buffer per forward pass pays them once, not per
    block. The buffer lives in the call's TokenState, so it is safe across inference_mode / no_grad /
    autograd calls and threads (no state outlives the call)."""
    if state is None or q.device.type != "cpu" or q.requires_grad or _compiling():
        return None
    need = q.shape[0] * q.shape[1] * n_q * n_k
    buf = state.map_buffer
    if buf is None or buf.numel() < need or buf.dtype != q.dtype:
        buf = state.map_buffer = torch.empty(need, device=q.device, dtype=q.dtype)
    return buf[:need].view(q.shape[0], q.shape[1], n_q, n_k)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


#: q elements (B x heads x N x head_dim) from which the explicit attention runs one GEMM per head
HEADWISE_MIN_ELEMENTS = 1 << 18


def _headwise(q: Tensor, v: Tensor) -> bool:
    """Per-head GEMMs for the explicit attention map (see `attention`): eager CPU inference only, large
    inputs, one dtype (no autocast: out= products are not autocast)."""
    return q.numel() >= HEADWISE_MIN_ELEMENTS and q.dtype == v.dtype and not torch.is_autocast_enabled(q.device.type)


def attention(
    attn: Attention, x: Tensor, req: AttentionRequest = NO_REQUEST, state: Optional[TokenState] = None
) -> AttentionResult:
    """timm ``Attention.forward`` that also returns what `req` asks for. `state` (optional) lends its
    per-call buffer to a transient map."""
    B, N, _ = x.shape
    attn_dim = attn.num_heads * attn.head_dim  # timm >= 1.0.23 names it attn.attn_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if req.probs is not None:
        return _attention_with_probs(attn, x, req, gate)
    bias = req.bias
    if req.queries is None:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:  # project queries only for the query tokens (the fused qkv weight split in place)
        n_q, d = req.queries, attn_dim
        w, b = attn.qkv.weight, attn.qkv.bias
        q = F.linear(x[:, :n_q], w[:d], None if b is None else b[:d])
        q = q.reshape(B, n_q, attn.num_heads, attn.head_dim).transpose(1, 2)
        kv = F.linear(x, w[d:], None if b is None else b[d:])
        k, v = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if bias is not None and bias.shape[-2] > 1:
            bias = bias[..., :n_q, :]
        gate = gate[:, :n_q] if gate is not None else None
        N = n_q
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_attn = full = None
    headwise = False
    if req.need == "map" or req.softmax is not None or req.post_softmax is not None:
        qs = q * attn.scale
        out_buf = transient_map_out(state, qs, N, k.shape[-2]) if req.transient_map else None
        # Large CPU batches: one GEMM per head, reading q, k, v where the qkv projection put them and
        # writing the output straight into the (B, N, C) layout. The batched product of the 4-D views
        # would first copy k^T and v into contiguous tensors and the output back out of the head-major
        # layout: three fresh multi-MB tensors per block, whose page faults cost more than the GEMMs
        # on CPU. Same products, same results; small inputs keep the 2 batched calls (fewer ops).
        headwise = out_buf is not None and _headwise(qs, v)
        if headwise:
            for h in range(attn.num_heads):
                torch.bmm(qs[:, h], k[:, h].transpose(-2, -1), out=out_buf[:, h])
            logits = out_buf
        elif out_buf is not None:
            logits = torch.matmul(qs, k.transpose(-2, -1), out=out_buf)
        else:
            logits = qs @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        full = req.softmax(logits) if req.softmax is not None else logits.softmax(dim=-1)
        full = attn.attn_drop(full)
        if req.post_softmax is not None:
            full = req.post_softmax(full)
        if headwise and full.dtype == v.dtype:
            out = v.new_empty(B, N, attn.num_heads, attn.head_dim)
            for h in range(attn.num_heads):
                torch.bmm(full[:, h], v[:, h], out=out[:, :, h])
        else:
            headwise = False
            out = full @ v
        cls_attn = full[:, :, 0]
    else:
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
        if req.need == "cls":
            # Only the CLS query row: 1/N of the full map's cost, and the fused kernel for the rest.
            row = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                row = row + bias[..., :1, :]
            cls_attn = row.softmax(dim=-1)[:, :, 0]
    out = attn.norm(out.reshape(B, N, attn_dim) if headwise else out.transpose(1, 2).reshape(B, N, attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return AttentionResult(out=out, keys=k, attn=full if req.need == "map" else None, cls_attn=cls_attn, values=v)


def _attention_with_probs(attn: Attention, x: Tensor, req: AttentionRequest, gate: Optional[Tensor]) -> AttentionResult:
    """`attention` with given probabilities `req.probs`: only the value projection and the value product."""
    B, N, _ = x.shape
    d = attn.num_heads * attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    v = F.linear(x, w[2 * d :], None if b is None else b[2 * d :])
    v = v.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    full = attn.attn_drop(req.probs.to(v.dtype))
    if req.post_softmax is not None:
        full = req.post_softmax(full)
    out = attn.norm((full @ v).transpose(1, 2).reshape(B, N, d))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return AttentionResult(
        out=out,
        keys=None,
        attn=full if req.need == "map" else None,
        cls_attn=full[:, :, 0] if req.need in ("cls", "map") else None,
        values=v,
    )


class ReductionMethod:
    """Base class: the identity method (`none`). Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"
    #: True when the method ranks tokens by CLS attention and so needs a class token.
    needs_class_token: ClassVar[bool] = False
    #: Top-level attribute names of every module this method may attach to the model (under the
    #: official checkpoint key names). Checkpoint keys under these names belong to the method: weight
    #: loading reads this to tell which method a checkpoint was trained with.
    module_names: ClassVar[Tuple[str, ...]] = ()
    #: True when the number of tokens every block keeps (in eval) follows from the input's shape alone,
    #: never from the pixel values: every forward pass of one input shape is the same static graph, so
    #: torch.compile(fullgraph=True) traces it once (no recompilation across blocks or batches) and it
    #: exports to ONNX. A method with per-image token counts (ATS-like sampling) sets False; shared
    #: code (src.models.compile, src.models.export) reads this, never the method's name.
    static_schedule: ClassVar[bool] = True
    #: False when the method cannot be exported to ONNX even with a static schedule; then
    #: `not_exportable_reason` says why (an op ONNX lacks, ...). A dynamic schedule is never exportable.
    exportable: ClassVar[bool] = True
    not_exportable_reason: ClassVar[str] = ""
    #: How the method gives the dense (B, C, H/p, W/p) map of its final features that detection and
    #: segmentation heads need (``forward_tokens(x, dense=True)`` -> ``state.dense_map``, before the final
    #: norm); shared code (ViTDetBackbone) reads this and `check_dense`, never the method's name:
    #:   "tokens": every patch token stays, in grid order: the final patch tokens are the map (`none`);
    #:   "source": the shared mechanism (`source_dense_map`): the pass traces the source map and the last
    #:             features of every token when it leaves; merged patches take the final features of the
    #:             token they were merged into, removed ones the last features their token had;
    #:   "own":    the method's `dense_map` builds the map itself, no tracing (STViT-R's recovery block).
    #: A method (configuration) with no map says so in `check_dense`. Every method declares it; the
    #: identity method (this class) is "tokens".
    dense_restore: ClassVar[str] = "tokens"
    #: "source" methods that only merge (every removed token's patches go to the token it joins, so every
    #: patch stays claimed): a dense pass then records no removed features (`record_removed`, a pass over
    #: the (B, N, N0) source map per hook: +60% time for ToMe on DeiT-S at 800x1344).
    claims_every_patch: ClassVar[bool] = False

    def __init__(self, model: VisionTransformer, **params: Any):
        if params:
            raise ReductionConfigError(f"method '{self.name}' takes no parameters, got {sorted(params)}")
        self.depth = len(model.blocks)

    # --- hooks -------------------------------------------------------------------------------
    def init_state(self, model: VisionTransformer, state: TokenState) -> TokenState:
        return state

    def before_block(self, i: int, block: Block, state: TokenState) -> TokenState:
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        return NO_REQUEST

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        return state

    def after_block(self, i: int, state: TokenState) -> TokenState:
        return state

    def finalize(self, model: VisionTransformer, state: TokenState) -> TokenState:
        return state

    def losses(self, state: TokenState, **context: Any) -> Dict[str, Tensor]:
        """Extra training losses (already weighted), computed from the final state."""
        return {}

    # --- dense map ------------------------------------------------------------------------------
    def check_dense(self) -> None:
        """Raise ReductionConfigError, saying why and what to do, when this configured method has no dense
        map (default: it has one)."""

    def dense_map(self, state: TokenState) -> Tensor:
        """(B, C, H, W) map of the final features of a dense pass (before the final norm), by
        `dense_restore`; a method with dense_restore "own" overrides this."""
        if self.dense_restore == "source":
            return source_dense_map(state)
        if self.dense_restore == "tokens":
            return patch_token_map(state, self.name)
        raise NotImplementedError(
            f"method '{self.name}' declares dense_restore={self.dense_restore!r} but does not override dense_map"
        )

    def new_module_names(self) -> List[str]:
        """Top-level attribute names of modules this method added to the model (full learning rate)."""
        return []

    def metrics(self, state: TokenState) -> Dict[str, float]:
        """Numbers worth logging from a forward pass (e.g. DynamicViT's kept fraction per stage)."""
        return {}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# --- shared by the methods that reduce at chosen blocks by CLS attention (EViT, BAT, MSTM) ---------
CLS_ROW = AttentionRequest(need="cls")
#: Blocks 3, 6, 9 of a 12-block ViT (the papers' setting), as fractions so they fit any depth.
QUARTER_POINTS = (0.25, 0.5, 0.75)


def resolve_block(value, depth: int, what: str) -> int:
    """A 0-based block index from an int, or from a float in [0, 1): that fraction of the depth,
    rounded half up, so one config serves every depth (0.25 / 0.5 / 0.75 -> blocks 3 / 6 / 9 of 12,
    6 / 12 / 18 of 24, 1 / 2 / 3 of 4)."""
    if isinstance(value, Real) and not isinstance(value, (bool, int)):
        if not 0.0 <= float(value) < 1.0:
            raise ReductionConfigError(
                f"{what} {value!r}: a float is a fraction of the depth in [0, 1); give an int for a block "
                f"index in [0, {depth - 1}]"
            )
        return int(float(value) * depth + 0.5)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < depth:
        raise ReductionConfigError(
            f"{what} {value!r} is not a block index of this {depth}-block model; use a 0-based int in "
            f"[0, {depth - 1}] or a fraction of the depth in [0, 1) (e.g. 0.25 for block {int(0.25 * depth + 0.5)})"
        )
    return value


def resolve_r(value, depth: int, num_patches: int, what: str) -> int:
    """Tokens removed per block from an int, or from a float in (0, 1): that fraction of the input's
    patch tokens removed over all blocks, ``int(f * num_patches / depth)`` per block (0.8 -> 13 on a
    12-block ViT with 196 patches, 6 with 24 blocks, 91 at 518 px with 1369 patches)."""
    if isinstance(value, Real) and not isinstance(value, (bool, int)):
        per_block = int(float(value) * num_patches / depth) if 0.0 < float(value) < 1.0 else -1
        if per_block < 1:
            raise ReductionConfigError(
                f"{what}={value!r}: a float is the fraction of the {num_patches} patch tokens removed over all "
                f"{depth} blocks and must be in ({depth / num_patches:.3g}, 1) to remove at least one token "
                "per block; or give an int per block"
            )
        return per_block
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReductionConfigError(f"{what} must be an int (tokens per block) or a fraction in (0, 1), got {value!r}")
    return value


R_KEY = "r"  # state.extras: the per-block counts of this input (counts_for_input)


def counts_for_input(spec, counts: List[int], num_patches: int, state: "TokenState", parse: Callable[[int], List[int]]):
    """The per-block token counts for this input. A fraction (a float `r`) stays a fraction of every
    input's patches: re-resolved by ``parse(patches)`` when the input has another patch count than the
    model was built for (dynamic image size: the detection task's 800x1344 images, multi-scale
    training). Ints are absolute counts at every size, as in the references."""
    patches = state.num_tokens - state.num_protected
    return parse(patches) if isinstance(spec, float) and patches != num_patches else counts


def describe_counts(spec, counts: List[int], num_patches: int) -> str:
    """`r` for a method's repr: the counts, and for a fraction what they are (see counts_for_input)."""
    if isinstance(spec, float):
        return f"r={spec} of each input's patches ({counts} at {num_patches} patches)"
    return f"r={counts}"


def parse_locations(locations, depth: int, method: str) -> List[int]:
    """A list of distinct 0-based block indices of a `depth`-block model (ints, or fractions of the depth)."""
    if isinstance(locations, (int, float, str)) or not isinstance(locations, Sequence):
        raise ReductionConfigError(f"{method} locations must be a list of block indices, got {locations!r}")
    locs = [resolve_block(loc, depth, f"{method} location") for loc in locations]
    if len(set(locs)) != len(locs):
        raise ReductionConfigError(
            f"{method} locations must not repeat a block, got {list(locations)} -> blocks {locs} of {depth}"
        )
    return locs  # in the given order: a per-location keep-rate list pairs with it by position


def check_fraction(value, what: str, method: str, lo: float, hi: float, lo_open: bool) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ReductionConfigError(f"{method} {what} must be a number in {interval}, got {value!r}")
    return float(value)


def parse_keep_rates(keep_rate, num_locations: int, method: str) -> List[float]:
    """One keep rate in (0, 1] per location, from a float or a per-location list."""
    if isinstance(keep_rate, Sequence) and not isinstance(keep_rate, str):
        if len(keep_rate) != num_locations:
            raise ReductionConfigError(
                f"{method} keep_rate list has {len(keep_rate)} entries but there are {num_locations} "
                "locations; give one keep rate per location or a single float"
            )
        return [check_fraction(k, f"keep_rate[{j}]", method, 0.0, 1.0, True) for j, k in enumerate(keep_rate)]
    return [check_fraction(keep_rate, "keep_rate", method, 0.0, 1.0, True)] * num_locations


def keep_count(keep_rate: float, num_candidates: int) -> int:
    """EViT's ``ceil(keep_rate * (N - 1))`` with N - 1 = the non-protected tokens."""
    return math.ceil(keep_rate * num_candidates)


def rank_by_cls_attention(res: AttentionResult, num_protected: int) -> Tuple[Tensor, Tensor]:
    """Head-mean CLS attention over the non-protected tokens (B, M) and their order, most attended
    first (stable sort, so ties keep token order and the result is deterministic)."""
    score = res.cls_attn[:, :, num_protected:].mean(dim=1)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    return score, order


class KeepRateMethod(ReductionMethod):
    """At chosen blocks, keep the ceil(keep_rate * (N - protected)) tokens the CLS token attends to
    most (EViT's convention) and let the subclass's `reduce` decide what becomes of the kept tokens
    and the rest (EViT drops or fuses them, BAT clusters and pairs, MSTM merges)."""

    needs_class_token = True
    label: ClassVar[str] = ""  # the method's name in error messages

    def _set_schedule(self, model: VisionTransformer, keep_rate, locations) -> None:
        self.depth = len(model.blocks)
        self.locations = parse_locations(locations, self.depth, self.label)
        self.keep_rates = parse_keep_rates(keep_rate, len(self.locations), self.label)
        # block index -> keep rate, only where something can be removed (rate 1 is a no-op, as in EViT)
        self.rate_at = {loc: k for loc, k in zip(self.locations, self.keep_rates) if k < 1.0}

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        return CLS_ROW if i in self.rate_at else NO_REQUEST

    def after_attention(self, i: int, state: TokenState, res: AttentionResult) -> TokenState:
        keep_rate = self.rate_at.get(i)
        if keep_rate is None:
            return state
        candidates = state.num_tokens - state.num_protected
        keep = keep_count(keep_rate, candidates)
        if keep >= candidates:
            return state
        return self.reduce(state, res, keep)

    def reduce(self, state: TokenState, res: AttentionResult, keep: int) -> TokenState:
        raise NotImplementedError


REGISTRY: Dict[str, type] = {"none": ReductionMethod}


def register(cls: type) -> type:
    """Class decorator: make a method available to `apply_reduction` under `cls.name`."""
    REGISTRY[cls.name] = cls
    return cls


def _attend(block: Block, x: Tensor, req: AttentionRequest, state: Optional[TokenState]) -> AttentionResult:
    return attention(block.attn, block.norm1(x), req, state)


def _mlp_residual(block: Block, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _hook(state: TokenState, hook: Callable[..., TokenState], *args: Any) -> TokenState:
    """``hook(*args)``, one of the method's hooks, returning the state; in a dense pass what it removed
    is recorded (`record_removed`)."""
    if not state.record_removals:
        return hook(*args)
    x, source = state.x, state.source
    state = hook(*args)
    record_removed(state, x, source)
    return state


def _keep_queries(state: TokenState, n_q: int) -> TokenState:
    """Only the first `n_q` tokens (the queries of a cross-attention) go on."""
    state.x = state.x[:, :n_q]
    if state.size is not None:
        state.size = state.size[:, :n_q]
    if state.source is not None:
        state.source = state.source[:, :n_q]
    return state


def run_block(
    block: Block, state: TokenState, method: ReductionMethod, i: int, grad_checkpoint: bool = False
) -> TokenState:
    """timm ``Block.forward`` with the method's hooks; keeps the block's own modules and names.

    With `grad_checkpoint` the attention and the MLP (the block's activations) are recomputed in
    backward; the method's hooks run outside the checkpoints, so their in-place edits of the state
    are never replayed. In a dense pass (``state.dense_tracking``) what each hook removes is recorded
    (`record_removed`); otherwise nothing is added to the pass."""
    state.block_index = i
    state = _hook(state, method.before_block, i, block, state)
    req = method.attention_request(i, state)
    if grad_checkpoint:
        res = checkpoint(_attend, block, state.x, req, None, use_reentrant=False)
    else:
        res = _attend(block, state.x, req, state)
    if req.queries is not None:  # the non-query tokens (the last ones) leave after serving as keys/values
        state = _hook(state, _keep_queries, state, req.queries)
    state.x = state.x + block.drop_path1(block.ls1(res.out))
    state = _hook(state, method.after_attention, i, state, res)
    if grad_checkpoint:
        state.x = checkpoint(_mlp_residual, block, state.x, use_reentrant=False)
    else:
        state.x = _mlp_residual(block, state.x)
    state = _hook(state, method.after_block, i, state)
    state.tokens_per_block.append(state.x.shape[1])
    return state


#: Attribute of a reduced model holding its compiled forward_tokens (set by src.models.compile).
COMPILED_TOKENS = "_compiled_forward_tokens"


def _rebuild_reduced(base: type) -> nn.Module:
    """Unpickling / deepcopy: a bare instance of the reduced class of `base` (state set afterwards)."""
    return object.__new__(_reduced_class(base))


class _ReducedMixin:
    """Mixed into the model's own class by `apply_reduction`: every token path of timm's
    ``VisionTransformer`` (forward, forward_features, forward_intermediates, get_intermediate_layers,
    grad checkpointing) runs the reduced blocks."""

    reduction: ReductionMethod

    def __reduce_ex__(self, protocol):
        # the reduced class is made at run time; pickle and deepcopy rebuild it from the base class. A
        # compiled forward_tokens (src.models.compile) is not carried over: a copy runs eagerly
        base = next(c for c in type(self).__mro__ if not issubclass(c, _ReducedMixin))
        state = dict(self.__getstate__())
        state.pop(COMPILED_TOKENS, None)
        return _rebuild_reduced, (base,), state

    def forward_tokens(
        self, x: Tensor, collect: Sequence[int] = (), last_block: Optional[int] = None, dense: bool = False
    ) -> TokenState:
        """Patch embedding, blocks with reduction, final norm; returns the whole final state.
        `collect`: block indices whose output tokens are kept in ``state.extras["intermediates"]``;
        `last_block`: stop after this block (no finalize, no final norm);
        `dense`: also give ``state.dense_map`` (B, C, H/p, W/p), the features of every patch position
        after the last block run and before the final norm, by the method's ``dense_restore`` (a method
        without one raises ReductionConfigError). Tracking it never changes the tokens or the logits.

        After ``src.models.compile.compile_model(model)`` the plain call ``forward_tokens(x)`` (the one
        ``forward`` and the trainer make) runs the compiled graph, and ``forward_tokens(x, dense=True)``
        a second compiled graph."""
        if dense:
            self.reduction.check_dense()  # before any work (and outside a compiled graph)
        if not torch.compiler.is_compiling() and not collect and last_block is None:
            compiled = getattr(self, COMPILED_TOKENS, None)
            if compiled is not None:
                return compiled(x, dense=True) if dense else compiled(x)
        return self._forward_tokens(x, collect, last_block, dense)

    def _forward_tokens(
        self, x: Tensor, collect: Sequence[int] = (), last_block: Optional[int] = None, dense: bool = False
    ) -> TokenState:
        method = self.reduction
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState(
            x=x,
            num_protected=self.num_prefix_tokens,
            grid_size=grid,
            training=self.training,
            trace_source=getattr(self, "trace_source", False),
            dense_tracking=dense and method.dense_restore == "source",
            record_removals=dense and method.dense_restore == "source" and not method.claims_every_patch,
        )
        state.ensure_source()
        state = _hook(state, method.init_state, self, state)
        grad_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        taken = []
        for i, block in enumerate(self.blocks):
            state = run_block(block, state, method, i, grad_checkpoint)
            if i in collect:
                taken.append(state.x)
            if last_block is not None and i >= last_block:
                break
        if collect:
            state.extras["intermediates"] = taken
        state.map_buffer = None
        if last_block is not None and last_block < len(self.blocks) - 1:
            if dense:
                state.dense_map = method.dense_map(state)
            return state
        state = _hook(state, method.finalize, self, state)
        if dense:
            state.dense_map = method.dense_map(state)
        state.x = self.norm(state.x)
        return state

    def forward_head_state(self, state: TokenState, pre_logits: bool = False) -> Tensor:
        """``forward_head`` on a final state: average pooling weighs every token by its size (how many
        patches a merged token stands for), so a merged model pools like the unmerged one."""
        if (
            state.size is None
            or getattr(self, "attn_pool", None) is not None
            or self.global_pool not in ("avg", "avgmax")
        ):
            return self.forward_head(state.x, pre_logits=pre_logits)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        x, size = state.x[:, start:], state.size[:, start:].to(state.x.dtype)
        pooled = (x * size).sum(1) / size.sum(1)
        if self.global_pool == "avgmax":
            pooled = 0.5 * (pooled + x.amax(1))
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(attn_mask, is_causal)
        return self.forward_head_state(self.forward_tokens(x))

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(attn_mask, is_causal)
        return self.forward_tokens(x).x

    def forward_intermediates(
        self,
        x: Tensor,
        indices=None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` on the reduced model. Tokens (NLC) of any block; a spatial
        (NCHW) map only of blocks whose patch tokens still fill the grid, else a clear error."""
        from timm.models._features import feature_take_indices

        _refuse_masks(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        stop = max_index if (stop_early or intermediates_only) else None
        state = self.forward_tokens(x, collect=tuple(take), last_block=stop)
        p = self.num_prefix_tokens
        feats = [self.norm(t) if norm else t for t in state.extras["intermediates"]]
        prefix = [t[:, :p] for t in feats] if p else None
        feats = [t[:, p:] for t in feats]
        if output_fmt == "NCHW":
            H, W = state.grid_size
            for i, t in zip(take, feats):
                if t.shape[1] != H * W:
                    raise ValueError(
                        f"block {i} of the token-reduced model ({self.reduction.name}) holds {t.shape[1]} patch "
                        f"tokens, not the {H}x{W} grid, so it has no (B, C, H, W) map; ask for "
                        "output_fmt='NLC' (get_intermediate_layers(..., reshape=False)) to get its tokens"
                    )
            feats = [t.transpose(1, 2).reshape(t.shape[0], -1, H, W).contiguous() for t in feats]
        if output_dict:
            out = {"image_intermediates": feats}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = state.x
            return out
        if return_prefix_tokens and prefix is not None:
            feats = list(zip(feats, prefix))
        return feats if intermediates_only else (state.x, feats)


def _refuse_masks(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise NotImplementedError("attention masks are not supported on a token-reduced model")


_CLASS_CACHE: Dict[type, type] = {}


def _reduced_class(cls: type) -> type:
    if issubclass(cls, _ReducedMixin):
        return cls
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Reduced{cls.__name__}", (_ReducedMixin, cls), {"__module__": __name__})
    return _CLASS_CACHE[cls]


def check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        kind = type(model).__name__
        hint = (
            " timm's Eva (EVA-02) applies rotary position embeddings inside attention, which would have "
            "to follow every kept, merged or dropped token; it is not supported yet."
            if kind == "Eva"
            else ""
        )
        raise ReductionConfigError(
            f"token reduction patches timm VisionTransformer models (DeiT, ViT AugReg, DeiT-III, CLIP, SigLIP, "
            f"DINOv2, MAE, ...); got {kind}.{hint}"
        )
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or not isinstance(attn, Attention):
            inside = (
                f" with {type(attn).__name__}" if attn is not None else " (no .attn: parallel attention/MLP branches)"
            )
            raise ReductionConfigError(
                f"block {i} is a {type(block).__name__}{inside}; only timm's pre-norm Block with Attention "
                "is supported (DeiT, DeiT-III, ViT AugReg, CLIP, SigLIP, DINOv2, ...)"
            )


def _module_layout(module: nn.Module) -> Tuple[str, List[Tuple[str, Tuple[int, ...]]]]:
    """What must agree for a held module to serve a new apply: its structure (repr) and its tensors."""
    return repr(module), [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def apply_reduction(
    model: VisionTransformer, method: str = "none", trace_source: bool = False, **params: Any
) -> VisionTransformer:
    """Patch `model` in place with token-reduction `method` and return it.

    `trace_source=True` makes every forward pass record which input tokens each remaining token
    stands for (`forward_tokens(x).source`, used by the visualisation). Calling it again replaces
    the previous method; a module the method adds that the model already holds with the same layout
    (e.g. trained DynamicViT predictors) is kept, one with another layout is an error. New modules
    follow the model's device and dtype. Errors in `params` are raised here, before any forward pass.
    """
    check_model(model)
    if method not in REGISTRY:
        raise ReductionConfigError(f"unknown reduction method '{method}'; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[method]
    if cls.needs_class_token and model.cls_token is None:
        raise ReductionConfigError(
            f"method '{method}' ranks tokens by CLS attention and needs a model with a class token; "
            f"{type(model).__name__} has none (global_pool={model.global_pool!r})"
        )
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "model")]
    unknown = sorted(set(params) - set(accepted))
    if unknown and cls is not ReductionMethod:
        raise ReductionConfigError(f"method '{method}' does not take {unknown}; its parameters are {accepted}")
    held = {n: getattr(model, n) for n in cls.module_names if isinstance(getattr(model, n, None), nn.Module)}
    try:
        impl = cls(model, **params)
        _settle_new_modules(model, impl, held)
    except BaseException:
        for name, module in held.items():  # leave the model as it was
            setattr(model, name, module)
        raise
    model.__dict__.pop(COMPILED_TOKENS, None)  # a compiled graph of the previous method is stale
    model.__class__ = _reduced_class(type(model))
    model.reduction = impl
    model.trace_source = bool(trace_source)
    return model


def _settle_new_modules(model: nn.Module, impl: ReductionMethod, held: Dict[str, nn.Module]) -> None:
    """Keep modules the model already held (trained weights are never silently re-initialised) and
    put fresh ones on the model's device and dtype."""
    ref = next(iter(model.parameters()))
    for name in impl.new_module_names():
        new, old = getattr(model, name), held.get(name)
        if old is None or old is new:
            new.to(device=ref.device, dtype=ref.dtype)
        elif _module_layout(old) == _module_layout(new):
            setattr(model, name, old)
        else:
            raise ReductionConfigError(
                f"the model already holds a '{name}' module whose layout does not fit {impl!r}; re-applying "
                "would re-initialise it. Apply the same settings it was built with, or call "
                "remove_reduction(model, drop_modules=True) first to start from fresh modules"
            )


def remove_reduction(model: VisionTransformer, drop_modules: bool = False) -> VisionTransformer:
    """Undo `apply_reduction`'s class swap. The modules the method added stay attached unless
    `drop_modules` (then the model is exactly the unpatched timm model again)."""
    if isinstance(model, _ReducedMixin):
        if drop_modules:
            for name in model.reduction.new_module_names():
                delattr(model, name)
        model.__class__ = next(c for c in type(model).__mro__ if not issubclass(c, _ReducedMixin))
        model.__dict__.pop(COMPILED_TOKENS, None)
        del model.reduction, model.trace_source
    return model


def unreduced_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without its reduction or the method's modules (e.g. the teacher)."""
    return remove_reduction(copy.deepcopy(model), drop_modules=True)
