"""Crash-safe training with W&B offline: a real run SIGKILLed mid-epoch resumes from its step
checkpoint, last-step.ckpt (same global step, optimizer and scheduler state, same W&B run id); a SIGTERM (what SLURM
sends before preemption) writes last.ckpt before the process exits; the W&B offline run holds the
config, metrics and token images, and never the API key."""
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.scaleout import cache_dir, env, train, train_cmd

pytestmark = pytest.mark.slow
FAKE_KEY = "fake0key0for0leak0test0" + "x" * 17  # 40 characters, like a real key
STEPS = 100  # limit_train_batches of these runs
CRASH_SAFE = ["callbacks=crash_safe", f"trainer.limit_train_batches={STEPS}",
              "callbacks.step_checkpoint.every_n_train_steps=5"]
WANDB = ["logger=wandb", "logger.token_images.num_images=3"]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """The session's cached quickstart teacher (trained by a plain run if no other test did)."""
    cache = cache_dir(tmp_path_factory)
    if not list(cache.glob("teachers/*.safetensors")):
        train(tmp_path_factory.mktemp("warm") / "run", cache, "profile.enabled=false")
    return cache


def start(run_dir: Path, cache: Path, *overrides):
    return subprocess.Popen(train_cmd(run_dir, cache, *CRASH_SAFE, *overrides), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env(WANDB_API_KEY=FAKE_KEY), cwd=run_dir.parent)


def wait_for(path: Path, proc, timeout=120):
    end = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n" + proc.stdout.read()[-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_epoch_then_resume_same_step_optimizer_and_wandb_run(warm_cache, tmp_path):
    run_dir = tmp_path / "run"
    step_ckpt, last = run_dir / "checkpoints" / "last-step.ckpt", run_dir / "checkpoints" / "last.ckpt"
    proc = start(run_dir, warm_cache, *WANDB)
    wait_for(step_ckpt, proc)
    time.sleep(0.3)  # let the first write finish (it is not atomic)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed = torch.load(step_ckpt, map_location="cpu", weights_only=True)
    step = killed["global_step"]
    assert 0 < step < STEPS and step % 5 == 0, step  # a mid-epoch step checkpoint
    assert not last.exists() and not (run_dir / "summary.json").exists()
    run_id = (run_dir / "wandb_run_id").read_text().strip()

    proc = train(run_dir, warm_cache, *CRASH_SAFE, *WANDB, "ckpt_path=last", WANDB_API_KEY=FAKE_KEY)
    out = proc.stdout + proc.stderr
    assert f"Restoring states from the checkpoint path at {step_ckpt}" in out
    final = torch.load(last, map_location="cpu", weights_only=True)  # the epoch end's
    assert final["global_step"] == STEPS  # continued from `step`, not restarted
    # AdamW's own step counters ran on from the killed run's: restored, not re-initialised
    adam_steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    killed_steps = {float(s["step"]) for s in killed["optimizer_states"][0]["state"].values()}
    assert killed_steps == {float(step)} and adam_steps == {float(STEPS)}
    assert final["lr_schedulers"] and set(final["lr_schedulers"][0]) == set(killed["lr_schedulers"][0])

    # W&B (offline): both processes wrote to the same run id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    blob = b"".join(p.read_bytes() for p in runs[-1].rglob("*") if p.is_file())
    for needle in (b"val/top1", b"val/top5", b"train/loss_ce", b"train/loss_distill", b"profile/student_gmacs",
                   b"profile/student_throughput", b"summary/student_val_top1", b"bootstrap", b"dev"):
        assert needle in blob, needle
    images = list(runs[-1].rglob("media/images/val/tokens_*.png"))
    assert len(images) == 3, images  # logger.token_images.num_images after the last epoch
    # the key (only in the environment) reaches no log, config or W&B file
    assert FAKE_KEY not in out
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert FAKE_KEY.encode() not in p.read_bytes(), p


def test_sigterm_saves_last_checkpoint_first(warm_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, warm_cache, "trainer.max_epochs=3")
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(last.with_name("last-step.ckpt"), proc)  # training runs (first step checkpoint, step 5)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    found = re.search(r"SIGTERM: saved (\S+) at global step (\d+)", out)
    assert found, out[-3000:]
    assert found.group(1) == str(last)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == int(found.group(2)) and 5 <= ckpt["global_step"] < 3 * STEPS
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert not (run_dir / "summary.json").exists()  # stopped, not finished
