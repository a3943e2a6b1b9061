"""Grading benchmark (issues 6 and 14): seconds to grade one assignment, and a folder of 30, in the sandbox.

    python benchmarks/bench_grading.py [--repeat 1] [--folder 30] [--jobs 2]

Targets: one assignment graded end to end (the answer key built from the solution in the grader's
process, then the submission run in a fresh bubblewrap sandbox and kernel, one torch thread,
``LECTUREKIT_FAST=1``) in at most 60 s; a folder of 30 submissions of assignment 1 with ``--jobs 2``
(solutions, untouched assignments and known wrong answers, a third each; one key) in at most 15 min.
For each assignment (00-04: assignment 0 and the inline questions of issue 13 included) the table
shows the key and each grade separately; "one assignment" is key + the solution's grade (what
``lecturekit grade sub.ipynb`` costs). Best of ``--repeat`` runs. ``--only 00`` benchmarks the
assignments whose names start with it.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

os.environ.setdefault("LECTUREKIT_STANDIN", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import timed  # noqa: E402

from lecturekit import grader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONE_TARGET_S, FOLDER_TARGET_S = 60.0, 15 * 60.0
A1 = "01_which_pixels_matter.ipynb"
WRONG_A1 = [("return grad.abs().amax(1)", "return grad.abs().mean(1)"),
            ("(s0 - s)[:, None, None]", "(s - s0)[:, None, None]"),
            ("return torch.relu((alpha * A).sum(1)).detach()", "return (alpha * A).sum(1).detach()")]


def folder_of_submissions(folder: Path, n: int) -> None:
    solution = (ROOT / "solutions" / A1).read_text(encoding="utf-8")
    assignment = (ROOT / "assignments" / A1).read_text(encoding="utf-8")
    for k in range(n):
        text = (solution, assignment, None)[k % 3]
        if text is None:  # a known wrong answer in one exercise
            nb = nbformat.reads(solution, as_version=4)
            old, new = WRONG_A1[(k // 3) % len(WRONG_A1)]
            for cell in nb.cells:
                cell.source = cell.source.replace(old, new)
            text = nbformat.writes(nb)
        (folder / f"student{k:02d}").mkdir()
        (folder / f"student{k:02d}" / A1).write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--folder", type=int, default=30, help="submissions in the folder run (0: skip)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only-folder", action="store_true", help="skip the one-assignment table")
    parser.add_argument("--quick", action="store_true", help="a folder of 4 (benchmarks/run.py --fast)")
    parser.add_argument("--only", default="", help="benchmark only the assignments whose names start with this")
    args = parser.parse_args()
    if args.quick:
        args.folder = min(args.folder, 4)
    ok, why = grader.sandbox_available()
    if not ok:
        sys.exit(f"no sandbox: {why}")
    rows = []
    for name in [] if args.only_folder else sorted(p.name for p in (ROOT / "assignments").glob(f"{args.only}*.ipynb")):
        key_s, key = timed(lambda: grader.load_key(ROOT / "assignments" / name), args.repeat)
        for kind in ("solutions", "assignments"):
            seconds, report = timed(lambda: grader.grade(ROOT / kind / name, against=key), args.repeat)
            total = key_s + seconds if kind == "solutions" else None
            rows.append((f"{kind}/{name}", f"{report.score:g}/{report.max_score:g}", key_s, seconds, total))
        key.close()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end, best of {args.repeat}")
    print(f"| {'notebook graded':45s} | {'score':>6s} | key (s) | grade (s) | one assignment (s) | target |")
    print(f"|{'-' * 47}|{'-' * 8}|---------|-----------|--------------------|--------|")
    for label, score, key_s, seconds, total in rows:
        one = f"{total:18.1f}" if total is not None else " " * 18
        ok = ("ok" if total <= ONE_TARGET_S else "SLOW") if total is not None else ""
        print(f"| {label:45s} | {score:>6s} | {key_s:7.1f} | {seconds:9.1f} | {one} | {ok:6s} |")
    if args.folder:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "submissions"
            folder.mkdir()
            folder_of_submissions(folder, args.folder)
            start = time.perf_counter()
            reports = grader.grade_folder(folder, against=ROOT / "assignments" / A1, jobs=args.jobs,
                                          out=Path(tmp) / "reports", similarity=True)
            seconds = time.perf_counter() - start
        scores = sorted({r.score for r in reports.values()})
        for student, report in reports.items():
            # not a solution, an assignment or one wrong exercise (2 points; the questions count too)
            if report.score not in (0, report.max_score - 2, report.max_score):
                print(student, [(e.id, e.message[:120]) for e in report.exercises if not e.passed])
        print(f"\nfolder of {len(reports)} submissions of {A1}, --jobs {args.jobs}: {seconds:.0f} s "
              f"({seconds / 60:.1f} min, target <= {FOLDER_TARGET_S / 60:.0f} min: "
              f"{'ok' if seconds <= FOLDER_TARGET_S else 'SLOW'}); scores seen {scores}")


if __name__ == "__main__":
    main()
