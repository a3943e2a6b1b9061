"""Every lecture notebook runs top to bottom under nbval (--nbval-lax), offline, with LECTUREKIT_FAST=1.

Each notebook is its own test, run in a fresh pytest process as a student's kernel would be; the
time each takes is printed (the issues ask for at most 60 s each; see benchmarks/RESULTS.md).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    env = dict(os.environ, LECTUREKIT_FAST="1", LECTUREKIT_STANDIN="1", MPLBACKEND="Agg")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(notebook)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    print(f"{notebook.name}: {seconds:.1f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for path in [*NOTEBOOKS, *sorted((ROOT / "solutions").glob("*.ipynb")), *sorted((ROOT / "assignments").glob("*.ipynb"))]:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name} has outputs in cells {dirty}: commit notebooks clean"
