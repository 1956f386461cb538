"""The benchmark behind bench.py: every method next to the unpatched model, as a matrix of batch sizes
x execution modes (eager PyTorch, torch.compile, onnxruntime) x precisions, timed side by side in one
run, with counted GMACs, the ideal speedup (GMACs ratio) and the measured one (median of per-round
ratios, with quartiles and extremes), JSON rows and a plot of measured against ideal speedup.

Also the user-facing ONNX export (`export_model`, behind bench.py ``export=PATH`` and export.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from .models import REGISTRY, remove_reduction
from .models.profile import (
    PRECISIONS,
    autocast_context,
    count_gmacs_split,
    count_params,
    ratio_stats,
    time_alternating,
)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BENCH_KEYS = {
    "model",
    "method",
    "batch",
    "precision",
    "device",
    "iters",
    "rounds",
    "warmup",
    "json",
    "threads",
    "mode",
    "plot",
    "export",
    "compile_mode",
    "compile_backend",
    "compile_dynamic",
    "freeze",
    "onnx_dir",
    "onnx_optimize",
    "check",
    "pretrained",
}
MODES = ("eager", "compile", "onnx")
_MODE_ALIASES = {
    "eager": "eager",
    "compile": "compile",
    "compiled": "compile",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "ort": "onnx",
}


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
        model_cfg,
        cfg.method.name,
        OmegaConf.to_container(cfg.method.params, resolve=True),
        OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else None,
        drop_method_modules=cfg.method.name == "none",
    )


def _short(params: Mapping) -> str:
    def fmt(v):
        if isinstance(v, list) and v and len(set(map(str, v))) == 1:
            return f"{v[0]}x{len(v)}"
        return str(v).replace(" ", "")

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def _list(value: Optional[str], default: str) -> List[str]:
    return [v.strip() for v in (value if value not in (None, "") else default).split(",") if v.strip()]


def _flag(value: Optional[str], default: bool) -> bool:
    if value in (None, ""):
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_settings(own: Mapping[str, str]) -> Dict[str, Any]:
    """The benchmark's own keys, checked (ValueError names the bad value and the choices)."""
    methods = _list(own.get("method"), ",".join(m for m in sorted(REGISTRY) if m != "none"))
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"method={','.join(unknown)}: unknown; available: {', '.join(sorted(REGISTRY))}")
    methods = [m for m in methods if m != "none"]  # the unpatched model is always timed
    try:
        batches = [int(b) for b in _list(own.get("batch"), "32")]
    except ValueError:
        raise ValueError(f"batch={own.get('batch')!r}: give batch sizes as integers, e.g. batch=1,32") from None
    if any(b < 1 for b in batches):
        raise ValueError(f"batch={own.get('batch')} must be at least 1")
    precisions = _list(own.get("precision"), "32")
    for prec in precisions:
        if prec not in PRECISIONS:
            raise ValueError(f"precision={prec!r}: choose 32, 16 or bf16 (several: precision=32,bf16)")
    modes = []
    for mode in _list(own.get("mode"), "eager"):
        if mode not in _MODE_ALIASES:
            raise ValueError(f"mode={mode!r}: choose eager, compile or onnx (several: mode=eager,compile,onnx)")
        if _MODE_ALIASES[mode] not in modes:
            modes.append(_MODE_ALIASES[mode])
    device = own.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine")
    rounds = own.get("rounds")
    return dict(
        methods=methods,
        batches=batches,
        precisions=precisions,
        modes=modes,
        device=device,
        iters=int(own.get("iters") or 1),
        rounds=None if rounds in (None, "") else int(rounds),
        warmup=int(own.get("warmup") or 2),
        threads=int(own["threads"]) if own.get("threads") else None,
        compile_mode=own.get("compile_mode") or None,
        freeze=_flag(own.get("freeze"), True),
        compile_backend=own.get("compile_backend") or "inductor",
        compile_dynamic=_flag(own.get("compile_dynamic"), False),
        onnx_dir=own.get("onnx_dir") or None,
        onnx_optimize=_flag(own.get("onnx_optimize"), True),
    )


def default_rounds(batch: int) -> int:
    """Rounds of one call each: many at small batches (a call is short), fewer at large ones."""
    return 30 if batch <= 4 else 12 if batch <= 32 else 8


# --- the models in each mode ----------------------------------------------------------------------------
def build_models(model_name: str, methods: Sequence[str], overrides: Sequence[str]):
    """{name: eval model} with "none" the unpatched timm model, {name: method params}, and the config."""
    base_cfg = compose_config([f"model={model_name}", "method=none", *overrides])
    models = {"none": remove_reduction(build_reduced(base_cfg)[0], drop_modules=True).eval()}
    params: Dict[str, Mapping] = {"none": {}}
    for m in methods:
        cfg = compose_config([f"model={model_name}", f"method={m}", *overrides])
        models[m], params[m] = build_reduced(cfg)
        models[m].eval()
    return models, params, base_cfg


class _Compiled:
    """A torch.compile'd deep copy of an eval model (src.models.compile.compile_model: fullgraph for a
    static token schedule), specialised on the batch size, or (`dynamic`) one copy for every batch size:
    torch.compile's automatic dynamic shapes then make the batch dimension symbolic at the second size
    (two graphs for any number of batch sizes instead of one each: less compilation, e.g. on a GPU)."""

    def __init__(
        self,
        model,
        compile_mode: Optional[str],
        freeze: bool,
        device: torch.device,
        backend: str,
        dynamic: bool = False,
    ):
        from .models.compile import compile_model

        self.model = copy.deepcopy(model)
        options = None
        if freeze and backend == "inductor" and compile_mode is None and device.type == "cpu":
            # inference-only graph: weights become constants (pre-packed for the CPU GEMM kernels)
            options = {"freezing": True}
        compile_model(
            self.model, mode=compile_mode, dynamic=None if dynamic else False, options=options, backend=backend
        )

    def __call__(self, x):
        return self.model(x)


class _OnnxRunner:
    """onnxruntime session of the model exported at one batch size (input given as a numpy array)."""

    def __init__(
        self, model, path: Path, example: torch.Tensor, threads: int, device: torch.device, optimize: bool = True
    ):
        from .models.export import export_onnx, onnx_session

        self.report = export_onnx(model, path, example=example, check=True, optimize=optimize)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = onnx_session(path, threads=threads, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.feed = {self.input: example.cpu().numpy()}

    def __call__(self, _x=None):
        return self.session.run(None, self.feed)


def _onnx_available(device: torch.device) -> Optional[str]:
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401
    except ImportError as err:
        return f"onnx mode needs onnxruntime and onnxscript ({err.name} is not installed)"
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); onnx mode skipped on cuda"
    return None


# --- the matrix ---------------------------------------------------------------------------------------
def run_benchmark(own: Mapping[str, str], overrides: Sequence[str]) -> List[Dict]:
    """Time every method and the unpatched model for every batch size, precision and mode; print one
    table per (batch, precision) and return one row per (batch, precision, mode, model), plus a "best"
    row per model (each side in its fastest mode)."""
    cfg = parse_settings(own)
    model_name = own.get("model", "deit_s")
    device = torch.device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    threads = torch.get_num_threads()
    modes = list(cfg["modes"])
    notes: List[str] = []
    if "onnx" in modes:
        why = _onnx_available(device)
        if why:
            notes.append(why)
            modes.remove("onnx")
    if not modes:
        raise ValueError("no mode left to time: " + "; ".join(notes))

    models, params, base_cfg = build_models(model_name, cfg["methods"], overrides)
    img, chans = int(base_cfg.model.img_size), int(base_cfg.model.in_chans)
    for m in models.values():
        m.to(device)
    counted = {name: count_gmacs_split(m, img, chans, device=device) for name, m in models.items()}
    static = {name: getattr(getattr(m, "reduction", None), "static_schedule", True) for name, m in models.items()}
    header = (
        f"model={model_name} ({base_cfg.model.name}) device={device} threads={threads} "
        f"load average {'/'.join(f'{v:.1f}' for v in os.getloadavg())} (1/5/15 min)"
    )
    print(header, flush=True)
    rows: List[Dict] = []
    onnx_dir = Path(cfg["onnx_dir"]) if cfg["onnx_dir"] else Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    compiled: Dict[str, _Compiled] = {}
    try:
        for batch in cfg["batches"]:
            x = torch.randn(batch, chans, img, img, device=device, generator=None)
            if not cfg["compile_dynamic"]:
                compiled = {}  # one graph per batch size
            for precision in cfg["precisions"]:
                runners: Dict[Tuple[str, str], Callable[[], Any]] = {}
                setup_s: Dict[Tuple[str, str], float] = {}
                extra: Dict[Tuple[str, str], Dict[str, Any]] = {}
                for mode in modes:
                    if mode == "onnx" and precision != "32":
                        notes.append(f"batch {batch} precision {precision}: onnx mode runs float32 only (skipped)")
                        continue
                    for name, model in models.items():
                        key = (mode, name)
                        start = time.perf_counter()
                        if mode == "eager":
                            runners[key] = lambda m=model, x=x: m(x)
                        elif mode == "compile":
                            if name not in compiled:
                                compiled[name] = _Compiled(
                                    model,
                                    cfg["compile_mode"],
                                    cfg["freeze"],
                                    device,
                                    cfg["compile_backend"],
                                    cfg["compile_dynamic"],
                                )
                            runners[key] = lambda c=compiled[name], x=x: c(x)
                        else:
                            if not static[name]:
                                notes.append(f"{name}: not exportable (dynamic token schedule), no onnx row")
                                continue
                            ort = _OnnxRunner(
                                model.cpu() if device.type == "cpu" else model,
                                onnx_dir / f"{name}_b{batch}.onnx",
                                x.cpu(),
                                threads,
                                device,
                                cfg["onnx_optimize"],
                            )
                            runners[key] = ort
                            extra[key] = {"onnx_max_rel_diff": ort.report.max_rel_diff, "export_s": ort.report.export_s}
                        setup_s[key] = time.perf_counter() - start
                rounds = cfg["rounds"] or default_rounds(batch)
                sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
                with torch.no_grad(), autocast_context(device, precision):
                    # the first warm-up call of a compiled model compiles it: count that apart
                    for key, fn in runners.items():
                        if key[0] == "compile":
                            start = time.perf_counter()
                            fn()
                            sync()
                            setup_s[key] += time.perf_counter() - start
                    times = time_alternating(
                        {f"{k[0]}/{k[1]}": fn for k, fn in runners.items()},
                        rounds=rounds,
                        iters=cfg["iters"],
                        warmup=cfg["warmup"],
                        sync=sync,
                    )
                times_by = {tuple(k.split("/", 1)): v for k, v in times.items()}
                rows += _rows_for(
                    model_name,
                    base_cfg,
                    batch,
                    precision,
                    device,
                    threads,
                    rounds,
                    cfg["iters"],
                    models,
                    params,
                    counted,
                    times_by,
                    setup_s,
                    extra,
                )
                _print_table(rows, batch, precision, modes)
    finally:
        if not cfg["onnx_dir"]:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"load average at the end {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    return rows


def _rows_for(
    model_name,
    base_cfg,
    batch,
    precision,
    device,
    threads,
    rounds,
    iters,
    models,
    params,
    counted,
    times,
    setup_s,
    extra,
) -> List[Dict]:
    rows = []
    gmacs = {name: c[0] for name, c in counted.items()}
    modes = list(dict.fromkeys(k[0] for k in times))

    def row(name, mode, t_method, t_none, **more):
        stats = ratio_stats(t_none, t_method)
        ideal = gmacs["none"] / gmacs[name]
        return dict(
            model=model_name,
            timm_name=str(base_cfg.model.name),
            method=name,
            params=_short(params[name]),
            params_m=count_params(models[name]) / 1e6,
            gmacs=gmacs[name],
            side_gmacs=counted[name][1],
            batch=batch,
            precision=precision,
            mode=mode,
            device=str(device),
            threads=threads,
            rounds=rounds,
            iters=iters,
            images_per_s=batch / statistics.median(t_method),
            speedup=stats["median"],
            speedup_q1=stats["q1"],
            speedup_q3=stats["q3"],
            speedup_min=stats["min"],
            speedup_max=stats["max"],
            ideal_speedup=ideal,
            fraction_of_ideal=stats["median"] / ideal,
            **more,
        )

    for mode in modes:
        for name in models:
            if (mode, name) not in times:
                continue
            rows.append(
                row(
                    name,
                    mode,
                    times[(mode, name)],
                    times[(mode, "none")],
                    setup_s=setup_s.get((mode, name)),
                    **extra.get((mode, name), {}),
                )
            )
    # each side in its fastest mode (by median time per call): the deployment comparison
    best_none = min((m for m in modes if (m, "none") in times), key=lambda m: statistics.median(times[(m, "none")]))
    for name in models:
        have = [m for m in modes if (m, name) in times]
        if not have:
            continue
        best = min(have, key=lambda m: statistics.median(times[(m, name)]))
        rows.append(
            row(name, "best", times[(best, name)], times[(best_none, "none")], best_mode=best, none_mode=best_none)
        )
    return rows


def _print_table(rows: List[Dict], batch: int, precision: str, modes: Sequence[str]) -> None:
    mine = [r for r in rows if r["batch"] == batch and r["precision"] == precision]
    shown = [m for m in modes if any(r["mode"] == m for r in mine)]
    if len(shown) > 1:
        shown.append("best")
    first = next(r for r in mine)
    print(
        f"\nbatch={batch} precision={precision} device={first['device']} threads={first['threads']} "
        f"rounds={first['rounds']}x{first['iters']} call(s); speedup = median of per-round ratios to the "
        f"unpatched model in the same mode [quartiles]; 'of ideal' = speedup / (GMACs ratio)"
    )
    head = f"{'method':<11}{'params':<34}{'GMACs':>7}{'+side':>7}{'ideal':>7}"
    for mode in shown:
        head += f" | {mode + ' img/s':>14}{'speedup [q1-q3]':>20}{'of ideal':>9}"
    print(head)
    for name in dict.fromkeys(r["method"] for r in mine):
        by_mode = {r["mode"]: r for r in mine if r["method"] == name}
        r0 = next(iter(by_mode.values()))
        line = (
            f"{name:<11}{r0['params'][:33]:<34}{r0['gmacs']:>7.3f}{r0['side_gmacs']:>7.3f}{r0['ideal_speedup']:>6.2f}x"
        )
        for mode in shown:
            r = by_mode.get(mode)
            if r is None:
                line += f" | {'-':>14}{'':>20}{'':>9}"
                continue
            label = f"{r['images_per_s']:.1f}" + (f" {r['best_mode'][0]}/{r['none_mode'][0]}" if mode == "best" else "")
            line += (
                f" | {label:>14}{r['speedup']:>7.2f}x [{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}]"
                f"{r['fraction_of_ideal']:>9.2f}"
            )
        print(line)
    print(flush=True)


# --- plot -----------------------------------------------------------------------------------------------
def plot_rows(rows: List[Dict], path: str) -> str:
    """Measured against ideal speedup, one panel per batch size (and precision), one marker per mode,
    quartile bars, the line of ideal speed and 0.9 of it. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["batch"], r["precision"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    markers = {"eager": "o", "compile": "s", "onnx": "^", "best": "*"}
    for ax, (batch, precision) in zip(axes[0], panels):
        mine = [r for r in rows if r["batch"] == batch and r["precision"] == precision and r["method"] != "none"]
        top = max([r["ideal_speedup"] for r in mine] + [r["speedup_q3"] for r in mine] + [1.5]) * 1.08
        ax.plot([1, top], [1, top], color="0.6", lw=1, label="ideal (GMACs ratio)")
        ax.plot([1, top], [0.9, 0.9 * top], color="0.6", lw=1, ls="--", label="0.9 of ideal")
        for mode in markers:
            pts = [r for r in mine if r["mode"] == mode]
            if not pts:
                continue
            ax.errorbar(
                [r["ideal_speedup"] for r in pts],
                [r["speedup"] for r in pts],
                yerr=[[r["speedup"] - r["speedup_q1"] for r in pts], [r["speedup_q3"] - r["speedup"] for r in pts]],
                fmt=markers[mode],
                ms=9 if mode == "best" else 6,
                capsize=2,
                label=mode,
                alpha=0.85,
            )
            if mode == ("best" if any(r["mode"] == "best" for r in mine) else pts[0]["mode"]):
                for r in pts:
                    ax.annotate(
                        r["method"],
                        (r["ideal_speedup"], r["speedup"]),
                        fontsize=8,
                        xytext=(4, -10),
                        textcoords="offset points",
                    )
        ax.set_title(f"{mine[0]['model'] if mine else ''} batch {batch}, precision {precision}")
        ax.set_xlabel("ideal speedup (GMACs ratio)")
        ax.set_ylabel("measured speedup (median round, quartiles)")
        ax.set_xlim(0.9, top)
        ax.set_ylim(0.5, top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(rows: List[Dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# --- ONNX export for users --------------------------------------------------------------------------------
def export_model(own: Mapping[str, str], overrides: Sequence[str]):
    """Write the model of the config (method, schedule, model.checkpoint ...) as ONNX and check it against
    PyTorch with onnxruntime (src.models.export.export_onnx). own: export (path), model, method,
    batch (one size), check (true/false). Returns the ExportReport."""
    from .models.export import export_onnx

    path = own.get("export") or "model.onnx"
    batches = _list(own.get("batch"), "1")
    if len(batches) != 1:
        raise ValueError(f"batch={own.get('batch')}: an ONNX file is exported for one batch size")
    methods = _list(own.get("method"), "none")
    if len(methods) != 1:
        raise ValueError(f"method={own.get('method')}: export one method at a time")
    cfg = compose_config([f"model={own.get('model', 'deit_s')}", f"method={methods[0]}", *overrides])
    # the config's weights (timm pretrained / model.checkpoint); pretrained=false: random (a quick check)
    model = build_reduced(cfg, pretrained=_flag(own.get("pretrained"), True))[0].eval()
    if own.get("threads"):
        torch.set_num_threads(int(own["threads"]))
    report = export_onnx(
        model,
        path,
        batch_size=int(batches[0]),
        img_size=int(cfg.model.img_size),
        in_chans=int(cfg.model.in_chans),
        check=_flag(own.get("check"), True),
    )
    print(report)
    return report
