import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lecturekit import cli

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lecturekit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("lab", "course", "train"):
        assert command in out.stdout


def test_course_builds_html_and_index(tmp_path):
    """A two-cell notebook stands in for the course: executed, exported, linked from the index."""
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny lecture"),
                nbformat.v4.new_code_cell("import os\nprint('standin=' + os.environ['LECTUREKIT_STANDIN'])")]
    nbformat.write(nb, tmp_path / "notebooks" / "00_tiny.ipynb")
    bad = nbformat.v4.new_notebook()
    bad.cells = [nbformat.v4.new_code_cell("raise RuntimeError('broken cell')")]
    nbformat.write(bad, tmp_path / "notebooks" / "01_broken.ipynb")
    results = cli.build_course(tmp_path, tmp_path / "build", fast=True)
    assert [r["status"] for r in results][0] == "ok" and results[1]["status"].startswith("failed")
    page = (tmp_path / "build" / "00_tiny.html").read_text()
    assert "standin=" in page  # the cell's output is in the page
    index = (tmp_path / "build" / "index.html").read_text()
    assert 'href="00_tiny.html"' in index and "Tiny lecture" in index and 'href="01_broken.html"' in index


def test_find_root_names_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="notebooks"):
        cli.find_root(tmp_path)
    assert cli.find_root(ROOT / "lecturekit") == ROOT
