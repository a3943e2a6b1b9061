"""A pip install, not only an editable checkout: the wheel and sdist hold what the course needs, and an
installed wheel runs `lecturekit course` outside the checkout.

Slow (a build and one notebook). The fresh environment reuses this one's torch and friends through a
.pth file that points at this environment's site-packages (``--system-site-packages`` would only
reach the base interpreter's), and the wheel is installed with ``--no-deps --no-index``: no network.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``python -m build`` of the checkout: {"wheel": Path, "sdist": Path}."""
    out = tmp_path_factory.mktemp("dist")
    # Run from the empty output folder: from the checkout, its build/ folder (test artefacts, `make
    # course`) is found first on sys.path and shadows the build package ("'build' is a package and
    # cannot be directly executed"); the same goes for an in-process importorskip.
    clean = {**os.environ, "PYTHONPATH": ""}
    if subprocess.run([sys.executable, "-c", "import build.__main__"], cwd=out, env=clean,
                      capture_output=True).returncode:
        pytest.skip("`python -m build` needs the build package: pip install build")
    # --no-isolation: build with this environment's setuptools, offline and in seconds.
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600, env=clean, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("lecturekit-*.whl")
    (sdist,) = out.glob("lecturekit-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_holds_the_package_its_weights_and_the_notebooks(dist):
    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    modules = {f"lecturekit/{p.name}" for p in (ROOT / "lecturekit").glob("*.py")}
    weights = {f"lecturekit/weights/{p.name}" for p in (ROOT / "lecturekit" / "weights").glob("*.pt")}
    assert weights and modules and (modules | weights) <= names, sorted((modules | weights) - names)
    shipped = {Path(n).name for n in names if "/share/lecturekit/notebooks/" in n}
    assert shipped == {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_sdist_holds_the_whole_course(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {"/".join(Path(n).parts[1:]) for n in tar.getnames()}
    expected = {"pyproject.toml", "README.md", "Makefile", "lecturekit/weights/coursenet.pt", "benchmarks/run.py"}
    for folder in ("notebooks", "solutions", "assignments", "tests"):
        expected |= {f"{folder}/{p.name}" for p in (ROOT / folder).glob("*.*") if p.suffix in (".ipynb", ".py")}
    assert expected <= names, sorted(expected - names)


def test_installed_wheel_runs_the_course_outside_the_checkout(dist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Plain path lines: this environment's packages (torch, pip, jupyter) come after the fresh venv's
    # own, and the .pth files in there (the editable lecturekit) are not processed.
    (site / "reuse_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Jupyter's data files (nbconvert's templates) of the reused environment live under its prefix.
    env.update(LECTUREKIT_STANDIN="1", MPLBACKEND="Agg", JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"))
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(dist["wheel"])],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import lecturekit, lecturekit.models as m; "
                            "print(lecturekit.__file__); print(m.WEIGHTS_PATH.is_file())"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == "True", where  # the wheel's copy, not the checkout's
    run = subprocess.run([str(venv / "bin" / "lecturekit"), "course", "--fast", "--only", "00"], capture_output=True,
                         text=True, env=env, cwd=elsewhere, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "installed with lecturekit" in run.stdout and "00_course_model.ipynb" in run.stdout
    page = (elsewhere / "build" / "00_course_model.html").read_text(encoding="utf-8")
    assert "CourseNet" in page and "Traceback" not in page
    assert 'href="00_course_model.html"' in (elsewhere / "build" / "index.html").read_text(encoding="utf-8")
    shutil.rmtree(venv)
