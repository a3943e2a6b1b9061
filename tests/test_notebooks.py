"""Every lecture notebook runs top to bottom, offline, with LECTUREKIT_FAST=1 and stand-in weights.

Each notebook is its own test, executed in a fresh kernel by the course build (the session fixture
``built_notebook``, shared with tests/test_built_course.py, which checks the page it makes), as
``pytest --nbval-lax`` would: any cell that raises fails it. The time each takes is printed (the issues
ask for at most 60 s each; see benchmarks/RESULTS.md). One notebook alone, as the README says:
``pytest --nbval-lax --nbval-current-env notebooks/NN_x.ipynb``.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [pytest.param(p, id=p.stem, marks=pytest.mark.xdist_group(p.stem))
                                      for p in NOTEBOOKS])
def test_notebook_runs(notebook, built_notebook):
    record = built_notebook(notebook)
    print(f"{notebook.name}: {record['seconds']:.1f} s")
    assert record["status"] == "ok", f"{notebook.name} {record['status']}\n{record['error']}"


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in [*NOTEBOOKS, *sorted((ROOT / "solutions").glob("*.ipynb")), *sorted((ROOT / "assignments").glob("*.ipynb"))]:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name} has outputs in cells {dirty}: commit notebooks clean"


def test_notebooks_are_valid_nbformat():
    """A cell ``id`` in a notebook of nbformat 4.4 (or a 4.5 cell without one) is invalid: nbconvert logs
    "Notebook JSON is invalid" at every build and other tools may refuse the file."""
    import nbformat

    for path in [*NOTEBOOKS, *sorted((ROOT / "solutions").glob("*.ipynb")), *sorted((ROOT / "assignments").glob("*.ipynb"))]:
        with open(path, encoding="utf-8") as f:
            nb = nbformat.reads(f.read(), as_version=nbformat.NO_CONVERT)
        nbformat.validate(nb)  # raises ValidationError naming the cell
