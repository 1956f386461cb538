"""Summarise a sweep: every run's summary.json -> a table (Markdown + CSV) and a Pareto plot PNG of
the score against GMACs and against throughput. The score is validation top-1 for classification runs
and box mAP for a sweep of task=detection runs (mask mAP as a column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional

COLUMNS = ["run", "method", "schedule", "params", "gmacs", "throughput", "top1", "teacher_top1"]


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return run_dir.name
    import yaml

    return " ".join(yaml.safe_load(path.read_text()) or []) or "(defaults)"


def _schedule(run_dir: Path) -> str:
    """The run's token schedule from its saved Hydra config, e.g. "flops gmacs=3.0" ("" for none)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return ""
    import yaml

    node = (yaml.safe_load(path.read_text()) or {}).get("schedule") or {}
    return " ".join([str(node.get("name", ""))] + [f"{k}={v}" for k, v in node.items() if k != "name"]).strip()


def collect(root: Path) -> List[Dict]:
    """One row per run below `root` that finished and wrote summary.json."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        rows.append(
            dict(
                run=_overrides(path.parent),
                dir=str(path.parent),
                method=s.get("method"),
                schedule=_schedule(path.parent),
                params=s.get("method_params", ""),
                gmacs=s.get("student_gmacs"),
                throughput=s.get("student_throughput"),
                top1=s.get("student_val_top1"),
                teacher_top1=s.get("teacher_val_top1"),
                box_map=s.get("student_val_box_map"),
                mask_map=s.get("student_val_mask_map"),
                teacher_gmacs=s.get("teacher_gmacs"),
                teacher_throughput=s.get("teacher_throughput"),
            )
        )
    if not rows:
        raise FileNotFoundError(f"no summary.json below {root}: is it a run or multirun directory of train.py?")
    return rows


def score_key(rows: List[Dict]) -> str:
    """ "top1", or "box_map" for a sweep of detection runs only (no run has a top-1)."""
    detection = all(r.get("top1") is None for r in rows) and any(r.get("box_map") is not None for r in rows)
    return "box_map" if detection else "top1"


def pareto(rows: List[Dict], cost: str, lower_is_better: bool = True, score: str = "top1") -> List[Dict]:
    """Runs not dominated in (score higher, cost lower/higher), sorted by cost."""
    pts = [r for r in rows if r.get(cost) is not None and r.get(score) is not None]
    sign = 1 if lower_is_better else -1
    front = [
        r
        for r in pts
        if not any(
            o is not r
            and sign * o[cost] <= sign * r[cost]
            and o[score] >= r[score]
            and (sign * o[cost] < sign * r[cost] or o[score] > r[score])
            for o in pts
        )
    ]
    return sorted(front, key=lambda r: r[cost])


def markdown(rows: List[Dict]) -> str:
    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    detection = score_key(rows) == "box_map"
    scores = ("box_map", "mask_map") if detection else ("top1", "teacher_top1")
    titles = (
        "backbone GMACs | img/s | box AP | mask AP" if detection else "GMACs | img/s | top-1 (%) | teacher top-1 (%)"
    )
    lines = [f"| run | method | schedule | {titles} |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] or "", -(r["gmacs"] or 0))):
        speed = fmt(r["throughput"], ".0f" if (r["throughput"] or 0) >= 100 else ".3g")
        lines.append(
            f"| {r['run']} | {r['method']} | {r.get('schedule', '')} | "
            f"{fmt(r['gmacs'], '.3f' if (r['gmacs'] or 0) >= 0.1 else '.3g')} | {speed} | "
            + " | ".join(fmt(r.get(k), ".2f") for k in scores)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = score_key(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label, lower in (
        (axes[0], "gmacs", "GMACs (counted)", True),
        (axes[1], "throughput", "throughput (img/s, measured)", False),
    ):
        methods = sorted({r["method"] for r in rows})
        for m in methods:
            pts = sorted(
                (r for r in rows if r["method"] == m and r.get(cost) is not None and r.get(score) is not None),
                key=lambda r: r[cost],
            )
            ax.plot([r[cost] for r in pts], [r[score] for r in pts], "o-", label=m, alpha=0.8)
        front = pareto(rows, cost, lower, score)
        ax.plot([r[cost] for r in front], [r[score] for r in front], "k--", lw=1, label="Pareto front")
        teachers = [r for r in rows if r.get(f"teacher_{cost}") is not None and r.get("teacher_top1") is not None]
        if teachers:
            ax.plot(
                [teachers[0][f"teacher_{cost}"]],
                [teachers[0]["teacher_top1"]],
                "k*",
                ms=12,
                label="teacher (unreduced)",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("val box mAP" if score == "box_map" else "val top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(root: str, out: Optional[str] = None) -> Dict[str, str]:
    root_path = Path(root)
    rows = collect(root_path)
    out_dir = Path(out) if out else root_path
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out_dir / "summary.md", "csv": out_dir / "summary.csv", "plot": out_dir / "pareto.png"}
    files["markdown"].write_text(markdown(rows))
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, files["plot"])
    return {k: str(v) for k, v in files.items()}
