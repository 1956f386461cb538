"""Summarise a run or multirun directory of train.py into a table and a Pareto plot.

    python summarize.py multirun/2026-11-21/12-00-00 [out=DIR]

Writes summary.md (Markdown table), summary.csv and pareto.png (val top-1 against counted GMACs and
against measured throughput, Pareto front dashed) into the directory (or DIR), and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from src.summarize import summarize


def main(argv):
    if not argv or argv[0].startswith("out="):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("out=")), None)
    try:
        files = summarize(argv[0], out)
    except FileNotFoundError as err:
        print(f"summarize.py: {err}", file=sys.stderr)
        return 2
    print(Path(files["markdown"]).read_text())
    print("wrote " + ", ".join(files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
