"""Loading weights into timm ViTs: official DeiT / DynamicViT files, plain state dicts,
safetensors and this project's own Lightning checkpoints, with clear errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Union

import torch
import torch.nn as nn

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

# Keys under which known checkpoint formats nest the model weights, in order of preference.
_NESTED_KEYS = ("model", "state_dict", "model_state", "module")
# Prefixes the LightningModule (src.trainer.module) and DDP wrappers put in front of backbone keys.
_PREFIXES = ("student.", "model.", "module.")


class WeightsError(RuntimeError):
    """The checkpoint is missing, unreadable, or does not fit the model."""


def read_checkpoint(path: Union[str, os.PathLike]) -> StateDict:
    """Read a checkpoint file into a flat state dict of tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects beyond tensors and containers
        raise WeightsError(
            f"could not read {path} with torch.load(weights_only=True): {err}. Only checkpoints made of "
            "tensors and plain containers are loaded (official DeiT/DynamicViT files, state dicts, "
            "safetensors, this project's Lightning checkpoints)."
        ) from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: Mapping, where: str = "checkpoint") -> StateDict:
    """Unwrap {"model": sd} (DeiT), {"state_dict": sd} (Lightning) and prefixed keys."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where} holds a {type(obj).__name__}, not a state dict")
    for key in _NESTED_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise WeightsError(f"{where} holds no tensors (keys: {sorted(obj)[:10]})")
    if any(k.startswith("student.") for k in sd):  # our LightningModule: student only, teacher dropped
        sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    for prefix in _PREFIXES[1:]:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, weights: Union[str, os.PathLike, Mapping], strict: bool = True) -> nn.Module:
    """Load `weights` (a path or a state dict) into `model`, adapting position embeddings and
    patch size the way timm does for its own checkpoints. Raises WeightsError naming the missing,
    unexpected or mis-shaped keys when the checkpoint belongs to another architecture."""
    sd = read_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else extract_state_dict(weights)
    sd = dict(sd)
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        # resizes pos_embed to the model's grid and converts legacy key layouts; leaves extras alone
        sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if wrong_shape or (strict and (missing or unexpected)):
        lines = []
        if wrong_shape:
            lines.append("shape mismatch: " + "; ".join(wrong_shape[:5]))
        if strict and missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if strict and unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        raise WeightsError(
            f"checkpoint does not fit {type(model).__name__} "
            f"(embed_dim={getattr(model, 'embed_dim', '?')}, depth={len(getattr(model, 'blocks', []))}): "
            + " | ".join(lines)
            + ". Is it a checkpoint for another architecture? Pick the matching model=..."
        )
    model.load_state_dict(sd, strict=strict)
    return model
