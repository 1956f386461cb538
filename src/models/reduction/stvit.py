"""STViT / STViT-R on DeiT: semantic tokens (Chang et al., "Making Vision Transformers Efficient from
A Token Sparsification View", CVPR 2023).

RECONSTRUCTION. The authors released only the Swin version (changsn/STViT-R); the STViT-DeiT code
"cannot be released" (changsn/STViT-R issue #1). What follows is built from the paper's abstract,
the author's remarks and the structure of the public Swin code, and says where it chooses:

1. Blocks ``0 .. block-1`` run unchanged on all tokens.
2. Semantic token generation (the paper's two-step module), run by the *pretrained* blocks
   ``block`` and ``block+1`` in cross-attention mode (their fused qkv weight split into a query part
   and a key/value part), so the generation module starts from the block it replaces and no
   parameter is renamed:
   - step 1: the patch grid is pooled to ``pool_size`` (default 4x4 = 16 tokens; adaptive max pooling
     as the Swin code's ``multi_scale_semantic_token1``); queries ``[prefix, pooled]``, keys/values
     ``[prefix, pooled, image tokens]`` (the Swin code likewise concatenates the pooled tokens with
     the image window);
   - step 2: queries ``[prefix, S1 + G]`` with ``G`` a learnable global centre (1, n, C), keys/values
     ``[prefix, S1 + G, image tokens]``. (Swin uses ``cat[S1, X]`` as keys; with the query tokens
     always part of the keys here the centre also enters the keys. The author says the global centre
     matters for DeiT, issue #2.)
   Both steps keep the block's own residual (the Swin detection backbone always has it; its
   classification run dropped it, which would discard the pooled tokens on a pretrained model).
3. Blocks ``block+2 ..`` run on the prefix (CLS) tokens and the semantic tokens only.

STViT-R (``recover=True``): after the last block the image tokens that entered the generation
(the queries) attend to the final semantic tokens (keys/values) in one new block, as the Swin
code's recovery ``Block(x, semantic_token)`` (separate q / kv projections, LayerScale 1e-5), and
the restored (B, C, H, W) map is left in ``state.extras["recovered"]`` for dense heads
(src/models/detection.py); it is also the ``state.dense_map`` of ``forward_tokens(x, dense=True)``
(``dense_restore = "own"``), which plain STViT (``recover=False``) refuses. The recovery block is
initialised from the last pretrained block.

New modules (full learning rate): ``stvit_centre`` (the global centre) and ``stvit_recover``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from .base import (
    NO_REQUEST,
    AttentionRequest,
    ReductionConfigError,
    ReductionMethod,
    TokenState,
    register,
    resolve_block,
)

Tensor = torch.Tensor


class SemanticCentre(nn.Module):
    """The learnable global centre G added to the step-1 semantic tokens."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, s: Tensor) -> Tensor:
        return s + self.weight


class RecoveryBlock(nn.Module):
    """Image tokens (queries) attend to semantic tokens (keys/values), then an MLP: STViT-R recovery."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool = True,
        layer_scale_init: float = 1e-5,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    @torch.no_grad()
    def init_from(self, block: nn.Module) -> "RecoveryBlock":
        """Copy a pretrained timm Block's norms, attention (qkv split into q / kv) and MLP."""
        dim = self.q.in_features
        self.norm1.load_state_dict(block.norm1.state_dict())
        self.norm2.load_state_dict(block.norm2.state_dict())
        self.q.weight.copy_(block.attn.qkv.weight[:dim])
        self.kv.weight.copy_(block.attn.qkv.weight[dim:])
        if self.q.bias is not None and block.attn.qkv.bias is not None:
            self.q.bias.copy_(block.attn.qkv.bias[:dim])
            self.kv.bias.copy_(block.attn.qkv.bias[dim:])
        self.proj.load_state_dict(block.attn.proj.state_dict())
        self.mlp.fc1.load_state_dict(block.mlp.fc1.state_dict())
        self.mlp.fc2.load_state_dict(block.mlp.fc2.state_dict())
        return self

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(self.norm1(x)).reshape(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(self.norm1(s)).reshape(B, s.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.gamma1 * self.proj(out)
        return x + self.gamma2 * self.mlp(self.norm2(x))


def adaptive_max_pool2d(g: Tensor, out_size: Tuple[int, int]) -> Tensor:
    """``F.adaptive_max_pool2d(g, out_size)`` (B, D, H, W) -> (B, D, h, w), the same windows (output i
    covers rows floor(i*H/h) .. ceil((i+1)*H/h) - 1) and the same values, as a separable maximum over
    gathered windows: ONNX has no adaptive max pooling for grids the output size does not divide
    (14x14 -> 4x4 on DeiT at 224), and the window indices are built on the tensor's device."""
    for dim, n in ((2, out_size[0]), (3, out_size[1])):
        size = g.shape[dim]
        if size % n == 0:  # equal windows: plain max pooling along this dimension
            kernel = (size // n, 1) if dim == 2 else (1, size // n)
            g = F.max_pool2d(g, kernel, kernel)
            continue
        starts = [i * size // n for i in range(n)]
        ends = [-(-(i + 1) * size // n) for i in range(n)]
        k = max(e - s for s, e in zip(starts, ends))
        i = torch.arange(n, device=g.device)
        start, last = (
            (i * size).div(n, rounding_mode="floor"),
            ((i + 1) * size + n - 1).div(n, rounding_mode="floor") - 1,
        )
        # every window padded to k entries by repeating its last row (a repeat does not change a maximum)
        idx = torch.minimum(start[:, None] + torch.arange(k, device=g.device), last[:, None]).reshape(-1)
        shape = list(g.shape)
        shape[dim : dim + 1] = [n, k]
        g = g.index_select(dim, idx).view(shape).amax(dim + 1)
    return g


def _pool_size(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    ):
        raise ReductionConfigError(f"STViT pool_size must be an int or [h, w], got {value!r} (e.g. 4 for 16 tokens)")
    size = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if min(size) < 1:
        raise ReductionConfigError(f"STViT pool_size must be >= 1, got {value!r}")
    return size


@register
class STViT(ReductionMethod):
    name = "stvit"
    module_names = ("stvit_centre", "stvit_recover")
    #: dense map: STViT-R's recovered map (its recovery block); plain STViT has none (check_dense)
    dense_restore = "own"

    def __init__(
        self,
        model,
        block: Union[int, float] = 0.333,
        pool_size: Union[int, Sequence[int]] = 4,
        pool: str = "max",
        global_centre: bool = True,
        recover: bool = False,
    ):
        self.depth = len(model.blocks)
        index = resolve_block(block, self.depth, "STViT block")
        if index > self.depth - 2:
            raise ReductionConfigError(
                f"STViT block={block!r} (block {index}): the two generation blocks are `block` and `block+1`, "
                f"so block must be in [0, {self.depth - 2}] for this {self.depth}-block model"
            )
        self.block = index
        self.pool_size = _pool_size(pool_size)
        grid = tuple(model.patch_embed.grid_size)
        if self.pool_size[0] > grid[0] or self.pool_size[1] > grid[1]:
            raise ReductionConfigError(
                f"STViT pool_size={pool_size!r} is larger than the {grid[0]}x{grid[1]} patch grid; "
                f"choose at most {grid}"
            )
        if pool not in ("max", "avg"):
            raise ReductionConfigError(f"STViT pool must be 'max' (the reference) or 'avg', got {pool!r}")
        self.pool = pool
        self.num_semantic = self.pool_size[0] * self.pool_size[1]
        self.global_centre = bool(global_centre)
        self.recover = bool(recover)
        dim = model.embed_dim
        if self.global_centre:
            model.stvit_centre = SemanticCentre(self.num_semantic, dim)
        if self.recover:
            last = model.blocks[-1]
            model.stvit_recover = RecoveryBlock(
                dim,
                last.attn.num_heads,
                last.mlp.fc1.out_features,
                qkv_bias=last.attn.qkv.bias is not None,
                eps=getattr(last.norm1, "eps", 1e-6),
            ).init_from(last)

    # --- generation ------------------------------------------------------------------------
    def _pool_grid(self, t: Tensor, grid: Tuple[int, int]) -> Tensor:
        """(B, H*W, D) -> (B, h*w, D) pooled over the patch grid."""
        B, _, D = t.shape
        g = t.transpose(1, 2).reshape(B, D, *grid)
        g = adaptive_max_pool2d(g, self.pool_size) if self.pool == "max" else F.adaptive_avg_pool2d(g, self.pool_size)
        return g.flatten(2).transpose(1, 2)

    def init_state(self, model, state: TokenState) -> TokenState:
        if self.global_centre:  # the centre is the model's module; the hooks only see blocks
            state.extras["stvit_centre"] = model.stvit_centre
        return state

    def before_block(self, i: int, block, state: TokenState) -> TokenState:
        p = state.num_protected
        if i == self.block:
            img = state.x[:, p:]
            H, W = state.grid_size
            if img.shape[1] != H * W:
                raise RuntimeError(f"STViT needs the full {H}x{W} patch grid at block {i}, got {img.shape[1]} tokens")
            state.extras["stvit_image_tokens"] = img
            pooled = self._pool_grid(img, (H, W))
            state.x = torch.cat([state.x[:, :p], pooled, img], dim=1)
            if state.source is not None:
                img_src = state.source[:, p:]
                # a pooled token stands for the patches of its pooling window
                pooled_src = (
                    F.adaptive_avg_pool2d(img_src.transpose(1, 2).reshape(img_src.shape[0], -1, H, W), self.pool_size)
                    .flatten(2)
                    .transpose(1, 2)
                    > 0
                ).to(img_src.dtype)
                state.extras["stvit_image_source"] = img_src
                state.source = torch.cat([state.source[:, :p], pooled_src, img_src], dim=1)
        elif i == self.block + 1:
            s = state.x[:, p:]
            if self.global_centre:
                s = state.extras["stvit_centre"](s)
            state.x = torch.cat([state.x[:, :p], s, state.extras["stvit_image_tokens"]], dim=1)
            if state.source is not None:
                state.source = torch.cat([state.source, state.extras["stvit_image_source"]], dim=1)
        return state

    def attention_request(self, i: int, state: TokenState) -> AttentionRequest:
        if i in (self.block, self.block + 1):
            return AttentionRequest(queries=state.num_protected + self.num_semantic)
        return NO_REQUEST

    # --- recovery (STViT-R) -----------------------------------------------------------------
    def finalize(self, model, state: TokenState) -> TokenState:
        if self.recover:
            img = state.extras["stvit_image_tokens"]
            restored = model.stvit_recover(img, state.x[:, state.num_protected :])
            B, _, C = restored.shape
            state.extras["recovered"] = restored.transpose(1, 2).reshape(B, C, *state.grid_size)
        state.extras.pop("stvit_image_source", None)
        return state

    # --- dense map ------------------------------------------------------------------------------
    def check_dense(self) -> None:
        if not self.recover:
            raise ReductionConfigError(
                "STViT keeps only its semantic tokens after the generation blocks, so it has no map of the patch "
                "grid for a dense head; STViT-R restores one: apply_reduction(vit, 'stvit', recover=True, ...)"
            )

    def dense_map(self, state: TokenState) -> Tensor:
        """STViT-R's recovered map (its recovery block runs after the last block; the final norm is skipped)."""
        recovered = state.extras.get("recovered")
        if recovered is None:
            raise ValueError(
                "STViT-R's recovered map is made after the last block; a pass stopped early (last_block) has none"
            )
        return recovered

    def new_module_names(self) -> List[str]:
        return (["stvit_centre"] if self.global_centre else []) + (["stvit_recover"] if self.recover else [])

    def metrics(self, state: TokenState) -> Dict[str, float]:
        return {"stvit/semantic_tokens": float(self.num_semantic)}

    def extra_repr(self) -> str:
        return (
            f"block={self.block}, pool_size={self.pool_size}, pool={self.pool!r}, "
            f"global_centre={self.global_centre}, recover={self.recover}"
        )
