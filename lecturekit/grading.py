"""Graded assignments: the checks graded cells call, the assignment generator, and the nbval grader.

Three parts, used by three people:

* **Students** run graded cells. Each starts with ``lk.grading.exercise("saliency", points=2)`` and
  compares their function with the lecturekit reference on fixed inputs (``check_close``,
  ``check_shape``, ``check``). A failure raises ``AssertionError`` whose message says *what* is wrong
  (shape, sign, scale, which pixels) without giving the answer away.
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

This module is also the small pytest plugin (``-p lecturekit.grading``) that records, per notebook
cell, whether it passed and the exception it raised: see ``pytest_runtest_makereport``.

Notebooks: assignments/01_which_pixels_matter, assignments/02_synthesizing_images
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
    "exercise", "check", "check_tensor", "check_shape", "check_close", "check_source",
    "make_assignment", "assignment_text", "write_assignments", "solution_blocks",
    "graded_cells", "grade", "grade_folder", "Exercise", "Report", "format_report", "reports_to_csv",
    "BEGIN", "END", "STUB",
]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub, line by line
MARKDOWN_STUB = "YOUR ANSWER HERE"


# ---------------------------------------------------------------------------------------------------
# Part 1: checks that graded cells call
# ---------------------------------------------------------------------------------------------------

_current: dict = {"id": None, "points": None}


def exercise(id: str, points: float) -> None:
    """Declare the exercise a graded cell grades: the first line of every graded cell.

    The grader reads this line from the notebook's source (it does not need to run it) to know which
    cells score which exercise and how many points; at run time it names the exercise in messages.
    """
    if not isinstance(id, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", id):
        raise ValueError(f"expected an exercise id made of letters, digits, '_' or '-', got {id!r}")
    if not isinstance(points, (int, float)) or points <= 0:
        raise ValueError(f"expected a positive number of points, got {points!r}")
    _current.update(id=id, points=float(points))


def _prefix(what: str) -> str:
    return f"[{_current['id']}] {what}" if _current["id"] else what


def check(condition, message: str) -> None:
    """A property check: raise ``AssertionError(message)`` when ``condition`` is false.

    Unlike a bare ``assert``, it runs also under ``python -O`` and names the current exercise.
    """
    if not bool(condition):
        raise AssertionError(_prefix(message))


def check_tensor(value, what: str = "your result"):
    """``value`` is a finite, detached ``torch.Tensor``; returns it."""
    import torch

    check(isinstance(value, torch.Tensor), f"{what} should be a torch.Tensor, got {type(value).__name__}")
    check(not value.requires_grad, f"{what} still requires grad: return a detached tensor (.detach())")
    if value.is_floating_point():
        check(bool(torch.isfinite(value).all()), f"{what} contains NaN or inf")
    return value


def check_shape(value, shape, what: str = "your result"):
    """``value`` is a tensor of exactly ``shape`` (a tuple; ``None`` entries match any size)."""
    check_tensor(value, what)
    got = tuple(value.shape)
    ok = len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got))
    if not ok:
        hint = ""
        if len(got) == len(shape) + 1:
            hint = " (one dimension too many: is a reduction missing?)"
        elif len(got) + 1 == len(shape):
            hint = " (one dimension too few: did you reduce over one dimension too many?)"
        check(False, f"{what} should have shape {tuple(shape)}, got {got}{hint}")
    return value


def check_source(func, no_loops: bool = False, forbidden: tuple = (), what: str | None = None) -> None:
    """Property checks on the source of a student's function (read with ``inspect``, parsed with ``ast``).

    ``no_loops``: no ``for``/``while`` loop and no comprehension (a loop-free, vectorised answer).
    ``forbidden``: attribute names the function must not call, e.g. ``("saliency",)`` rejects
    ``lk.attribution.saliency(...)``, so that an exercise is not answered by calling the reference.
    """
    import ast
    import inspect
    import textwrap

    what = what or f"{getattr(func, '__name__', 'your function')}()"
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        check(False, f"cannot read the source of {what}: define it with `def` in a notebook cell")
    loops = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    for node in ast.walk(tree):
        if no_loops and isinstance(node, loops):
            check(False, f"{what} uses a loop or comprehension (line {node.lineno} of the function); "
                         "write it with tensor operations only")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in forbidden:
            check(False, f"{what} calls {ast.unparse(node.func)}(): write the computation yourself")


def _where(wrong) -> str:
    """Where a map (N, H, W) or image batch (N, C, H, W) is wrong: the first wrong image, its rows and columns."""
    first = wrong.nonzero()[0].tolist()  # index of the first wrong entry
    n = first[0]
    plane = wrong[tuple(first[:-2])]  # (H, W) of that image (and channel)
    rows, cols = plane.any(1).nonzero().flatten(), plane.any(0).nonzero().flatten()
    where = f"image {n}" + (f", channel {first[1]}" if wrong.dim() == 4 else "")
    return (f"; in {where}, {plane.float().mean().item():.0%} of the pixels differ, within rows "
            f"{int(rows.min())}-{int(rows.max())} and columns {int(cols.min())}-{int(cols.max())}")


def check_close(value, reference, what: str = "your result", rtol: float = 1e-3, atol: float = 1e-5,
                scale_free: bool = False):
    """``value`` matches ``reference`` (the lecturekit answer) up to ``rtol``/``atol``.

    On a mismatch the message diagnoses without revealing the reference: wrong type or shape, NaN,
    the opposite sign, the right pattern at the wrong scale (and by which factor), or which entries
    (for maps: which image, rows and columns) differ, with the correlation to the answer.
    ``scale_free=True`` accepts any positive multiple of the reference (for maps whose scale is free).
    """
    import torch

    reference = reference.detach()
    check_shape(value, tuple(reference.shape), what)
    s = value.detach().to(reference.dtype).cpu().flatten()
    r = reference.cpu().flatten()
    rr = (r * r).sum()
    c = float((s * r).sum() / rr) if rr > 0 else 0.0  # least-squares factor s ~ c r
    if scale_free and c > 0:
        s = s / c
    if torch.allclose(s, r, rtol=rtol, atol=atol):
        return value
    norm = lambda t: t.norm().item()  # noqa: E731
    if norm(r) == 0:
        check(False, f"{what} should be all zeros here, but is not (largest entry {s.abs().max().item():.3g})")
    if norm(s) == 0:
        check(False, f"{what} is all zeros; it should not be")
    if s.numel() == 1:
        check(False, f"{what} is not the expected value: it is about {c:.3g} times what it should be")
    residual = norm(s - c * r) / norm(s)
    if residual < 1e-3 and c < 0:
        check(False, f"{what} has the opposite sign of the expected result: check a sign or a subtraction")
    if residual < 1e-3 and not scale_free:
        check(False, f"{what} has the right pattern but the wrong scale (about {c:.3g} times the "
                     "expected values): check a normalisation, a mean versus a sum, or a factor")
    wrong = ~torch.isclose(s, r, rtol=rtol, atol=atol)
    message = f"{what} differs from the expected result at {wrong.float().mean().item():.0%} of its entries"
    if s.numel() >= 16:
        message += f" (correlation {torch.corrcoef(torch.stack([s, r]))[0, 1].item():.2f})"
    if reference.dim() >= 3:
        message += _where(wrong.view(reference.shape))
    if (r >= 0).all() and (s < 0).any():
        message += "; it has negative entries where none are expected"
    check(False, message)


# ---------------------------------------------------------------------------------------------------
# Part 2: assignments from solutions
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
# Part 3: the grader
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
        command = [sys.executable, "-m", "pytest", "-p", "lecturekit.grading", "-p", "no:cacheprovider",
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
