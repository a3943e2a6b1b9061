"""The Colab install cell and lecturekit.colab.setup, in a simulated Colab (a fake ``google.colab``).

Nothing is installed: ``subprocess.run`` is replaced by a recorder, which also reads the pip
constraints file while it exists.
"""
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from lecturekit import colab

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_colab(monkeypatch):
    """sys.modules holds google and google.colab(.output); returns the list of widget-manager calls."""
    enabled = []
    google = types.ModuleType("google")
    google.__path__ = []
    colab_module = types.ModuleType("google.colab")
    colab_module.__path__ = []
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: enabled.append(True)
    google.colab, colab_module.output = colab_module, output
    for name, module in {"google": google, "google.colab": colab_module, "google.colab.output": output}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return enabled


@pytest.fixture
def pip_calls(monkeypatch):
    """Record every subprocess.run command (and the constraints file's text when there is one)."""
    calls = []

    def run(command, check=False, **kwargs):
        constraints = command[command.index("-c") + 1] if "-c" in command else None
        calls.append(dict(command=list(command), constraints=Path(constraints).read_text() if constraints else None))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def installed(name):
    import importlib.metadata

    return importlib.metadata.version(name)


def test_setup_does_nothing_outside_colab(pip_calls, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(colab.importlib.util, "find_spec", lambda name: None)
    assert colab.on_colab() is False
    assert colab.setup() is False and pip_calls == []


def test_setup_on_colab_installs_missing_requirements_and_pins_torch(fake_colab, pip_calls, monkeypatch, capsys):
    requirements = ["torch>=2.2", "torchvision>=0.17", "numpy>=1.23", "ipywidgets>=7.6,<9", "scikit-image>=0.20",
                    'pytest>=7; extra == "dev"']
    monkeypatch.setattr(colab.importlib.metadata, "requires", lambda dist: requirements)
    assert colab.setup() is True
    assert fake_colab == [True]  # custom widget manager enabled once
    (call,) = pip_calls
    command = call["command"]
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "--upgrade" not in command
    wanted = command[command.index("-c") + 2:]
    assert wanted == ["scikit-image>=0.20"]  # protected packages are never requested, extras never installed
    pins = dict(line.split("==") for line in call["constraints"].split())
    assert pins == {name: installed(name) for name in ("torch", "torchvision", "ipywidgets", "numpy")}
    assert "custom widgets enabled" in capsys.readouterr().out


def test_setup_requests_a_protected_package_only_when_it_is_missing(fake_colab, pip_calls, monkeypatch):
    monkeypatch.setattr(colab.importlib.metadata, "requires", lambda dist: ["ipywidgets>=7.6,<9", "tqdm>=4.60"])
    real_version = colab._installed_version
    monkeypatch.setattr(colab, "_installed_version", lambda name: None if name == "ipywidgets" else real_version(name))
    colab.setup()
    command, constraints = pip_calls[0]["command"], pip_calls[0]["constraints"]
    assert command[-2:] == ["ipywidgets>=7.6,<9", "tqdm>=4.60"]
    assert "ipywidgets" not in constraints and f"torch=={installed('torch')}" in constraints.split()


def test_setup_reads_the_installed_package_metadata(fake_colab, pip_calls):
    """Against the real metadata of the installed lecturekit: every non-protected requirement is passed on."""
    colab.setup()
    wanted = pip_calls[0]["command"][pip_calls[0]["command"].index("-c") + 2:]
    names = {colab._name(r) for r in wanted}
    assert names and not names & set(colab.PROTECTED) and "scikit-learn" in names and "pytest" not in names


@pytest.mark.parametrize("source", ["lecturekit", "lecturekit==0.1.0",
                                    "https://example.org/dist/lecturekit-0.1.0-py3-none-any.whl",
                                    "git+https://github.com/someone/lecturekit.git@main"])
def test_the_cell_installs_from_its_source_without_deps_then_calls_setup(source, fake_colab, pip_calls, monkeypatch):
    monkeypatch.setattr(colab.importlib.metadata, "requires", lambda dist: ["tqdm>=4.60"])
    cell = colab.install_cell(source)
    assert cell.startswith(colab.CELL_MARKER) and len(cell.splitlines()) <= 11
    exec(compile(cell, "<install cell>", "exec"), {})
    first, second = (c["command"] for c in pip_calls)
    assert first == [sys.executable, "-m", "pip", "install", "-q", "--no-deps", source]
    assert "-c" in second and fake_colab == [True]


def test_the_cell_says_what_to_do_when_the_source_cannot_be_installed(fake_colab, monkeypatch):
    """On Colab with the default source before the course is on PyPI: a clear error, and setup never runs."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append(command) or
                        subprocess.CompletedProcess(command, 1))
    with pytest.raises(RuntimeError, match=r"could not install the course from 'lecturekit'.*--source URL"):
        exec(compile(colab.install_cell("lecturekit"), "<install cell>", "exec"), {})
    assert len(calls) == 1 and fake_colab == []  # no second pip call, widgets untouched


def test_the_cell_does_nothing_locally(pip_calls, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile(colab.install_cell("lecturekit"), "<install cell>", "exec"), {})
    assert pip_calls == []


@pytest.mark.parametrize("bad", ["", "./dist/lecturekit.whl", "/home/me/lecturekit", "lecturekit; rm -rf /",
                                 "http://insecure.example/lecturekit.whl", 'lecturekit"', "https://example.org/page"])
def test_sources_that_colab_cannot_install_are_refused(bad):
    with pytest.raises(ValueError, match="expected a PyPI name"):
        colab.install_cell(bad)


def _course_copy(tmp_path: Path) -> Path:
    for folder in ("notebooks", "solutions", "assignments"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lecturekit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lecturekit.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_colab_command_rewrites_only_the_install_cell(tmp_path):
    root = _course_copy(tmp_path)
    before = {p: nbformat.read(p, as_version=4) for p in sorted(root.glob("*/*.ipynb"))}
    source = "git+https://github.com/someone/lecturekit.git"
    out = _lecturekit("colab", "--source", source, cwd=root)
    assert out.returncode == 0, out.stderr
    assert colab.configured_source(root) == source  # saved as the one configured source
    assert 'colab_source = "git+https://github.com/someone/lecturekit.git"' in (root / "pyproject.toml").read_text()
    for path, old in before.items():
        new = nbformat.read(path, as_version=4)
        index = colab._install_cell_index(new)
        assert index is not None and new.cells[index].source == colab.install_cell(source), path
        assert len(new.cells) == len(old.cells) + (colab._install_cell_index(old) is None)
        others_old = [c.source for i, c in enumerate(old.cells) if i != colab._install_cell_index(old)]
        others_new = [c.source for i, c in enumerate(new.cells) if i != index]
        assert others_old == others_new, path  # nothing else changed
    assert _lecturekit("colab", "--check", cwd=root).returncode == 0  # idempotent, and --check agrees
    assert _lecturekit("assignments", "--check", cwd=root).returncode == 0  # assignments still match solutions
    again = _lecturekit("colab", cwd=root)
    assert again.returncode == 0 and "0 notebooks changed" in again.stdout


def test_colab_check_names_stale_notebooks_and_a_notebook_without_the_cell_gets_one(tmp_path):
    root = _course_copy(tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# New"), nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, root / "notebooks" / "99_new.ipynb")
    out = _lecturekit("colab", "--check", cwd=root)
    assert out.returncode == 1 and "out of date: notebooks/99_new.ipynb" in out.stdout
    assert colab.rewrite_notebooks(root, "lecturekit")
    new = nbformat.read(root / "notebooks" / "99_new.ipynb", as_version=4)
    assert [c.source for c in new.cells] == ["# New", colab.install_cell("lecturekit"), "x = 1"]
    bad = _lecturekit("colab", "--source", "./dist/x.whl", cwd=root)
    assert bad.returncode == 2 and "expected a PyPI name" in bad.stderr


def test_set_configured_source_adds_the_section_when_missing(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match="colab_source"):
        colab.configured_source(tmp_path)
    colab.set_configured_source(tmp_path, "lecturekit==0.2")
    colab.set_configured_source(tmp_path, "lecturekit==0.3")
    assert colab.configured_source(tmp_path) == "lecturekit==0.3"
    assert (tmp_path / "pyproject.toml").read_text().count("[tool.lecturekit]") == 1


def test_committed_notebooks_install_from_the_configured_source():
    source = colab.configured_source(ROOT)
    stale = colab.rewrite_notebooks(ROOT, source, check_only=True)
    assert not stale, f"run `lecturekit colab`: {[p.name for p in stale]} do not install from {source}"
