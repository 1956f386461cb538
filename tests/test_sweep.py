"""Sweeps: the sweep objective (GMACs budget, multi-objective list), a grid that composes, and a real
2-trial multi-objective Optuna multirun with W&B offline (one group per sweep) + summarize.py, whose
table / CSV / PNG must hold the runs' own summary.json numbers."""

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from src.models.reduction import ReductionConfigError
from src.trainer.objective import check_objective, objective
from tests.scaleout import ROOT, TINY, cache_dir, env, train_cmd

SUMMARY = {"student_val_top1": 90.0, "student_gmacs": 1.1, "teacher_gmacs": 2.0, "train": True}


def test_objective_single_list_and_budget():
    assert objective(SUMMARY, None) is None
    assert objective(SUMMARY, "student_val_top1") == 90.0
    assert objective(SUMMARY, ["student_val_top1", "student_gmacs"]) == [90.0, 1.1]
    assert objective(SUMMARY, "student_val_top1", {"gmacs": 1.1}) == 90.0  # at the budget: no penalty
    assert objective(SUMMARY, "student_val_top1", {"gmacs": 1.0, "penalty": 50}) == pytest.approx(90.0 - 5.0)
    # teacher_ratio 0.5 of 2.0 GMACs = 1.0 GMACs: 10% over -> 10 points at the default penalty
    assert objective(SUMMARY, "student_val_top1", {"teacher_ratio": 0.5}) == pytest.approx(80.0)
    assert objective(SUMMARY, "student_val_top1", {"teacher_ratio": 0.6}) == 90.0


@pytest.mark.parametrize(
    "metric,budget,match",
    [
        ("val_top1", None, "'val_top1' is not a number in summary.json; use one of"),
        ("student_val_top1", {"gmacs": 1.0, "teacher_ratio": 0.5}, "not both"),
        (["student_val_top1", "student_gmacs"], {"gmacs": 1.0}, "multi-objective"),
    ],
)
def test_objective_errors_name_the_fix(metric, budget, match):
    with pytest.raises(ReductionConfigError, match=match):
        objective(SUMMARY, metric, budget)


def test_objective_settings_checked_before_training():
    with pytest.raises(ReductionConfigError, match="list of >= 2 keys"):
        check_objective(["student_val_top1"], None)
    with pytest.raises(ReductionConfigError, match="budget.gmacs must be >= 0, got -1"):
        check_objective("student_val_top1", {"gmacs": -1})


@pytest.mark.parametrize("method", ["tome", "gtp"])
@pytest.mark.parametrize("gmacs", ["0.0009", "0.001"])
def test_equal_compute_grid_composes(method, gmacs):
    """Every cell of `-m method=tome,gtp schedule=flops schedule.gmacs=0.0009,0.001` builds (unreduced: 0.00117)."""
    from hydra import compose, initialize_config_dir

    from src.trainer.run import check_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"method={method}", "schedule=flops", f"schedule.gmacs={gmacs}"])
    check_config(cfg)


@pytest.mark.slow
def test_optuna_multi_objective_multirun_and_summary(tmp_path_factory):
    cache = cache_dir(tmp_path_factory)
    work = tmp_path_factory.mktemp("sweep")
    sweep = work / "multi_2trials"
    cmd = train_cmd(
        work / "unused",
        cache,
        "hparams_search=accuracy_gmacs_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
        "logger=wandb",
        "logger.token_images.enabled=false",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1"]

    # the sweeper got [top1, GMACs] from train.py: its Pareto set holds values of real runs
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    pairs = {(s["student_val_top1"], s["student_gmacs"]) for s in summaries.values()}
    assert results["solutions"] and all(tuple(t["values"]) in pairs for t in results["solutions"])

    # one W&B group per sweep: the multirun folder's name, in every run
    for job in summaries:
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        blob = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
        assert sweep.name.encode() in blob and b"val/top1" in blob

    proc = subprocess.run(
        [os.sys.executable, str(ROOT / "summarize.py"), str(sweep)], capture_output=True, text=True, cwd=ROOT, env=env()
    )
    assert proc.returncode == 0, proc.stderr
    with open(sweep / "summary.csv") as f:
        rows = {Path(r["dir"]).name: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["0", "1"]
    table = (sweep / "summary.md").read_text()
    for job, s in summaries.items():
        r = rows[job]
        assert float(r["top1"]) == s["student_val_top1"] and float(r["gmacs"]) == s["student_gmacs"]
        assert float(r["throughput"]) == s["student_throughput"] and r["method"] == "tome"
        assert f"| {s['student_val_top1']:.2f} | {s['teacher_val_top1']:.2f} |" in table
        assert f"| {s['student_gmacs']:.3g} |" in table
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (
        sweep / "pareto.png"
    ).stat().st_size > 5000


def test_sweep_and_cluster_configs_compose():
    """hparams_search configs, trainer=ddp and the SLURM launcher resolve to what the docs say."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        budget = compose("train", overrides=["hparams_search=gmacs_budget_optuna"], return_hydra_config=True)
        multi = compose("train", overrides=["hparams_search=accuracy_gmacs_optuna"], return_hydra_config=True)
        slurm = compose(
            "train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    assert budget.optimized_metric == "student_val_top1" and budget.budget.teacher_ratio == 0.85
    assert budget.hydra.sweeper.direction == "maximize" and "method.params.r" in budget.hydra.sweeper.params
    assert list(multi.optimized_metric) == ["student_val_top1", "student_gmacs"]
    assert list(multi.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert multi.hydra.sweeper.sampler._target_.endswith("NSGAIISampler") and multi.hydra.sweeper.sampler.seed == 1234
    check_objective(multi.optimized_metric, multi.get("budget"))
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert slurm.trainer.strategy == "ddp" and slurm.trainer.num_nodes == 2
