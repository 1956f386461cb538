"""bench.py as a user runs it (quickstart model, one round: seconds), its matrix, plot, JSON and export,
and its bad-input messages. Timings are printed, never asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = ("model=quickstart", "rounds=1", "iters=1", "warmup=1")


def run(*args, script="bench.py"):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_bench_prints_and_writes_the_table(tmp_path):
    """The common case: every registered method (default), eager, one table per batch size."""
    from src.models import REGISTRY

    out = tmp_path / "bench.json"
    proc = run(*FAST, "batch=1,4", f"json={out}")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["mode"] for r in rows} == {"eager", "best"} and {r["batch"] for r in rows} == {1, 4}
    eager = {r["method"]: r for r in rows if r["mode"] == "eager" and r["batch"] == 4}
    assert set(eager) == set(REGISTRY) and list(eager)[0] == "none"
    assert eager["none"]["speedup"] == 1.0 and eager["none"]["ideal_speedup"] == 1.0
    for name, r in eager.items():
        if name == "none":
            continue
        assert 0 < r["gmacs"] < eager["none"]["gmacs"] and r["images_per_s"] > 0
        assert abs(r["ideal_speedup"] - eager["none"]["gmacs"] / r["gmacs"]) < 1e-9
        assert r["speedup_min"] <= r["speedup_q1"] <= r["speedup"] <= r["speedup_q3"] <= r["speedup_max"]
        assert abs(r["fraction_of_ideal"] - r["speedup"] / r["ideal_speedup"]) < 1e-9
        assert r["precision"] == "32" and r["rounds"] == 1
    # GTP's semantic graph is counted apart (its paper leaves it out); the others have no side work
    assert eager["gtp"]["side_gmacs"] > 0 and eager["tome"]["side_gmacs"] == eager["evit"]["side_gmacs"] == 0
    assert "of ideal" in proc.stdout and "+side" in proc.stdout and "prop_attn=True" in eager["tome"]["params"]
    table = proc.stdout.split("batch=4")[1]
    assert all(f"\n{name} " in table for name in REGISTRY) and eager["tome"]["params"][:30] in table


def test_matrix_of_modes_with_plot(tmp_path):
    pytest.importorskip("onnxruntime")
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    # compile_backend=eager: the compile mode's plumbing without minutes of C++ compilation
    # onnx_optimize=false: no onnxscript optimiser pass (onnxruntime optimises at load): faster export
    proc = run(
        *FAST,
        "method=tome",
        "batch=2",
        "mode=eager,compile,onnx",
        "compile_backend=eager",
        "onnx_optimize=false",
        f"json={out}",
        f"plot={png}",
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    keys = {(r["mode"], r["method"]) for r in rows}
    for mode in ("eager", "compile", "onnx", "best"):
        assert {(mode, "none"), (mode, "tome")} <= keys
    onnx = [r for r in rows if r["mode"] == "onnx"]
    assert all(r["onnx_max_rel_diff"] <= 1e-4 and r["setup_s"] > 0 for r in onnx)
    best = [r for r in rows if r["mode"] == "best"]
    assert all(r["best_mode"] in ("eager", "compile", "onnx") for r in best)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "onnx img/s" in proc.stdout and "best img/s" in proc.stdout


def test_export_writes_a_checked_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    proc = run("model=quickstart", "method=evit", f"out={path}", "pretrained=false", script="export.py")
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_size > 0 and "onnxruntime matches PyTorch" in proc.stdout


def test_bench_bad_input_is_one_clear_line():
    proc = run("model=quickstart", "method=tome", "precision=fp8")
    assert proc.returncode == 2 and "precision='fp8'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "own,message",
    [
        ({"mode": "jit"}, "mode='jit'"),
        ({"method": "tomee"}, "tomee: unknown"),
        ({"batch": "0"}, "at least 1"),
        ({"batch": "a"}, "integers"),
        ({"precision": "32,fp8"}, "precision='fp8'"),
        ({"freeze": "maybe"}, "true or false"),
    ],
)
def test_settings_are_checked(own, message):
    from src.bench import parse_settings

    with pytest.raises(ValueError, match=message):
        parse_settings(own)
