"""docs/tutorial.md works: every fenced python and bash block of the page runs, in order, as a reader
would run it (from a fresh folder, with the repository's entry points), with tiny settings: the
training runs get debug=fast (conf/debug/fast.yaml), the benchmark a small batch. What each step
writes is checked; bench.py's output only for the method names (its format belongs to bench.py)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
pytestmark = pytest.mark.slow


def blocks(text: str):
    """(language, code) of every fenced ```python / ```bash block, in order (```text blocks are output)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.S | re.M)]


def tiny(command: str, tmp: Path) -> list:
    """A bash line of the tutorial as argv: the repository's scripts, tiny settings, the test's folders."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].endswith(".py"), command
    script = argv[1]
    argv = [sys.executable, str(ROOT / script), *argv[2:]]
    if script == "train.py":
        argv += ["debug=fast", f"paths.log_dir={tmp / 'logs'}", f"paths.cache_dir={tmp / 'cache'}"]
    elif script == "bench.py":
        argv = [re.sub(r"^batch=\d+$", "batch=8", a) for a in argv]
    return argv


def test_the_page_has_every_step():
    text = TUTORIAL.read_text()
    kinds = [lang for lang, _ in blocks(text)]
    assert kinds[0] == "python" and kinds.count("bash") >= 5
    for step in (
        "apply_reduction",
        "count_gmacs",
        "python bench.py",
        "python visualize.py",
        "schedule=flops",
        "python summarize.py",
        "pareto.png",
    ):
        assert step in text, step


def test_every_command_of_the_tutorial_runs(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    outputs = []
    for lang, code in blocks(TUTORIAL.read_text()):
        if lang == "python":
            commands = [[sys.executable, "-c", code]]
        else:
            lines = [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]
            commands = [tiny(line, tmp_path) for line in lines]
        for argv in commands:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
            assert proc.returncode == 0, (argv, proc.stdout[-3000:], proc.stderr[-3000:])
            outputs.append((argv, proc.stdout))

    (_, python_out), (_, quickstart_out), (_, bench_out), (_, visualize_out), (_, sweep_out), (_, summary_out) = outputs
    assert "tokens after each block: [184, 171," in python_out and "GMACs: 1.254 -> 0.735 (0.59x)" in python_out
    quickstart = tmp_path / "logs" / "tutorial" / "quickstart"
    assert "student vs teacher" in quickstart_out and f"run folder: {quickstart}" in quickstart_out
    assert (quickstart / "checkpoints" / "last.ckpt").is_file()
    assert all(m in bench_out for m in ("none", "tome", "evit"))
    assert (tmp_path / "tokens.png").is_file() and "wrote tokens.png" in visualize_out
    sweep = tmp_path / "logs" / "tutorial" / "sweep"
    assert len(list(sweep.glob("*/summary.json"))) == 4 and sweep_out.count("student vs teacher") == 4
    assert (sweep / "pareto.png").is_file() and "tome" in summary_out and "evit" in summary_out
