"""Every checkpoint reloads, for every method, through every entry point.

Unit part (fast): official layouts made locally with random weights (DeiT, EViT, DynamicViT,
STViT-R-Swin classification), the mismatched-method errors, the EMA choice, files that
torch.load(weights_only=True) refuses.

End-to-end part (marker `slow`): one `train.py -m` multirun trains every method on the tiny quickstart
(one cached teacher for all), one `eval.py -m` multirun reloads each run's last.ckpt and must report
the same student val top-1. In this process (each script start-up costs ~10 s of CPU in imports):
STViT-R (recover=True) through the entry points' run(); official DynamicViT / EViT files cut from the
trained students; the EMA weights; visualize.py and bench.py run as scripts with a checkpoint that
holds DynamicViT's modules.
"""

import argparse
import json
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from src.models import REGISTRY, apply_reduction, load_weights
from src.models.backbone import build_model, create_backbone
from src.models.stvit_swin import STViTRSwin
from src.models.weights import WeightsError, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY_CFG = {
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "checkpoint": None,
    "num_classes": 10,
    "img_size": 16,
    "in_chans": 1,
    "drop_path_rate": 0.0,
    "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},
}
DYN = {"keep_rate": 0.7, "locations": [1, 2, 3]}


def tiny(**over):
    return {**TINY_CFG, **over}


def randomised(model, seed=3):
    """Every float tensor of `model` replaced by random values (so nothing equals a fresh init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                r = torch.randn(v.shape, generator=g) * 0.1
                v.copy_(r.abs() + 0.5 if k.endswith("running_var") else r)
    return model


def patched(method="dynamicvit", seed=0, **params):
    torch.manual_seed(seed)
    model = create_backbone(TINY_CFG)
    return apply_reduction(model, method, **(params or (DYN if method == "dynamicvit" else {})))


def images(n=4):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(7))


def assert_same_weights(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


# --- official layouts ------------------------------------------------------------------------------
def test_official_dynamicvit_file_loads_into_the_patched_model(tmp_path):
    """raoyongming/DynamicViT files: backbone + score_predictor.* nested under "model"."""
    sd = randomised(patched()).state_dict()
    assert any(k.startswith("score_predictor.") for k in sd)
    path = tmp_path / "dynamicvit-deit-official.pth"
    torch.save({"model": sd, "epoch": 29}, path)
    model = load_weights(patched(seed=1), path)
    assert_same_weights(model, sd)
    built, _ = build_model(tiny(checkpoint=str(path)), "dynamicvit", DYN)  # the entry points' path
    assert_same_weights(built, sd)
    with torch.no_grad():
        assert torch.equal(built.eval()(images()), model.eval()(images()))


def test_official_evit_and_deit_files_load(tmp_path):
    """EViT's released checkpoints are plain DeiT layouts in {"model": ...}: they load into an EViT
    model (no modules of its own) and into every method without modules."""
    sd = randomised(create_backbone(TINY_CFG)).state_dict()
    path = tmp_path / "evit-0.7-deit-s.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 29}, path)
    for method in ("evit", "tome", "none"):
        model, _ = build_model(tiny(checkpoint=str(path)), method)
        assert_same_weights(model, sd)
    assert_same_weights(load_weights(patched("evit", keep_rate=0.7, locations=[1, 2]), path), sd)


def test_deit_weights_start_the_methods_modules_fresh_and_say_so(tmp_path, caplog):
    """Finetuning DynamicViT from DeiT weights: the predictors are not in the file and start fresh."""
    sd = randomised(create_backbone(TINY_CFG)).state_dict()
    path = tmp_path / "deit.pth"
    torch.save({"model": sd}, path)
    with caplog.at_level(logging.INFO, logger="src.models.weights"):
        model, _ = build_model(tiny(checkpoint=str(path)), "dynamicvit", DYN)
    assert "score_predictor.*" in caplog.text and "freshly initialised" in caplog.text
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # a module only partly in the checkpoint is not "fresh": an error naming the key
    part = dict(randomised(patched()).state_dict())
    del part["score_predictor.1.out_conv.2.weight"]
    torch.save({"model": part}, path)
    with pytest.raises(WeightsError, match=r"score_predictor\.1\.out_conv\.2\.weight.*settings"):
        build_model(tiny(checkpoint=str(path)), "dynamicvit", DYN)
    # backbone keys stay strict
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.weight"}}, path)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): blocks\.0\.attn\.qkv\.weight"):
        build_model(tiny(checkpoint=str(path)), "dynamicvit", DYN)


def test_another_methods_modules_are_a_clear_error(tmp_path):
    path = tmp_path / "dyn.pth"
    torch.save({"model": randomised(patched()).state_dict()}, path)
    with pytest.raises(WeightsError) as info:
        build_model(tiny(checkpoint=str(path)), "tome", {"r": 1})
    msg = str(info.value)
    assert "'dynamicvit'" in msg and "score_predictor.*" in msg and "method=tome" in msg
    assert "use method=dynamicvit" in msg and str(path) in msg
    with pytest.raises(WeightsError, match="'dynamicvit'.*method none.*use method=dynamicvit"):
        build_model(tiny(checkpoint=str(path)), "none")
    # the bare model (no method applied): the same keys, and the fix is to apply the method first
    with pytest.raises(WeightsError, match=r"'dynamicvit'.*not patched.*apply_reduction\(model, 'dynamicvit'"):
        create_backbone(tiny(checkpoint=str(path)))
    with pytest.raises(WeightsError, match="apply the method first"):
        load_weights(create_backbone(TINY_CFG), path)
    # STViT's modules into a MSTM model: both methods named
    stvit = randomised(patched("stvit", block=1, pool_size=2, recover=True)).state_dict()
    with pytest.raises(WeightsError, match="method 'stvit' \\(stvit_centre.*method=mstm"):
        load_weights(patched("mstm", keep_rate=0.7, locations=[1, 2]), stvit)
    # same method, other settings: the module the checkpoint holds is not attached
    with pytest.raises(WeightsError, match="stvit_recover.*does not attach.*settings the checkpoint was trained with"):
        load_weights(patched("stvit", block=1, pool_size=2, recover=False), stvit)
    # unknown extra keys stay an error
    extra = {**create_backbone(TINY_CFG).state_dict(), "my_adapter.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match="unexpected keys \\(1\\): my_adapter.weight"):
        load_weights(patched("tome", r=1), extra)


# --- EMA ---------------------------------------------------------------------------------------------
def test_ema_weights_are_chosen_at_load_time(tmp_path):
    student = randomised(patched(), seed=1).state_dict()
    ema = randomised(patched(), seed=2).state_dict()
    ours = tmp_path / "last.ckpt"  # this project's Lightning layout
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in student.items()},
            "state_dict_ema": ema,
            "epoch": 0,
            "global_step": 2,
        },
        ours,
    )
    official = tmp_path / "official.pth"  # DeiT / DynamicViT: model + model_ema
    torch.save({"model": student, "model_ema": ema}, official)
    for path in (ours, official):
        assert_same_weights(load_weights(patched(), path), student)
        assert_same_weights(load_weights(patched(), path, ema=True), ema)
        model, _ = build_model(tiny(checkpoint=str(path), checkpoint_ema=True), "dynamicvit", DYN)
        assert_same_weights(model, ema)
    plain = tmp_path / "plain.pth"
    torch.save({"model": student, "epoch": 3}, plain)
    with pytest.raises(
        WeightsError, match=r"no 'state_dict_ema' / 'model_ema' entry; its top-level keys are \['epoch', 'model'\]"
    ):
        load_weights(patched(), plain, ema=True)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in student.items()}, str(st))
    with pytest.raises(WeightsError, match="safetensors.*no state_dict_ema"):
        read_checkpoint(st, ema=True)
    from src.models.backbone import BackboneError

    with pytest.raises(BackboneError, match="model.checkpoint is not set"):
        build_model(tiny(checkpoint_ema=True), "none")


# --- weights_only ------------------------------------------------------------------------------------
def test_pickled_python_objects_are_refused_with_a_safe_resave_recipe(tmp_path):
    sd = randomised(patched()).state_dict()
    path = tmp_path / "with_args.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, model="deit_small")}, path)
    with pytest.raises(WeightsError) as info:
        load_weights(patched(), path)
    msg = str(info.value)
    assert "argparse.Namespace" in msg and "weights_only=True" in msg and "never loaded unsafely" in msg
    assert "trust" in msg
    code = re.search(r'python -c "(.*?)" and pass (\S+) instead', msg)
    assert code, msg
    subprocess.run([sys.executable, "-c", code.group(1)], check=True, timeout=120)  # the user's one-liner
    resaved = Path(code.group(2))
    assert resaved.is_file() and resaved != path
    assert_same_weights(load_weights(patched(), resaved), sd)


# --- STViT-R-Swin official classification checkpoints ------------------------------------------------
def to_official(sd):
    """This project's STViT-R-Swin keys -> the official changsn/STViT-R layout (the inverse of
    stvit_swin.checkpoint_filter_fn), plus the persistent buffers the official files carry."""
    rules = [
        (r"^patch_embed\.proj\.0\.", "patch_embed.proj.0.c."),
        (r"^patch_embed\.proj\.1\.", "patch_embed.proj.0.bn."),
        (r"^patch_embed\.proj\.3\.", "patch_embed.proj.2.c."),
        (r"^patch_embed\.proj\.4\.", "patch_embed.proj.2.bn."),
        (r"^downsamples\.(\d+)\.", r"layers.\1.downsample."),
    ]
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.arange(49 * 49).reshape(49, 49)
    for i in (0, 1):
        out[f"layers.{i}.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    return out


def tiny_swin(seed):
    torch.manual_seed(seed)
    return STViTRSwin(num_classes=5, embed_dim=24, depths=(2, 2, 6, 2), num_heads=(1, 2, 3, 4), drop_path_rate=0.0)


def test_official_stvit_r_swin_checkpoint_loads_by_renaming_only(tmp_path):
    src = randomised(tiny_swin(0), seed=4).eval()
    official = to_official(src.state_dict())
    assert "patch_embed.proj.2.bn.running_var" in official and "layers.2.downsample.reduction.weight" in official
    assert not any(k.startswith("downsamples.") for k in official)
    path = tmp_path / "STViT-R-Swin-T.pth"
    torch.save({"model": official}, path)
    model = load_weights(tiny_swin(1), path).eval()  # strict
    assert_same_weights(model, src.state_dict())  # no tensor was changed (no Patch Merging permutation)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    cfg = dict(
        name="stvit_r_swin_tiny",
        pretrained=False,
        checkpoint=str(path),
        num_classes=5,
        img_size=224,
        in_chans=3,
        kwargs={"embed_dim": 24, "num_heads": [1, 2, 3, 4]},
    )
    built, _ = build_model(cfg, "none")
    assert_same_weights(built, src.state_dict())


def test_official_stvit_r_swin_golden_weights_reproduce_the_reference_logits():
    """The golden set's official classification layout (real key names of changsn/STViT-R) loads
    strictly and gives the reference's logits: the rename-only mapping is complete and correct."""
    from tests import golden

    root = golden.SHARED / "golden" / "stvit_r"
    golden.require_shared(root / "golden_io.py", "STViT-R golden files")
    sys.path.insert(0, str(root))
    try:
        import golden_io
    finally:
        sys.path.remove(str(root))
    man, where = golden_io.load_manifest(str(root / "manifest.json"), verify=False)
    case = next(c for c in man["cases"] if c["id"] == "cls_t_s0")
    sd = golden_io.case_state_dict(where, case)
    assert "patch_embed.proj.0.c.weight" in sd and "layers.0.downsample.reduction.weight" in sd
    model = load_weights(timm.create_model("stvit_r_swin_tiny"), sd).eval()
    from safetensors.torch import load_file

    gold = load_file(str(root / case["golden"]))
    with torch.no_grad():
        out = model(gold["in0.image"])
    ref = gold["in0.logits.float32"]
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))


# --- end to end: train.py -> eval.py for every method ------------------------------------------------
METHODS = ["none", *sorted(m for m in REGISTRY if m != "none")]  # every registered method
TINY = [
    "model.kwargs.embed_dim=32",
    "model.bootstrap.epochs=1",
    "model.bootstrap.warmup_epochs=0",
    "model.bootstrap.limit_train_batches=20",
    "data.max_shift=0",
    "data.val_per_class=20",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "profile.enabled=false",
    "ema.enabled=true",
    "ema.decay=0.5",
]
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def entry(script, work: Path, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=timeout,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def trained(work):
    """One train.py multirun, every method, one cached teacher; run folders named by method."""
    entry(
        "train.py",
        work,
        "-m",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={work / 'cache'}",
        f"hydra.sweep.dir={work / 'train'}",
        "hydra.sweep.subdir=${method.name}",
        *TINY,
        "method=" + ",".join(METHODS),
    )
    return work / "train"


@pytest.fixture(scope="module")
def evaluated(work, trained):
    """One eval.py multirun reloading each method's last.ckpt."""
    entry(
        "eval.py",
        work,
        "-m",
        f"paths.log_dir={work / 'logs'}",
        f"paths.cache_dir={work / 'cache'}",
        f"hydra.sweep.dir={work / 'eval'}",
        "hydra.sweep.subdir=${method.name}",
        *TINY,
        f"model.checkpoint={trained}/" + "${method.name}/checkpoints/last.ckpt",
        "method=" + ",".join(METHODS),
    )
    return work / "eval"


@pytest.fixture(scope="module")
def in_process(work):
    """run() of train.py / eval.py in this process (config composed as the entry points do)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from src.trainer.run import run

    def go(config, name, *overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                config,
                overrides=[f"paths.log_dir={work / 'logs'}", f"paths.cache_dir={work / 'cache'}", *TINY, *overrides],
                return_hydra_config=True,
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(work / "inproc" / name)
            del cfg.hydra
        return run(cfg)

    return go


def last_ckpt(run_dir: Path) -> Path:
    path = Path(summary(run_dir)["last_checkpoint"])
    assert path.is_file() and path == run_dir / "checkpoints" / "last.ckpt"
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reloads_through_eval(method, trained, evaluated):
    train_summary, eval_summary = summary(trained / method), summary(evaluated / method)
    assert train_summary["method"] == eval_summary["method"] == method
    assert eval_summary["train"] is False
    assert eval_summary["student_val_top1"] == train_summary["student_val_top1"], (train_summary, eval_summary)
    assert eval_summary["method_params"] == train_summary["method_params"]
    ckpt = torch.load(last_ckpt(trained / method), map_location="cpu", weights_only=True)
    students = {k[len("student.") :] for k in ckpt["state_dict"] if k.startswith("student.")}
    assert set(ckpt["state_dict_ema"]) == students  # EMA: plain student names, beside the student
    assert not any(k.startswith(("teacher.", "ema.")) for k in ckpt["state_dict"])


@pytest.mark.slow
def test_stvit_r_with_recovery_reloads(in_process, work):
    over = ["method=stvit", "method.params.recover=true"]
    trained = in_process("train", "stvit_r_train", *over)
    ckpt = Path(trained["last_checkpoint"])
    keys = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("student.stvit_recover.") for k in keys)
    evaluated = in_process("eval", "stvit_r_eval", *over, f"model.checkpoint={ckpt}")
    assert evaluated["student_val_top1"] == trained["student_val_top1"]


@pytest.mark.slow
def test_ema_weights_reload_through_eval(in_process, trained):
    train_summary = summary(trained / "dynamicvit")
    out = in_process(
        "eval",
        "ema_eval",
        "method=dynamicvit",
        f"model.checkpoint={last_ckpt(trained / 'dynamicvit')}",
        "model.checkpoint_ema=true",
        "ema.enabled=false",
    )
    assert out["student_val_top1"] == train_summary["ema_val_top1"]


@pytest.mark.slow
def test_official_layouts_cut_from_trained_students_evaluate_the_same(in_process, trained, work):
    """The trained DynamicViT / EViT students re-saved in the official repositories' layout
    ({"model": plain keys}) evaluate exactly as the Lightning checkpoints."""
    for method in ("dynamicvit", "evit"):
        sd = read_checkpoint(last_ckpt(trained / method))
        path = work / f"official_{method}.pth"
        torch.save({"model": sd, "epoch": 0}, path)
        assert any(k.startswith("score_predictor.") for k in sd) == (method == "dynamicvit")
        out = in_process("eval", f"official_{method}", f"method={method}", f"model.checkpoint={path}")
        assert out["student_val_top1"] == summary(trained / method)["student_val_top1"], method


@pytest.mark.slow
def test_mismatched_method_fails_before_any_work(in_process, trained):
    with pytest.raises(WeightsError, match="'dynamicvit'.*method=tome was chosen; use method=dynamicvit"):
        in_process("eval", "mismatch", "method=tome", f"model.checkpoint={last_ckpt(trained / 'dynamicvit')}")


def run_script(script: str, *args: str) -> None:
    """An entry-point script run in this process exactly as `python script args` (no second start-up)."""
    argv = sys.argv
    sys.argv = [str(ROOT / script), *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), f"{script} exited with {done.code}"
    finally:
        sys.argv = argv


@pytest.mark.slow
def test_visualize_and_bench_load_checkpoints_with_method_modules(trained, work, capsys):
    ckpt = last_ckpt(trained / "dynamicvit")
    model_over = ["model.kwargs.embed_dim=32", f"model.checkpoint={ckpt}"]
    out = work / "tokens.png"
    run_script("visualize.py", *model_over, "method=dynamicvit", f"out={out}")
    assert out.is_file() and "wrote" in capsys.readouterr().out
    bench_json = work / "bench.json"
    run_script(
        "bench.py",
        "model=quickstart",
        "method=dynamicvit",
        "batch=4",
        "iters=1",
        "rounds=1",
        "warmup=1",
        f"json={bench_json}",
        *model_over,
    )
    rows = {r["method"]: r for r in json.loads(bench_json.read_text())}
    assert {"none", "dynamicvit"} <= set(rows) and rows["dynamicvit"]["gmacs"] < rows["none"]["gmacs"]
