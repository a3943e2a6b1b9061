"""nbgrader compatibility (issue 13): the real nbgrader grades an assignment as ``lecturekit grade`` does.

The solution notebooks carry nbgrader's cell metadata (``grader.nbgrader_metadata``, written by
``lecturekit assignments``). Here nbgrader itself, through its Python API, in a temporary course
folder with its own gradebook database, runs ``generate_assignment`` on assignment 0's solution and
``autograde`` on four submissions (the solution, the untouched assignment and two known wrong answers
of the catalogue in tests/test_grading.py); its score of every graded cell must equal lecturekit's
score of the exercise, and its manually graded cells must be lecturekit's free-text answers.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from lecturekit import grader

nbgrader = pytest.importorskip("nbgrader", reason="nbgrader is a dev dependency (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_what_the_network_learned.ipynb"
ASSIGNMENT = "a0"  # nbgrader's assignment id (a folder name)
WRONG_ONES = ("pca_not_centred", "question_pixel_space_groups_classes")  # a code exercise and an inline question


def _catalogue() -> dict:
    spec = importlib.util.spec_from_file_location("catalogue", ROOT / "tests" / "test_grading.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WRONG


def _wrong(name: str, path: Path) -> Path:
    """The whole solution notebook with one known wrong answer of the catalogue."""
    notebook, _, old, new = _catalogue()[name]
    assert notebook == NOTEBOOK
    nb = nbformat.read(ROOT / "solutions" / NOTEBOOK, as_version=4)
    hits = [c for c in nb.cells if old in c.source and grader.BEGIN in c.source]
    assert len(hits) == 1
    hits[0].source = hits[0].source.replace(old, new)
    nbformat.write(nb, path)
    return path


def test_solution_metadata_is_what_the_tooling_writes_and_nbgrader_accepts():
    from nbgrader.nbgraderformat import MetadataValidator

    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert nbformat.writes(grader.nbgrader_metadata(nb, path.name)).rstrip("\n") == \
            path.read_text(encoding="utf-8").rstrip("\n"), f"{path.name}: run `lecturekit assignments`"
        MetadataValidator().validate_nb(nb)  # nbgrader's own schema check (raises on a bad cell)
        meta = [c.metadata["nbgrader"] for c in nb.cells if "nbgrader" in c.metadata]
        graded = {i for i, _ in grader.graded_cells(nb).values()}
        assert {m["grade_id"] for m in meta if m["grade"] and not m["solution"]} == graded
        assert all(m["locked"] for m in meta if m["grade"] and not m["solution"])
        assert len([m for m in meta if m["solution"]]) == len(grader.solution_blocks(nb))


@pytest.mark.slow
def test_nbgrader_autograde_scores_equal_lecturekit_grade(tmp_path, monkeypatch):
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    for name, value in grader.GRADING_ENV.items():  # the settings lecturekit grade's kernels get
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # nbgrader runs its database migrations with the `alembic` command: the one next to this Python
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    course = tmp_path / "course"
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    shutil.copy(ROOT / "solutions" / NOTEBOOK, course / "source" / ASSIGNMENT / NOTEBOOK)
    config = Config()
    config.CourseDirectory.root = str(course)
    config.CourseDirectory.db_url = f"sqlite:///{tmp_path / 'gradebook.db'}"
    config.Execute.timeout = 300
    api = NbGraderAPI(config=config)
    result = api.generate_assignment(ASSIGNMENT)
    assert result["success"], result.get("error") or result.get("log")

    # nbgrader's student version is lecturekit's assignments/ notebook, cell by cell
    released = nbformat.read(course / "release" / ASSIGNMENT / NOTEBOOK, as_version=4)
    ours = nbformat.read(ROOT / "assignments" / NOTEBOOK, as_version=4)
    assert [c.source for c in released.cells] == [c.source for c in ours.cells]

    submissions = {"solution": ROOT / "solutions" / NOTEBOOK,
                   "untouched": course / "release" / ASSIGNMENT / NOTEBOOK}
    for name in WRONG_ONES:
        submissions[name.replace("_", "-")] = _wrong(name, tmp_path / f"{name}.ipynb")
    for student, path in submissions.items():
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        shutil.copy(path, folder / NOTEBOOK)

    key = grader.load_key(ROOT / "assignments" / NOTEBOOK)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            ours = dict(zip(submissions, pool.map(lambda p: grader.grade(p, against=key, timeout=240),
                                                  submissions.values())))
    finally:
        key.close()
    for student in submissions:
        result = api.autograde(ASSIGNMENT, student)
        assert result["success"], result.get("error") or result.get("log")

    with Gradebook(config.CourseDirectory.db_url) as gb:
        for student, report in ours.items():
            theirs, manual = {}, {}
            for grade in gb.find_submission_notebook(NOTEBOOK[:-6], ASSIGNMENT, student).grades:
                if grade.cell.cell_type == "markdown":
                    manual[grade.name] = grade.needs_manual_grade
                else:
                    theirs[grade.name] = grade.auto_score
            assert theirs == {e.id: e.points for e in report.exercises}, (student, report.exercises)
            assert manual == {m.id: m.status.startswith("pending") for m in report.manual}, student
            print(f"{student}: nbgrader {sum(theirs.values()):g}, lecturekit {report.score:g} of {report.max_score:g}")
    assert ours["solution"].score == ours["solution"].max_score > ours["pca-not-centred"].score > 0
    assert ours["untouched"].score == 0
    assert ours["question-pixel-space-groups-classes"].score == ours["solution"].max_score - 1
