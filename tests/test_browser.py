"""The explorers in a real browser: JupyterLab + headless Chromium driven by Playwright.

For each notebook that builds an explorer (``lk.widgets.*_explorer``): open it in JupyterLab, run all
cells, check that no cell failed, move each explorer's main slider with the keyboard (as a person
would: focus the handle, press the right arrow) and check that the rendered picture changed and
that no error appeared. Screenshots before and after each move, the server's log and the browser's
console are kept as test artefacts (in pytest's tmp folder, and copied to build/test-artefacts/browser
when build/test-artefacts exists, which is where CI collects them).

JupyterLab runs on 127.0.0.1 on a free port with a random token and a temporary home and Jupyter
folders, on copies of the notebooks (so that autosave never touches the checkout), and is stopped at
the end, also when a test fails. Skipped, with a message saying what is missing, when Chromium
(Debian's ``chromium``), Playwright (``pip install 'lecturekit[browser]'``) or JupyterLab is absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The slider a person would move first in each explorer (its description); others: the first slider.
MAIN_SLIDER = {"feature_explorer": "channel", "occlusion_explorer": "patch", "prior_explorer": "jitter (px)"}
EXPLORER_CALL = re.compile(r"\blk\.widgets\.(\w+_explorer)\(")
RUN_TIMEOUT_S = 240  # one notebook, all cells, FAST settings
REDRAW_TIMEOUT_S = 120


def explorer_notebooks() -> list[tuple[str, list[str]]]:
    """(notebook name, explorers it builds, in order) for every lecture notebook with an explorer."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        explorers = EXPLORER_CALL.findall(code)
        if explorers:
            found.append((path.name, explorers))
    return found


def chromium_path() -> str | None:
    for candidate in (os.environ.get("LECTUREKIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _missing() -> str | None:
    if chromium_path() is None:
        return "no Chromium found (apt-get install chromium, or set LECTUREKIT_CHROMIUM)"
    for module, extra in (("playwright", "browser"), ("jupyterlab", "lab")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'lecturekit[{extra}]')"
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(_missing() is not None, reason=f"browser tests skipped: {_missing()}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-artefacts")
    yield folder
    collected = ROOT / "build" / "test-artefacts"
    if collected.is_dir():
        shutil.copytree(folder, collected / "browser", dirs_exist_ok=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, artefacts):
    """A JupyterLab server on copies of the notebooks: yields its base URL and token; always stopped."""
    home = tmp_path_factory.mktemp("lab-home")
    root = tmp_path_factory.mktemp("lab-root")
    for name, _ in explorer_notebooks():
        shutil.copy(ROOT / "notebooks" / name, root / name)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline backend draws
    env.update(HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               IPYTHONDIR=str(home / "ipython"), LECTUREKIT_FAST="1", LECTUREKIT_STANDIN="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    log = open(artefacts / "jupyterlab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {artefacts / 'jupyterlab.log'}")
                time.sleep(0.5)
        yield base, token
    finally:
        # The server and its kernels form one process group (start_new_session): stop them all.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox does not run as root (CI containers).
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


KERNEL_IDLE = """(path) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const k = w && w.context && w.context.path === path && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.status === 'idle' && w.content.widgets.length > 0; }"""
ALL_RAN = """() => { const w = window.jupyterapp.shell.currentWidget;
    if (w.sessionContext.session.kernel.status !== 'idle') return false;
    const cells = [...w.content.model.cells].filter(c => c.type === 'code');
    const failed = cells.some(c => c.outputs.toJSON().some(o => o.output_type === 'error'));
    return failed || cells.every(c => c.executionCount !== null); }"""
CELL_ERRORS = """() => [...window.jupyterapp.shell.currentWidget.content.model.cells]
    .filter(c => c.type === 'code')
    .flatMap(c => c.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue))"""
PAGE_ERRORS = re.compile(r"Error displaying widget|Failed to load model class|Traceback \(most recent call last\)")


def _slider(page, explorer: str, nth: int):
    """The explorer's main slider (``nth`` explorer with that label on the page)."""
    label = MAIN_SLIDER.get(explorer)
    sliders = page.locator(".widget-slider")
    if label is not None:
        sliders = sliders.filter(has=page.locator("label.widget-label", has_text=re.compile(f"^{re.escape(label)}$")))
    return sliders.nth(nth)


def _image_src(area) -> str | None:
    images = area.locator("img")
    return images.first.get_attribute("src") if images.count() else None


@pytest.mark.parametrize("notebook, explorers", explorer_notebooks(), ids=[n for n, _ in explorer_notebooks()])
def test_explorer_redraws_when_its_slider_moves(notebook, explorers, lab, browser, artefacts):
    base, token = lab
    stem = Path(notebook).stem
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    try:
        # A workspace of its own, reset: only this notebook is open, and it is the current widget.
        page.goto(f"{base}/lab/workspaces/{stem}/tree/{notebook}?reset&token={token}")
        page.wait_for_function(KERNEL_IDLE, arg=notebook, timeout=120_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(ALL_RAN, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
        assert page.evaluate(CELL_ERRORS) == [], f"{notebook}: a cell failed"
        seen: dict[str, int] = {}
        for explorer in explorers:
            nth = seen[explorer] = seen.get(explorer, -1) + 1
            slider = _slider(page, explorer, nth)
            slider.scroll_into_view_if_needed()
            area = slider.locator("xpath=ancestor::div[contains(@class, 'jp-OutputArea-output')][1]")
            before_src = _image_src(area)
            assert before_src, f"{notebook}: {explorer} shows no picture"
            before_png = area.screenshot(path=str(artefacts / f"{stem}-{explorer}-{nth}-before.png"))
            readout = slider.locator(".widget-readout").inner_text()
            handle = slider.locator("[role=slider]")
            handle.focus()
            handle.press("ArrowRight")
            deadline = time.monotonic() + REDRAW_TIMEOUT_S
            while _image_src(area) in (before_src, None):
                assert time.monotonic() < deadline, f"{notebook}: {explorer} did not redraw after its slider moved"
                time.sleep(0.5)
            page.wait_for_timeout(300)  # let the new picture paint before the screenshot
            after_png = area.screenshot(path=str(artefacts / f"{stem}-{explorer}-{nth}-after.png"))
            assert slider.locator(".widget-readout").inner_text() != readout, "the slider did not move"
            assert hashlib.sha256(before_png).digest() != hashlib.sha256(after_png).digest(), \
                f"{notebook}: {explorer}'s picture looks the same after the slider moved"
            found = PAGE_ERRORS.search(area.inner_text())
            assert found is None, f"{notebook}: {explorer} shows an error: {found.group(0)}"
        assert page.evaluate(CELL_ERRORS) == []
        assert PAGE_ERRORS.search(page.locator(".jp-Notebook").inner_text()) is None
    finally:
        page.screenshot(path=str(artefacts / f"{stem}-page.png"))
        (artefacts / f"{stem}-console.log").write_text("\n".join(console), encoding="utf-8")
        page.close()
