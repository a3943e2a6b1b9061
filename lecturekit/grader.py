"""The instructor's side of graded assignments: the assignment generator and the grader.

* **Instructors** write solutions/*.ipynb with nbgrader's markers (``### BEGIN SOLUTION`` /
  ``### END SOLUTION``, so nbgrader stays an option); ``lecturekit assignments`` (``write_assignments``)
  writes assignments/ from them, each marked block replaced by a stub that raises
  ``NotImplementedError``, outputs cleared.
* **The grader** (``lecturekit grade``, ``grade``, ``grade_folder``) scores a submission against an
  answer key (``load_key``): the official assignment (exercises, points, graded cells) and the
  instructor's solution, from which the grader computes every reference value itself.

How a submission is graded
--------------------------
1. **The key is built once, in the grader's process.** The solution notebook runs here (never in a
   student's kernel); every check of its graded cells records the reference it compares with
   (``lecturekit.grading`` in "reference" mode). The functions those references come from (the
   ``lk.<module>.<function>`` calls that feed a ``check_close`` reference, and every name in a
   ``check_source(..., forbidden=...)``) are the assignment's *withheld* functions.
2. **The submission is restored**: read once into memory; every graded cell is replaced by the
   official one (source, metadata, id, matched by exercise id; a deleted one scores 0, "graded cell
   missing"); nbval/nbclient tags and ``# NBVAL_*`` markers are stripped from every cell.
3. **The student's code runs in a sandbox** (one per submission, ``bwrap``): user (or, for root, a
   dedicated uid), mount, PID, network, IPC and UTS namespaces; a read-only view of the system and of
   Python, and nothing else: no course checkout, no solutions/, no other submission, no instructor
   HOME; a fresh scratch HOME/IPYTHONDIR/MPLCONFIGDIR and working folder, a size-limited /tmp; a
   minimal environment; limits on memory (RLIMIT_DATA), processes, file size, CPU and wall time;
   no network. The kernel imports a copy of lecturekit in which the withheld functions return a
   ``Withheld`` placeholder (``lecturekit.grading``): an alias, ``from ... import ... as``,
   ``getattr``, ``importlib`` or reading the package's source all reach the placeholder, and any use
   of it raises ``WithheldError``. The grader drives the kernel over the Jupyter protocol (IPC
   sockets in the scratch folder) and reads what each graded cell displays: the student's values
   (JSON, tensors as base64 bytes; nothing is unpickled). When the submission is done, the sandbox's
   PID namespace ends, and with it every process the submission started.
4. **The grade is decided in the grader's process**: each value is compared with the reference
   recorded in step 1 (the same diagnostics as ``check_close``); an exercise passes when every one of
   its values arrived and matches, and its graded cell raised nothing. A kernel cannot report "passed":
   it can only send values, so patching the check helpers, ``torch.allclose``, printing fake output or
   forging answer messages gains nothing that a function returning those values would not.
5. **Batches** (``grade_folder``) read every submission once, grade ``jobs`` at a time, write each
   report atomically as soon as it is graded and a ``COMPLETE`` marker at the end; an unreadable or
   ungradable notebook gets a report naming why, with every exercise failed, and never ends the batch;
   CSV cells that a spreadsheet would read as a formula are escaped; an instructor's Ctrl-C stops the
   batch (it is not reported as a timeout). ``similarity_report`` lists solution code that is
   near-identical to the public lecturekit source, the instructor's solution or another submission.

What it does not protect against
--------------------------------
* **Copying**: a student who copies the public lecturekit source of a withheld function (or a
  classmate's answer) gets the right values; the similarity report lists such pairs for a person to
  judge, nothing is penalised automatically. Other, non-withheld lecturekit functions that compute the
  same thing by another route (e.g. ``lk.attribution.gradient`` for a saliency map) stay available.
* **Property checks** that a graded cell evaluates in the kernel (``check(condition)``,
  ``check_source``) can fail a submission but a dishonest kernel can make them pass; an exercise's
  grade rests on its value checks (``check_close``, ``check_shape``, ``check_tensor``), so every
  graded cell needs at least one.
* **Without bubblewrap** (``sandbox=False``, ``--no-sandbox``): the kernel runs as the instructor,
  with only the minimal environment, the withheld copy of lecturekit and the resource limits; it can
  read the course checkout, other submissions, kill the grader and reach the network. The grader
  refuses to run this way unless asked to, and says so loudly.
* Disk use of the scratch folder is limited per file (RLIMIT_FSIZE), not in total; the sandbox's
  memory limit is per process (RLIMIT_DATA, processes are limited in number), not a cgroup.

Graded cells: a graded cell starts with ``lk.grading.exercise("id", points=2)``, then calls the
student's functions on fixed inputs (seeded, computed in the cell or in setup cells, never from the
global random state after the student's code ran, never from a withheld function) and compares with
``lk.grading.check_close(ours, lk.<module>.<reference>(...))``. The reference may be computed in the
same cell, also through intermediate variables and loops (``ref = lk.synthesis.ascent_step(net, ref,
...)``): in the sandbox it is a placeholder that the grader replaces by its own value.

Inline questions (issue 13): a graded cell whose check is ``check_answer`` is a *question*: the student's
choice or number is compared with the solution's answer, which the solution's hidden tests hold with
its explanation (``expect``); the report marks it ``kind: "question"`` with the ``explanation``. A markdown
cell with ``<!-- lk.grading.manual("id", points=1) -->`` is a free-text answer: reported under
``manual`` (pending manual grading, or no answer), its points counted apart from ``score``.
``nbgrader_metadata`` writes nbgrader's cell metadata from the markers (``lecturekit assignments``).

What a graded cell itself imports (``exercise()``, the checks) is ``lecturekit.grading``.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import csv
import fcntl
import importlib
import io
import json
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .grading import MIME as MIME_KEY  # the display type that carries a graded cell's answers

__all__ = [
    "make_assignment", "assignment_text", "write_assignments", "solution_blocks",
    "graded_cells", "load_key", "Key", "grade", "grade_folder", "Exercise", "Report", "format_report",
    "reports_to_csv", "similarity_report", "sandbox_available", "SandboxUnavailable", "BEGIN", "END", "STUB",
    "ManualItem", "manual_cells", "nbgrader_metadata", "strip_hidden_tests", "hidden_blocks",
    "HIDDEN_BEGIN", "HIDDEN_END",
]
BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"  # nbgrader's hidden tests: in solutions/ only, never in assignments/
HIDDEN_END = "### END HIDDEN TESTS"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")  # nbgrader's stub, line by line
MARKDOWN_STUB = "YOUR ANSWER HERE"


# ---------------------------------------------------------------------------------------------------
# Assignments from solutions
# ---------------------------------------------------------------------------------------------------

def _replace_blocks(source: str, stub_lines, where: str, begin: str = BEGIN, end: str = END) -> str:
    out, inside = [], False
    for n, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker == begin:
            if inside:
                kind = "solution" if begin == BEGIN else "hidden-tests"
                raise ValueError(f"{where}, line {n}: '{begin}' inside another {kind} block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in stub_lines)
        elif marker == end:
            if not inside:
                raise ValueError(f"{where}, line {n}: '{end}' without a '{begin}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: '{begin}' is never closed by '{end}'")
    return "\n".join(out)


def strip_hidden_tests(source: str, where: str = "cell") -> str:
    """``source`` without its ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS`` blocks (as nbgrader does)."""
    if HIDDEN_BEGIN not in source and HIDDEN_END not in source:
        return source
    return _replace_blocks(source, (), where, HIDDEN_BEGIN, HIDDEN_END)


def _marked_blocks(nb, begin: str, end: str) -> list[str]:
    """The text between every ``begin`` and ``end`` marker line of a notebook's cells (markers excluded)."""
    blocks = []
    for cell in nb.cells:
        lines, inside = [], False
        for line in cell.source.splitlines():
            if line.strip() == begin:
                inside, lines = True, []
            elif line.strip() == end:
                inside = False
                blocks.append("\n".join(lines))
            elif inside:
                lines.append(line)
    return blocks


def hidden_blocks(nb) -> list[str]:
    """The text of every hidden-tests block of a notebook (markers excluded): the answers to inline questions."""
    return _marked_blocks(nb, HIDDEN_BEGIN, HIDDEN_END)


def solution_blocks(nb) -> list[str]:
    """The text of every marked solution block of a notebook (markers excluded)."""
    return _marked_blocks(nb, BEGIN, END)


def make_assignment(nb, name: str = "notebook"):
    """A solution notebook -> the student's notebook (a new object; ``nb`` is not changed).

    Each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block of a code cell becomes nbgrader's stub
    (``# YOUR CODE HERE`` / ``raise NotImplementedError()``) at the marker's indentation; in a markdown
    cell it becomes ``YOUR ANSWER HERE``. Hidden tests (``### BEGIN HIDDEN TESTS`` ...
    ``### END HIDDEN TESTS``, the answers to inline questions) are removed, as nbgrader does. Outputs
    and execution counts are cleared. Unbalanced markers raise ``ValueError`` naming the cell.
    """
    import copy

    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        if cell.cell_type == "code":
            cell.source = _replace_blocks(strip_hidden_tests(cell.source, where), STUB, where)
            cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown":
            cell.source = _replace_blocks(cell.source, (MARKDOWN_STUB,), where)
    return nb


NBGRADER_SCHEMA = 3  # nbgrader's cell-metadata schema_version (nbgrader/nbgraderformat/v3.json)


def nbgrader_metadata(nb, name: str = "notebook"):
    """``nb`` with nbgrader's cell metadata beside lecturekit's markers (a new notebook; ``nb`` is unchanged).

    So that an instructor who runs nbgrader can use the assignments unchanged, every cell gets the
    ``metadata.nbgrader`` that nbgrader's "Create Assignment" toolbar would give it, derived from the
    markers: a code cell with a solution block is a solution cell (``grade_id`` ``<exercise>_solution``,
    the exercise of the graded cell after it); a graded cell (``exercise("id", points=P)``) is a
    locked grade cell with ``grade_id`` ``id`` and ``points`` P (nbgrader gives the points when the
    cell runs without error, lecturekit when its values match: the same thing for these cells); a
    markdown cell with a ``manual("id", points=P)`` marker is a manually graded answer (solution and
    grade). Any other cell has no nbgrader metadata. A markdown solution block without a ``manual``
    marker raises ``ValueError`` (nbgrader requires such cells to be graded).
    """
    nb = copy.deepcopy(nb)
    graded = {i: m.group(1) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for m in [_EXERCISE.search(c.source)] if m}
    points = {i: float(m.group(2)) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for m in [_EXERCISE.search(c.source)] if m}
    seen: dict[str, int] = {}

    def unique(grade_id: str) -> str:
        seen[grade_id] = seen.get(grade_id, 0) + 1
        return grade_id if seen[grade_id] == 1 else f"{grade_id}_{seen[grade_id]}"

    def meta(**values) -> dict:
        return {"grade": False, "locked": False, "solution": False, **values, "schema_version": NBGRADER_SCHEMA}

    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("nbgrader", None)
        manual = _MANUAL.search(cell.source) if cell.cell_type == "markdown" else None
        if i in graded:
            if BEGIN in cell.source:
                raise ValueError(f"{name}, cell {i}: a graded cell cannot hold a solution block")
            cell.metadata["nbgrader"] = meta(grade=True, locked=True, grade_id=unique(graded[i]), points=points[i])
        elif cell.cell_type == "code" and BEGIN in cell.source:
            after = [graded[j] for j in sorted(graded) if j > i]
            grade_id = unique(f"{after[0] if after else 'cell'}_solution")
            cell.metadata["nbgrader"] = meta(solution=True, grade_id=grade_id)
        elif manual:
            cell.metadata["nbgrader"] = meta(grade=True, solution=True, grade_id=unique(manual.group(1)),
                                             points=float(manual.group(2)))
        elif cell.cell_type == "markdown" and BEGIN in cell.source:
            raise ValueError(f"{name}, cell {i}: a markdown answer block needs a "
                             '<!-- lk.grading.manual("id", points=1) --> marker (nbgrader grades such cells by hand)')
    return nb


def _text(nb) -> str:
    import nbformat

    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def solution_text(solution: Path) -> str:
    """The exact text of ``solution`` with its nbgrader metadata as ``lecturekit assignments`` writes it."""
    import nbformat

    solution = Path(solution)
    return _text(nbgrader_metadata(nbformat.read(solution, as_version=4), solution.name))


def assignment_text(solution: Path) -> str:
    """The exact text ``lecturekit assignments`` writes for ``solution`` (for up-to-date checks)."""
    import nbformat

    solution = Path(solution)
    nb = nbgrader_metadata(nbformat.read(solution, as_version=4), solution.name)
    return _text(make_assignment(nb, solution.name))


def write_assignments(solutions: Path, assignments: Path, check_only: bool = False) -> list[Path]:
    """Write ``assignments/NAME.ipynb`` for every ``solutions/NAME.ipynb``; return the files that changed.

    The solutions themselves get their nbgrader cell metadata (``nbgrader_metadata``) when it is
    missing or stale. With ``check_only`` nothing is written: the returned list names the
    out-of-date files (solutions and assignments).
    """
    solutions, assignments = Path(solutions), Path(assignments)
    changed = []
    for path in sorted(solutions.glob("*.ipynb")):
        solved = solution_text(path)
        if path.read_text(encoding="utf-8") != solved:
            changed.append(path)
            if not check_only:
                path.write_text(solved, encoding="utf-8")
        target = assignments / path.name
        text = assignment_text(path)
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            changed.append(target)
            if not check_only:
                assignments.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    return changed


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------

_EXERCISE = re.compile(r"""^\s*(?:[A-Za-z_][\w.]*\.)?exercise\(\s*(?:id\s*=\s*)?["']([\w\-]+)["']\s*,"""
                       r"""\s*(?:points\s*=\s*)?([0-9]+(?:\.[0-9]*)?)\s*\)""", re.M)
# A free-text answer graded by a person: a markdown cell holding <!-- lk.grading.manual("id", points=1) -->
_MANUAL = re.compile(r"""<!--\s*(?:[A-Za-z_][\w.]*\.)?manual\(\s*(?:id\s*=\s*)?["']([\w\-]+)["']\s*,"""
                     r"""\s*(?:points\s*=\s*)?([0-9]+(?:\.[0-9]*)?)\s*\)\s*-->""")
ANSWER_TEXT_CHARS = 4000  # the longest free-text answer a report keeps
_NBVAL_MARKER = re.compile(r"^[ \t]*#[ \t]*(?:NBVAL|PYTEST_VALIDATE)_\w+[ \t]*$", re.M | re.I)
MESSAGE_CHARS = 400  # a message in a report is at most this long
LOG_BYTES = 20_000  # how much of a submission's printed output a report keeps (its tail)
SUBMISSION_BYTES = 64 * 2**20  # a larger notebook is not graded ("too large")
ANSWERS_PER_CELL = 2000  # values one graded cell may send
ANSWER_BUDGET = 256 * 2**20  # bytes of values one submission may send in all (more are dropped, so they fail)


def graded_cells(nb) -> dict[int, tuple[str, float]]:
    """``{code-cell number: (exercise id, points)}``, read from each cell's ``exercise(...)`` line.

    Code cells are numbered 0, 1, ... over code cells only.
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
    kind: str = "code"  # "code": a function compared with the reference; "question": an inline question
    explanation: str = ""  # a question's: why the right answer is right (from the solution's hidden tests)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.kind == "code":  # the DESIGN.md format, unchanged for code exercises
            data.pop("kind")
            data.pop("explanation")
        return data


@dataclass
class ManualItem:
    """A free-text answer waiting for a person: its points are not in the report's score (``manual``)."""

    id: str
    max_points: float
    status: str  # "pending manual grading" or "no answer"
    answer: str = ""  # the student's text (at most ANSWER_TEXT_CHARS)


@dataclass
class Report:
    """A graded submission; ``to_json()`` is the DESIGN.md report format."""

    notebook: str
    score: float
    max_score: float
    exercises: list = field(default_factory=list)
    seconds: float = 0.0
    log: str = ""  # the tail of what the submission printed, and the grader's notes (not in the JSON report)
    manual: list = field(default_factory=list)  # ManualItem: free-text answers, not in score / max_score

    @property
    def manual_max_score(self) -> float:
        """Points of the free-text answers, graded by a person (counted apart from ``score``)."""
        return sum(m.max_points for m in self.manual)

    def to_json(self) -> dict:
        """The DESIGN.md format; with free-text answers, also ``manual`` and ``manual_max_score``."""
        data = dict(notebook=self.notebook, score=self.score, max_score=self.max_score,
                    exercises=[e.to_json() if isinstance(e, Exercise) else asdict(e) for e in self.exercises])
        if self.manual:
            data.update(manual=[asdict(m) for m in self.manual], manual_max_score=self.manual_max_score)
        return data


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _short(text: str, limit: int = MESSAGE_CHARS) -> str:
    text = _ANSI.sub("", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# The answer key: the official assignment, and references computed here from the solution
# ---------------------------------------------------------------------------------------------------

GROUND_FLOOR = ("data", "models", "hooks", "plotting", "grading", "training", "widgets", "receptive_field")
LECTURE_MODULES = ("features", "attribution", "evaluation", "synthesis", "style", "adversarial")


@dataclass
class Key:
    """What a submission is graded against, built once by ``load_key`` and kept in memory.

    ``cells``: exercise id -> the official graded cells (nbformat cells, in notebook order);
    ``points``: exercise id -> points; ``references``: exercise id -> for each graded cell, the
    records of its checks (``lecturekit.grading``), with the reference tensors computed in this
    process from the solution; ``withheld``: the functions a graded kernel does not get
    (``"lecturekit.attribution.saliency"``); ``blocks``: exercise id -> the solution's code.
    """

    name: str
    points: dict
    cells: dict
    references: dict
    withheld: tuple
    blocks: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # exercise id -> {withheld function: its public source}
    manual: dict = field(default_factory=dict)  # free-text answer id -> (points, the official cell's text)
    _package: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def package(self) -> Path:
        """A folder holding the copy of lecturekit that graded kernels import (built once)."""
        with self._lock:
            if self._package is None or not self._package.is_dir():
                self._package = _withheld_package(self.withheld)
        return self._package

    def close(self) -> None:
        if self._package is not None:
            shutil.rmtree(self._package.parent, ignore_errors=True)  # <tmp>/lecturekit-key-*/site
            self._package = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _read_notebook(source):
    """A notebook from a path, bytes or a notebook; cells normalised (source a str) or ValueError."""
    import nbformat

    if hasattr(source, "cells"):
        return copy.deepcopy(source)
    raw = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else source
    if len(raw) > SUBMISSION_BYTES:
        raise ValueError(f"the notebook is {len(raw) / 2**20:.0f} MB, more than {SUBMISSION_BYTES // 2**20} MB")
    text = raw.decode("utf-8")
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError("this is JSON but not a notebook (no list of cells)")
    for n, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            raise ValueError(f"cell {n} is not a notebook cell")
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        if not isinstance(source, str):
            raise ValueError(f"cell {n} has no text source")
        cell["source"] = source
        if not isinstance(cell.get("metadata", {}), dict):
            cell["metadata"] = {}
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    data.setdefault("nbformat", 4)
    data.setdefault("nbformat_minor", 5)
    data.setdefault("metadata", {})
    nb = nbformat.from_dict(data)
    if nb.get("nbformat") != 4:
        nb = nbformat.reads(json.dumps(data), as_version=4)
    return nb


def manual_cells(nb) -> dict[str, tuple[int, float]]:
    """``{id: (cell index, points)}`` of the free-text answers: markdown cells with a ``manual(...)`` marker."""
    found = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            match = _MANUAL.search(cell.source)
            if match and match.group(1) not in found:
                found[match.group(1)] = (i, float(match.group(2)))
    return found


def _manual_items(nb, key: "Key") -> list:
    """The free-text answers of a submission: the text the student wrote in each manual cell."""
    found = {}
    with contextlib.suppress(Exception):
        found = manual_cells(nb)
    items = []
    for ex_id, (points, official) in key.manual.items():
        scaffold = {line.strip() for line in official.splitlines()} | {MARKDOWN_STUB, BEGIN, END, ""}
        text = ""
        if ex_id in found:
            lines = nb.cells[found[ex_id][0]].source.splitlines()
            text = "\n".join(line for line in lines if line.strip() not in scaffold).strip()
        items.append(ManualItem(ex_id, points, "pending manual grading" if text else "no answer",
                                _short(text, ANSWER_TEXT_CHARS) if text else ""))
    return items


def _graded_by_id(nb) -> dict[str, list[int]]:
    """exercise id -> indices (in ``nb.cells``) of its graded cells."""
    found: dict[str, list[int]] = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            match = _EXERCISE.search(cell.source)
            if match:
                found.setdefault(match.group(1), []).append(i)
    return found


def _transform(source: str) -> str:
    """IPython syntax (magics, ``!``) as Python, for running a solution cell outside a kernel."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


_ENV_LOCK = threading.Lock()
GRADING_ENV = {"LECTUREKIT_FAST": "1", "LECTUREKIT_STANDIN": "1", "MPLBACKEND": "Agg"}


def _run_solution(nb, name: str, env: dict | None = None) -> dict[int, list[dict]]:
    """Run the solution's code cells in this process; ``{cell index: records of its checks}``.

    The cells run in a fresh namespace with the grading environment (``LECTUREKIT_FAST=1``...), the
    global random state restored afterwards and figures closed. Each check of a graded cell records
    its reference; a check the solution itself fails raises (a broken key must not grade anyone).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from . import grading

    records: dict[int, list[dict]] = {}
    namespace = {"__name__": "__main__"}
    graded = {i for ids in _graded_by_id(nb).values() for i in ids}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in {**GRADING_ENV, **(env or {})}}
        os.environ.update({**GRADING_ENV, **(env or {})})
        output = io.StringIO()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a graded kernel; many threads on shared cores are much slower
        try:
            with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(output), \
                    contextlib.redirect_stderr(output):
                for i, cell in enumerate(nb.cells):
                    if cell.cell_type != "code" or not cell.source.strip():
                        continue
                    token = grading._recorder.set(records.setdefault(i, []) if i in graded else [])
                    filename = f"<{name}, cell {i}>"
                    code = _transform(cell.source)
                    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # for inspect
                    try:
                        exec(compile(code, filename, "exec"), namespace)
                    except BaseException as err:
                        raise RuntimeError(f"the solution {name} fails in cell {i}, so it cannot be the key: "
                                           f"{type(err).__name__}: {_short(err)}") from err
                    finally:
                        grading._recorder.reset(token)
                        plt.close("all")
        finally:
            torch.set_num_threads(threads)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return records


def _lk_calls(node) -> set[tuple[str, str]]:
    """``(module, function)`` of every ``lk.module.function(...)`` / ``lecturekit.module.function(...)`` call."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            inner = sub.func.value
            if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and \
                    inner.value.id in ("lk", "lecturekit"):
                found.add((inner.attr, sub.func.attr))
    return found


def withheld_functions(cells) -> tuple[str, ...]:
    """The lecturekit functions a graded kernel must not get, from the graded cells' source.

    Every ``lk.<module>.<function>`` that feeds a ``check_close`` reference (directly or through a
    variable assigned in the cell), outside the ground floor (data, models, hooks, plotting...), and
    every name in a ``check_source(..., forbidden=...)`` found in a lecture module; each resolved to
    where it is defined (``"lecturekit.attribution.saliency"``).
    """
    wanted: set[tuple[str, str]] = set()
    forbidden: set[str] = set()
    for cell in cells:
        try:
            tree = ast.parse(_transform(cell.source))
        except SyntaxError as err:
            raise ValueError(f"a graded cell is not valid Python: {err}") from err
        assigned: dict[str, list] = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            assigned.setdefault(name.id, []).append(node.value)
            elif isinstance(node, ast.For):
                for name in ast.walk(node.target):
                    if isinstance(name, ast.Name):
                        assigned.setdefault(name.id, []).append(node.iter)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if called == "check_close":
                refs = node.args[1:2] + [k.value for k in node.keywords if k.arg == "reference"]
                for ref in refs:
                    wanted |= _lk_calls(ref)
                    for name in {n.id for n in ast.walk(ref) if isinstance(n, ast.Name)}:
                        for value in assigned.get(name, []):
                            wanted |= _lk_calls(value)
            elif called == "check_source":
                for k in node.keywords:
                    if k.arg == "forbidden":
                        with contextlib.suppress(ValueError):
                            forbidden |= {str(v) for v in ast.literal_eval(k.value)}
    names = set()
    for module, function in wanted:
        if module not in GROUND_FLOOR:
            names.add(_definition(module, function))
    for function in forbidden:
        for module in LECTURE_MODULES:
            try:
                found = hasattr(importlib.import_module(f"lecturekit.{module}"), function)
            except ImportError:
                continue
            if found:
                names.add(_definition(module, function))
    return tuple(sorted(names))


def _definition(module: str, function: str) -> str:
    try:
        obj = getattr(importlib.import_module(f"lecturekit.{module}"), function)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"a graded cell names lk.{module}.{function}, which does not exist") from err
    where = getattr(obj, "__module__", None) or f"lecturekit.{module}"
    name = getattr(obj, "__name__", function)
    if not where.startswith("lecturekit.") or not callable(obj):
        raise ValueError(f"cannot withhold lk.{module}.{function}: it is not a lecturekit function")
    return f"{where}.{name}"


def load_key(against, solution=None, env: dict | None = None) -> Key:
    """The answer key for grading against ``against`` (a path or notebook), read once.

    ``against`` is the official assignment or its solution (a notebook with solution blocks). The
    references come from the solution: ``solution`` if given, ``against`` itself when it holds
    solution blocks, else ``solutions/<name>`` next to the assignment's folder (``ValueError`` when
    none is found). The solution runs here, in the grader's process, and must pass its own checks.
    """
    name = getattr(against, "name", None) or Path(str(against)).name if not hasattr(against, "cells") else "assignment"
    official = _read_notebook(against)
    if solution is None and solution_blocks(official):
        solution = official
    if solution is None and not hasattr(against, "cells"):
        candidate = Path(against).resolve().parent.parent / "solutions" / Path(against).name
        if candidate.is_file():
            solution = candidate
    if solution is None:
        raise ValueError(f"grading {name} needs the instructor's solution to compute the references: pass "
                         "solution= (--solution), or keep it in solutions/ next to assignments/")
    solved = _read_notebook(solution)
    if solution_blocks(official):
        official = make_assignment(official, name)
    ids, solved_ids = _graded_by_id(official), _graded_by_id(solved)
    if not ids:
        raise ValueError(f"{name} has no graded cell (no lk.grading.exercise(...) line)")
    if {i: len(v) for i, v in ids.items()} != {i: len(v) for i, v in solved_ids.items()}:
        raise ValueError(f"the solution's graded cells ({sorted(solved_ids)}) are not the assignment's ({sorted(ids)})")
    for ex_id, indices in ids.items():
        for i, j in zip(indices, solved_ids[ex_id]):
            if official.cells[i].source != strip_hidden_tests(solved.cells[j].source):
                raise ValueError(f"the graded cell of {ex_id!r} differs between the assignment and the solution")
    points = {}
    for cell in official.cells:
        match = _EXERCISE.search(cell.source) if cell.cell_type == "code" else None
        if match and match.group(1) not in points:
            points[match.group(1)] = float(match.group(2))
    cells = {ex_id: [copy.deepcopy(official.cells[i]) for i in indices] for ex_id, indices in ids.items()}
    withheld = withheld_functions([c for cs in cells.values() for c in cs])
    records = _run_solution(solved, name, env)
    references = {ex_id: [records.get(j, []) for j in solved_ids[ex_id]] for ex_id in ids}
    for ex_id, per_cell in references.items():
        if not any(r["check"] in ("close", "shape", "tensor", "answer") for rs in per_cell for r in rs):
            raise ValueError(f"the graded cell of {ex_id!r} compares no value (check_close, check_shape, "
                             "check_tensor or check_answer): a grade cannot rest on checks the student's kernel "
                             "evaluates")
        for r in (r for rs in per_cell for r in rs if r["check"] == "answer"):
            if "because" not in r:
                raise ValueError(f"the question {ex_id!r} has no expect(...) in its hidden tests: its answer "
                                 "and explanation are missing from the key")
    sources = {ex_id: {f: _public_source(f) for f in withheld_functions(cs)} for ex_id, cs in cells.items()}
    manual = {ex_id: (pts, official.cells[i].source) for ex_id, (i, pts) in manual_cells(official).items()}
    return Key(name, points, cells, references, withheld, _exercise_blocks(solved), sources, manual)


def _public_source(full: str) -> str:
    """The source of a lecturekit function (what any student can read), for the similarity report."""
    import inspect

    module, _, name = full.rpartition(".")
    with contextlib.suppress(Exception):
        return inspect.getsource(getattr(importlib.import_module(module), name))
    return ""


def _exercise_blocks(nb) -> dict[str, str]:
    """exercise id -> the code of the solution blocks before its graded cell (since the previous one)."""
    blocks, pending = {}, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        pending += solution_blocks(type("NB", (), {"cells": [cell]})())
        match = _EXERCISE.search(cell.source)
        if match:
            blocks[match.group(1)] = blocks.get(match.group(1), "") + "\n".join(pending)
            pending = []
    return blocks


# ---------------------------------------------------------------------------------------------------
# The copy of lecturekit a graded kernel imports: the withheld functions replaced by placeholders
# ---------------------------------------------------------------------------------------------------

def _withhold_source(source: str, names: dict[str, str], path: str) -> str:
    tree = ast.parse(source)
    found = set()
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            doc = ast.get_docstring(node, clean=False)
            body = [ast.Expr(ast.Constant(doc))] if doc else []
            body += ast.parse(f"return __import__('lecturekit.grading', fromlist=['withheld'])"
                              f".withheld({names[node.name]!r})").body
            node.body = body
            found.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name in names:
            tree.body[i] = ast.parse(f"def {node.name}(*args, **kwargs):\n    return __import__("
                                     f"'lecturekit.grading', fromlist=['withheld']).withheld({names[node.name]!r})").body[0]
            found.add(node.name)
    missing = set(names) - found
    if missing:
        raise ValueError(f"cannot withhold {sorted(missing)}: no top-level definition in {path}")
    return "# A copy made by lecturekit.grader for graded kernels: the withheld functions return placeholders.\n" + \
        ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def _withheld_package(withheld) -> Path:
    """``<tmp>/site/lecturekit``: this lecturekit, with the ``withheld`` functions' bodies replaced."""
    import lecturekit

    source = Path(lecturekit.__file__).resolve().parent
    root = Path(tempfile.mkdtemp(prefix="lecturekit-key-"))
    target = root / "site" / "lecturekit"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    by_module: dict[str, dict[str, str]] = {}
    for full in withheld:
        module, _, name = full.rpartition(".")
        by_module.setdefault(module, {})[name] = full
    for module, names in by_module.items():
        path = target.joinpath(*module.split(".")[1:]).with_suffix(".py")
        path.write_text(_withhold_source(path.read_text(encoding="utf-8"), names, str(path)), encoding="utf-8")
    (target / "_sandbox.py").write_text(
        '"""Written by lecturekit.grader: this copy of lecturekit runs in a graded kernel."""\n'
        f"WITHHELD = {tuple(withheld)!r}\n", encoding="utf-8")
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
    return root / "site"


# ---------------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------------

class SandboxUnavailable(RuntimeError):
    """No sandbox (bubblewrap) on this machine, and ``sandbox=False`` / ``--no-sandbox`` was not given."""


NO_SANDBOX_WARNING = ("WARNING: grading WITHOUT a sandbox (--no-sandbox): each submission's code runs as you, can "
                      "read the course checkout, other submissions and your home, reach the network and "
                      "kill the grader. Use this only for submissions you trust.")
_SANDBOX_UIDS = range(61000, 61500)  # for a grader run as root: one unprivileged uid per running sandbox
_uids_in_use: dict[int, int] = {}  # uid -> the file descriptor holding its machine-wide lock
_uid_lock = threading.Lock()
# A uid is a machine-wide resource: two grader processes (two instructors, a test run beside a batch) must
# never share one, or the first to finish kills the other's kernel (_kill_uid). Each claim holds an
# exclusive flock on a file named after the uid; the kernel drops it if the grader dies.
_UID_LOCKS = Path("/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()) / "lecturekit-grader-uids"


def _claim_uid() -> int:
    """An unprivileged uid no other sandbox on this machine is using (threads and processes alike)."""
    _UID_LOCKS.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _uid_lock:
        for uid in _SANDBOX_UIDS:
            if uid in _uids_in_use:
                continue
            fd = os.open(_UID_LOCKS / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by another grader process
                os.close(fd)
                continue
            _uids_in_use[uid] = fd
            return uid
    raise RuntimeError(f"all {len(_SANDBOX_UIDS)} sandbox uids are in use on this machine")


def _release_uid(uid: int) -> None:
    with _uid_lock:
        fd = _uids_in_use.pop(uid, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
_probe: dict[str, tuple[bool, str]] = {}


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def sandbox_available() -> tuple[bool, str]:
    """``(True, "")`` when bubblewrap can build a sandbox here, else ``(False, why)`` (probed once per path)."""
    path = _bwrap()
    if path is None:
        return False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    if path not in _probe:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "work").mkdir()
            command = _sandbox_command([sys.executable, "-c", "print('ok')"], Path(tmp), Path(tmp), Path(tmp),
                                       {}, _Limits(), uid=None)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                ok = done.returncode == 0 and done.stdout.strip() == "ok"
                _probe[path] = (ok, "" if ok else f"bwrap cannot build a sandbox here: {_short(done.stderr)}")
            except (OSError, subprocess.TimeoutExpired) as err:
                _probe[path] = (False, f"bwrap cannot build a sandbox here: {err}")
    return _probe[path]


@dataclass
class _Limits:
    memory: int = 2 * 2**30  # RLIMIT_DATA per process (heap and private mappings); a kernel with torch uses ~1 GiB
    processes: int = 256  # processes and threads of the sandbox's uid
    file_size: int = 256 * 2**20  # largest file a submission may write
    cpu: int = 900  # CPU seconds per process
    tmp: int = 512 * 2**20  # size of the sandbox's /tmp (in memory)


def _mount_points(paths) -> list[str]:
    """bwrap arguments that create every missing parent folder of ``paths`` world-readable (0755)."""
    args, made = [], {"/"}
    for path in paths:
        parts = Path(path).parts
        for k in range(2, len(parts)):
            folder = str(Path(*parts[:k]))
            if folder not in made:
                made.add(folder)
                args += ["--perms", "0755", "--dir", folder]
    return args


def _python_dirs() -> list[str]:
    """The folders Python and its packages live in (read-only in the sandbox), not the course checkout."""
    import site
    import sysconfig

    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    dirs |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.add(site.getusersitepackages())
    dirs = sorted(d for d in dirs if d and os.path.isdir(d) and not d.startswith(("/usr/", "/etc/")))
    return [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


SANDBOX_HOME = "/home/student"
SANDBOX_PACKAGE = "/opt/lecturekit-grading"


def _sandbox_command(command, box: Path, ipc: Path, package: Path, env: dict, limits: _Limits,
                     uid: int | None) -> list[str]:
    """``prlimit ... bwrap ... command``: ``command`` in a fresh sandbox (see the module's docstring).

    ``box`` becomes the sandbox's home (the only writable folder besides /tmp and ``ipc``, which is
    mounted at its own path for the kernel's sockets); ``package`` (the withheld copy of lecturekit)
    is read-only at /opt. ``uid`` (when the grader runs as root): the unprivileged uid it runs as.
    """
    # RLIMIT_NPROC counts every task of the uid: a dedicated uid (root grader) gets the limit itself; an
    # ordinary user's sandbox gets it on top of the tasks that user already runs.
    nproc = limits.processes if uid is not None else limits.processes + _tasks_of(os.getuid())
    args = [shutil.which("prlimit") or "prlimit", f"--data={limits.memory}", f"--nproc={nproc}",
            f"--fsize={limits.file_size}", f"--cpu={limits.cpu}", "--core=0", "--nofile=1024", "--",
            _bwrap() or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if uid is None:
        args += ["--unshare-user", "--disable-userns"]
    else:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    args += ["--size", str(limits.tmp), "--perms", "1777", "--tmpfs", "/tmp"]  # before the mounts under /tmp
    python = _python_dirs()
    args += _mount_points([*python, str(ipc), SANDBOX_PACKAGE, SANDBOX_HOME])
    for folder in python:
        args += ["--ro-bind", folder, folder]
    args += ["--ro-bind", str(package), SANDBOX_PACKAGE, "--bind", str(box), SANDBOX_HOME,
             "--bind", str(ipc), str(ipc), "--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.tmp), "--perms", "1777", "--tmpfs", "/dev/shm",
             "--remount-ro", "/", "--chdir", f"{SANDBOX_HOME}/work", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args.append("--")
    if uid is not None:
        args += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                 "--bounding-set=-all", "--"]
    return args + list(command)


def _tasks_of(uid: int) -> int:
    """How many tasks (threads) run as ``uid`` now (Linux /proc)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                lines = (entry / "status").read_text().splitlines()
                if int(next(line for line in lines if line.startswith("Uid:")).split()[1]) == uid:
                    count += int(next(line for line in lines if line.startswith("Threads:")).split()[1])
    return count


def _kernel_env(home: str, package: str, env: dict | None) -> dict:
    base = {"HOME": home, "USER": "student", "LOGNAME": "student", "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8", "TMPDIR": "/tmp", "IPYTHONDIR": f"{home}/.ipython",
            "MPLCONFIGDIR": f"{home}/.config/matplotlib", "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
            "JUPYTER_DATA_DIR": f"{home}/.local/share/jupyter", "JUPYTER_RUNTIME_DIR": f"{home}/.local/share/jupyter/runtime",
            "PYTHONPATH": package, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "TORCH_HOME": f"{home}/.cache/torch", "XDG_CACHE_HOME": f"{home}/.cache",
            # One thread per submission: torch's default of one per core slows to a crawl when the cores
            # are shared (other submissions, other users); --jobs grades submissions side by side instead.
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **GRADING_ENV}
    return {**base, **(env or {})}


# ---------------------------------------------------------------------------------------------------
# Running a submission: a kernel driven over the Jupyter protocol, answers read from its messages
# ---------------------------------------------------------------------------------------------------

@dataclass
class _CellRun:
    answers: list = field(default_factory=list)
    error: str = ""  # "ename: evalue" of the cell's error, or a note (time limit)
    ran: bool = False


class _Stopped(Exception):
    """The instructor interrupted the batch (Ctrl-C): no report for this submission."""


_stop = threading.Event()  # set by grade_folder on KeyboardInterrupt: every running grade stops its kernel


def _kernel_manager(command, ipc: Path, uid: int | None):
    import zmq
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec

    class Manager(KernelManager):
        def write_connection_file(self, **kwargs):
            super().write_connection_file(**kwargs)
            os.chmod(self.connection_file, 0o644)  # the kernel (another uid for a root grader) reads it

    context = zmq.Context()
    context.setsockopt(zmq.MAXMSGSIZE, 64 * 2**20)  # a larger message drops the connection, not the grader
    km = Manager(transport="ipc", ip=str(ipc / "k"), connection_file=str(ipc / "kernel.json"), context=context)
    km._kernel_spec = KernelSpec(argv=list(command), display_name="graded submission", language="python",
                                 interrupt_mode="message", env={})
    return km, context


def _run_cells(nb, graded: set[int], command, ipc: Path, cwd: Path, kernel_log: Path, cell_timeout: float,
               timeout: float, uid: int | None, log: list[str]) -> tuple[dict[int, _CellRun], str]:
    """Run ``nb``'s code cells in a kernel started with ``command``; ``({cell index: run}, why it stopped)``.

    Answers are kept only from the cells in ``graded``. Printed output is kept as a tail in ``log``.
    """
    from queue import Empty

    km, context = _kernel_manager(command, ipc, uid)
    runs: dict[int, _CellRun] = {}
    kept, received = [0], [0]  # characters of log kept, bytes of answers received

    def keep(text: str) -> None:
        log.append(text)
        kept[0] += len(text)
        while kept[0] > 2 * LOG_BYTES and len(log) > 1:
            kept[0] -= len(log.pop(0))

    deadline = time.monotonic() + timeout
    try:
        with open(kernel_log, "wb") as out:  # the kernel's own stdout/stderr (its file size is limited)
            km.start_kernel(cwd=str(cwd), env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=max(5.0, min(120.0, deadline - time.monotonic())))
        except RuntimeError as err:
            with contextlib.suppress(OSError):
                log.append(kernel_log.read_bytes()[-LOG_BYTES // 2:].decode("utf-8", "replace"))
            return runs, f"not run: the kernel did not start ({_short(err, 200)})"
        # Part of starting the kernel, not of the first cell's time limit: import torch and lecturekit.
        try:
            kc.execute_interactive("import torch, lecturekit.grading", silent=True, store_history=False,
                                   timeout=max(5.0, min(120.0, deadline - time.monotonic())),
                                   output_hook=lambda msg: None)
        except (TimeoutError, RuntimeError) as err:
            return runs, f"not run: the kernel did not start ({_short(err, 200)})"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            if _stop.is_set():
                raise _Stopped()
            if time.monotonic() >= deadline:
                return runs, f"not run: the notebook hit its time limit of {timeout:g} s"
            run = runs[i] = _CellRun(ran=True)
            msg_id = kc.execute(cell.source, store_history=False, allow_stdin=False, stop_on_error=False)
            cell_deadline = min(deadline, time.monotonic() + cell_timeout)
            interrupted = False
            while True:
                if _stop.is_set():
                    raise _Stopped()
                now = time.monotonic()
                if now >= cell_deadline:
                    if interrupted or now >= deadline:
                        if now >= deadline:
                            run.error = run.error or f"time limit of {timeout:g} s per notebook exceeded"
                            return runs, f"not run: the notebook hit its time limit of {timeout:g} s"
                        return runs, "not run: the kernel did not stop after a cell's time limit"
                    run.error = f"time limit of {cell_timeout:g} s per cell exceeded"
                    km.interrupt_kernel()
                    interrupted, cell_deadline = True, min(deadline, now + 10)
                try:
                    msg = kc.get_iopub_msg(timeout=min(1.0, max(0.01, cell_deadline - now)))
                except Empty:
                    if not km.is_alive():
                        run.error = run.error or "the kernel died while running this cell"
                        return runs, "not run: the kernel died in an earlier cell"
                    continue
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg.get("msg_type"), msg.get("content", {})
                if kind == "stream":
                    keep(str(content.get("text", ""))[-LOG_BYTES:])
                elif kind in ("display_data", "execute_result", "update_display_data"):
                    data = content.get("data", {})
                    if i in graded and isinstance(data, dict) and MIME_KEY in data:
                        size = len(json.dumps(data[MIME_KEY]))
                        if len(run.answers) < ANSWERS_PER_CELL and received[0] + size <= ANSWER_BUDGET:
                            run.answers.append(data[MIME_KEY])
                            received[0] += size
                elif kind == "error":
                    if not interrupted:  # a KeyboardInterrupt the student raised is the student's error
                        run.error = f"{content.get('ename')}: {content.get('evalue')}"
                    keep("\n".join(str(t) for t in content.get("traceback", []))[-4000:])
                elif kind == "status" and content.get("execution_state") == "idle":
                    break
            with contextlib.suppress(Exception):  # replies we do not need; keep the queue short
                while True:
                    kc.get_shell_msg(timeout=0)
        return runs, ""
    finally:
        with contextlib.suppress(Exception):
            kc.stop_channels()
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)
        with contextlib.suppress(Exception):
            km.cleanup_resources()
        context.destroy(linger=0)




def _restore(nb, key: Key) -> tuple[set[int], dict[str, list[int]], list[str]]:
    """Put the key's graded cells into ``nb`` (in place), strip tags and markers; graded indices, notes."""
    notes = []
    for cell in nb.cells:
        meta = cell.get("metadata", {})
        for k in ("tags", "nbval", "nbgrader", "jupyter", "execution"):
            meta.pop(k, None)
        if cell.cell_type == "code" and _NBVAL_MARKER.search(cell.source):
            cell.source = _NBVAL_MARKER.sub("", cell.source)
    found = _graded_by_id(nb)
    remove = set()
    for ex_id, indices in found.items():
        official = key.cells.get(ex_id)
        if official is None:
            continue  # not an exercise of this assignment: an ordinary cell
        for n, i in enumerate(indices):
            if n < len(official):
                nb.cells[i] = copy.deepcopy(official[n])
            else:
                remove.add(i)
                notes.append(f"an extra copy of the graded cell of {ex_id!r} was not run")
    nb.cells = [c for i, c in enumerate(nb.cells) if i not in remove]
    by_id = {ex_id: idx for ex_id, idx in _graded_by_id(nb).items() if ex_id in key.cells}
    return {i for idx in by_id.values() for i in idx}, by_id, notes


def _judge(key: Key, ex_id: str, runs: list[_CellRun | None], status: str) -> Exercise:
    """Compare one exercise's values (from the kernel) with the key's references, in this process."""
    points = key.points[ex_id]
    answers = [r for rs in key.references[ex_id] for r in rs if r["check"] == "answer"]
    kind = "question" if answers else "code"
    explanation = _short(" ".join(r.get("because", "") for r in answers), 2 * MESSAGE_CHARS)
    fail = lambda message: Exercise(ex_id, 0.0, points, False, _short(message), kind, explanation)  # noqa: E731
    for run, references in zip(runs, key.references[ex_id]):
        if run is None or not run.ran:
            return fail(status or "not run: the notebook stopped before this cell")
        for n, ref in enumerate(references):
            if n >= len(run.answers):
                if run.error:
                    return fail(run.error)
                return fail(f"not every value reached the grader ({len(run.answers)} of {len(references)})")
            answer = run.answers[n]
            if not isinstance(answer, dict) or answer.get("check") != ref["check"] or \
                    answer.get("what", None) != ref.get("what", None):
                return fail(f"the graded cell's checks came back out of order (check {n + 1})")
            message = _decide(ref, answer)
            if message:
                return fail(f"AssertionError: [{ex_id}] {message}")
        if run.error:
            return fail(run.error)
        if len(run.answers) != len(references):
            return fail(f"the graded cell sent {len(run.answers)} values, {len(references)} expected")
    return Exercise(ex_id, points, points, True, "", kind, explanation)


def _decide(ref: dict, answer: dict) -> str | None:
    from . import grading

    kind = ref["check"]
    if kind == "answer":
        return _decide_answer(ref, answer)
    if kind in ("check", "source"):
        return None if answer.get("ok") is True else str(answer.get("message") or ref.get("message") or "a check failed")
    value = grading.decode_answer(answer.get("value"))
    what = ref.get("what", "your result")
    if kind == "tensor":
        return grading.tensor_problem(value, what)
    if kind == "shape":
        return grading.shape_problem(value, tuple(ref["shape"]), what)
    if kind == "close":
        return grading.close_problem(value, ref["reference"], what, ref["rtol"], ref["atol"], ref["scale_free"])
    return f"unknown check {kind!r}"


def _decide_answer(ref: dict, answer: dict) -> str | None:
    """An inline question: the student's answer (JSON) against the solution's, with the explanation."""
    from . import grading

    sent = answer.get("answer")
    if not isinstance(sent, dict) or not isinstance(sent.get("type"), str):
        return "the answer could not be read"
    sent = {"type": sent["type"][:80], **({"value": sent["value"]} if isinstance(sent.get("value"), (str, int, float))
                                          and not isinstance(sent.get("value"), bool) else {})}
    if sent["type"] in ("str", "number") and "value" not in sent:
        return "the answer could not be read"
    return grading.answer_problem(sent, ref.get("expected"), ref.get("choices") or None, ref.get("tolerance", 0.0),
                                  ref.get("because", ""), ref.get("what", "your answer"))


def _failed_report(name: str, key: Key, why: str, seconds: float = 0.0) -> Report:
    exercises = [Exercise(ex_id, 0.0, pts, False, _short(why),
                          "question" if any(r["check"] == "answer" for rs in key.references[ex_id] for r in rs) else "code")
                 for ex_id, pts in key.points.items()]
    manual = [ManualItem(ex_id, pts, "no answer") for ex_id, (pts, _) in key.manual.items()]
    return Report(name, 0.0, sum(key.points.values()), exercises, seconds, log=why, manual=manual)


def _official_assignment(name: str) -> Path:
    """The course's assignments/<name> (the checkout lecturekit lives in, or the current folder's course)."""
    import lecturekit

    roots = [Path(lecturekit.__file__).resolve().parent.parent, Path.cwd(), *Path.cwd().parents]
    for root in roots:
        if (root / "assignments" / name).is_file():
            return root / "assignments" / name
    raise ValueError(f"no official assignment named {name} in assignments/: pass against= (--against)")


def grade(submission, against=None, cell_timeout: float = 60, timeout: float = 300, env: dict | None = None,
          sandbox: bool | None = None, memory: int | None = None, reference=None, solution=None,
          name: str | None = None) -> Report:
    """Grade one submission (a path, or the notebook's bytes with ``name``) against ``against``.

    ``against``: a ``Key`` (``load_key``) or the official assignment (path or notebook; with
    ``solution=`` when the solution is not in solutions/ next to it); default: the course's
    assignment of the same name. ``reference`` is the old name of ``against``.
    ``cell_timeout``/``timeout``: seconds per cell / per notebook. ``sandbox``: None (default) uses
    bubblewrap and raises ``SandboxUnavailable`` when there is none; False runs without a sandbox
    (says so loudly). ``memory``: bytes per process in the sandbox (RLIMIT_DATA). ``env`` adds
    variables to the kernel's (minimal) environment. Always returns a ``Report`` for a readable key.
    """
    against = against if against is not None else reference
    if isinstance(submission, (bytes, bytearray)):
        raw, label = bytes(submission), name or "submission.ipynb"
    else:
        label = name or Path(submission).name
        raw = None
    key_owned = False
    if not isinstance(against, Key):
        against = load_key(against if against is not None else _official_assignment(label), solution)
        key_owned = True
    try:
        if raw is None:
            try:
                if Path(submission).is_symlink():
                    raise ValueError("it is a symbolic link, not a notebook")
                raw = Path(submission).read_bytes()
            except (OSError, ValueError) as err:
                return _failed_report(label, against, f"could not read the notebook: {_short(err, 200)}")
        return _grade(raw, label, against, cell_timeout, timeout, env, sandbox, memory)
    finally:
        if key_owned:
            against.close()


def _grade(raw: bytes, label: str, key: Key, cell_timeout: float, timeout: float, env, sandbox, memory) -> Report:
    start = time.perf_counter()
    use_sandbox = sandbox is not False
    if use_sandbox:
        ok, why = sandbox_available()
        if not ok:
            raise SandboxUnavailable(f"{why}. Refusing to grade without a sandbox; pass sandbox=False "
                                     "(--no-sandbox) to grade anyway, unprotected.")
    else:
        print(NO_SANDBOX_WARNING, file=sys.stderr)
    try:
        nb = _read_notebook(raw)
        manual = _manual_items(nb, key)
        graded, by_id, notes = _restore(nb, key)
    except Exception as err:  # unreadable JSON, not a notebook, malformed cells: still a report
        return _failed_report(label, key, f"could not read the notebook: {_short(err, 200)}",
                              time.perf_counter() - start)
    uid = None
    if use_sandbox and os.geteuid() == 0:
        uid = _claim_uid()
    scratch = Path(tempfile.mkdtemp(prefix="lecturekit-grade-"))
    log: list[str] = []
    try:
        box, ipc = scratch / "home", scratch / "ipc"
        for folder in (box, box / "work", ipc):
            folder.mkdir()
            if uid is not None:
                os.chown(folder, uid, uid)
        limits = _Limits(cpu=int(timeout * 2) + 60)
        if memory:
            limits.memory = int(memory)
        package = key.package()
        kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        if use_sandbox:
            command = _sandbox_command(kernel, box, ipc, package, _kernel_env(SANDBOX_HOME, SANDBOX_PACKAGE, env),
                                       limits, uid)
            cwd = scratch
        else:
            variables = _kernel_env(str(box), str(package), env)
            command = [shutil.which("prlimit") or "prlimit", f"--data={limits.memory}", f"--fsize={limits.file_size}",
                       f"--cpu={limits.cpu}", "--core=0", "--", "env", "-i",
                       *(f"{k}={v}" for k, v in variables.items()), *kernel]
            cwd = box / "work"
        runs, status = _run_cells(nb, graded, command, ipc, cwd, scratch / "kernel.log", cell_timeout, timeout,
                                  uid, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if uid is not None:
            _kill_uid(uid)
            _release_uid(uid)
    exercises = []
    for ex_id in key.points:
        indices = by_id.get(ex_id)
        if not indices:
            exercises.append(Exercise(ex_id, 0.0, key.points[ex_id], False, "graded cell missing"))
            continue
        exercises.append(_judge(key, ex_id, [runs.get(i) for i in indices], status))
    text = _ANSI.sub("", "".join(log))[-LOG_BYTES:]
    if notes:
        text = (text + "\n" + "\n".join(notes))[-LOG_BYTES:]
    return Report(label, sum(e.points for e in exercises), sum(e.max_points for e in exercises), exercises,
                  time.perf_counter() - start, text, manual)


def _kill_uid(uid: int) -> None:
    """Kill any process left running as a sandbox's uid (the PID namespace normally took them all)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                status = (entry / "status").read_text()
                real = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
                if real == uid:
                    os.kill(int(entry.name), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------

def _student(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder).with_suffix(""))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def report_filename(student: str) -> str:
    """``alice/hw`` -> ``alice__hw.json``: one flat folder of reports."""
    return re.sub(r"[^\w.\-]", "_", student.replace("/", "__").replace(os.sep, "__")) + ".json"


def grade_folder(folder, against=None, jobs: int = 1, out=None, solution=None, on_report=None,
                 similarity: bool = False, **kwargs) -> dict[str, Report]:
    """Grade every notebook under ``folder``: ``{student: Report}`` (``alice/01_...`` per subfolder).

    Every submission is read into memory first (a later change on disk changes nothing); the key is
    built once per assignment (``against``, default the official assignment of each notebook's name).
    Submissions are graded ``jobs`` at a time; with ``out``, each report is written there atomically
    (``report_filename``) as soon as it is graded, and ``COMPLETE`` when every one is. A notebook that
    cannot be read or graded gets a report that says why. Ctrl-C stops every kernel and re-raises.
    ``similarity`` (with ``out``): also write ``out/similarity.csv`` (``similarity_report``).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    submissions: dict[str, tuple[str, bytes | str]] = {}
    for p in paths:
        try:
            if p.is_symlink():
                raise ValueError("it is a symbolic link, not a notebook")
            if p.stat().st_size > SUBMISSION_BYTES:
                raise ValueError(f"it is larger than {SUBMISSION_BYTES // 2**20} MB")
            submissions[_student(p, folder)] = (p.name, p.read_bytes())
        except (OSError, ValueError) as err:
            submissions[_student(p, folder)] = (p.name, f"could not read the notebook: {_short(err, 200)}")
    keys: dict[str, Key] = {}
    owned = not isinstance(against, Key)

    def key_for(name: str) -> Key:
        if isinstance(against, Key):
            return against
        where = against if against is not None else _official_assignment(name)
        ident = str(where) if not hasattr(where, "cells") else "notebook"
        if ident not in keys:
            keys[ident] = load_key(where, solution)
        return keys[ident]

    for name, _ in submissions.values():  # build the keys before any submission runs
        key_for(name)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (out / "COMPLETE").unlink()
    reports: dict[str, Report] = {}

    def work(student: str) -> tuple[str, Report]:
        name, content = submissions[student]
        key = key_for(name)
        if isinstance(content, str):
            return student, _failed_report(name, key, content)
        try:
            return student, _grade(content, name, key, kwargs.get("cell_timeout", 60), kwargs.get("timeout", 300),
                                   kwargs.get("env"), kwargs.get("sandbox"), kwargs.get("memory"))
        except (_Stopped, SandboxUnavailable):
            raise
        except Exception as err:  # a grader failure on one notebook never ends the batch
            return student, _failed_report(name, key, f"could not grade the notebook: {type(err).__name__}: "
                                                      f"{_short(err, 200)}")

    _stop.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(work, s) for s in submissions]
        for future in as_completed(futures):
            student, report = future.result()
            reports[student] = report
            if out is not None:
                _write_atomically(out / report_filename(student), json.dumps(report.to_json(), indent=2))
            if on_report is not None:
                on_report(student, report)
    except BaseException:
        _stop.set()  # every running grade stops its kernel; no report claims a timeout
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        _stop.clear()
        if owned:
            for key in keys.values():
                key.close()
    reports = {s: reports[s] for s in submissions}
    if out is not None and similarity:
        rows = []
        for ident, key in ({"": against} if isinstance(against, Key) else keys).items():
            mine = {s: c for s, (n, c) in submissions.items() if isinstance(c, bytes) and key_for(n) is key}
            rows += similarity_report(mine, key)
        _write_atomically(out / "similarity.csv", similarity_csv(rows))
    if out is not None:
        _write_atomically(out / "COMPLETE", json.dumps({"students": len(reports), "time": time.time()}) + "\n")
    return reports


def format_report(report: Report) -> str:
    """The table ``lecturekit grade`` prints: exercise, points, passed, message, and the total."""
    width = max([len("exercise"), *(len(e.id) for e in report.exercises)]) + 2
    lines = [f"{report.notebook}  ({report.seconds:.1f} s)",
             f"{'exercise':{width}s}{'points':>10s}  passed  message"]
    width = max([width, *(len(m.id) + 2 for m in report.manual)])
    for e in report.exercises:
        lines.append(f"{e.id:{width}s}{f'{e.points:g}/{e.max_points:g}':>10s}  {'yes' if e.passed else 'no':6s}  "
                     f"{e.message}")
        if e.kind == "question" and e.explanation and e.explanation[:60] not in e.message:
            lines.append(f"{'':{width}s}{'':10s}          why: {e.explanation}")
    lines.append(f"{'total':{width}s}{f'{report.score:g}/{report.max_score:g}':>10s}")
    for m in report.manual:
        lines.append(f"{m.id:{width}s}{f'?/{m.max_points:g}':>10s}  {'-':6s}  {m.status} (free text, graded by hand)")
    if report.manual:
        lines.append(f"{'by hand':{width}s}{f'?/{report.manual_max_score:g}':>10s}  (not in the total above)")
    return "\n".join(lines)


def _cell(value) -> str:
    """A CSV cell a spreadsheet reads as text: a leading = + - @ (or tab, CR) gets a quote mark before it."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def reports_to_csv(reports: dict[str, Report]) -> str:
    """One row per student: student, notebook, points per exercise, score, max_score.

    When some report has free-text answers (graded by hand), they follow, counted apart: a column per
    answer (``<id> (manual)``: its status, ``pending`` or ``no answer``) and ``manual_max_score``.
    """
    ids: list[str] = []
    manual_ids: list[str] = []
    for report in reports.values():
        ids += [e.id for e in report.exercises if e.id not in ids]
        manual_ids += [m.id for m in report.manual if m.id not in manual_ids]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = [f"{i} (manual)" for i in manual_ids] + (["manual_max_score"] if manual_ids else [])
    writer.writerow([_cell(c) for c in ["student", "notebook", *ids, "score", "max_score", *extra]])
    for student, report in reports.items():
        points = {e.id: e.points for e in report.exercises}
        status = {m.id: ("pending" if m.status.startswith("pending") else m.status) for m in report.manual}
        row = [_cell(student), _cell(report.notebook), *(f"{points[i]:g}" if i in points else "" for i in ids),
               f"{report.score:g}", f"{report.max_score:g}"]
        if manual_ids:
            row += [status.get(i, "") for i in manual_ids] + [f"{report.manual_max_score:g}"]
        writer.writerow(row)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Similarity: solution code near-identical to the public reference, the instructor's solution or a classmate's
# ---------------------------------------------------------------------------------------------------

def code_tokens(code: str) -> list[str]:
    """Python tokens of ``code`` with comments, docstrings and layout dropped and local names made equal.

    Keywords, operators, numbers and attribute names (after a dot) stay; every other name becomes
    ``_``, so that renaming variables does not hide a copy.
    """
    import keyword
    import tokenize

    tokens, previous = [], ""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER, tokenize.STRING):
                continue
            text = tok.string
            if tok.type == tokenize.NAME and not keyword.iskeyword(text) and previous != ".":
                text = "_"
            tokens.append(text)
            previous = tok.string
    except (tokenize.TokenError, IndentationError, SyntaxError):
        tokens = code.split()
    return tokens


def _student_code(nb, key: Key) -> dict[str, str]:
    """exercise id -> the code a student wrote for it: lines of the code cells since the previous graded
    cell that are not in the assignment's scaffold (the official graded cells and the stubs)."""
    scaffold = {line.strip() for cs in key.cells.values() for c in cs for line in c.source.splitlines()}
    scaffold |= {s.strip() for s in STUB}
    code, pending = {}, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        match = _EXERCISE.search(cell.source)
        if match and match.group(1) in key.cells:
            code[match.group(1)] = code.get(match.group(1), "") + "\n".join(pending)
            pending = []
        else:
            pending += [line for line in cell.source.splitlines() if line.strip() not in scaffold]
    return code


def _body(source: str) -> str:
    """A function's source without its signature and docstring (what a student would copy)."""
    try:
        tree = ast.parse(textwrap.dedent(source))
        fn = tree.body[0]
        body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
        return "\n".join(ast.unparse(node) for node in body)
    except Exception:
        return source


def similarity_report(submissions: dict, key: Key, threshold: float = 0.9, min_tokens: int = 25) -> list[dict]:
    """Pairs of near-identical solution code, for a person to look at (nothing is penalised).

    ``submissions``: student -> notebook (bytes, path or notebook). For each exercise, each student's
    code (``_student_code``) is compared with the public source of the withheld functions, the
    instructor's solution and every other student's code: ``difflib`` ratio over ``code_tokens``
    (names normalised). Rows ``{"exercise", "student", "similar_to", "ratio"}`` with ratio >=
    ``threshold``, for code of at least ``min_tokens`` tokens (short answers are alike by nature).
    """
    import difflib

    codes = {}
    for student, notebook in submissions.items():
        with contextlib.suppress(Exception):
            codes[student] = _student_code(_read_notebook(notebook), key)
    rows = []
    for ex_id in key.points:
        others = {f"public source of {name}": code_tokens(_body(src)) for name, src in key.sources.get(ex_id, {}).items()}
        others["the instructor's solution"] = code_tokens(key.blocks.get(ex_id, ""))
        mine = {s: code_tokens(c.get(ex_id, "")) for s, c in codes.items()}
        students = sorted(mine)
        for n, student in enumerate(students):
            tokens = mine[student]
            if len(tokens) < min_tokens:
                continue
            candidates = {**others, **{s: mine[s] for s in students[n + 1:]}}
            for other, theirs in candidates.items():
                if len(theirs) < min_tokens:
                    continue
                ratio = difflib.SequenceMatcher(None, tokens, theirs, autojunk=False).ratio()
                if ratio >= threshold:
                    rows.append({"exercise": ex_id, "student": student, "similar_to": other, "ratio": round(ratio, 3)})
    return sorted(rows, key=lambda r: (-r["ratio"], r["exercise"], r["student"]))


def similarity_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["exercise", "student", "similar_to", "ratio"])
    for row in rows:
        writer.writerow([_cell(row["exercise"]), _cell(row["student"]), _cell(row["similar_to"]), row["ratio"]])
    return buffer.getvalue()
