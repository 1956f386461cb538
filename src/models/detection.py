"""A (token-reduced) timm ViT as a detection backbone: the spatial token map -> a simple feature pyramid.

``ViTDetBackbone(vit)`` runs ``vit.forward_tokens(images, dense=True)`` and takes its dense map
``state.dense_map`` (B, C, H/p, W/p), which every token-reduction method gives by its own declared means
(``ReductionMethod.dense_restore``; see src/models/reduction/base.py): ``none`` the final patch tokens;
merging methods (ToMe, MCTF, PiToMe, ToFu, BAT, MSTM, DiffRate's and PPT's merging) unmerge through
their source map, every patch taking the final features of the token it was merged into; pruning and
propagating methods (EViT, DynamicViT, GTP, ATS, DiffRate's and PPT's pruning) give a removed token's
patch the features it had when it was removed; STViT-R (``apply_reduction(vit, "stvit", recover=True)``)
its recovered map. A method without a map (plain STViT, ``recover=False``) is refused when the backbone
is built, with the method's reason. The map is taken before the ViT's final norm (STViT-R's recovered
map skips it too); the backbone normalises it with its own LayerNorm2d. From that single-scale map it
builds ViTDet's simple feature pyramid (Li et al., ECCV 2022): deconvolutions up, max-pooling down, then
a 1x1 and a 3x3 convolution with LayerNorm per level, plus one extra max-pooled level, all with
``out_channels`` channels.

It returns an ``OrderedDict`` ``{"0", "1", "2", "3", "pool"}`` (strides p/s for each scale factor s,
then twice the last) and has ``out_channels``: exactly what torchvision's ``FasterRCNN`` /
``MaskRCNN`` expect of ``backbone=`` (their default RoI pooler reads "0".."3", their default anchor
generator wants five levels). For other frameworks wrap it the same way: mmdet expects a tuple of
maps from the backbone (``tuple(out.values())``, register it in ``MODELS`` and drop the mmdet FPN
neck, or keep the FPN with ``in_channels=[out_channels] * 5``); detectron2 expects a ``Backbone``
with ``output_shape()`` naming strides and channels per level (p2..p6 = "0".."pool").

Image sizes other than the ViT's own: create the ViT with ``dynamic_img_size=True`` (timm
interpolates the position embeddings per input); height and width must be multiples of the patch
size (torchvision's transform pads to multiples of 32, which covers patch 8, 16 and 32).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer

from .reduction import apply_reduction
from .reduction.base import _ReducedMixin

Tensor = torch.Tensor


def _level(dim: int, scale: float, out_channels: int) -> nn.Sequential:
    """One pyramid level from the stride-p map: resample by `scale`, then 1x1 + 3x3 convs with LayerNorm."""
    if scale == 4.0:
        layers, ch = (
            [
                nn.ConvTranspose2d(dim, dim // 2, 2, 2),
                LayerNorm2d(dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2),
            ],
            dim // 4,
        )
    elif scale == 2.0:
        layers, ch = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    elif scale == 1.0:
        layers, ch = [], dim
    elif scale == 0.5:
        layers, ch = [nn.MaxPool2d(2, 2)], dim
    elif scale == 0.25:
        layers, ch = [nn.MaxPool2d(4, 4)], dim
    else:
        raise ValueError(f"scale factor {scale} not supported; use 4, 2, 1, 0.5 or 0.25")
    layers += [
        nn.Conv2d(ch, out_channels, 1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    ]
    return nn.Sequential(*layers)


class ViTDetBackbone(nn.Module):
    """Feature pyramid from the dense token map of a timm ViT, unreduced or reduced with any method that
    has a dense map (every registered one but plain STViT)."""

    def __init__(
        self, vit: VisionTransformer, out_channels: int = 256, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
    ):
        super().__init__()
        if len(scale_factors) != 4:
            raise ValueError(f"torchvision's RoI pooler reads four levels; got scale_factors={list(scale_factors)}")
        if not isinstance(vit, _ReducedMixin):
            apply_reduction(vit, "none")  # gives the plain model forward_tokens
        vit.reduction.check_dense()  # the method's own ReductionConfigError when it has no dense map
        self.vit = vit
        dim = vit.embed_dim
        self.patch = tuple(vit.patch_embed.patch_size)
        self.norm = LayerNorm2d(dim)  # the dense map is taken before the ViT's final norm: normalise it here
        self.levels = nn.ModuleList([_level(dim, float(s), out_channels) for s in scale_factors])
        self.top = nn.MaxPool2d(1, 2)  # ViTDet's / torchvision's extra level: stride 2 of the last
        self.out_channels = out_channels
        self.strides = [int(self.patch[0] / s) for s in scale_factors] + [int(self.patch[0] / scale_factors[-1]) * 2]

    def spatial_map(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, H/p, W/p) dense token map (before the ViT's final norm)."""
        H, W = images.shape[-2:]
        if H % self.patch[0] or W % self.patch[1]:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {self.patch}; pad the images "
                "(torchvision's GeneralizedRCNNTransform pads to multiples of 32 by default)"
            )
        return self.vit.forward_tokens(images, dense=True).dense_map

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        x = self.norm(self.spatial_map(images))
        feats = [level(x) for level in self.levels]
        out = OrderedDict((str(i), f) for i, f in enumerate(feats))
        out["pool"] = self.top(feats[-1])
        return out

    def new_module_names(self) -> list:
        """Modules trained at full learning rate: the pyramid and the method's new modules."""
        return ["norm", "levels"] + [f"vit.{n}" for n in self.vit.reduction.new_module_names()]
