"""End-to-end: train.py as a subprocess with tiny settings, and the config errors through run().

The subprocess runs share one tmp folder per test module: the first trains a tiny quickstart teacher
(cached there), the second reuses the cache and resumes from the first run's checkpoint.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# debug=fast (conf/debug/fast.yaml: 2 teacher epochs without augmentation, 200 val images, 20 student
# steps, a short throughput measurement) on a width-32 quickstart model
TINY = ["debug=fast", "model.kwargs.embed_dim=32"]

# third-party lines a user of the project cannot act on: none may appear in a run's output
NOISE = [
    "💡",
    "litlogger",
    "litmodels",
    "module(s) in eval mode",
    "LeafSpec",
    "pin_memory",
    "Total FLOPs",
    "Loading `train_dataloader`",
    "TPU available",
    "┏━",
    "Trainable params",
    "set_vital",
    "Warning",
]


def train(tmp: Path, *overrides: str, env=None, name="run"):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={tmp / name}",
        *overrides,
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600, cwd=tmp)
    return proc, tmp / name


def metrics_rows(run_dir: Path, sub="csv"):
    with open(run_dir / sub / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows, key):
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return vals[-1] if vals else None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def first_run(workdir):
    proc, run_dir = train(workdir, *TINY, name="run1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_dir


def test_quickstart_trains_teacher_then_reduced_student(first_run, workdir):
    proc, run_dir = first_run
    out = proc.stdout + proc.stderr
    assert "Training the quickstart teacher" in out and "teacher: epoch 2/2" in out
    assert "Timing student and teacher side by side" in out and "student: epoch 1/1" in out
    # Lightning's lines go through Hydra's handlers once (the teacher's fit and the student's: two)
    assert out.count("GPU available: False") == 2, out.count("GPU available: False")
    for noise in NOISE:
        assert noise not in out, (noise, [line for line in out.splitlines() if noise in line])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "tome" and "r=[16, 12, 8, 4]" in summary["method_params"]
    assert summary["model_display_name"] == "digits ViT (quickstart)"
    assert summary["architecture"].startswith(
        "ViT 28x28x1 input, 4x4 patches -> 49 tokens + 1 prefix, width 32, 4 blocks"
    )
    # well above the 10% of chance on 10 digit classes
    assert summary["teacher_val_top1"] > 30.0 and summary["student_val_top1"] > 30.0
    assert 0 < summary["student_gmacs"] < summary["teacher_gmacs"]
    assert summary["student_throughput"] > 0 and summary["teacher_throughput"] > 0
    # the final table: teacher vs student top-1, GMACs, images/s and the ratios, then the run folder
    table = proc.stdout[proc.stdout.index("=== digits ViT (quickstart) + ToMe(") :]
    t, st = summary["teacher_val_top1"], summary["student_val_top1"]

    def row(*cells):  # a table row: the cells in order, separated by spaces
        return re.compile(" +".join(re.escape(c) for c in cells) + "\n")

    tput = [f"{summary[f'{who}_throughput']:,.0f}" for who in ("teacher", "student")]
    assert row("teacher (unreduced)", f"{t:.2f}%", f"{summary['teacher_gmacs']:.4g}", tput[0]).search(table), table
    assert row("student (tome)", f"{st:.2f}%", f"{summary['student_gmacs']:.4g}", tput[1]).search(table), table
    ratio = summary["student_throughput"] / summary["teacher_throughput"]
    gratio = summary["student_gmacs"] / summary["teacher_gmacs"]
    assert row("student vs teacher", f"{st - t:+.2f}", f"{gratio:.2f}x", f"{ratio:.2f}x").search(table), table
    assert f"run folder: {run_dir}   (summary.json, train.log, checkpoints/)" in table
    assert "last checkpoint: checkpoints/last.ckpt" in table
    rows = metrics_rows(run_dir)
    assert last_value(rows, "val/top1") == pytest.approx(summary["student_val_top1"], abs=1e-3)
    assert last_value(rows, "val/teacher_top1") == pytest.approx(summary["teacher_val_top1"], abs=1e-3)
    assert last_value(rows, "profile/student_gmacs") == pytest.approx(summary["student_gmacs"], rel=1e-6)
    assert last_value(rows, "train/loss_ce_epoch") > 0 and last_value(rows, "train/loss_distill_epoch") >= 0
    teacher_rows = metrics_rows(run_dir / "teacher")
    assert last_value(teacher_rows, "val/top1") == pytest.approx(summary["teacher_val_top1"], abs=0.5)
    assert len(list((workdir / "cache" / "teachers").glob("*.safetensors"))) == 1
    log_file = (run_dir / "train.log").read_text()  # the same filtered lines as the console
    assert "teacher: epoch 2/2" in log_file and not any(noise in log_file for noise in NOISE)


def test_checkpoint_has_no_teacher_and_reloads_with_load_weights(first_run):
    from src.models.backbone import create_backbone
    from src.models.weights import load_weights

    _, run_dir = first_run
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt_path = Path(summary["last_checkpoint"])
    assert ckpt_path.is_file() and Path(summary["best_checkpoint"]).is_file()
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("student.") for k in keys) and not any(k.startswith("teacher.") for k in keys)
    # the checkpoint says what it holds (save_hyperparameters, plain containers: weights_only reads them)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["kwargs"]["embed_dim"] == 32 and hp["model"]["display_name"] == "digits ViT (quickstart)"
    assert hp["method_config"] == {"name": "tome", "params": {"r": [10, -0.6], "prop_attn": True}}
    assert hp["reduction"]["method"] == "tome" and "r=[16, 12, 8, 4]" in hp["reduction"]["settings"]
    assert hp["optim"]["name"] == "adamw" and hp["distill"]["type"] == "soft" and hp["num_classes"] == 10
    cfg = hp["model"]  # enough to rebuild the model
    model = load_weights(create_backbone(cfg), ckpt_path)
    assert torch.equal(model.head.weight, ckpt["state_dict"]["student.head.weight"])


def test_second_run_reuses_teacher_and_resumes(first_run, workdir):
    _, run1 = first_run
    last = json.loads((run1 / "summary.json").read_text())["last_checkpoint"]
    proc, run_dir = train(
        workdir, *TINY, f"ckpt_path={last}", "trainer.max_epochs=2", "logger=tensorboard", name="run2"
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Reusing the cached quickstart teacher" in out and "Training the quickstart teacher" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 40  # resumed after epoch 0's 20 steps
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert summary["teacher_val_top1"] > 30.0


def test_compiled_student_trains_and_its_checkpoint_is_plain(first_run, workdir):
    """compile.enabled: the student and teacher run torch.compile'd graphs (aot_eager here: the same
    capture and autograd graphs inductor compiles, without generating C++); the run ends as the eager
    one does (same seeded recipe) and its checkpoint has the eager model's keys."""
    _, run1 = first_run
    proc, run_dir = train(workdir, *TINY, "compile.enabled=true", "compile.backend=aot_eager", name="compiled")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "torch.compile: student and teacher compiled (backend aot_eager" in out
    eager, compiled = (json.loads((d / "summary.json").read_text()) for d in (run1, run_dir))
    assert abs(compiled["student_val_top1"] - eager["student_val_top1"]) <= 1.0
    keys = [
        set(torch.load(s["last_checkpoint"], map_location="cpu", weights_only=True)["state_dict"])
        for s in (eager, compiled)
    ]
    assert keys[0] == keys[1]


def test_eval_only_with_wandb_offline(first_run, workdir):
    _, run1 = first_run
    last = json.loads((run1 / "summary.json").read_text())["last_checkpoint"]
    proc, run_dir = train(
        workdir,
        *TINY,
        "train=false",
        f"model.checkpoint={last}",
        "logger=wandb",
        "tags=[e2e_tag_one,e2e_tag_two]",
        name="run3",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"] is False and summary["student_val_top1"] > 30.0 and summary["best_checkpoint"] is None
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    for needle in (
        b"e2e_tag_one",
        b"e2e_tag_two",
        b"val/top1",
        b"val/teacher_top1",
        b"profile/student_gmacs",
        b"vit_tiny_patch16_224",
        b"bootstrap",
    ):  # tags, metrics, resolved config
        assert needle in blob, needle


def test_user_errors_are_one_clean_message(workdir):
    proc, _ = train(workdir, "method.params.r=-1", name="bad_r")
    assert proc.returncode == 2
    assert "r must be >= 0" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = train(workdir, "model=deit_s", "method=gtp", name="no_weights")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Hugging Face cache" in proc.stderr and "model.checkpoint=PATH" in proc.stderr


def test_unknown_option_gets_hydras_listing(workdir):
    proc, _ = train(workdir, "method=not_a_method", name="bad_group")
    assert proc.returncode != 0
    assert "Could not find 'method/not_a_method'" in proc.stderr and "Available options" in proc.stderr
    assert "tome" in proc.stderr


# --- config errors, in process (no subprocess start-up): raised before any training ------------------
@pytest.fixture
def compose(tmp_path, monkeypatch):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def make(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose(
                "train",
                overrides=[f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", *overrides],
                return_hydra_config=True,
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "out")
            del cfg.hydra
        return cfg

    return make


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["method.params.r=-1"], "ReductionConfigError", "r must be >= 0"),
        (["method.params.r=13"], "ReductionConfigError", "removes 52 tokens"),  # 49 patch tokens, 4 blocks
        (
            ["method=evit", "method.params.keep_rate=1.5", "method.params.locations=[1]"],
            "ReductionConfigError",
            "keep_rate",
        ),
        (
            ["method=evit", "method.params.keep_rate=0", "method.params.locations=[1]"],
            "ReductionConfigError",
            "keep_rate",
        ),
        (["model.img_size=30"], "BackboneError", "not divisible by the patch size"),
        (["data=imagenet", "model.num_classes=1000", "data.root=/no/such/imagenet"], "DataError", "/no/such/imagenet"),
        (["distill.type=kl"], "ConfigValueError", "distill.type=kl must be one of none, soft, hard"),
        (["ckpt_path=/no/such/last.ckpt"], "WeightsError", "ckpt_path=/no/such/last.ckpt"),
        (["data.val_per_class=500"], "ConfigValueError", "data.val_per_class=500 must be an integer between 1 and 499"),
        (["optim.frozen_params=[pos_embd]"], "ReductionConfigError", "'pos_embd' names no parameter"),
        # the token pictures (logger=wandb) need a ViT patched by apply_reduction: refused before any training
        (["model=stvit_swin_t", "method=none", "logger=wandb"], "ConfigValueError", "logger.token_images cannot draw"),
    ],
)
def test_config_errors_before_training(compose, overrides, error, match, tmp_path):
    from src.trainer.run import USER_ERRORS, run

    cfg = compose(*overrides)
    with pytest.raises(USER_ERRORS, match=match) as info:
        run(cfg)
    assert type(info.value).__name__ == error
    assert not (tmp_path / "cache" / "teachers").exists(), "a teacher was trained before the error"


def test_wandb_run_is_finished_when_training_fails(compose, tmp_path, monkeypatch):
    """run() closes its loggers however it ends: a failing fit leaves no W&B run open (a multirun's next
    job would otherwise log into it)."""
    import wandb

    from src.trainer.module import ReductionModule
    from src.trainer.run import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")

    monkeypatch.setattr(ReductionModule, "training_step", boom)
    cfg = compose(
        "logger=wandb",
        "logger.token_images.enabled=false",
        "model.bootstrap.enabled=false",
        "profile.enabled=false",
        "model.kwargs.embed_dim=32",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
    )
    with pytest.raises(RuntimeError, match="boom in training_step"):
        run(cfg)
    assert wandb.run is None
    assert len(list((tmp_path / "out" / "wandb").glob("offline-run-*"))) == 1


def test_checkpoint_for_another_architecture_is_refused(compose, tmp_path):
    from src.models.backbone import create_backbone
    from src.models.weights import WeightsError
    from src.trainer.run import run

    other = create_backbone({"name": "deit_tiny_patch16_224", "num_classes": 10})
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(WeightsError, match="another architecture"):
        run(compose(f"model.checkpoint={path}"))


def test_hparams_search_composes_for_optuna():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hparams_search=tome_r_optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "student_val_top1"
    assert "optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.params["method.params.r"] == "range(1, 4)"
    assert list(cfg.method.params.r) == [10, -0.6]  # the quickstart default stays until the sweeper overrides it
