"""Loading weights into timm ViTs (and the other models of this project) with clear errors.

Formats read: official DeiT / EViT files (``{"model": sd}``), official DynamicViT files (backbone +
``score_predictor.*`` in ``{"model": sd}``), plain state dicts, ``.safetensors``, this project's
Lightning checkpoints (``state_dict`` with ``student.*``; EMA weights under ``state_dict_ema``; a
task=detection checkpoint gives its backbone trunk), and
official STViT-R-Swin classification files (renamed by ``stvit_swin.checkpoint_filter_fn``). Files
are read with ``torch.load(weights_only=True)`` only.

Which keys may be where, when loading into a model patched with a reduction method:
- every backbone key must be in the checkpoint (strict);
- keys of the chosen method's modules (``type(model.reduction).module_names``) are loaded; with
  ``fresh_modules=True`` a module the checkpoint lacks entirely keeps its fresh initialisation (one
  info line says which), e.g. finetuning DynamicViT from DeiT weights;
- keys of another method's modules (found through ``REGISTRY[...].module_names``) are an error naming
  both methods; so are method keys loaded into an unpatched model (apply the method first).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]
log = logging.getLogger(__name__)

# Keys under which known checkpoint formats nest the model weights, in order of preference.
_NESTED_KEYS = ("model", "state_dict", "model_state", "module")
# Keys under which EMA weights are stored: this project's and timm's train.py (state_dict_ema), DeiT's
# and the official method repositories' (model_ema).
EMA_KEYS = ("state_dict_ema", "model_ema")
# Prefixes the LightningModule (src.trainer.module) and DDP wrappers put in front of backbone keys.
_PREFIXES = ("student.", "model.", "module.")
# The backbone trunk inside a task=detection checkpoint: a ViT (ViTDetBackbone) or a features_only model.
_DETECTION_TRUNKS = ("detector.backbone.vit.", "detector.backbone.body.")
# EMA weights inside an older Lightning checkpoint of this project (before state_dict_ema existed).
_LIGHTNING_EMA_PREFIX = "ema.module."


class WeightsError(RuntimeError):
    """The checkpoint is missing, unreadable, or does not fit the model."""


def _resave_hint(path: Path) -> str:
    out = path.with_name(path.stem + ".weights" + (path.suffix or ".pth"))
    keep = "('model', 'model_ema', 'state_dict', 'state_dict_ema')"
    return (
        "If you trust the file (unpickling it runs code from it), re-save its weights once as plain "
        "tensors: python -c \"import torch; ck = torch.load('{src}', map_location='cpu', weights_only=False); "
        "torch.save({{k: ck[k] for k in {keep} if k in ck}} if isinstance(ck, dict) else ck.state_dict(), "
        "'{dst}')\" and pass {dst} instead."
    ).format(src=path, dst=out, keep=keep)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects beyond tensors and containers, or not a torch file
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "weights_only" in text.lower() or "Weights only load failed" in text:
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"{path} pickles Python objects{what}, e.g. the training config or an argparse Namespace saved "
                "next to the weights, and torch.load(weights_only=True) refuses them because loading them could run "
                f"arbitrary code; it is never loaded unsafely here. {_resave_hint(path)}"
            ) from None
        raise WeightsError(
            f"could not read {path} with torch.load(weights_only=True): {type(err).__name__}: "
            f"{text.splitlines()[0][:300] if text else ''}. "
            "Readable are official DeiT/EViT/DynamicViT/STViT-R files, state dicts, .safetensors and this "
            "project's Lightning checkpoints."
        ) from None


def read_checkpoint(path: Union[str, os.PathLike], ema: bool = False) -> StateDict:
    """Read a checkpoint file into a flat state dict of tensors (its EMA weights when `ema`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
        if ema:
            raise WeightsError(
                f"EMA weights were asked for (model.checkpoint_ema=true / ema=True) but {path} is a .safetensors "
                f"file holding one flat state dict ({len(sd)} tensors, e.g. {', '.join(sorted(sd)[:3])}), no "
                f"{' / '.join(EMA_KEYS)}; load it without the EMA choice"
            )
        return sd
    return extract_state_dict(_torch_load(path), str(path), ema=ema)


def _pick_ema(obj: Mapping, where: str) -> Mapping:
    for key in EMA_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):  # an older Lightning checkpoint of this project: ema.module.* keys
        old = {k[len(_LIGHTNING_EMA_PREFIX) :]: v for k, v in inner.items() if k.startswith(_LIGHTNING_EMA_PREFIX)}
        if old:
            return old
    raise WeightsError(
        f"EMA weights were asked for (model.checkpoint_ema=true / ema=True) but {where} has none: no "
        f"{' / '.join(repr(k) for k in EMA_KEYS)} entry; its top-level keys are {sorted(map(str, obj))[:12]}. "
        "Load its regular weights (model.checkpoint_ema=false), or train with ema.enabled=true to get EMA weights"
    )


def extract_state_dict(obj: Mapping, where: str = "checkpoint", ema: bool = False) -> StateDict:
    """Unwrap {"model": sd} (DeiT), {"state_dict": sd} (Lightning) and prefixed keys; with `ema` the
    EMA weights ({"state_dict_ema": sd} of this project and timm, {"model_ema": sd} of DeiT)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where} holds a {type(obj).__name__}, not a state dict")
    if ema:
        obj = _pick_ema(obj, where)
    else:
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise WeightsError(f"{where} holds no tensors (keys: {sorted(map(str, obj))[:10]})")
    if any(k.startswith("student.") for k in sd):  # our LightningModule: student only, teacher/EMA dropped
        sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
    for trunk in _DETECTION_TRUNKS:  # a task=detection checkpoint as backbone weights: its trunk only
        if any(k.startswith(trunk) for k in sd):
            sd = {k[len(trunk) :]: v for k, v in sd.items() if k.startswith(trunk)}
    for prefix in _PREFIXES[1:]:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# --- which method a key belongs to ------------------------------------------------------------------
def method_owners(top: str) -> List[str]:
    """Names of the registered reduction methods that may attach a module called `top`."""
    from .reduction import REGISTRY

    return sorted(name for name, cls in REGISTRY.items() if top in getattr(cls, "module_names", ()))


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def _groups(keys) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for k in sorted(keys):
        out.setdefault(_top(k), []).append(k)
    return out


def _describe_model(model: nn.Module) -> str:
    return (
        f"{type(model).__name__} (embed_dim={getattr(model, 'embed_dim', '?')}, "
        f"depth={len(getattr(model, 'blocks', getattr(model, 'layers', [])))})"
    )


def _check_method_keys(model: nn.Module, sd: Mapping[str, Tensor], own: Mapping[str, Tensor], where: str) -> None:
    """Checkpoint keys of a reduction method's modules that the model does not hold: clear errors."""
    reduction = getattr(model, "reduction", None)
    chosen = reduction.name if reduction is not None else None
    for top, keys in _groups(k for k in sd if k not in own).items():
        owners = method_owners(top)
        if not owners:
            continue
        names = " / ".join(f"'{o}'" for o in owners)
        first = owners[0]
        if chosen is None or chosen == "none":
            if chosen is None:
                fix = (
                    f"apply the method first (apply_reduction(model, '{first}', ...)) and then load the weights; "
                    f"on the command line method={first}"
                )
            else:
                fix = f"use method={first} (with the settings it was trained with)"
            raise WeightsError(
                f"checkpoint {where} holds modules of method {names} ({top}.*, {len(keys)} keys) but the model is "
                f"{'not patched with any method' if chosen is None else 'patched with method none'}; {fix}"
            )
        if chosen not in owners:
            raise WeightsError(
                f"checkpoint {where} holds modules of method {names} ({top}.*) but method={chosen} was chosen; "
                f"use method={first} to evaluate or finetune it, or a checkpoint without {top}.* (e.g. its "
                "backbone weights) for method=" + chosen
            )
        if not isinstance(getattr(model, top, None), nn.Module):
            raise WeightsError(
                f"checkpoint {where} holds {top}.* of method '{chosen}', but this model's {reduction!r} does not "
                f"attach a '{top}' module; apply '{chosen}' with the settings the checkpoint was trained with"
            )


def _model_filter(model: nn.Module):
    """The key-conversion function of the model's own module (timm's convention: `checkpoint_filter_fn`
    next to the model class), e.g. timm's ViT (pos-embed resizing, legacy layouts) or STViT-R-Swin
    (official names -> this project's)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
        if callable(fn):
            return fn
    return None


def load_weights(
    model: nn.Module,
    weights: Union[str, os.PathLike, Mapping],
    strict: bool = True,
    ema: bool = False,
    fresh_modules: bool = False,
    source: Optional[str] = None,
) -> nn.Module:
    """Load `weights` (a path or a state dict) into `model`, adapting position embeddings and patch
    size the way timm does for its own checkpoints.

    Load into the model *after* `apply_reduction` when the checkpoint holds a method's modules (e.g.
    DynamicViT's ``score_predictor.*``). `ema`: take the checkpoint's EMA weights (``state_dict_ema`` /
    ``model_ema``). `fresh_modules`: modules of the model's reduction method that the checkpoint lacks
    entirely keep their initialisation (logged) instead of being an error. Raises WeightsError naming the
    missing, unexpected or mis-shaped keys and the fix."""
    where = source or (str(weights) if isinstance(weights, (str, os.PathLike)) else "(state dict)")
    if isinstance(weights, (str, os.PathLike)):
        sd = read_checkpoint(weights, ema=ema)
    else:
        sd = extract_state_dict(weights, where, ema=ema)
    sd = dict(sd)
    filter_fn = _model_filter(model)
    if filter_fn is not None:
        sd = filter_fn(sd, model)  # ViT: resizes pos_embed to the model's grid; leaves extras alone
    own = model.state_dict()
    if strict:
        _check_method_keys(model, sd, own, where)
    reduction = getattr(model, "reduction", None)
    method_tops = set(reduction.new_module_names()) if reduction is not None else set()

    ckpt_tops = {_top(k) for k in sd}
    missing = sorted(set(own) - set(sd))
    fresh = []
    if fresh_modules:
        for top, keys in _groups(k for k in missing if _top(k) in method_tops).items():
            if len(keys) == sum(1 for k in own if _top(k) == top):  # the whole module is absent: fresh
                fresh.append(top)
                for k in keys:
                    sd[k] = own[k]
        missing = sorted(set(own) - set(sd))
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    unexpected = sorted(set(sd) - set(own))
    if wrong_shape or (strict and (missing or unexpected)):
        lines = []
        if wrong_shape:
            lines.append("shape mismatch: " + "; ".join(wrong_shape[:5]))
        if strict and missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
        if strict and unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
        bad_tops = {_top(k) for k in missing + unexpected} | {_top(s.split(":")[0]) for s in wrong_shape}
        if bad_tops and bad_tops <= method_tops:
            absent = method_tops - ckpt_tops
            if {_top(k) for k in missing} <= absent and not unexpected and not wrong_shape:
                hint = (
                    f". The checkpoint has no weights for {', '.join(sorted(absent))} of method '{reduction.name}': "
                    "load it before applying the method, or pass fresh_modules=True (as model.checkpoint does) "
                    "to start them freshly initialised"
                )
            else:
                hint = (
                    f". Only modules of method '{reduction.name}' ({', '.join(sorted(bad_tops))}) differ: apply "
                    "it with the settings the checkpoint was trained with"
                )
        else:
            hint = ". Is it a checkpoint for another architecture? Pick the matching model=..."
        raise WeightsError(f"checkpoint {where} does not fit {_describe_model(model)}: " + " | ".join(lines) + hint)
    if fresh:
        log.info(
            "checkpoint %s has no weights for %s of method '%s': they start freshly initialised",
            where,
            ", ".join(f"{t}.*" for t in fresh),
            reduction.name,
        )
    model.load_state_dict(sd, strict=strict)
    return model


__all__ = ["EMA_KEYS", "WeightsError", "extract_state_dict", "load_weights", "method_owners", "read_checkpoint"]
