"""Colab: the install cell at the top of every notebook, and what it calls once lecturekit is there.

Colab ships torch, torchvision and ipywidgets 7 built for its runtime; upgrading any of them breaks
the runtime (a CUDA mismatch, or widgets that no longer render) and asks for a restart. So the cell

1. installs lecturekit itself with ``pip install --no-deps SOURCE`` (nothing else can move), then
2. calls :func:`setup`, which installs only the requirements that are missing, with a pip constraints
   file that pins the installed torch, torchvision, ipywidgets and numpy (pip may not change them to
   satisfy another package), and enables Colab's custom widget manager for the explorers.

SOURCE is the one place the course is installed from: a PyPI name (``lecturekit``), a wheel URL or a
git URL. It is configured once in ``pyproject.toml`` (``[tool.lecturekit] colab_source``) and written
into every notebook by ``lecturekit colab [--source SPEC]`` (:func:`rewrite_notebooks`); the cell
cannot import it from the package, which is not installed yet when the cell starts.
Locally the cell does nothing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTECTED", "on_colab", "setup", "install_cell", "validate_source", "configured_source",
           "set_configured_source", "rewrite_notebooks"]

# Packages Colab ships built for its runtime; pip must never upgrade or replace them there.
PROTECTED = ("torch", "torchvision", "ipywidgets", "numpy")
# The marker that identifies the install cell (its first line).
CELL_MARKER = "# On Colab: install lecturekit"


def on_colab() -> bool:
    """True inside a Colab runtime (its kernel imports ``google.colab`` at start-up)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no ``google`` package at all
        return False


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string ('scikit-learn>=1.2' -> 'scikit-learn')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"expected a requirement such as 'numpy>=1.23', got {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirements(dist: str = "lecturekit") -> list[str]:
    """The distribution's own requirements (no extras), from its installed metadata."""
    return [r for r in importlib.metadata.requires(dist) or [] if "extra ==" not in r]


def setup(dist: str = "lecturekit", quiet: bool = True) -> bool:
    """On Colab: install the missing requirements of ``dist`` without moving :data:`PROTECTED`, enable widgets.

    Run by the notebooks' first cell after ``pip install --no-deps SOURCE``. The requirements come from
    the installed package's metadata; protected packages that are installed are left out and pinned
    to their installed version in a constraints file (``pip install -c``), so that no other
    requirement can pull in a different torch. Returns False (and does nothing) outside Colab.
    """
    if not on_colab():
        return False
    pins = {name: _installed_version(name) for name in PROTECTED}
    wanted = [r for r in _requirements(dist) if pins.get(_name(r)) is None]  # missing protected ones stay
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items() if v), encoding="utf-8")
        command = [sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "-c", str(constraints),
                   *wanted]
        subprocess.run(command, check=True)
    from google.colab import output  # type: ignore[import-not-found]

    output.enable_custom_widget_manager()
    kept = ", ".join(f"{n} {v}" for n, v in pins.items() if v)
    print(f"lecturekit {_installed_version(dist)} ready; kept Colab's {kept}; custom widgets enabled")
    return True


# ---- the cell, and writing it into the notebooks ---------------------------------------------------

_PYPI_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?((==|>=|<=|~=|!=|<|>)[A-Za-z0-9.*+!,<>=~-]+)?")
_URL = re.compile(r"(git\+)?https://[^\s'\"\\]+")


def validate_source(source: str) -> str:
    """``source`` if it is a PyPI requirement, a wheel URL or a git URL; ValueError otherwise.

    Local paths are refused: a Colab runtime cannot see this machine's files.
    """
    source = source.strip()
    if _PYPI_NAME.fullmatch(source):
        return source
    if _URL.fullmatch(source) and (source.startswith("git+") or source.split("#")[0].endswith((".whl", ".tar.gz", ".zip"))):
        return source
    raise ValueError("expected a PyPI name (lecturekit or lecturekit==0.1.0), a wheel URL "
                     "(https://.../lecturekit-0.1.0-py3-none-any.whl) or a git URL "
                     f"(git+https://github.com/OWNER/lecturekit.git), got {source!r}")


def _install_failed(source: str) -> str:
    """What the cell says when pip cannot install ``source`` (e.g. the course is not on PyPI yet)."""
    return (f"could not install the course from {source!r} (pip's message is above). Not on PyPI yet? "
            "Your instructor sets its wheel or git URL once: `lecturekit colab --source URL`.")


def install_cell(source: str) -> str:
    """The source of the first code cell of every notebook, installing from ``source``."""
    source = validate_source(source)
    return (f"{CELL_MARKER} without touching Colab's torch, torchvision or\n"
            f"# ipywidgets, and enable its widgets (source: {source}). Locally: nothing happens.\n"
            "import subprocess, sys\n"
            "\n"
            'if "google.colab" in sys.modules:\n'
            '    if subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", '
            f'{json.dumps(source)}]).returncode:\n'
            f'        raise RuntimeError({json.dumps(_install_failed(source))})\n'
            "    from lecturekit.colab import setup\n"
            "\n"
            "    setup()")


def configured_source(root: Path) -> str:
    """``[tool.lecturekit] colab_source`` from ``root/pyproject.toml``."""
    text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+

        value = tomllib.loads(text).get("tool", {}).get("lecturekit", {}).get("colab_source")
        if isinstance(value, str):
            return value
    except ImportError:
        pass
    match = re.search(r'^\[tool\.lecturekit\][^\[]*?^colab_source\s*=\s*"([^"]*)"', text, flags=re.M | re.S)
    if not match:
        raise ValueError(f"expected a `colab_source = \"...\"` line under [tool.lecturekit] in {root}/pyproject.toml")
    return match.group(1)


def set_configured_source(root: Path, source: str) -> None:
    """Write ``source`` as ``[tool.lecturekit] colab_source`` into ``root/pyproject.toml``."""
    source = validate_source(source)
    path = Path(root) / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    line = f'colab_source = "{source}"'
    try:
        configured_source(root)
        text = re.sub(r'^(\[tool\.lecturekit\][^\[]*?^)colab_source\s*=\s*"[^"]*"', lambda m: m.group(1) + line,
                      text, count=1, flags=re.M | re.S)
    except ValueError:
        text = text.rstrip("\n") + f"\n\n[tool.lecturekit]\n{line}\n"
    path.write_text(text, encoding="utf-8")


def _install_cell_index(nb) -> int | None:
    """Index of the notebook's install cell (the first code cell, when it mentions google.colab)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            return i if "google.colab" in cell.source else None
    return None


def rewrite_notebooks(root: Path, source: str, check_only: bool = False) -> list[Path]:
    """Make the first code cell of every notebook in notebooks/, solutions/, assignments/ the install cell.

    A notebook whose first code cell is not an install cell gets one inserted before it. Only that
    cell changes (its id and metadata are kept). Returns the notebooks that changed (or, with
    ``check_only``, that would change).
    """
    import nbformat

    cell_source = install_cell(source)
    changed = []
    for folder in ("notebooks", "solutions", "assignments"):
        for path in sorted((Path(root) / folder).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            index = _install_cell_index(nb)
            if index is not None and nb.cells[index].source == cell_source:
                continue
            changed.append(path)
            if check_only:
                continue
            if index is None:
                first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
                cell = nbformat.v4.new_code_cell(cell_source)
                if not any("id" in c for c in nb.cells):
                    cell.pop("id", None)  # nbformat 4.4 notebooks have no cell ids
                nb.cells.insert(first_code, cell)
            else:
                nb.cells[index].source = cell_source
            nbformat.write(nb, path)
    return changed
