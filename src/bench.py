"""The benchmark behind bench.py: params, counted GMACs and measured images/s of each method next to
the unpatched model, with measured and ideal (GMACs ratio) speedups."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .models import apply_reduction
from .models.backbone import create_backbone
from .models.profile import count_gmacs_split, count_params, measure_throughput
from .models.reduction.schedules import resolve_params

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BENCH_KEYS = {"model", "method", "batch", "precision", "device", "iters", "rounds", "warmup", "json", "threads"}


def compose_config(overrides: Sequence[str]):
    """The training config for `overrides`, composed from conf/ exactly as train.py would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def build_reduced(cfg, pretrained: bool = False):
    """The model of cfg.model with cfg.method applied, through build_model (bare model -> method ->
    weights). Weights: model.checkpoint when set (loaded into the patched model, so a method's
    modules load with it; with method none, the unreduced reference, only its backbone); else timm's
    pretrained weights when `pretrained`; else random."""
    from .models.backbone import build_model

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not pretrained:
        model_cfg["pretrained"] = False  # an explicit model.checkpoint is still loaded
    return build_model(
        model_cfg, cfg.method.name, OmegaConf.to_container(cfg.method.params, resolve=True),
        OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else None,
        drop_method_modules=cfg.method.name == "none",
    )


def _short(params: Mapping) -> str:
    def fmt(v):
        if isinstance(v, list) and v and len(set(map(str, v))) == 1:
            return f"{v[0]}x{len(v)}"
        return str(v).replace(" ", "")
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def run_benchmark(own: Mapping[str, str], overrides: Sequence[str]) -> List[Dict]:
    model_name = own.get("model", "deit_s")
    methods = [m for m in own.get("method", "tome,evit,gtp").split(",") if m]
    batch = int(own.get("batch", 32))
    precision = own.get("precision", "32")
    device = own.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    if own.get("threads"):
        torch.set_num_threads(int(own["threads"]))
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if precision not in ("32", "16", "bf16"):
        raise ValueError(f"precision={precision!r}: choose 32, 16 or bf16")

    base_cfg = compose_config([f"model={model_name}", "method=none", *overrides])
    img = int(base_cfg.model.img_size)
    chans = int(base_cfg.model.in_chans)
    models = {"none": build_reduced(base_cfg)[0]}
    params = {"none": {}}
    for m in methods:
        cfg = compose_config([f"model={model_name}", f"method={m}", *overrides])
        models[m], params[m] = build_reduced(cfg)
    for m in models.values():
        m.to(device)

    counted = {name: count_gmacs_split(m, img, chans, device=device) for name, m in models.items()}
    gmacs = {name: c[0] for name, c in counted.items()}
    speed = measure_throughput(
        models, batch_size=batch, img_size=img, in_chans=chans, device=device, precision=precision,
        warmup=int(own.get("warmup", 3)), iters=int(own.get("iters", 3)), rounds=int(own.get("rounds", 8)),
    )
    rows = []
    for name, m in models.items():
        measured = speed[name] / speed["none"]
        ideal = gmacs["none"] / gmacs[name]
        rows.append(dict(
            method=name, params=_short(params[name]), params_m=count_params(m) / 1e6, gmacs=gmacs[name],
            side_gmacs=counted[name][1],
            images_per_s=speed[name], speedup=measured, ideal_speedup=ideal, fraction_of_ideal=measured / ideal,
        ))
    print(f"model={model_name} ({base_cfg.model.name}) batch={batch} precision={precision} device={device} "
          f"threads={torch.get_num_threads()}")
    print(f"{'method':<11}{'params':<44}{'Mparams':>8}{'GMACs':>10}{'+side':>9}{'img/s':>9}{'speedup':>9}{'ideal':>7}{'of ideal':>9}")
    for r in rows:
        print(f"{r['method']:<11}{r['params'][:43]:<44}{r['params_m']:>8.2f}{r['gmacs']:>10.4g}{r['side_gmacs']:>9.2g}{r['images_per_s']:>9.1f}"
              f"{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x{r['fraction_of_ideal']:>9.2f}")
    return rows
