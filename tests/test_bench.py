"""bench.py as a user runs it (quickstart model: fast), and its bad-input messages."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("model=quickstart", "method=tome,evit,gtp", "batch=4", "iters=1", "rounds=1", "warmup=1", f"json={out}")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["none", "tome", "evit", "gtp"]
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["ideal_speedup"] == 1.0
    for name in ("tome", "evit", "gtp"):
        r = rows[name]
        assert 0 < r["gmacs"] < rows["none"]["gmacs"] and r["images_per_s"] > 0
        assert abs(r["ideal_speedup"] - rows["none"]["gmacs"] / r["gmacs"]) < 1e-9
    # GTP's semantic graph is counted apart (its paper leaves it out); the others have no side work
    assert rows["gtp"]["side_gmacs"] > 0 and rows["tome"]["side_gmacs"] == rows["evit"]["side_gmacs"] == 0
    assert "of ideal" in proc.stdout and "+side" in proc.stdout and "r=2 prop_attn=True" in proc.stdout


def test_bench_bad_input_is_one_clear_line():
    proc = run("model=quickstart", "method=tome", "precision=fp8")
    assert proc.returncode == 2 and "precision='fp8'" in proc.stderr and "Traceback" not in proc.stderr
