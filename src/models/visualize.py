"""Draw which patches each remaining token stands for (ToMe-style source tracing, for every method).

The model runs once with source tracing; every patch is painted with the mean colour of the patches
its final token stands for, token borders are drawn in white, and patches that no remaining token
stands for (dropped by EViT without fusion, propagated away by GTP, pruned by DynamicViT) are shown
dark. Left: the input; right: the tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

Tensor = torch.Tensor


def token_assignment(model, image: Tensor) -> tuple:
    """Run `model` (patched by apply_reduction) on one image (C, H, W) with source tracing.

    Returns (assign, grid): assign is (H_p * W_p,) with, for every patch, the index of the final token
    that stands for it, or -1 when no token does; grid is (H_p, W_p).
    """
    previous = getattr(model, "trace_source", False)
    model.trace_source = True
    try:
        with torch.no_grad():
            state = model.eval().forward_tokens(image[None])
    finally:
        model.trace_source = previous
    source = state.source[0]  # (N, N0): final tokens x input tokens (protected tokens first)
    patches = source[:, source.shape[1] - int(np.prod(state.grid_size)) :]  # the input patch columns
    covered = patches.sum(0) > 0
    assign = torch.where(covered, patches.argmax(0), torch.full_like(covered, -1, dtype=torch.long))
    return assign.cpu().numpy(), tuple(state.grid_size)


def render(image_rgb: np.ndarray, assign: np.ndarray, grid: Sequence[int], dark: float = 0.15) -> Image.Image:
    """image_rgb: (H, W, 3) uint8. Paint each patch with its token's mean colour, borders in white."""
    H, W, _ = image_rgb.shape
    gh, gw = grid
    ph, pw = H // gh, W // gw
    img = image_rgb[: gh * ph, : gw * pw].astype(np.float32)
    patch_rgb = img.reshape(gh, ph, gw, pw, 3).mean(axis=(1, 3)).reshape(-1, 3)
    tokens = assign.reshape(-1)
    out = np.zeros_like(patch_rgb)
    for t in np.unique(tokens):
        members = tokens == t
        out[members] = patch_rgb[members] * dark if t < 0 else patch_rgb[members].mean(0)
    canvas = np.repeat(np.repeat(out.reshape(gh, gw, 3), ph, axis=0), pw, axis=1)
    grid_tokens = tokens.reshape(gh, gw)
    for i in range(gh):  # white border where neighbouring patches belong to different tokens
        for j in range(gw):
            if j + 1 < gw and grid_tokens[i, j] != grid_tokens[i, j + 1]:
                canvas[i * ph : (i + 1) * ph, (j + 1) * pw - 1] = 255
            if i + 1 < gh and grid_tokens[i, j] != grid_tokens[i + 1, j]:
                canvas[(i + 1) * ph - 1, j * pw : (j + 1) * pw] = 255
    side = np.concatenate([img, np.full((img.shape[0], 4, 3), 255.0), canvas], axis=1)
    return Image.fromarray(side.clip(0, 255).astype(np.uint8))


def visualize_tokens(
    model,
    image: Tensor,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    path: Optional[str] = None,
) -> Image.Image:
    """PNG-ready picture of `model`'s tokens for one normalised image tensor (C, H, W)."""
    assign, grid = token_assignment(model, image)
    pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    rgb = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    picture = render(rgb, assign, grid)
    if path is not None:
        picture.save(path)
    return picture
