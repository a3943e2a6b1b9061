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


# ---- every subcommand the README names: --help for all, the quick ones for real -----------------

def _lecturekit(*args, cwd, timeout=300):
    """Run ``python -m lecturekit.cli ARGS`` in ``cwd``, as a user would from that folder."""
    return subprocess.run([sys.executable, "-m", "lecturekit.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _subcommands() -> list[str]:
    """The subcommands argparse lists in ``lecturekit --help`` ({lab,course,...})."""
    import re

    usage = _lecturekit("--help", cwd=ROOT).stdout
    return re.search(r"\{([a-z,_-]+)\}", usage).group(1).split(",")


def _tiny_course(folder: Path) -> Path:
    """A course folder with one short notebook: what find_root and `lecturekit course` need."""
    (folder / "notebooks").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 00 · Tiny"), nbformat.v4.new_code_cell("print(6 * 7)")]
    nbformat.write(nb, folder / "notebooks" / "00_tiny.ipynb")
    return folder


def test_readme_commands_are_subcommands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    import re

    named = set(re.findall(r"^lecturekit (\w+)", readme, flags=re.M))
    assert named and named <= set(_subcommands()), f"README names {named}, the CLI has {_subcommands()}"


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, tmp_path):
    out = _lecturekit(command, "--help", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: lecturekit {command}"), out.stdout[:200]


def test_course_command_runs_in_a_course_folder(tmp_path):
    root = _tiny_course(tmp_path / "course")
    out = _lecturekit("course", "--fast", "--only", "00", cwd=root / "notebooks")  # works from a subfolder too
    assert out.returncode == 0, out.stdout + out.stderr
    assert "00_tiny.ipynb" in out.stdout and "ok" in out.stdout
    assert "42" in (root / "build" / "00_tiny.html").read_text(encoding="utf-8")
    assert 'href="00_tiny.html"' in (root / "build" / "index.html").read_text(encoding="utf-8")


def test_commands_outside_a_course_folder_say_so(tmp_path):
    for command in ("course", "assignments"):
        out = _lecturekit(command, cwd=tmp_path)
        assert out.returncode != 0 and "no notebooks/ folder" in out.stderr, (command, out.stderr)


def test_assignments_command_writes_and_checks(tmp_path):
    import shutil

    root = _tiny_course(tmp_path)
    shutil.copytree(ROOT / "solutions", root / "solutions")
    out = _lecturekit("assignments", "--check", cwd=root)
    assert out.returncode == 1 and "out of date" in out.stdout  # no assignments/ yet
    out = _lecturekit("assignments", cwd=root)
    assert out.returncode == 0 and "wrote" in out.stdout
    assert sorted(p.name for p in (root / "assignments").glob("*.ipynb")) == \
        sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
    assert _lecturekit("assignments", "--check", cwd=root).returncode == 0


def test_grade_command_scores_a_submission(tmp_path):
    # A submission named like an official assignment is graded against it by default (issue 14): the
    # solution scores full marks, in the sandbox, with the JSON report where it was asked for.
    import json
    import shutil

    name = "02_synthesizing_images.ipynb"
    shutil.copy(ROOT / "solutions" / name, tmp_path / name)
    out = _lecturekit("grade", name, "--json", "report.json", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    # 10 points of code exercises and an inline question; its free-text question is counted apart (issue 13)
    assert report["score"] == report["max_score"] == 11.0 and report["manual_max_score"] == 1.0, report
    # no official assignment of that name and no --against: refused with the reason, not graded
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from lecturekit import grading")]
    nbformat.write(nb, tmp_path / "sub.ipynb")
    unknown = _lecturekit("grade", "sub.ipynb", cwd=tmp_path)
    assert unknown.returncode == 2 and "no official assignment named sub.ipynb" in unknown.stderr, unknown.stderr
    missing = _lecturekit("grade", "nothing.ipynb", cwd=tmp_path)
    assert missing.returncode == 2 and "no such submission" in missing.stderr


def test_lab_passes_allow_root_only_as_root(tmp_path, monkeypatch):
    root = _tiny_course(tmp_path)
    monkeypatch.chdir(root)
    pytest.importorskip("jupyterlab", reason="JupyterLab is the `lab` extra")
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command: calls.append(command) or 0)
    for uid, expected in ((0, True), (1000, False)):
        monkeypatch.setattr(cli.os, "geteuid", lambda uid=uid: uid)
        assert cli.main(["lab", "--no-browser"]) == 0
        assert ("--allow-root" in calls[-1]) is expected and "--no-browser" in calls[-1]
        assert calls[-1][:5] == [sys.executable, "-m", "jupyter", "lab", str(root / "notebooks")]
    cli.main(["lab", "--allow-root"])
    assert calls[-1].count("--allow-root") == 1


def test_lab_command_starts_jupyterlab(tmp_path):
    """For real, as far as it goes without a server: `jupyter lab --version` through the command."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is the `lab` extra")
    root = _tiny_course(tmp_path)
    out = _lecturekit("lab", "--version", cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.strip()[0].isdigit(), out.stdout + out.stderr


@pytest.mark.slow
def test_train_command_runs_a_few_steps(tmp_path):
    out = _lecturekit("train", "--steps", "2", "--out", str(tmp_path / "w.pt"), "--quiet", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained 2 steps" in out.stdout and (tmp_path / "w.pt").is_file()


# ---- benchmarks/run.py: every bench_*.py in its own process, one summary table ----------------------

def _bench_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runner_runs_each_benchmark_and_summarises(tmp_path, capsys):
    (tmp_path / "bench_a.py").write_text("import sys\nprint('| a row | SLOW |', sys.argv[1:])\n")
    (tmp_path / "bench_b.py").write_text("import sys\nprint('quick mode: --quick', sys.argv[1:])\nsys.exit(3)\n")
    (tmp_path / "bench_c.py").write_text("print('c ran')\n")
    (tmp_path / "helper.py").write_text("raise SystemExit('not a benchmark')\n")
    runner = _bench_runner()
    assert runner.main(["--dir", str(tmp_path), "--fast"]) == 1  # bench_b failed
    out = capsys.readouterr().out
    table = out[out.rindex("| benchmark"):].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["bench_a", "bench_b", "bench_c"]
    assert "| ok " in table[2] and "SLOW" in table[2] and "exit 3" in table[3]
    assert "['--quick']" in out and "| a row | SLOW | []" in out  # --quick only where the script has it
    assert runner.main(["--dir", str(tmp_path), "--only", "c"]) == 0
    assert "bench_a" not in capsys.readouterr().out.split("| benchmark")[-1]


def test_bench_runner_stops_a_benchmark_that_hangs(tmp_path, capsys):
    (tmp_path / "bench_hang.py").write_text("import time\ntime.sleep(60)\n")
    runner = _bench_runner()
    assert runner.main(["--dir", str(tmp_path), "--timeout", "2"]) == 1
    assert "timeout (2 s)" in capsys.readouterr().out


def test_bench_runner_finds_the_real_benchmarks():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--list"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench_attribution" in out.stdout.split()

