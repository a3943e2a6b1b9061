"""The instructor's side of graded assignments: the assignment generator and the nbval grader.

* **Instructors** write solutions/*.ipynb with nbgrader's markers (``### BEGIN SOLUTION`` /
  ``### END SOLUTION``, so nbgrader stays an option); ``lecturekit assignments`` (``write_assignments``)
  writes assignments/ from them, each marked block replaced by a stub that raises
  ``NotImplementedError``, outputs cleared.
* **The grader** (``lecturekit grade``, ``grade``) runs a submission with nbval (``--nbval-lax``) in
  a scratch folder, in a subprocess, with a time limit per cell and per notebook and a cap on what it
  reads back, and scores each graded cell: ``{"notebook", "score", "max_score", "exercises": [{"id",
  "points", "max_points", "passed", "message"}]}`` (DESIGN.md). A submission that raises, never ends,
  prints megabytes or writes files still gets a report, and cannot touch the grader or other
  submissions (each runs in its own process and folder).

What a graded cell itself imports (``exercise()``, the checks) is ``lecturekit.grading``.
This module is also the small pytest plugin (``-p lecturekit.grader``) that records, per notebook
cell, whether it passed and the exception it raised: see ``pytest_runtest_makereport``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "make_assignment", "assignment_text", "write_assignments", "solution_blocks",
    "graded_cells", "grade", "grade_folder", "Exercise", "Report", "format_report", "reports_to_csv",
    "BEGIN", "END", "STUB",
]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub, line by line
MARKDOWN_STUB = "YOUR ANSWER HERE"


# ---------------------------------------------------------------------------------------------------
# Assignments from solutions
# ---------------------------------------------------------------------------------------------------

def _replace_blocks(source: str, stub_lines, where: str) -> str:
    out, inside = [], False
    for n, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {n}: '{BEGIN}' inside another solution block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in stub_lines)
        elif marker == END:
            if not inside:
                raise ValueError(f"{where}, line {n}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def solution_blocks(nb) -> list[str]:
    """The text of every marked solution block of a notebook (markers excluded)."""
    blocks = []
    for cell in nb.cells:
        lines, inside = [], False
        for line in cell.source.splitlines():
            if line.strip() == BEGIN:
                inside, lines = True, []
            elif line.strip() == END:
                inside = False
                blocks.append("\n".join(lines))
            elif inside:
                lines.append(line)
    return blocks


def make_assignment(nb, name: str = "notebook"):
    """A solution notebook -> the student's notebook (a new object; ``nb`` is not changed).

    Each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block of a code cell becomes nbgrader's stub
    (``# YOUR CODE HERE`` / ``raise NotImplementedError()``) at the marker's indentation; in a markdown
    cell it becomes ``YOUR ANSWER HERE``. Outputs and execution counts are cleared. Unbalanced markers
    raise ``ValueError`` naming the cell.
    """
    import copy

    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        if cell.cell_type == "code":
            cell.source = _replace_blocks(cell.source, STUB, where)
            cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown":
            cell.source = _replace_blocks(cell.source, (MARKDOWN_STUB,), where)
    return nb


def assignment_text(solution: Path) -> str:
    """The exact text ``lecturekit assignments`` writes for ``solution`` (for up-to-date checks)."""
    import nbformat

    solution = Path(solution)
    nb = make_assignment(nbformat.read(solution, as_version=4), solution.name)
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_assignments(solutions: Path, assignments: Path, check_only: bool = False) -> list[Path]:
    """Write ``assignments/NAME.ipynb`` for every ``solutions/NAME.ipynb``; return the files that changed.

    With ``check_only`` nothing is written: the returned list names the out-of-date assignments.
    """
    solutions, assignments = Path(solutions), Path(assignments)
    changed = []
    for path in sorted(solutions.glob("*.ipynb")):
        target = assignments / path.name
        text = assignment_text(path)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            changed.append(target)
            if not check_only:
                assignments.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    return changed


# ---------------------------------------------------------------------------------------------------
# The grader
# ---------------------------------------------------------------------------------------------------

_EXERCISE = re.compile(r"""^\s*(?:[A-Za-z_][\w.]*\.)?exercise\(\s*(?:id\s*=\s*)?["']([\w\-]+)["']\s*,"""
                       r"""\s*(?:points\s*=\s*)?([0-9]+(?:\.[0-9]*)?)\s*\)""", re.M)


def graded_cells(nb) -> dict[int, tuple[str, float]]:
    """``{code-cell number: (exercise id, points)}``, read from each cell's ``exercise(...)`` line.

    Code cells are numbered as nbval numbers them (0, 1, ... over code cells only).
    """
    found, number = {}, 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        match = _EXERCISE.search(cell.source)
        if match:
            found[number] = (match.group(1), float(match.group(2)))
        number += 1
    return found


@dataclass
class Exercise:
    """One exercise of a report: points scored out of ``max_points``, and why it failed (``message``)."""

    id: str
    points: float
    max_points: float
    passed: bool
    message: str = ""


@dataclass
class Report:
    """A graded submission; ``to_json()`` is the DESIGN.md report format."""

    notebook: str
    score: float
    max_score: float
    exercises: list = field(default_factory=list)
    seconds: float = 0.0
    log: str = ""  # the tail of the grader's own output, for instructors (not in the JSON report)

    def to_json(self) -> dict:
        return dict(notebook=self.notebook, score=self.score, max_score=self.max_score,
                    exercises=[asdict(e) for e in self.exercises])


_RESULTS_ENV = "LECTUREKIT_GRADE_RESULTS"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MESSAGE_CHARS = 400  # a message in a report is at most this long
LOG_BYTES = 20_000  # how much of the subprocess's output the grader reads back


def _short(text: str, limit: int = MESSAGE_CHARS) -> str:
    text = _ANSI.sub("", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pytest_runtest_makereport(item, call):
    """Plugin hook (active in the grader's subprocess only): append one JSON line per executed cell."""
    path = os.environ.get(_RESULTS_ENV)
    if not path or call.when != "call" or not hasattr(item, "cell_num"):
        return
    outcome, message = "passed", ""
    if call.excinfo is not None:
        outcome = "skipped" if call.excinfo.typename == "Skipped" else "failed"
        errors = [o for o in (getattr(item, "test_outputs", None) or []) if o.get("output_type") == "error"]
        if errors and errors[-1].get("ename") == "KeyboardInterrupt":
            message = f"time limit of {float(item.config.option.nbval_cell_timeout):g} s per cell exceeded"
        elif errors:
            message = f"{errors[-1].get('ename')}: {errors[-1].get('evalue')}"
        else:
            message = str(call.excinfo.value).splitlines()[0] if str(call.excinfo.value) else call.excinfo.typename
            if "Timeout" in message:
                message = f"time limit of {float(item.config.option.nbval_cell_timeout):g} s per cell exceeded"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(cell=item.cell_num, outcome=outcome, message=_short(message))) + "\n")


def _kill_leftovers(folder: Path) -> None:
    """Kill processes (a kernel stuck in a loop) still working in the scratch ``folder`` (Linux).

    jupyter_client starts kernels in a session of their own, so killing the pytest process group does
    not reach them; their working directory (the scratch folder, unique per run) identifies them.
    Written by hand with /proc because psutil is not a dependency.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")).resolve() == folder.resolve():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _tail(path: Path, limit: int = LOG_BYTES) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", "replace")


def _against(nb, reference) -> dict[str, tuple[float, str]]:
    """Put the reference's graded cells into ``nb`` (in place); ``{id: (points, source)}`` of the reference.

    A student may edit or delete a graded cell; the grader runs the reference's version of each one
    (matched by exercise id), as nbgrader restores its read-only cells.
    """
    import nbformat

    ref = nbformat.read(reference, as_version=4) if not hasattr(reference, "cells") else reference
    code = [c for c in ref.cells if c.cell_type == "code"]
    expected = {ex_id: (points, code[n].source) for n, (ex_id, points) in graded_cells(ref).items()}
    for number, (ex_id, _) in graded_cells(nb).items():
        cell = [c for c in nb.cells if c.cell_type == "code"][number]
        if ex_id in expected:
            cell.source = expected[ex_id][1]
    return expected


def grade(submission, cell_timeout: float = 60, timeout: float = 300, env: dict | None = None,
          reference=None) -> Report:
    """Run ``submission`` (a .ipynb) under nbval in a scratch folder and score its graded cells.

    ``cell_timeout``: seconds one cell may run (nbval's ``--nbval-cell-timeout``); ``timeout``: seconds
    for the whole notebook (the subprocess is killed after it). The kernel runs with
    ``LECTUREKIT_FAST=1``, ``LECTUREKIT_STANDIN=1``, ``MPLBACKEND=Agg`` and one thread
    (``OMP_NUM_THREADS=1``); ``env`` adds or overrides variables.
    An exercise passes when all its graded cells ran without error; cells that never ran (a crash,
    the notebook's time limit) fail with a message saying so. Always returns a ``Report``.

    ``reference`` (the assignment notebook, a path or a notebook): the exercises and their points
    come from it, its graded cells replace the submission's (so editing a check does not help), and
    an exercise whose graded cell was deleted scores 0 ("graded cell missing").
    """
    import nbformat

    submission = Path(submission)
    start = time.perf_counter()
    try:
        nb = nbformat.read(submission, as_version=4)
    except Exception as err:  # unreadable JSON, not a notebook: still a report
        return Report(submission.name, 0.0, 0.0, [], 0.0, log=f"could not read the notebook: {err}")
    expected = _against(nb, reference) if reference is not None else None
    cells = graded_cells(nb)
    scratch = Path(tempfile.mkdtemp(prefix="lecturekit-grade-"))
    results: dict[int, dict] = {}
    log, status = "", ""
    try:
        work = scratch / "work"
        work.mkdir()
        for cell in nb.cells:  # run the code as submitted, not its stale outputs
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        notebook = work / "submission.ipynb"
        nbformat.write(nb, notebook)
        results_file = scratch / "results.jsonl"
        log_file = scratch / "log.txt"
        # One thread per submission: torch's default of one per core slows to a crawl when the cores
        # are shared (other submissions, other users); --jobs grades submissions side by side instead.
        run_env = dict(os.environ, LECTUREKIT_FAST="1", LECTUREKIT_STANDIN="1", MPLBACKEND="Agg",
                       PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{_RESULTS_ENV: str(results_file)}, **(env or {}))
        command = [sys.executable, "-m", "pytest", "-p", "lecturekit.grader", "-p", "no:cacheprovider",
                   "--noconftest", "--nbval-lax", "--nbval-current-env",
                   f"--nbval-cell-timeout={cell_timeout:g}", "-q", "-o", "addopts=", "--rootdir", str(work),
                   str(notebook)]
        with open(log_file, "wb") as out:
            process = subprocess.Popen(command, cwd=work, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"not run: the notebook hit its time limit of {timeout:g} s"
        _kill_leftovers(work)
        log = _tail(log_file)
        if results_file.is_file():
            for line in results_file.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                results[row["cell"]] = row
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    exercises: dict[str, Exercise] = {}
    for number, (ex_id, points) in cells.items():
        row = results.get(number)
        if row is None:
            passed, message = False, status or "not run: the notebook stopped before this cell"
        else:
            passed, message = row["outcome"] == "passed", ("" if row["outcome"] == "passed" else row["message"])
        if ex_id not in exercises:
            exercises[ex_id] = Exercise(ex_id, 0.0, points, True, "")
        ex = exercises[ex_id]
        if not passed and ex.passed:
            ex.passed, ex.message = False, message
    if expected is not None:
        exercises = {ex_id: exercises.get(ex_id) or Exercise(ex_id, 0.0, points, False, "graded cell missing")
                     for ex_id, (points, _) in expected.items()}
        for ex_id, ex in exercises.items():
            ex.max_points = expected[ex_id][0]
    for ex in exercises.values():
        ex.points = ex.max_points if ex.passed else 0.0
    items = list(exercises.values())
    return Report(submission.name, sum(e.points for e in items), sum(e.max_points for e in items), items,
                  time.perf_counter() - start, log)


def grade_folder(folder, jobs: int = 1, **kwargs) -> dict[str, Report]:
    """Grade every notebook under ``folder``: ``{student: Report}``.

    The student is the notebook's path relative to ``folder`` without ``.ipynb`` (``alice/01_...`` when
    each student has a subfolder). Submissions run in separate processes, ``jobs`` at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        reports = list(pool.map(lambda p: grade(p, **kwargs), paths))
    return {str(p.relative_to(folder).with_suffix("")): r for p, r in zip(paths, reports)}


def format_report(report: Report) -> str:
    """The table ``lecturekit grade`` prints: exercise, points, passed, message, and the total."""
    width = max([len("exercise"), *(len(e.id) for e in report.exercises)]) + 2
    lines = [f"{report.notebook}  ({report.seconds:.1f} s)",
             f"{'exercise':{width}s}{'points':>10s}  passed  message"]
    for e in report.exercises:
        lines.append(f"{e.id:{width}s}{f'{e.points:g}/{e.max_points:g}':>10s}  {'yes' if e.passed else 'no':6s}  "
                     f"{e.message}")
    lines.append(f"{'total':{width}s}{f'{report.score:g}/{report.max_score:g}':>10s}")
    return "\n".join(lines)


def reports_to_csv(reports: dict[str, Report]) -> str:
    """One row per student: student, notebook, points per exercise, score, max_score."""
    ids: list[str] = []
    for report in reports.values():
        ids += [e.id for e in report.exercises if e.id not in ids]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "notebook", *ids, "score", "max_score"])
    for student, report in reports.items():
        points = {e.id: e.points for e in report.exercises}
        writer.writerow([student, report.notebook, *(f"{points[i]:g}" if i in points else "" for i in ids),
                         f"{report.score:g}", f"{report.max_score:g}"])
    return buffer.getvalue()
