"""Grading benchmark (issue 6): seconds to grade one assignment with ``lecturekit grade``; target <= 60 s.

    python benchmarks/bench_grading.py [--repeat 2]

For each assignment: the solution (every cell runs, full marks) and the untouched assignment (every
exercise fails fast), each graded end to end in a fresh subprocess as ``lecturekit grade`` does
(pytest + nbval + a new kernel, one torch thread, LECTUREKIT_FAST=1). The overhead row grades a
notebook with one trivial exercise: the fixed cost of starting pytest, nbval and a kernel, so the
difference is what the assignment's own cells cost. Best of ``--repeat`` runs, measured alternately.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

os.environ.setdefault("LECTUREKIT_STANDIN", "1")

from lecturekit import grader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60.0


def trivial_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from lecturekit import grading"),
                nbformat.v4.new_code_cell("grading.exercise('trivial', points=1)\ngrading.check(True, '')")]
    path = folder / "trivial.ipynb"
    nbformat.write(nb, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one repeat (benchmarks/run.py --fast)")
    args = parser.parse_args()
    if args.quick:
        args.repeat = 1
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("overhead (one trivial exercise)", trivial_notebook(Path(tmp)))]
        for name in sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb")):
            cases += [(f"solutions/{name}", ROOT / "solutions" / name),
                      (f"assignments/{name}", ROOT / "assignments" / name)]
        best = {label: float("inf") for label, _ in cases}
        scores = {}
        for _ in range(args.repeat):
            for label, path in cases:
                start = time.perf_counter()
                report = grader.grade(path)
                best[label] = min(best[label], time.perf_counter() - start)
                scores[label] = f"{report.score:g}/{report.max_score:g}"
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, best of {args.repeat}")
    print(f"| {'notebook graded':45s} | {'score':>6s} | {'seconds':>7s} | target |")
    print(f"|{'-' * 47}|{'-' * 8}|{'-' * 9}|--------|")
    for label, _ in cases:
        ok = "" if label.startswith("overhead") else ("ok" if best[label] <= TARGET_S else "SLOW")
        print(f"| {label:45s} | {scores[label]:>6s} | {best[label]:7.1f} | {ok:6s} |")


if __name__ == "__main__":
    main()
