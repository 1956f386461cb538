"""Small random ViTs and inputs shared by the method tests (no download, deterministic)."""

import functools

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(seed=0, cls=VisionTransformer, img_size=64, patch_size=8, depth=4, sharpen=8.0, **kw):
    """Small random ViT (width 48, 3 heads). `sharpen` multiplies every qkv weight so attention is
    peaky and token rankings have clear margins (None: timm's plain initialisation)."""
    torch.manual_seed(seed)
    model = cls(img_size=img_size, patch_size=patch_size, embed_dim=48, depth=depth, num_heads=3, num_classes=10, **kw)
    if sharpen is not None:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight.mul_(sharpen)
    return model.eval()


def images(n=3, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_grid8(distilled: bool = False, **kw):
    """8x8 patch grid (64 patch tokens), 4 blocks, timm's plain random weights."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return tiny_vit(cls=cls, img_size=32, patch_size=4, sharpen=None, **kw)


images32 = functools.partial(images, size=32)
