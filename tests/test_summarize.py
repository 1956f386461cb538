"""The sweep summary: Pareto front and files (end-to-end multirun coverage lives in the e2e tests)."""

import json

import pytest

from src.summarize import collect, pareto, summarize


def _rows():
    return [
        dict(method="a", gmacs=1.0, throughput=300, top1=90.0),
        dict(method="a", gmacs=2.0, throughput=200, top1=95.0),
        dict(method="b", gmacs=1.5, throughput=250, top1=89.0),  # dominated by a@1.0
        dict(method="b", gmacs=3.0, throughput=100, top1=96.0),
    ]


def test_pareto_front_by_gmacs_and_throughput():
    rows = _rows()
    assert [r["gmacs"] for r in pareto(rows, "gmacs")] == [1.0, 2.0, 3.0]
    assert [r["throughput"] for r in pareto(rows, "throughput", lower_is_better=False)] == [100, 200, 300]


def test_summarize_writes_table_csv_and_png(tmp_path):
    for i, r in enumerate(_rows()):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "summary.json").write_text(
            json.dumps(
                dict(
                    method=r["method"],
                    method_params="p",
                    student_gmacs=r["gmacs"],
                    student_throughput=r["throughput"],
                    student_val_top1=r["top1"],
                    teacher_val_top1=97.0,
                    teacher_gmacs=4.0,
                    teacher_throughput=80.0,
                )
            )
        )
    files = summarize(str(tmp_path))
    table = open(files["markdown"]).read()
    assert "| 1.500 | 250 | 89.00 | 97.00 |" in table and len(collect(tmp_path)) == 4
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        summarize(str(tmp_path))


def test_detection_sweep_is_summarised_by_box_map(tmp_path):
    """A multirun of task=detection runs: box mAP is the score (table, Pareto), mask mAP a column."""
    runs = [("none", 0.25, 0.9, 52.0, 22.4), ("tome", 0.14, 1.1, 50.1, 20.1), ("evit", 0.18, 1.0, 49.0, 19.0)]
    for i, (method, gmacs, speed, box, mask) in enumerate(runs):
        run = tmp_path / str(i)
        run.mkdir()
        summary = dict(task="detection", method=method, method_params="p", student_gmacs=gmacs)
        summary.update(student_throughput=speed, student_val_box_map=box, student_val_mask_map=mask)
        (run / "summary.json").write_text(json.dumps(summary))
    rows = collect(tmp_path)
    front = pareto(rows, "gmacs", score="box_map")
    assert [r["method"] for r in front] == ["tome", "none"]  # evit: more GMACs than tome, lower box AP
    files = summarize(str(tmp_path))
    table = open(files["markdown"]).read()
    assert "| box AP | mask AP |" in table and "| 0.140 | 1.1 | 50.10 | 20.10 |" in table
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
