"""The explorers with ipywidgets 7.7 (what Colab ships), at the callback level, in a second environment.

A fresh venv reuses this environment's packages through a .pth file and gets ipywidgets 7.7 (and its
own widgetsnbextension / jupyterlab_widgets) from the package index on top; the explorers' callback
tests (moving a slider calls the pure function and redraws) then run in it. Slow; skipped with a
message when that environment cannot be built (no package index).
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# The callback tests of the three explorers (notebooks 03, 04, 08) and their stand-in titles.
CALLBACK_TESTS = ["tests/test_widgets.py",  # every explorer's slider -> pure function -> new picture
                  "tests/test_standin.py::test_explorers_mark_standin_models_in_their_titles"]


@pytest.fixture(scope="module")
def python7(tmp_path_factory):
    venv = tmp_path_factory.mktemp("ipywidgets7") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "reuse_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "ipywidgets==7.7.*"], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        pytest.skip("cannot build the ipywidgets 7.7 environment (is the package index reachable?): "
                    + (done.stderr.strip().splitlines() or ["pip failed"])[-1])
    return python


def test_explorer_callbacks_work_with_ipywidgets_7(python7, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    version = subprocess.run([str(python7), "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert version.startswith("7.7"), version
    run = subprocess.run([str(python7), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          "--rootdir", str(ROOT), *CALLBACK_TESTS], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout and "deselected" not in run.stdout, run.stdout[-1000:]
