"""STViT-R on Swin: the detection backbone of changsn/STViT-R-Object-Detection (Chang et al., CVPR 2023).

``timm.create_model("stvit_swin_t" | "stvit_swin_s" | "stvit_swin_b", features_only=True)`` builds
:class:`STViTRSwinDet`: the same parameters as the classifier of ``stvit_swin.py`` (minus ``norm`` and
``head``) plus one LayerNorm per output (``norm0..3``), run in the detection geometry of the reference
(``mmdet/models/backbones/swin_transformer.py`` + ``layers.py`` at 8b8eb1e1), on any input size:

- conv stem on the image zero-padded (right, bottom) to a multiple of 4;
- Swin stages 1, 2, 4 (and block 6p of stage 3): LayerNorm, zero-pad to a multiple of the window,
  THEN roll (odd blocks, shift 3 even on maps smaller than the window), window attention with the
  standard shift mask of the padded map, crop; Patch Merging pads odd sizes;
- stage 3, per period of six blocks: Swin block (no shift); generation: 3x3 max pool of every 7x7
  window (zero-padded map) queries the 14x14 neighbourhood of image tokens, residual on the pooled
  tokens; a second semantic block (queries: the semantic tokens of the window, keys: the 21x21
  neighbourhood); local (3x3 groups) and global self-attention of the semantic tokens; recovery: the
  image tokens of every window query the 27x27 neighbourhood of the semantic grid (local);
- the reference's padding masks, quirks included (:func:`pad_mask`);
- output i = ``norm{i}(stage i output)`` in NCHW at stride 4 * 2**i.

Cost: the reference applies ``norm1`` and the key/value projection after cutting the overlapping
neighbourhoods, i.e. up to 81 times per token. Here every token is projected once, and the
neighbourhoods are gathered from the projected map; positions outside the map are
``kv(norm1(0))``, a single vector (:meth:`_NeighbourhoodAttention.key_windows`). Same function, a
fraction of the MACs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import FeatureInfo
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, window_partition, window_reverse

# load_weights converts official keys with the checkpoint_filter_fn of the model class's module
from .stvit_swin import (
    PERIOD,
    ConvStem,
    SemanticBlock,
    STViTRSwin,
    _LayerScaled,
    checkpoint_filter_fn,  # noqa: F401
)

Tensor = torch.Tensor
MASK_VALUE = -1000.0  # the reference's padding-mask value (behaves as -inf unless every key has it)


def _pads(h: int, w: int, window: int) -> Tuple[int, int]:
    """(bottom, right) zero padding that makes an h x w map a multiple of `window`."""
    return (-h) % window, (-w) % window


def shift_mask(hp: int, wp: int, window: int, shift: int, like: Tensor) -> Tensor:
    """Swin's shifted-window mask of a padded hp x wp map: (num_windows, window**2, window**2), -100
    between tokens of different regions (regions from the slices [0, -window), [-window, -shift),
    [-shift, end) per axis, Python slicing as the reference)."""
    img = torch.zeros(hp, wp, dtype=like.dtype, device=like.device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0)


def pad_mask(rows: int, cols: int, pad_b: int, pad_r: int, k: int, base: int, stride: int, like: Tensor) -> Tensor:
    """The reference's padding mask of the k x k neighbourhoods, (num_windows, k*k), added to the logits.

    A rows x cols map (the padded token map, or the semantic grid) gets MASK_VALUE on
    ``[-pad_b:, -pad_r:]`` with `pad_b`, `pad_r` the IMAGE-token pads, then a border of MASK_VALUE
    (floor/ceil of (k - base) / 2), cut into k x k patches at `stride`. Python slicing makes the
    three cases of the reference: both pads > 0 masks the bottom-right corner only; one pad 0 masks a
    whole strip (``-0:`` is the whole axis); both 0 sets every entry, a constant shift that masks
    nothing. A slice longer than the axis saturates."""
    m = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    m[-pad_b:, -pad_r:] = MASK_VALUE
    lo = (k - base) // 2
    hi = k - base - lo
    m = F.pad(m, (lo, hi, lo, hi), value=MASK_VALUE)
    return m.unfold(0, k, stride).unfold(1, k, stride).reshape(-1, k * k)


class DetSwinBlock(SwinTransformerBlock):
    """Swin block of the detection reference: pad AFTER norm1, then roll (shift never clamped)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__(
            dim,
            (window, window),
            num_heads,
            window_size=window,
            shift_size=shift,
            always_partition=True,
            dynamic_mask=True,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path,
        )

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, H, W, C); mask: the shift mask of the padded map (used when the block shifts)."""
        _, H, W, C = x.shape
        ws, shift = self.window_size[0], self.shift_size[0]
        pad_b, pad_r = _pads(H, W, ws)
        h = F.pad(self.norm1(x), (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if shift:
            h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            if mask is None:
                mask = shift_mask(Hp, Wp, ws, shift, h)
        a = self.attn(window_partition(h, (ws, ws)).reshape(-1, ws * ws, C), mask=mask if shift else None)
        h = window_reverse(a.reshape(-1, ws, ws, C), (ws, ws), Hp, Wp)
        if shift:
            h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path1(h[:, :H, :W])
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class DetSwinStage(nn.Module):
    """A Swin stage (BasicLayer) of the detection reference: shift 0 / 3 alternating, any map size."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, drop_path: List[float]):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            [
                DetSwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i])
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        _, H, W, _ = x.shape
        pad_b, pad_r = _pads(H, W, self.window)
        mask = shift_mask(H + pad_b, W + pad_r, self.window, self.window // 2, x) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class _NeighbourhoodAttention(_LayerScaled):
    """Shared part of the generation and recovery blocks: queries attend to the k x k neighbourhood
    (stride `stride`) of a key map, with the reference's padding mask."""

    def key_windows(self, kmap: Tensor, k: int, base: int, stride: int) -> Tensor:
        """kv(norm1(.)) of every k x k neighbourhood of `kmap` (B, R, S, C), zero-padded by
        floor/ceil((k - base) / 2): (B * num_windows, k*k, 2C).

        Equal to the reference's ``kv(norm1(unfold(pad(kmap))))`` but every token is projected once:
        norm1 and kv act per token, and a zero token maps to ``kv(norm1(0))`` (norm1's bias through
        kv), so the border is filled with that one vector after the projection."""
        B, R, S, C = kmap.shape
        lo = (k - base) // 2
        hi = k - base - lo
        kv = self.attn.kv(self.norm1(kmap))
        border = self.attn.kv(self.norm1(kmap.new_zeros(1, C)))
        full = border.reshape(1, 1, 1, -1).expand(B, R + lo + hi, S + lo + hi, 2 * C).contiguous()
        full[:, lo : lo + R, lo : lo + S] = kv
        win = full.unfold(1, k, stride).unfold(2, k, stride)  # (B, nh, nw, 2C, k, k)
        return win.permute(0, 1, 2, 4, 5, 3).reshape(-1, k * k, 2 * C)

    def attend(self, q_in: Tensor, kv: Tensor, mask: Tensor, batch: int) -> Tensor:
        """Multi-head attention of q_in (B*nW, Nq, C) over kv (B*nW, K, 2C) with mask (nW, K)."""
        Bn, Nq, C = q_in.shape
        h = self.attn.num_heads
        d = C // h
        q = self.attn.q(q_in).reshape(Bn, Nq, h, d).transpose(1, 2)
        k, v = kv.reshape(Bn, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        # one fused kernel (scale, mask, softmax, @v): the 49 x 729 logits of recovery are never written out
        mask = mask.to(q.dtype).reshape(1, -1, 1, 1, k.shape[2]).expand(batch, -1, 1, 1, -1).reshape(Bn, 1, 1, -1)
        drop = self.attn.attn_drop if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.attn.proj(o.transpose(1, 2).reshape(Bn, Nq, C))


class SemanticGenerationBlock(_NeighbourhoodAttention):
    """Blocks 6p+1 and 6p+2 (reference ``SemanticAttentionBlock``): the semantic tokens of each 7x7
    window (3x3 max-pooled from the window when `s` is None, else the window's tokens of `s`) attend
    to the k x k neighbourhood of the image tokens; residual on the semantic tokens, then the MLP."""

    def __init__(self, *args, window: int = 7, sample: int = 3, k: int = 14, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.sample, self.k = window, sample, k

    def forward(self, x: Tensor, s: Optional[Tensor] = None) -> Tensor:
        """x: image tokens (B, H, W, C); s: semantic tokens (B, gh*gw, C) in raster order of the grid or
        None -> semantic tokens (B, gh*gw, C), gh = 3 * ceil(H / 7), gw = 3 * ceil(W / 7)."""
        B, H, W, C = x.shape
        ws, n = self.window, self.sample
        pad_b, pad_r = _pads(H, W, ws)
        xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # raw tokens, before any norm
        nh, nw = (H + pad_b) // ws, (W + pad_r) // ws
        if s is None:
            windows = xp.reshape(B, nh, ws, nw, ws, C).permute(0, 1, 3, 5, 2, 4).reshape(-1, C, ws, ws)
            s0 = F.adaptive_max_pool2d(windows, n).flatten(2).transpose(1, 2)  # (B*nW, n*n, C)
        else:
            s0 = s.reshape(B, nh, n, nw, n, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n * n, C)
        kv = self.key_windows(xp, self.k, ws, ws)
        mask = pad_mask(nh * ws, nw * ws, pad_b, pad_r, self.k, ws, ws, x)
        s = s0 + self.drop_path(self.layer_scale_1 * self.attend(self.norm1(s0), kv, mask, B))
        s = s.reshape(B, nh, nw, n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, C)
        return self.ffn(s)


class RecoveryBlock(_NeighbourhoodAttention):
    """Block 6p+5 (reference ``RestoreBlock``): the image tokens of each 7x7 window attend to the
    k x k neighbourhood (stride 3) of the semantic grid around the window's own 3x3 block (local)."""

    def __init__(self, *args, window: int = 7, sample: int = 3, k: int = 27, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.sample, self.k = window, sample, k

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws, n = self.window, self.sample
        pad_b, pad_r = _pads(H, W, ws)
        Hp, Wp = H + pad_b, W + pad_r
        nh, nw = Hp // ws, Wp // ws
        xw = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)).reshape(B, nh, ws, nw, ws, C)
        xw = xw.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        kv = self.key_windows(s.reshape(B, nh * n, nw * n, C), self.k, n, n)
        mask = pad_mask(nh * n, nw * n, pad_b, pad_r, self.k, n, n, x)  # image-token pads on the grid: as the reference
        xw = xw + self.drop_path(self.layer_scale_1 * self.attend(self.norm1(xw), kv, mask, B))
        x = xw.reshape(B, nh, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)[:, :H, :W]
        return self.ffn(x)


class DetSemanticStage(nn.Module):
    """Stage 3 of the detection backbone: `depth // 6` periods of [Swin (no shift), generation (k1),
    semantic (k2), local 3x3, global, recovery (kr)]; every period pools new semantic tokens."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        sample: int,
        k1: int,
        k2: int,
        kr: int,
        mlp_ratio: float,
        drop_path: List[float],
    ):
        super().__init__()
        if depth % PERIOD:
            raise ValueError(f"the semantic stage depth must be a multiple of {PERIOD}, got {depth}")
        self.window, self.sample = window, sample
        common = dict(num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            kind, dp = i % PERIOD, drop_path[i]
            if kind == 0:
                blk = DetSwinBlock(dim, num_heads, window, 0, mlp_ratio, dp)
            elif kind in (1, 2):
                blk = SemanticGenerationBlock(
                    dim, drop_path=dp, window=window, sample=sample, k=k1 if kind == 1 else k2, **common
                )
            elif kind == 3:
                blk = SemanticBlock(dim, drop_path=dp, group=sample, **common)
            elif kind == 4:
                blk = SemanticBlock(dim, drop_path=dp, **common)
            else:
                blk = RecoveryBlock(dim, drop_path=dp, window=window, sample=sample, k=kr, **common)
            self.blocks.append(blk)

    def forward(self, x: Tensor) -> Tensor:
        _, H, W, _ = x.shape
        grid = (math.ceil(H / self.window) * self.sample, math.ceil(W / self.window) * self.sample)
        for p in range(0, len(self.blocks), PERIOD):
            swin, gen, sem, local, glob, rec = self.blocks[p : p + PERIOD]
            x = swin(x)
            s = sem(x, gen(x))
            s = glob(local(s, grid=grid))
            x = rec(x, s)
        return x


class STViTRSwinDet(nn.Module):
    """STViT-R-Swin detection backbone: forward(x) -> list of NCHW maps ``norm{i}(stage i)`` for i in
    `out_indices` (strides 4, 8, 16, 32; channels embed_dim * 2**i); any input size.

    A timm feature extractor in the way of timm's own feature classes (``EfficientNetFeatures``,
    ``HighResolutionNetFeatures``): ``feature_info`` is a :class:`timm.models.FeatureInfo`. Stages after
    the last index in `out_indices` are not built."""

    def __init__(
        self,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        sample_window_size: int = 3,
        k_window_size_1: int = 14,
        k_window_size_2: int = 21,
        restore_k_window_size: int = 27,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        use_global: bool = False,
        **kwargs,
    ):
        super().__init__()
        for key in ("img_size", "num_classes", "global_pool"):  # any input size; no head
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"stvit_swin (features_only) got unsupported arguments {sorted(kwargs)}")
        if use_global:
            raise ValueError("the detection backbone has no global centre (use_global=False)")
        if len(depths) != 4 or depths[2] % PERIOD:
            raise ValueError(f"depths must be four stages with a multiple of {PERIOD} in stage 3, got {depths}")
        if isinstance(out_indices, int):
            out_indices = range(len(depths) - out_indices, len(depths))
        self.out_indices = tuple(sorted({int(i) % len(depths) for i in out_indices}))
        num_stages = self.out_indices[-1] + 1
        self.embed_dim = embed_dim
        self.window_size, self.patch_stride = window_size, 4
        self.num_features = [int(embed_dim * 2**i) for i in range(len(depths))]
        self.patch_embed = ConvStem(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i in range(num_stages):
            dim, dp = self.num_features[i], dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            if i == 2:
                stage = DetSemanticStage(
                    dim,
                    depths[i],
                    num_heads[i],
                    window_size,
                    sample_window_size,
                    k_window_size_1,
                    k_window_size_2,
                    restore_k_window_size,
                    mlp_ratio,
                    dp,
                )
            else:
                stage = DetSwinStage(dim, depths[i], num_heads[i], window_size, mlp_ratio, dp)
            self.layers.append(stage)
            self.downsamples.append(PatchMerging(dim) if i < num_stages - 1 else nn.Identity())
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.feature_info = FeatureInfo(
            [dict(num_chs=self.num_features[i], reduction=4 * 2**i, module=f"norm{i}") for i in range(num_stages)],
            self.out_indices,
        )
        self.apply(STViTRSwin._init_weights)  # the reference's init_weights(None): trunc_normal Linear, LN (1, 0)

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def forward(self, x: Tensor) -> List[Tensor]:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % self.patch_stride, 0, (-H) % self.patch_stride))
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, (stage, down) in enumerate(zip(self.layers, self.downsamples)):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2))  # NCHW view, channels_last memory
            x = down(x)
        return outs
