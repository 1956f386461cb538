"""Crash safety and exact resumption, with real train.py runs (tiny quickstart settings).

- Exact resumption: a run interrupted mid-epoch and resumed with `ckpt_path=last` ends with the
  uninterrupted run's student weights, optimizer and scheduler state, EMA weights, metrics.csv rows and
  summary.json (bit-identical on CPU): SIGKILLed once; and four times in one run: SIGTERM and SIGUSR1
  (SLURM's requeue signal), each of which saves last.ckpt and exits cleanly, and two SIGKILLs (one two
  steps after its checkpoint, so metrics rows after the checkpoint must go; one right after an
  epoch-end checkpoint, before the epoch's row is written). The runs train DynamicViT
  (Gumbel noise) with drop path, mixup/cutmix (numpy), random shifts and an EMA, so every source of
  randomness of a step takes part. The interruptions are sent by the run itself at a chosen step
  (TEST_SIGNAL_ENV, a test-only hook), so they are deterministic.
- A real run SIGKILLed from outside mid-epoch resumes from its step checkpoint, last-step.ckpt (same
  global step, optimizer and scheduler state, same W&B run id); the W&B offline run holds the config,
  metrics and token images, and never the API key.
"""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.trainer.callbacks import TEST_SIGNAL_ENV
from tests.scaleout import ROOT, env, train, train_cmd

pytestmark = pytest.mark.slow
FAKE_KEY = "fake0key0for0leak0test0" + "x" * 17  # 40 characters, like a real key
STEPS = 100  # limit_train_batches of these runs
CRASH_SAFE = [
    "callbacks=crash_safe",
    f"trainer.limit_train_batches={STEPS}",
    "callbacks.step_checkpoint.every_n_train_steps=5",
]
WANDB = ["logger=wandb", "logger.token_images.num_images=3"]

# exact resumption: 2 epochs of 6 steps; every random draw of a step in play
EXACT = [
    "profile.enabled=false",
    "callbacks=crash_safe",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.log_every_n_steps=1",
    "data.max_shift=2",
    "data.mixup.mixup_alpha=0.8",
    "data.mixup.cutmix_alpha=1.0",
    "method=dynamicvit",
    "method.params.locations=[1]",
    "model.drop_path_rate=0.1",
    "ema.enabled=true",
    "ema.decay=0.9",
]
FINAL_STEP = 12
# chain -> (checkpoint every n steps, interruptions: "N" = SIGKILL right after step N's checkpoints are
# written, "N:SIGTERM" / "N:SIGUSR1" = that signal at that point), then a run to the end
CHAINS = {
    "reference": (2, []),
    "killed_once": (2, ["4"]),  # right after the step-4 checkpoint, before step 4's metrics row is written
    # SIGTERM at step 2 (last.ckpt); SIGKILL 2 steps after the step-3 checkpoint (step 3's row, written,
    # must go); SIGKILL right after the epoch-0-end checkpoint, before the epoch's row is written;
    # SLURM's requeue signal at step 10
    "interrupted": (3, ["2:SIGTERM", "5", "6", "10:SIGUSR1"]),
}

# The runs are real train.py runs, forked from one warm process that has imported the project once
# (import and interpreter teardown are 2/3 of a tiny run's time on this 2-core machine). Each child
# runs train.py as __main__ with its own argv, environment, working folder and output file, and is
# killed / signalled like any process. OMP_NUM_THREADS=1 (tests/scaleout.py ENV): no OpenMP threads
# exist in the parent at fork time.
LAUNCHER = r"""
import json, os, runpy, select, sys, traceback
sys.path.insert(0, sys.argv[1])
import src.trainer.run, src.trainer.resume, hydra, lightning.pytorch  # noqa: F401  (imports only)
running, stdin_open, buffer, jobs = {}, True, b"", []
while running or stdin_open or jobs:
    if stdin_open and select.select([0], [], [], 0.05)[0]:
        data = os.read(0, 1 << 16)  # unbuffered: every line that arrived is taken
        stdin_open = bool(data)
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        jobs += [json.loads(line) for line in lines if line.strip()]
    while jobs:
        job = jobs.pop(0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1), os.dup2(fd, 2)
                os.chdir(job["cwd"])
                os.environ.update(job["env"])
                sys.argv = job["argv"]
                try:
                    runpy.run_path(job["argv"][0], run_name="__main__")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        running[pid] = job["id"]
    for pid in list(running):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(json.dumps({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@pytest.fixture(scope="module")
def warm_cache(scaleout_teacher_cache):
    """The session's cached quickstart teacher (trained by a plain run if no other test did)."""
    return scaleout_teacher_cache[0]


class Launcher:
    """Runs train.py jobs as children of one warm process (see LAUNCHER); several at a time."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=cwd,
        )
        self.n = 0

    def submit(self, argv, cwd: Path, out: Path, **extra_env) -> str:
        self.n += 1
        job = {"id": str(self.n), "argv": argv[1:], "cwd": str(cwd), "out": str(out), "env": extra_env}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return job["id"]

    def finished(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the launcher died"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def exact_runs(scaleout_teacher_cache, tmp_path_factory):
    """The chains of CHAINS side by side, each chain's runs one after the other: {name: {dir, outputs}}."""
    cache, teacher = scaleout_teacher_cache
    root = tmp_path_factory.mktemp("exact")
    launcher = Launcher(root)
    chains = {name: {"dir": root / name, "outputs": [], "next": 0} for name in CHAINS}
    jobs = {}

    def submit(name):
        every, interruptions = CHAINS[name]
        i = chains[name]["next"]
        spec = ([*interruptions, None])[i]
        overrides = [
            f"model.checkpoint={teacher}",
            *EXACT,
            f"callbacks.step_checkpoint.every_n_train_steps={every}",
            *(["ckpt_path=last"] if i else []),
        ]
        out = root / f"{name}-{i}.out"
        job = launcher.submit(
            train_cmd(chains[name]["dir"], cache, *overrides), root, out, **({TEST_SIGNAL_ENV: spec} if spec else {})
        )
        jobs[job] = (name, i, spec, out)

    try:
        for name in CHAINS:
            submit(name)
        while jobs:
            done = launcher.finished()
            name, i, spec, out = jobs.pop(done["id"])
            text = out.read_text()
            expected = -signal.SIGKILL if spec and ":" not in spec else 0
            assert done["rc"] == expected, f"{name} run {i} ({spec}): exit {done['rc']}\n{text[-4000:]}"
            chains[name]["outputs"].append(text)
            chains[name]["next"] = i + 1
            if i < len(CHAINS[name][1]):
                submit(name)
    finally:
        launcher.close()
    return chains


def _final(run_dir: Path) -> dict:
    """The last checkpoint of the run: the crash-safe callback's, written after the last epoch."""
    ckpt = torch.load(run_dir / "checkpoints" / "last-step.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == FINAL_STEP
    return ckpt


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def _metrics(run_dir: Path) -> list:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _check_exact(runs: dict, name: str) -> None:
    """`name` ends as the reference: weights, optimizer, scheduler, EMA, metrics.csv, summary.json."""
    ref_dir, run_dir = runs["reference"]["dir"], runs[name]["dir"]
    ref, got = _final(ref_dir), _final(run_dir)
    diff = _max_diff(ref["state_dict"], got["state_dict"])
    print(f"{name}: max |student weight difference| = {diff:.3g}")
    assert diff <= 1e-6, f"{name}: final student weights differ from the uninterrupted run's by up to {diff}"
    assert all(torch.equal(ref["state_dict"][k], got["state_dict"][k]) for k in ref["state_dict"])  # CPU: bit-identical
    opt_ref, opt_got = ref["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    for i in opt_ref:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_ref[i][key], opt_got[i][key]), (name, i, key)
    assert ref["lr_schedulers"] == got["lr_schedulers"]

    # metrics.csv: the same rows (steps, columns, values) in the same order; no step lost or repeated
    rows_ref, rows_got = _metrics(ref_dir), _metrics(run_dir)
    not_ema = (
        [[(k, v) for k, v in r.items() if "ema" not in k] for r in rows_ref],
        [[(k, v) for k, v in r.items() if "ema" not in k] for r in rows_got],
    )
    assert not_ema[0] == not_ema[1], f"{name}: metrics.csv differs from the uninterrupted run's"
    steps = [int(r["step"]) for r in rows_got if "train/loss_step" in r]
    assert steps == list(range(FINAL_STEP)), steps  # one training row per step
    summary_ref = json.loads((ref_dir / "summary.json").read_text())
    summary_got = json.loads((run_dir / "summary.json").read_text())
    paths = ("best_checkpoint", "last_checkpoint", "output_dir")
    assert {k: v for k, v in summary_ref.items() if k not in paths and "ema" not in k} == {
        k: v for k, v in summary_got.items() if k not in paths and "ema" not in k
    }

    ema_diff = _max_diff(ref["state_dict_ema"], got["state_dict_ema"])
    assert ema_diff == 0, f"{name}: EMA weights differ from the uninterrupted run's by up to {ema_diff:.3g}"
    assert rows_ref == rows_got, f"{name}: metrics.csv (EMA columns) differs from the uninterrupted run's"
    assert summary_ref["ema_val_top1"] == summary_got["ema_val_top1"]


def test_sigkill_mid_epoch_then_resume_ends_as_the_uninterrupted_run(exact_runs):
    outputs = exact_runs["killed_once"]["outputs"]
    assert "Restoring states from the checkpoint path at" in outputs[1] and "last-step.ckpt" in outputs[1]
    assert "dataloader is not resumable" not in outputs[1]  # Lightning's warning is gone
    _check_exact(exact_runs, "killed_once")


def test_interrupted_four_times_in_one_run_ends_as_the_uninterrupted_run(exact_runs):
    _, _, after_kill1, after_kill2, _ = exact_runs["interrupted"]["outputs"]  # the runs after the kills
    # the kill 2 steps after the step-3 checkpoint: step 3's row (written) goes, step 4 is done again
    assert "metrics.csv rewound to step 3" in after_kill1
    assert "(1 later rows of the interrupted run dropped)" in after_kill1
    assert "metrics.csv rewound to step 6" in after_kill2  # resumed from the epoch-0-end checkpoint
    _check_exact(exact_runs, "interrupted")


def test_metrics_rows_after_a_resume_are_neither_duplicated_nor_missing(exact_runs):
    ref_rows = _metrics(exact_runs["reference"]["dir"])
    for name in ("killed_once", "interrupted"):
        rows = _metrics(exact_runs[name]["dir"])
        keys = [(r["step"], tuple(sorted(k for k in r if k != "step"))) for r in rows]
        assert keys == [(r["step"], tuple(sorted(k for k in r if k != "step"))) for r in ref_rows], name
        assert len(set(keys)) == len(keys), name  # no (step, columns) row twice
        epochs = [r for r in rows if "train/loss_epoch" in r]  # the epoch rows, with the whole epoch's means
        assert [int(r["step"]) for r in epochs] == [5, 11] and all("train/lr" in r for r in epochs), name
        assert [r["train/loss_epoch"] for r in epochs] == [
            r["train/loss_epoch"] for r in ref_rows if "train/loss_epoch" in r
        ], name


def test_sigterm_and_slurm_requeue_signal_save_and_exit_cleanly(exact_runs):
    run_dir = exact_runs["interrupted"]["dir"]
    term, _, _, usr1, last_run = exact_runs["interrupted"]["outputs"]
    for out, name, step in ((term, "SIGTERM", 2), (usr1, "SIGUSR1", 10)):
        found = re.search(rf"{name}: saved (\S+) at global step (\d+)", out)
        assert found, out[-3000:]
        assert found.group(1) == str(run_dir / "checkpoints" / "last.ckpt") and int(found.group(2)) == step
    # the run after SIGUSR1 resumed from the checkpoint it wrote: optimizer, scheduler and data position
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in last_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def start(run_dir: Path, cache: Path, *overrides):
    return subprocess.Popen(
        train_cmd(run_dir, cache, *CRASH_SAFE, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(WANDB_API_KEY=FAKE_KEY),
        cwd=run_dir.parent,
    )


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
    for needle in (
        b"val/top1",
        b"val/top5",
        b"train/loss_ce",
        b"train/loss_distill",
        b"profile/student_gmacs",
        b"profile/student_throughput",
        b"summary/student_val_top1",
        b"bootstrap",
        b"dev",
    ):
        assert needle in blob, needle
    images = list(runs[-1].rglob("media/images/val/tokens_*.png"))
    assert len(images) == 3, images  # logger.token_images.num_images after the last epoch
    # the key (only in the environment) reaches no log, config or W&B file
    assert FAKE_KEY not in out
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert FAKE_KEY.encode() not in p.read_bytes(), p
