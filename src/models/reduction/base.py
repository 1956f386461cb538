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
"""
from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

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

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def ensure_source(self) -> None:
        """Start the source map (identity over the current tokens) if tracing and not started."""
        if self.trace_source and self.source is None:
            B, N, _ = self.x.shape
            self.source = torch.eye(N, device=self.x.device, dtype=self.x.dtype)[None].expand(B, N, N)

    def keep(self, idx: Tensor, extra: Optional[Tensor] = None, extra_source: Optional[Tensor] = None) -> None:
        """Keep the protected tokens plus the non-protected tokens `idx` (B, K), in that order, then
        optionally append `extra` tokens (B, E, C) whose source rows are `extra_source` (B, E, N0).
        x, size and source are gathered together so they never fall out of step."""
        p = self.num_protected
        idx = idx + p  # indices into the whole sequence: no copy of a sliced view
        self.x = torch.cat([self.x[:, :p], gather_tokens(self.x, idx)], dim=1)
        if self.size is not None:
            self.size = torch.cat([self.size[:, :p], gather_tokens(self.size, idx)], dim=1)
        if self.source is not None:
            self.source = torch.cat([self.source[:, :p], gather_tokens(self.source, idx)], dim=1)
        if extra is not None:
            self.x = torch.cat([self.x, extra], dim=1)
            if self.source is not None and extra_source is not None:
                self.source = torch.cat([self.source, extra_source], dim=1)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x: (B, N, C), idx: (B, K) -> (B, K, C).

    A row lookup on the flattened batch: on CPU several times faster than `gather` with an index
    expanded over the channels (it is on every reducing method's hot path)."""
    B, N, C = x.shape
    flat = (idx + torch.arange(B, device=idx.device)[:, None] * N).reshape(-1)
    return x.reshape(B * N, C).index_select(0, flat).view(B, idx.shape[1], C)


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


NO_REQUEST = AttentionRequest()


@dataclass
class AttentionResult:
    out: Tensor  # (B, N, C) after the output projection
    keys: Tensor  # (B, H, N, hd)
    attn: Optional[Tensor] = None  # (B, H, N, N) when need == "map"
    cls_attn: Optional[Tensor] = None  # (B, H, N) CLS query row when need in ("cls", "map")

    @property
    def metric(self) -> Tensor:
        """ToMe's matching metric: keys averaged over heads, (B, N, hd)."""
        return self.keys.mean(1)


_MAP_BUFFERS: Dict[tuple, Tensor] = {}


def _map_buffer(q: Tensor, n_q: int, n_k: int) -> Tensor:
    """A (B, H, n_q, n_k) view of one growing CPU buffer per thread and dtype. Large CPU buffers are
    otherwise fresh kernel pages on every allocation (glibc maps them), and their page faults cost a
    map-reading method about as much as its softmax on a 2-core CPU. (CUDA's caching allocator
    already reuses memory.)"""
    shape = (*q.shape[:2], n_q, n_k)
    need = shape[0] * shape[1] * n_q * n_k
    key = (threading.get_ident(), q.dtype)
    buf = _MAP_BUFFERS.get(key)
    if buf is None or buf.numel() < need:
        buf = _MAP_BUFFERS[key] = torch.empty(need, device=q.device, dtype=q.dtype)
    return buf[:need].view(shape)


def attention(attn: Attention, x: Tensor, req: AttentionRequest = NO_REQUEST) -> AttentionResult:
    """timm ``Attention.forward`` that also returns what `req` asks for."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    bias = req.bias
    if req.queries is None:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:  # project queries only for the query tokens (the fused qkv weight split in place)
        n_q, d = req.queries, attn.num_heads * attn.head_dim
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
    if req.need == "map" or req.softmax is not None or req.post_softmax is not None:
        qs = q * attn.scale
        if req.transient_map and qs.device.type == "cpu" and not (qs.requires_grad or k.requires_grad):
            logits = torch.matmul(qs, k.transpose(-2, -1), out=_map_buffer(qs, N, k.shape[-2]))
        else:
            logits = qs @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        full = req.softmax(logits) if req.softmax is not None else logits.softmax(dim=-1)
        full = attn.attn_drop(full)
        if req.post_softmax is not None:
            full = req.post_softmax(full)
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
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return AttentionResult(out=out, keys=k, attn=full if req.need == "map" else None, cls_attn=cls_attn)


class ReductionMethod:
    """Base class: the identity method (`none`). Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"
    #: True when the method ranks tokens by CLS attention and so needs a class token.
    needs_class_token: ClassVar[bool] = False

    def __init__(self, model: VisionTransformer, **params: Any):
        if params:
            raise ReductionConfigError(
                f"method '{self.name}' takes no parameters, got {sorted(params)}"
            )
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


def parse_locations(locations, depth: int, method: str) -> List[int]:
    """A list of distinct 0-based block indices of a `depth`-block model."""
    if isinstance(locations, (int, str)) or not isinstance(locations, Sequence):
        raise ReductionConfigError(f"{method} locations must be a list of block indices, got {locations!r}")
    locs = list(locations)
    for loc in locs:
        if isinstance(loc, bool) or not isinstance(loc, int) or not 0 <= loc < depth:
            raise ReductionConfigError(
                f"{method} location {loc!r} is not a block index of this {depth}-block model; "
                f"use 0-based indices in [0, {depth - 1}] (e.g. [3, 6, 9] for 12 blocks)"
            )
    if len(set(locs)) != len(locs):
        raise ReductionConfigError(f"{method} locations must not repeat a block, got {locs}")
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


def run_block(block: Block, state: TokenState, method: ReductionMethod, i: int) -> TokenState:
    """timm ``Block.forward`` with the method's hooks; keeps the block's own modules and names."""
    state.block_index = i
    state = method.before_block(i, block, state)
    req = method.attention_request(i, state)
    res = attention(block.attn, block.norm1(state.x), req)
    if req.queries is not None:  # the non-query tokens leave after serving as keys/values
        idx = torch.arange(req.queries - state.num_protected, device=state.x.device)
        state.keep(idx[None].expand(state.x.shape[0], -1))
    state.x = state.x + block.drop_path1(block.ls1(res.out))
    state = method.after_attention(i, state, res)
    state.x = state.x + block.drop_path2(block.ls2(block.mlp(block.norm2(state.x))))
    state = method.after_block(i, state)
    state.tokens_per_block.append(state.x.shape[1])
    return state


class _ReducedMixin:
    """Mixed into the model's own class by `apply_reduction`; only the feature path changes."""

    reduction: ReductionMethod

    def forward_tokens(self, x: Tensor) -> TokenState:
        """Patch embedding, blocks with reduction, final norm; returns the whole final state."""
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        state = TokenState(
            x=x, num_protected=self.num_prefix_tokens, grid_size=grid, training=self.training,
            trace_source=getattr(self, "trace_source", False),
        )
        state.ensure_source()
        state = self.reduction.init_state(self, state)
        for i, block in enumerate(self.blocks):
            state = run_block(block, state, self.reduction, i)
        state = self.reduction.finalize(self, state)
        state.x = self.norm(state.x)
        return state

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported on a token-reduced model")
        return self.forward_tokens(x).x


_CLASS_CACHE: Dict[type, type] = {}


def _reduced_class(cls: type) -> type:
    if issubclass(cls, _ReducedMixin):
        return cls
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Reduced{cls.__name__}", (_ReducedMixin, cls), {})
    return _CLASS_CACHE[cls]


def check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise ReductionConfigError(
            f"token reduction patches timm VisionTransformer models; got {type(model).__name__}"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or not isinstance(block.attn, Attention):
            raise ReductionConfigError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; only timm's "
                "pre-norm Block with Attention is supported (DeiT, DeiT-III, ViT AugReg, ...)"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise ReductionConfigError("attention-pooling heads (global_pool='map') are not supported")


def apply_reduction(
    model: VisionTransformer, method: str = "none", trace_source: bool = False, **params: Any
) -> VisionTransformer:
    """Patch `model` in place with token-reduction `method` and return it.

    `trace_source=True` makes every forward pass record which input tokens each remaining token
    stands for (`forward_tokens(x).source`, used by the visualisation). Calling it again replaces
    the previous method. Errors in `params` are raised here, before any forward pass.
    """
    check_model(model)
    if method not in REGISTRY:
        raise ReductionConfigError(
            f"unknown reduction method '{method}'; available: {', '.join(sorted(REGISTRY))}"
        )
    cls = REGISTRY[method]
    if cls.needs_class_token and model.cls_token is None:
        raise ReductionConfigError(
            f"method '{method}' ranks tokens by CLS attention and needs a model with a class token; "
            f"{type(model).__name__} has none (global_pool={model.global_pool!r})"
        )
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "model")]
    unknown = sorted(set(params) - set(accepted))
    if unknown and cls is not ReductionMethod:
        raise ReductionConfigError(
            f"method '{method}' does not take {unknown}; its parameters are {accepted}"
        )
    impl = cls(model, **params)
    model.__class__ = _reduced_class(type(model))
    model.reduction = impl
    model.trace_source = bool(trace_source)
    return model


def remove_reduction(model: VisionTransformer) -> VisionTransformer:
    """Undo `apply_reduction`'s class swap (modules a method added stay attached)."""
    if isinstance(model, _ReducedMixin):
        model.__class__ = next(c for c in type(model).__mro__[1:] if c is not _ReducedMixin
                               and not issubclass(c, _ReducedMixin))
        del model.reduction, model.trace_source
    return model
