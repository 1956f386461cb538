"""DDP on CPU (gloo): Lightning's own 2-process launch, and 2 "nodes" started by two torchrun
invocations meeting at 127.0.0.1. Validation top-1 under DDP must be the exact single-process value
(no sample counted twice through sampler padding, none missed), the checkpoint is written once, the
lr scales with the global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scaleout import ROOT, TINY, cache_dir, env, free_port, train, train_cmd

pytestmark = pytest.mark.slow
N_VAL = 990  # data.val_per_class=99 in TINY


# --- the sampler: an odd count over 2 ranks, in-process gloo ----------------------------------------
def _rank_counts(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from torchmetrics.classification import MulticlassAccuracy

    from src.trainer.distributed import unpadded_loader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    logits = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2, 0])]  # 7 samples; predicts 0,1,2,0,1,2,0
    labels = torch.tensor([0, 1, 1, 0, 2, 2, 1])  # correct: 0, 1, 3, 5 -> 4 of 7
    data = TensorDataset(logits, labels)
    loaders = {
        "unpadded": unpadded_loader(DataLoader(data, batch_size=2)),
        # what Lightning injects for validation without the fix
        "padded": DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False)),
    }
    results = {}
    for name, loader in loaders.items():
        acc = MulticlassAccuracy(num_classes=3, average="micro")
        seen = 0
        for x, y in loader:
            acc.update(x, y)
            seen += len(y)
        total = torch.tensor([seen])
        dist.all_reduce(total)
        results[name] = {"acc": float(acc.compute()), "seen": int(total)}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_unpadded_validation_counts_each_sample_once(tmp_path):
    out = tmp_path / "result.json"
    torch.multiprocessing.spawn(_rank_counts, args=(2, free_port(), str(out)), nprocs=2)
    result = json.loads(out.read_text())
    assert result["unpadded"]["seen"] == 7 and result["unpadded"]["acc"] == pytest.approx(4 / 7, abs=1e-6)
    # the padded sampler repeats sample 0 (a correct one): 5 of 8, the bug this guards against
    assert result["padded"]["seen"] == 8 and result["padded"]["acc"] == pytest.approx(5 / 8, abs=1e-6)


# --- real runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process reference run (also trains the session's cached teacher)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "single"
    train(run_dir, cache_dir(tmp_path_factory))
    return json.loads((run_dir / "summary.json").read_text())


def composed(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


def evaluate_checkpoint(ckpt: str, cache: Path):
    """(correct, total) of the checkpoint's reduced student on all validation digits, in this process."""
    from src.trainer.run import build_datamodule, build_module

    cfg = composed(f"model.checkpoint={ckpt}", f"paths.cache_dir={cache}")
    module = build_module(cfg).eval()
    dm = build_datamodule(cfg)
    dm.setup()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            correct += int((module.student(x).argmax(-1) == y).sum())
            total += len(y)
    return correct, total


def check_ddp_run(run_dir: Path, out: str, single: dict, cache: Path, world: int, accumulate: int):
    assert out.count("student vs teacher") == 1, "only the global rank 0 prints / writes the summary"
    assert "find_unused_parameters" not in out and "unused parameters" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    # the frozen teacher saw the same 990 images: exactly the single-process value
    assert summary["teacher_val_top1"] == single["teacher_val_top1"]
    correct, total = evaluate_checkpoint(summary["last_checkpoint"], cache)
    assert total == N_VAL
    assert summary["student_val_top1"] == pytest.approx(100.0 * correct / N_VAL, abs=1e-4)
    # the checkpoint is written once (by rank 0), nothing per rank: best + last of the epoch callback and
    # the crash-safe step callback's last-step (ckpt_path=last resumes from the newest)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best-epoch000.ckpt",
        "last-step.ckpt",
        "last.ckpt",
    ]
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 // accumulate  # limit_train_batches=4 per rank
    # optim.lr is for optim.lr_base_batch images: scaled by world x per-device batch x accumulation
    cfg = composed()
    assert cfg.data.batch_size == 32 and cfg.optim.lr_base_batch == 512
    expected_lr = cfg.optim.lr * world * 32 * accumulate / 512
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(expected_lr, rel=1e-9)
    return summary


def test_ddp_two_processes_on_cpu(single, tmp_path_factory):
    cache = cache_dir(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("ddp2") / "run"
    proc = train(run_dir, cache, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    out = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in out and "All distributed processes registered. Starting with 2" in out
    check_ddp_run(run_dir, out, single, cache, world=2, accumulate=1)


def test_two_nodes_via_torchrun_rendezvous(single, tmp_path_factory):
    """Two torchrun invocations, one process each, --nnodes 2 --node-rank 0/1 on 127.0.0.1."""
    cache = cache_dir(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("nodes") / "run"
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = (
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
        )
        cmd = train_cmd(
            run_dir,
            cache,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.num_nodes=2",
            "trainer.accumulate_grad_batches=2",
            launcher=launcher,
        )
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=run_dir.parent
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "All distributed processes registered. Starting with 2" in outs[0]
    check_ddp_run(run_dir, outs[0] + outs[1], single, cache, world=2, accumulate=2)
