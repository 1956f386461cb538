"""STViT-R on Swin: the classification model of changsn/STViT-R (Chang et al., CVPR 2023).

Structure as the reference (``models/swin_transformer.py``, ``layers.py``, ``multi_scale.py`` and
the released config in ``log/small.txt``), written on timm's Swin blocks:

- Conv stem instead of Swin's patch embedding: Conv3x3/2 + BN + Hardswish, twice (C/2 then C), no
  LayerNorm (so not weight-compatible with Swin checkpoints).
- Stages 1, 2 and 4 are standard Swin stages (shifted windows, no LayerScale); Patch Merging after
  stages 1-3.
- Stage 3 (14x14 tokens at 224 px) is the repeated six-block pattern, three times for depth 18:
  0 Swin block (window 7, no shift) on the image tokens x;
  1 generation: each 7x7 window adaptively max-pooled to 3x3 (36 semantic tokens in all) queries a
    10x10 window of x (unfold, stride 4) concatenated with its own 9 pooled tokens; no residual
    (the released SHORTCUT=False);
  2 global: semantic tokens query cat[s, x] (+ learnable global centre on the queries in the first
    period when ``use_global``; the released runs have it off);
  3 local: self-attention of s inside the 3x3 groups (one group per 7x7 window);
  4 global self-attention of s;
  5 recovery: x queries s (keys/values), MLP on all image tokens.
  The non-Swin blocks have separate q / kv projections, LayerScale (init 1e-5) and LayerNorm.
- Head: LayerNorm, average pool, linear.

The geometry of the generation block (10x10 windows at stride 4) is the reference's, which fixes
stage 3 at 14x14, i.e. 224x224 inputs (the reference's patch embedding asserts that size too).
timm's PatchMerging concatenates the 2x2 neighbours in the reference's channel order
(``[x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]]``), so reference weights load with
no permutation.

Official checkpoints load through :func:`checkpoint_filter_fn`, a rename-only key mapping (no
tensor is changed); ``load_weights`` calls it for this model and for the detection backbone. The
classification layout (``STViT-R-Swin-*.pth["model"]``):

    patch_embed.proj.0.c.weight       -> patch_embed.proj.0.weight   (Conv 3 -> C/2)
    patch_embed.proj.0.bn.*           -> patch_embed.proj.1.*        (BatchNorm)
    patch_embed.proj.2.c.weight       -> patch_embed.proj.3.weight   (Conv C/2 -> C; index 2 is the Hardswish)
    patch_embed.proj.2.bn.*           -> patch_embed.proj.4.*        (BatchNorm)
    layers.{i}.downsample.{norm,reduction}.* -> downsamples.{i}.{norm,reduction}.*   (Patch Merging after stage i)
    *.attn.relative_position_index, layers.*.blocks.*.attn_mask      dropped (recomputed buffers)
    everything else (Swin and semantic blocks, norm, head)          unchanged

The detection layout (changsn/STViT-R-Object-Detection, an mmdet ``state_dict``) is the same with the
prefix ``backbone.`` (stripped; ``neck.*`` / ``*_head.*`` ignored), without ``norm``, ``head`` and
``attn_mask``, plus the output norms ``norm0..3`` (kept as they are).

Models: ``stvit_swin_t`` / ``_s`` / ``_b`` (aliases ``stvit_r_swin_tiny`` / ``_small`` / ``_base``),
registered with timm, so ``timm.create_model("stvit_swin_s", num_classes=..., drop_path_rate=...)``
works once this module is imported. With ``features_only=True`` the same names build the detection
backbone of ``stvit_swin_det.py`` (detection geometry, any input size, four NCHW maps). Trained from
scratch (300 epochs in the paper); no pretrained weights here.
"""

from __future__ import annotations

import logging
import re
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

Tensor = torch.Tensor
log = logging.getLogger(__name__)

PERIOD = 6  # blocks per repeat of the semantic pattern in stage 3


class ConvStem(nn.Module):
    """Two stride-2 Conv3x3 + BN + Hardswish: (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim // 2),
            nn.Hardswish(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim),
            nn.Hardswish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over keys/values y (separate q and kv projections)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(y).reshape(B, y.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _LayerScaled(nn.Module):
    """Shared parts of the non-Swin blocks: norms, attention, MLP, LayerScale, drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        qkv_bias: bool = True,
        layer_scale_init: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))

    def ffn(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.layer_scale_2 * self.mlp(self.norm2(x)))


class SemanticBlock(_LayerScaled):
    """Queries x attend to y (global), or, with `group`, s attends within group x group windows of its grid."""

    def __init__(self, *args, group: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: Tensor, y: Optional[Tensor] = None, grid: Optional[Sequence[int]] = None) -> Tensor:
        h = self.norm1(x)
        if self.group is not None:  # local attention inside the 3x3 groups of the semantic grid
            B, _, C = h.shape
            g, (gh, gw) = self.group, grid
            w = h.reshape(B, gh // g, g, gw // g, g, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, g * g, C)
            a = self.attn(w, w).reshape(B, gh // g, gw // g, g, g, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, C)
        else:
            a = self.attn(h, h if y is None else self.norm1(y))
        return self.ffn(x + self.drop_path(self.layer_scale_1 * a))


class GenerationBlock(_LayerScaled):
    """Semantic-token generation: 3x3 max-pooled tokens of each 7x7 window query a 10x10 window of x."""

    def __init__(self, *args, window: int = 7, sample: int = 3, kv_window: int = 10, kv_stride: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.sample, self.kv_window, self.kv_stride = window, sample, kv_window, kv_stride

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> semantic tokens (B, (H/7*3) * (W/7*3), C) in raster order of their grid."""
        B, H, W, C = x.shape
        ws, n = self.window, self.sample
        nh, nw = H // ws, W // ws
        windows = x.reshape(B, nh, ws, nw, ws, C).permute(0, 1, 3, 5, 2, 4).reshape(-1, C, ws, ws)
        pooled = F.adaptive_max_pool2d(windows, n).flatten(2).transpose(1, 2)  # (B*nW, n*n, C)
        k = self.kv_window
        kv = F.unfold(x.permute(0, 3, 1, 2), kernel_size=k, stride=self.kv_stride)  # (B, C*k*k, L)
        if kv.shape[-1] != nh * nw:
            raise ValueError(
                f"the generation block's {k}x{k}/stride-{self.kv_stride} key windows give {kv.shape[-1]} windows "
                f"on a {H}x{W} map but there are {nh * nw} 7x7 windows; the reference geometry needs 14x14 "
                "(224x224 input)"
            )
        kv = kv.reshape(B, C, k * k, -1).permute(0, 3, 2, 1).reshape(-1, k * k, C)
        kv = self.norm1(torch.cat([pooled, kv], dim=1))
        s = self.layer_scale_1 * self.attn(self.norm1(pooled), kv)  # no shortcut (released SHORTCUT=False)
        s = s.reshape(B, nh, nw, n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, C)
        return self.ffn(s)


class SemanticStage(nn.Module):
    """Stage 3 of STViT-R-Swin: `depth // 6` repeats of [swin, generate, global(s, [s, x]), local, global, recover]."""

    def __init__(
        self,
        dim: int,
        resolution: Sequence[int],
        depth: int,
        num_heads: int,
        window: int,
        sample: int,
        mlp_ratio: float,
        drop_path: List[float],
        use_global: bool,
    ):
        super().__init__()
        if depth % PERIOD:
            raise ValueError(f"the semantic stage depth must be a multiple of {PERIOD}, got {depth}")
        self.sample, self.window, self.resolution = sample, window, tuple(resolution)
        num_semantic = (resolution[0] // window * sample) * (resolution[1] // window * sample)
        self.semantic_token2 = nn.Parameter(torch.zeros(1, num_semantic, dim)) if use_global else None
        if use_global:
            trunc_normal_(self.semantic_token2, std=0.02)
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            kind, dp = i % PERIOD, drop_path[i]
            if kind == 0:
                self.blocks.append(
                    SwinTransformerBlock(
                        dim, resolution, num_heads, window_size=window, shift_size=0, mlp_ratio=mlp_ratio, drop_path=dp
                    )
                )
            elif kind == 1:
                self.blocks.append(GenerationBlock(dim, drop_path=dp, window=window, sample=sample, **common))
            elif kind == 3:
                self.blocks.append(SemanticBlock(dim, drop_path=dp, group=sample, **common))
            else:  # 2: global over [s, x], 4: global on s, 5: recovery
                self.blocks.append(SemanticBlock(dim, drop_path=dp, **common))

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        grid = (H // self.window * self.sample, W // self.window * self.sample)
        s = None
        for i, blk in enumerate(self.blocks):
            kind = i % PERIOD
            if kind == 0:
                x = blk(x)
            elif kind == 1:
                s = blk(x)
            elif kind == 2:
                q = s + self.semantic_token2 if (self.semantic_token2 is not None and i == 2) else s
                s = blk(q, torch.cat([s, x.reshape(B, -1, C)], dim=1))
            elif kind in (3, 4):
                s = blk(s, grid=grid)
            else:
                x = blk(x.reshape(B, -1, C), s).reshape(B, H, W, C)
        return x


class SwinStage(nn.Module):
    """Standard Swin stage (alternating shifted windows) as in the reference's BasicLayer."""

    def __init__(
        self,
        dim: int,
        resolution: Sequence[int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: List[float],
    ):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                SwinTransformerBlock(
                    dim,
                    resolution,
                    num_heads,
                    window_size=window,
                    shift_size=0 if i % 2 == 0 else window // 2,
                    mlp_ratio=mlp_ratio,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class STViTRSwin(nn.Module):
    """STViT-R-Swin classifier: forward(x) -> logits; ``forward_features`` -> pooled features."""

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        sample_window_size: int = 3,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_global: bool = False,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"stvit_r_swin got unsupported arguments {sorted(kwargs)}")
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[0] if img_size[0] == img_size[1] else img_size
        if img_size != 224:
            raise ValueError(
                f"STViT-R-Swin classification geometry (10x10/stride-4 key windows in stage 3) needs img_size=224, "
                f"got {img_size}"
            )
        self.num_classes = num_classes
        self.img_size = img_size
        self.num_features = int(embed_dim * 2 ** (len(depths) - 1))
        self.patch_embed = ConvStem(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths))]
        res = img_size // 4
        self.layers = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim, r = embed_dim * 2**i, (res // 2**i, res // 2**i)
            dp = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            if i == 2:
                stage = SemanticStage(
                    dim, r, depth, num_heads[i], window_size, sample_window_size, mlp_ratio, dp, use_global
                )
            else:
                stage = SwinStage(dim, r, depth, num_heads[i], window_size, mlp_ratio, dp)
            self.layers.append(stage)
            self.downsamples.append(PatchMerging(dim) if i < len(depths) - 1 else nn.Identity())
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for stage, down in zip(self.layers, self.downsamples):
            x = down(stage(x))
        return self.norm(x).mean(dim=(1, 2))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Official STViT-R-Swin checkpoint names -> this project's (rename only, see the docstring).
_OFFICIAL_RENAMES = (
    (re.compile(r"^patch_embed\.proj\.0\.c\."), "patch_embed.proj.0."),
    (re.compile(r"^patch_embed\.proj\.0\.bn\."), "patch_embed.proj.1."),
    (re.compile(r"^patch_embed\.proj\.2\.c\."), "patch_embed.proj.3."),
    (re.compile(r"^patch_embed\.proj\.2\.bn\."), "patch_embed.proj.4."),
    (re.compile(r"^layers\.(\d+)\.downsample\."), r"downsamples.\1."),
)
_OFFICIAL_DROPPED = re.compile(r"(^|\.)attn\.relative_position_index$|^layers\.\d+\.blocks\.\d+\.attn_mask$")
_MMDET_BACKBONE = "backbone."  # an mmdet detector's backbone entries (neck.*, rpn_head.*, roi_head.* ignored)
_OUT_NORM = re.compile(r"^norm(\d+)\.")  # the detection backbone's output norms norm0..3
_CLASSIFIER_ONLY = re.compile(r"^(norm|head)\.")


def checkpoint_filter_fn(state_dict, model=None):
    """Official STViT-R-Swin keys -> this project's names (rename only, no tensor changes; keys already
    in this project's layout pass unchanged). Called by ``load_weights``.

    Accepts the classification layout (``STViT-R-Swin-*.pth["model"]``) and the detection layout (the
    ``backbone.*`` entries of an mmdet ``state_dict``; ``neck.*`` and the heads are ignored). Into a
    detection backbone (``features_only=True``, `model` given) a classification checkpoint loads as
    the reference initialises its detector: ``norm`` and ``head`` dropped, ``norm0..3`` set to (1, 0);
    entries of stages or output norms that the model was built without (``out_indices``) are dropped."""
    if any(k.startswith(_MMDET_BACKBONE) for k in state_dict):
        state_dict = {k[len(_MMDET_BACKBONE) :]: v for k, v in state_dict.items() if k.startswith(_MMDET_BACKBONE)}
    out = {}
    for key, value in state_dict.items():
        if _OFFICIAL_DROPPED.search(key):
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            key, n = pattern.subn(repl, key)
            if n:
                break
        out[key] = value
    if model is not None:
        from .stvit_swin_det import STViTRSwinDet

        if isinstance(model, STViTRSwinDet):
            out = _to_detection_backbone(out, model)
    return out


def _to_detection_backbone(sd, model):
    """A renamed state dict -> the keys of the detection backbone `model` (see checkpoint_filter_fn)."""
    if not any(_OUT_NORM.match(k) for k in sd) and any(_CLASSIFIER_ONLY.match(k) for k in sd):
        sd = {k: v for k, v in sd.items() if not _CLASSIFIER_ONLY.match(k)}
        for i in model.out_indices:
            norm = getattr(model, f"norm{i}")
            sd[f"norm{i}.weight"] = torch.ones(norm.weight.shape)
            sd[f"norm{i}.bias"] = torch.zeros(norm.bias.shape)
        log.info(
            "classification checkpoint into the detection backbone: norm/head dropped, norm%s start at (1, 0)",
            "/".join(str(i) for i in model.out_indices),
        )
    built = len(model.layers)
    merging = sum(isinstance(d, PatchMerging) for d in model.downsamples)

    def kept(key: str) -> bool:
        found = re.match(r"^(layers|downsamples)\.(\d+)\.", key)
        if found:
            return int(found.group(2)) < (built if found.group(1) == "layers" else merging)
        found = _OUT_NORM.match(key)
        return found is None or int(found.group(1)) in model.out_indices

    return {k: v for k, v in sd.items() if kept(k)}


_VARIANTS = {
    "t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}
# drop path of the released detection configs (configs/swin/*3x_coco.py; T as the base file)
_DET_DROP_PATH = {"t": 0.2, "s": 0.2, "b": 0.3}


def _create(variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """The classifier, or with ``features_only=True`` the detection backbone (stvit_swin_det.py)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
        kwargs.pop(key, None)
    if pretrained:
        raise ValueError(
            "no pretrained STViT-R-Swin weights are bundled (the model is trained from scratch); "
            "use pretrained=false, or load the csncsn/STViT-R checkpoint with model.checkpoint=PATH"
        )
    kwargs = dict(_VARIANTS[variant], **kwargs)
    if kwargs.pop("features_only", False):
        from .stvit_swin_det import STViTRSwinDet

        kwargs.setdefault("drop_path_rate", _DET_DROP_PATH[variant])
        return STViTRSwinDet(**kwargs)
    kwargs.pop("out_indices", None)  # only meaningful with features_only, as in timm
    return STViTRSwin(**kwargs)


@register_model
def stvit_swin_t(pretrained: bool = False, **kwargs) -> nn.Module:
    """Swin-T layout (depths 2-2-6-2): one period of the semantic pattern in stage 3 (no released weights)."""
    return _create("t", pretrained, **kwargs)


@register_model
def stvit_swin_s(pretrained: bool = False, **kwargs) -> nn.Module:
    """The released STViT-R-Swin-S (49.6M params, 5.83 GFLOPs fvcore, 82.65% from scratch; COCO 51.8 box AP)."""
    return _create("s", pretrained, **kwargs)


@register_model
def stvit_swin_b(pretrained: bool = False, **kwargs) -> nn.Module:
    """The released STViT-R-Swin-B (87.8M params, 10.26 GFLOPs fvcore, 83.21% from scratch; COCO 52.2 box AP)."""
    return _create("b", pretrained, **kwargs)


@register_model
def stvit_r_swin_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """Alias of ``stvit_swin_t``."""
    return _create("t", pretrained, **kwargs)


@register_model
def stvit_r_swin_small(pretrained: bool = False, **kwargs) -> nn.Module:
    """Alias of ``stvit_swin_s``."""
    return _create("s", pretrained, **kwargs)


@register_model
def stvit_r_swin_base(pretrained: bool = False, **kwargs) -> nn.Module:
    """Alias of ``stvit_swin_b``."""
    return _create("b", pretrained, **kwargs)
