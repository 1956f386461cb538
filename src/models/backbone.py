"""Building the model from ``cfg.model`` and ``cfg.method``: one sequence for every entry point.

    build_model:  bare timm model (pretrained or random) -> resolve the schedule -> apply the method
                  -> load the checkpoint into the patched model (so a method's modules, e.g.
                  DynamicViT's ``score_predictor.*``, load with it or start fresh)

``create_backbone`` is the first step alone (the bare model, optionally with a backbone checkpoint).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch.nn as nn

from .weights import WeightsError, load_weights, method_owners, read_checkpoint


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
    kwargs.update(
        num_classes=int(cfg["num_classes"]),
        in_chans=int(cfg.get("in_chans", 3)),
        drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
    )
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


def load_checkpoint(
    model: nn.Module,
    checkpoint: Union[str, os.PathLike],
    drop_head: bool = False,
    ema: bool = False,
    fresh_modules: bool = False,
    drop_method_modules: bool = False,
) -> nn.Module:
    """Read `checkpoint` (its EMA weights when `ema`), fit the classifier head (`drop_head`: a fresh
    head for another class count) and load it strictly with :func:`load_weights`.
    `drop_method_modules`: leave out the modules of any reduction method (the backbone alone, e.g. the
    unreduced reference model of a benchmark)."""
    sd = read_checkpoint(checkpoint, ema=ema)
    if drop_method_modules:
        sd = {k: v for k, v in sd.items() if not method_owners(k.split(".", 1)[0])}
    sd = _fit_head(model, sd, drop_head, str(checkpoint))
    return load_weights(model, sd, fresh_modules=fresh_modules, source=str(checkpoint))


def create_backbone(cfg: Mapping[str, Any], checkpoint: Optional[str] = None) -> nn.Module:
    """The bare (unpatched) model of ``cfg.model`` with its weights.

    Weights come from, in order: `checkpoint` / ``cfg.checkpoint`` (official DeiT, plain, safetensors or
    this project's Lightning checkpoints, via :func:`load_weights`; a checkpoint holding a reduction
    method's modules needs :func:`build_model`, which applies the method first); timm's pretrained path
    when ``cfg.pretrained``; otherwise timm's random initialisation.
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
        return load_checkpoint(
            model, checkpoint, bool(cfg.get("drop_head", False)), bool(cfg.get("checkpoint_ema", False))
        )
    if cfg.get("pretrained", False):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub / cache / connection errors come in many types
            raise BackboneError(_missing_weights_message(name, err)) from None
    return model


def is_patchable(model: nn.Module) -> bool:
    """Token reduction patches timm VisionTransformers; other models (e.g. STViT-R-Swin) run as they are."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def apply_method(model: nn.Module, method: str, params: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """apply_reduction for timm ViTs; other models only with method none (left unpatched)."""
    from .reduction import ReductionConfigError, apply_reduction

    if is_patchable(model):
        return apply_reduction(model, method, **dict(params or {}))
    if method != "none":
        raise ReductionConfigError(
            f"method '{method}' patches timm VisionTransformer models; {type(model).__name__} can only be "
            "used with method=none"
        )
    return model


def build_model(
    model_cfg: Mapping[str, Any],
    method: str = "none",
    params: Optional[Mapping[str, Any]] = None,
    schedule: Optional[Mapping[str, Any]] = None,
    checkpoint: Optional[str] = None,
    ema: Optional[bool] = None,
    weights: bool = True,
    drop_method_modules: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model every entry point uses, and the method parameters it was built with.

    1. the bare model of `model_cfg` (timm pretrained when ``pretrained`` and there is no checkpoint,
       else random);
    2. `params` with `schedule` resolved (counts / keep rates / a GMACs budget);
    3. `method` applied (its modules attached);
    4. `checkpoint` (default ``model_cfg.checkpoint``; its EMA weights when `ema`, default
       ``model_cfg.checkpoint_ema``) loaded into the patched model: backbone keys strictly, the chosen
       method's modules loaded or, when the checkpoint has none of them, freshly initialised (logged);
       another method's modules are an error naming both methods.

    `weights=False` builds the same model without any weights (config checks: nothing is read or
    downloaded). `drop_method_modules`: load only the checkpoint's backbone, leaving out every method's
    modules (the unreduced reference model of a benchmark built from a method's checkpoint).
    """
    from .reduction.schedules import resolve_params

    ckpt = checkpoint if checkpoint is not None else model_cfg.get("checkpoint")
    ema = bool(model_cfg.get("checkpoint_ema", False)) if ema is None else bool(ema)
    if ema and not (ckpt or model_cfg.get("checkpoint")):
        raise BackboneError(
            "model.checkpoint_ema=true asks for the EMA weights of model.checkpoint, but model.checkpoint is not "
            "set; give model.checkpoint=PATH or drop model.checkpoint_ema"
        )
    bare = dict(model_cfg, checkpoint=None)
    bare["pretrained"] = bool(model_cfg.get("pretrained", False)) and weights and not ckpt
    model = create_backbone(bare)
    params = dict(params or {})
    if is_patchable(model):
        params = resolve_params(model, method, params, dict(schedule) if schedule else None)
    model = apply_method(model, method, params)
    if weights and ckpt:
        load_checkpoint(
            model,
            ckpt,
            bool(model_cfg.get("drop_head", False)),
            ema,
            fresh_modules=True,
            drop_method_modules=drop_method_modules,
        )
    return model, params


__all__ = [
    "BackboneError",
    "WeightsError",
    "apply_method",
    "build_model",
    "create_backbone",
    "is_patchable",
    "load_checkpoint",
]
