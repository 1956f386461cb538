"""Shared pieces of the scale-out tests (DDP, sweeps, W&B, resume): tiny subprocess runs of train.py.

Every run uses the same tiny quickstart model and data, so the quickstart teacher (cached by a hash of
model + data + seed) is trained once per pytest session in `cache_dir(...)` and reused by every test.
990 validation digits (99 per class) so the DDP tests also cover a count that is not a round number.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.kwargs.embed_dim=32",
    "model.kwargs.depth=2",
    "model.bootstrap.epochs=2",
    "model.bootstrap.warmup_epochs=0",
    "data.max_shift=0",
    "data.val_per_class=99",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "profile.batch_size=16",
]

ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def cache_dir(tmp_path_factory) -> Path:
    """One teacher cache for the whole pytest session."""
    return tmp_path_factory.getbasetemp() / "scaleout_cache"


def train_cmd(run_dir: Path, cache: Path, *overrides: str, launcher=(sys.executable,)):
    return [
        *launcher,
        str(ROOT / "train.py"),
        f"paths.log_dir={run_dir.parent / 'logs'}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *TINY,
        *overrides,
    ]


def env(**extra):
    return {**os.environ, **ENV, **extra}


def train(run_dir: Path, cache: Path, *overrides: str, timeout=300, **extra_env):
    proc = subprocess.run(
        train_cmd(run_dir, cache, *overrides),
        capture_output=True,
        text=True,
        env=env(**extra_env),
        timeout=timeout,
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
