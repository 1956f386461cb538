"""Building the backbone from ``cfg.model``: a timm model with pretrained weights, weights from a
checkpoint file, or (for the quickstart) a fresh model whose weights run() trains first."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import timm
import torch.nn as nn

from .weights import WeightsError, load_weights, read_checkpoint


class BackboneError(ValueError):
    """The model config cannot be built (bad sizes, no weights available, head mismatch)."""


def _missing_weights_message(name: str, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"Could not get the pretrained weights of '{name}' ({type(err).__name__}: {first_line[:200]}). "
        "timm downloads them from the Hugging Face Hub, which is not reachable from here and they are "
        "not in the local cache. Two ways to fix it: (1) connect to the internet once, or pre-fill the "
        "Hugging Face cache (HF_HOME) on a machine that has it, e.g. "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`; or "
        "(2) pass model.checkpoint=PATH to a local weights file: an official DeiT .pth "
        "({'model': state_dict}), a plain state dict, a .safetensors file or a checkpoint of this project."
    )


def _timm_kwargs(cfg: Mapping[str, Any]) -> dict:
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs.update(num_classes=int(cfg["num_classes"]), in_chans=int(cfg.get("in_chans", 3)),
                  drop_path_rate=float(cfg.get("drop_path_rate", 0.0)))
    if cfg.get("img_size") is not None:
        kwargs["img_size"] = int(cfg["img_size"])
    return kwargs


def _check_sizes(model: nn.Module, cfg: Mapping[str, Any]) -> None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    img = cfg.get("img_size")
    if patch is None or img is None:
        return
    if int(img) % int(patch[0]) != 0 or int(img) % int(patch[1]) != 0:
        raise BackboneError(
            f"model.img_size={img} is not divisible by the patch size {tuple(patch)} of '{cfg['name']}'; "
            f"use a multiple of {patch[0]}, e.g. model.img_size={int(img) // patch[0] * patch[0] or patch[0]}"
        )


def _fit_head(model: nn.Module, sd: dict, drop_head: bool, path: str) -> dict:
    """Checkpoints for another number of classes: a clear error, or a fresh head when configured."""
    own = model.state_dict()
    heads = [k for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias") if k in own]
    bad = [k for k in heads if k in sd and sd[k].ndim >= 1 and sd[k].shape[0] != own[k].shape[0]]
    if not bad:
        return sd
    if not drop_head:
        k = bad[0]
        raise BackboneError(
            f"the checkpoint {path} has a classifier head for {sd[k].shape[0]} classes ({k} {tuple(sd[k].shape)}) "
            f"but model.num_classes={own[k].shape[0]}. Set model.num_classes={sd[k].shape[0]} to keep it, or "
            "model.drop_head=true to start from a freshly initialised head for the new classes."
        )
    sd = dict(sd)
    for k in heads:  # keep the model's own fresh initialisation of every head tensor
        sd[k] = own[k]
    return sd


def create_backbone(cfg: Mapping[str, Any], checkpoint: Optional[str] = None) -> nn.Module:
    """The model of ``cfg.model`` with its weights.

    Weights come from, in order: `checkpoint` / ``cfg.checkpoint`` (official DeiT, plain, safetensors or
    this project's Lightning checkpoints, via :func:`load_weights`); timm's pretrained path when
    ``cfg.pretrained``; otherwise timm's random initialisation.
    """
    name = cfg["name"]
    kwargs = _timm_kwargs(cfg)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise BackboneError(f"timm cannot build model '{name}' with {kwargs}: {err}") from None
    _check_sizes(model, cfg)
    checkpoint = checkpoint or cfg.get("checkpoint")
    if checkpoint:
        sd = read_checkpoint(checkpoint)
        sd = _fit_head(model, sd, bool(cfg.get("drop_head", False)), str(checkpoint))
        return load_weights(model, sd)
    if cfg.get("pretrained", False):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub / cache / connection errors come in many types
            raise BackboneError(_missing_weights_message(name, err)) from None
    return model


__all__ = ["BackboneError", "WeightsError", "create_backbone"]
