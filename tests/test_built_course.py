"""The built course reads the same offline and shows nothing misleading (issue 16).

Two parts:

- Unit tests on small synthetic notebooks and pages show that each check of ``lecturekit.course``
  catches its defect (a stand-in figure without the mark, raw ``$`` math, a progress bar left
  unfinished, a traceback, a script from the internet) and that the build fixes what it should
  (equations become MathML, an explorer becomes its picture, a finished bar disappears).
- ``test_built_notebook_reads_well`` renders every lecture notebook (FAST, stand-ins) with the build
  and checks its page. The execution is shared with tests/test_notebooks.py through the session
  fixture ``built_notebook`` (conftest.py): each notebook runs once per test session.
"""
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from lecturekit import course
from lecturekit.plotting import FIGURE_MIME

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ---- equations ------------------------------------------------------------------------------------

def test_math_becomes_mathml_and_code_stays():
    md = (r"The score $S_c(x)$ and its gradient $$\frac{\partial S_c}{\partial x}$$ "
          "but `$not_math$` and\n```\n$code$\n```\nand a price of $5 and $6, and \\$ alone.")
    out = course.math_to_mathml(md)
    assert out.count("<math") == 2 and 'display="block"' in out and "<mfrac>" in out
    assert "`$not_math$`" in out and "$code$" in out
    assert "$5 and $6" in out  # currency is not math (a space or digit next to the dollar)
    assert "$S_c" not in out and "$$" not in out
    assert "<math" in course.math_to_mathml("a wrapped $x\n+ y$ equation")  # one newline: still math
    assert course.math_to_mathml("costs $5\n\nand $6") == "costs $5\n\nand $6"  # never across paragraphs


def _page(markdown: str, convert: bool = True) -> str:
    nb = v4.new_notebook(cells=[v4.new_markdown_cell(markdown)])
    return course.notebook_html(course.offline_notebook(nb) if convert else nb)


def test_raw_math_in_a_page_is_caught_and_the_build_removes_it():
    md = r"# Saliency" "\n\n" r"The map is $|\partial S_c / \partial x|$, max over channels."
    raw = course.html_problems(_page(md, convert=False))
    assert any("raw math" in p for p in raw), raw
    page = _page(md)
    assert course.html_problems(page) == [] and "<math" in page


def test_pages_load_nothing_from_the_internet():
    page = _page("# Hello")
    assert "cdn" not in page.lower() and "https://unpkg" not in page
    assert course.html_problems(page + '<script src="https://cdn.example.org/x.js"></script>')


# ---- executed notebooks: each check catches its defect ----------------------------------------------------

def _executed(*outputs, state=None):
    nb = v4.new_notebook(cells=[v4.new_code_cell("pass", outputs=list(outputs))])
    if state is not None:
        nb.metadata["widgets"] = {course.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


def _figure(standin, marked):
    return v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>",
                                                FIGURE_MIME: {"standin": standin, "marked": marked}})


def test_a_standin_figure_without_the_mark_is_caught():
    assert course.notebook_problems(_executed(_figure(True, False)))
    assert course.notebook_problems(_executed(_figure(True, True))) == []
    assert course.notebook_problems(_executed(_figure(False, False))) == []


def test_a_download_line_is_caught():
    line = v4.new_output("stream", name="stderr", text='Downloading: "https://download.pytorch.org/x.pth" to /tmp\n')
    assert course.notebook_problems(_executed(line))


def test_a_traceback_is_caught():
    error = v4.new_output("error", ename="ValueError", evalue="bad", traceback=["ValueError: bad"])
    assert any("traceback" in p for p in course.notebook_problems(_executed(error)))
    printed = v4.new_output("stream", name="stderr", text="Traceback (most recent call last):\n  ...\n")
    assert course.notebook_problems(_executed(printed))


def _bar_state(value, max_, style=""):
    return {"h": {"state": {"_model_name": "HBoxModel", "children": ["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]}},
            "l": {"state": {"_model_name": "HTMLModel", "value": "deep dream"}},
            "p": {"state": {"_model_name": "FloatProgressModel", "value": value, "max": max_, "bar_style": style}},
            "r": {"state": {"_model_name": "HTMLModel", "value": f" {value}/{max_} [00:01&lt;00:00]"}}}


def _bar_output():
    return v4.new_output("display_data", data={"text/plain": "  0%|          | 0/30",
                                                course.WIDGET_VIEW: {"model_id": "h", "version_major": 2}})


def test_a_progress_bar_left_unfinished_is_caught_and_a_closed_one_disappears():
    stopped = _executed(_bar_output(), state=_bar_state(29, 30, "danger"))
    assert any("29/30" in p for p in course.notebook_problems(stopped))
    page = course.notebook_html(course.offline_notebook(stopped))
    assert any("progress bar left at 29/30" in p for p in course.html_problems(page))
    finished = _executed(_bar_output(), state=_bar_state(30, 30, "success"))
    assert course.notebook_problems(finished) == []
    assert course.html_problems(course.notebook_html(course.offline_notebook(finished))) == []
    # leave=False: tqdm closes the widget when the loop ends; the page then has no bar at all
    closed = course.offline_notebook(_executed(_bar_output(), state=_bar_state(29, 30)), closed_widgets=["h"])
    assert closed.cells[0].outputs == [] and course.notebook_problems(stopped, closed_widgets=["h"]) == []
    text = v4.new_output("stream", name="stderr", text="deep dream:  97%|#########6| 29/30 [00:01<00:00]\r")
    assert course.notebook_problems(_executed(text))
    done = v4.new_output("stream", name="stderr", text="x:  97%| 29/30 [00:01<00:00]\rx: 100%| 30/30 [00:01<00:00]\n")
    assert course.notebook_problems(_executed(done)) == []


def test_an_explorer_becomes_its_picture():
    explorer = v4.new_output("display_data", data={"text/plain": "VBox(...)", "image/png": "iVBORw0KGgo=",
                                                   course.WIDGET_VIEW: {"model_id": "w", "version_major": 2}})
    other = v4.new_output("display_data", data={"text/plain": "IntSlider(...)",
                                                course.WIDGET_VIEW: {"model_id": "s", "version_major": 2}})
    nb = course.offline_notebook(_executed(explorer, other, state={}))
    first, second = nb.cells[0].outputs
    assert course.WIDGET_VIEW not in first.data and "image/png" in first.data
    assert "interactive widget" in second.data["text/plain"] and "widgets" not in nb.metadata


# ---- in a real kernel: the package's side of the mechanisms -----------------------------------------------

KERNEL_CELLS = [
    "import matplotlib.pyplot as plt, torch, lecturekit as lk\n"
    "net = lk.models.imagenet_model('squeezenet1_1', standin=True)\n"
    "course = lk.models.course_model()",
    # 1: a stand-in figure without the mark
    "p = net(torch.rand(1, 3, 64, 64)).softmax(1)\nplt.plot(p[0].detach()); plt.title('probabilities'); plt.show()",
    # 2: the same, marked by the plotting helper
    "p = net(torch.rand(1, 3, 64, 64))\nlk.plotting.show_images(torch.rand(2, 3, 8, 8), model=net); plt.show()",
    # 3: a course-model figure after a stand-in cell: no mark needed
    "x = lk.data.shapes(2, seed=0).images\nlk.plotting.show_images(x, model=course); plt.show()",
    # 4: an explorer: its picture in the page
    "lk.widgets.occlusion_explorer(course, x[:1], 0, patch=16, stride=16)",
    # 5: the package's bars disappear, finished or stopped early; a plain tqdm bar that stopped stays, red
    "for _ in lk.hooks.progress_bar(range(3), desc='finished'): pass\n"
    "for i in lk.hooks.progress_bar(range(3), desc='early'):\n    if i == 1: break\n"
    "from tqdm.auto import tqdm\n"
    "for i in tqdm(range(3), desc='stopped', leave=False):\n    if i == 1: break",
]


@pytest.mark.slow
def test_the_build_catches_and_fixes_in_a_real_kernel(tmp_path):
    (tmp_path / "notebooks").mkdir()
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# Tiny\n\nThe score $S_c$."),
                                *map(v4.new_code_cell, KERNEL_CELLS)])
    nbformat.write(nb, tmp_path / "notebooks" / "00_tiny.ipynb")
    lines = []
    [record] = course.build_course(tmp_path, tmp_path / "build", fast=True, heartbeat=0.5, log=lines.append)
    assert record["status"] == "ok" and record["standin"]
    assert lines[0] == "00_tiny: started (6 code cells)" and any("running" in line for line in lines)
    problems = record["problems"]
    assert any(p.startswith("cell 2: 1 figure(s) made where a stand-in model ran") for p in problems), problems
    assert not any(p.startswith(("cell 3:", "cell 4:", "cell 5:")) for p in problems), problems
    assert any(p.startswith("cell 6: progress bar left at 1/3") for p in problems), problems
    executed = nbformat.read(tmp_path / "build" / "00_tiny.ipynb", as_version=4)
    marked = [o.data[FIGURE_MIME] for o in executed.cells[3].outputs if FIGURE_MIME in o.get("data", {})]
    assert marked == [{"standin": True, "marked": True}]
    page = (tmp_path / "build" / "00_tiny.html").read_text()
    explorer = course.offline_notebook(executed, record["closed_widgets"]).cells[5].outputs
    assert [set(o.data) >= {"image/png"} for o in explorer] == [True]
    assert "<math" in page and "<script src=" not in page
    assert not any("internet" in p or "raw math" in p for p in course.html_problems(page))
    assert page.count('class="lk-progress"') == 1 and "stopped" in page.split('class="lk-progress"')[1]
    index = (tmp_path / "build" / "index.html").read_text()
    assert "00_tiny.html" in index and "<b>yes</b>" in index and "progress bar left at 1/3" in index


# ---- the whole course ------------------------------------------------------------------------------------

# Each check of a built page, by the words its problems contain.
CHECKS = {"stand-in mark": "stand-in", "raw math": "raw math", "progress bars": "progress bar",
          "tracebacks": "traceback", "offline": "internet", "download line": "Downloading"}
# (notebook, check) -> reason: a known defect being fixed elsewhere, xfail(strict=False) until it lands.
# Empty since the notebook passes of issue 16 were merged: every check holds for every notebook.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("notebook", [pytest.param(p, id=p.stem, marks=pytest.mark.xdist_group(p.stem))
                                      for p in NOTEBOOKS])
def test_built_notebook_reads_well(notebook, check, built_notebook, request):
    """The page of each notebook (FAST, stand-ins): every stand-in figure marked, no raw math, no bar
    left unfinished, no traceback, nothing loaded from the internet, no misleading download line."""
    if (notebook.stem, check) in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[notebook.stem, check], strict=False))
    record = built_notebook(notebook)
    found = [p for p in record["problems"] if CHECKS[check] in p]
    assert found == [], f"{notebook.name} ({record['html']}):\n" + "\n".join(found)


def test_every_problem_belongs_to_a_check():
    problems = [*course.notebook_problems(_executed(_figure(True, False))),
                *course.html_problems(_page("$$x$$", convert=False) + '<progress value="1" max="2">')]
    assert problems and all(any(word in p for word in CHECKS.values()) for p in problems), problems


# ---- progress bars finish or disappear (the package's side) ----------------------------------------------

@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the package makes in the test, with (n, total) when it was closed."""
    import io

    import tqdm.auto
    import tqdm.std

    closed = []

    class Recorder(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)

        def close(self):
            if not self.disable and (self.n, self.total, self.desc) not in closed:
                closed.append((self.n, self.total, self.desc))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    return closed


def test_progress_bars_finish_or_disappear(bars, course):
    from lecturekit import hooks, synthesis

    assert list(hooks.progress_bar(range(4), desc="full")) == [0, 1, 2, 3]
    for i in hooks.progress_bar(range(5), desc="early"):
        if i == 2:
            break  # a target reached: the bar ends where it is (tqdm would leave it red at 2/5)
    # DeepDream's bar once stopped at 29/30 (an iterator advanced once per step, never past the last)
    synthesis.deep_dream(course, torch_rand(), "features.3", steps=2, octaves=3, jitter=1)
    assert bars == [(4, 4, "full"), (2, 2, "early"), (6, 6, "deep dream")]
    assert list(hooks.progress_bar(range(3), progress=False)) == [0, 1, 2] and len(bars) == 3


def torch_rand():
    import torch

    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_an_explorer_displays_its_picture_with_the_standin_check(course):
    """What the build keeps of an explorer: the PNG of its current figure beside the widget view."""
    import base64

    import ipywidgets
    import torch

    from lecturekit import widgets

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    box = widgets.occlusion_explorer(course, x, 0, patch=16, stride=16)
    data = box.picture_data()
    assert base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    assert data[FIGURE_MIME] == {"standin": False, "marked": False}
    box.sliders[0].value = 8  # the picture follows the sliders
    assert data["image/png"] != box.picture_data()["image/png"]
    if hasattr(ipywidgets.Widget, "_repr_mimebundle_"):  # ipywidgets 8 (7 displays through _ipython_display_)
        bundle = box._repr_mimebundle_()
        assert {"image/png", "application/vnd.jupyter.widget-view+json", "text/plain"} <= set(bundle)


def test_under_ipywidgets_7_the_explorer_displays_its_picture_too(course, monkeypatch):
    """ipywidgets 7 (Colab) displays a widget with _ipython_display_, not _repr_mimebundle_: simulated."""
    import IPython.display
    import ipywidgets
    import torch

    from lecturekit import widgets

    shown = []
    monkeypatch.delattr(ipywidgets.Widget, "_repr_mimebundle_", raising=False)
    monkeypatch.setattr(IPython.display, "display", lambda data, raw=False: shown.append((data, raw)))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    box = widgets.occlusion_explorer(course, x, 0, patch=16, stride=16)
    box._ipython_display_()
    [(data, raw)] = shown
    assert raw and {"image/png", "application/vnd.jupyter.widget-view+json", FIGURE_MIME} <= set(data)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == box.model_id


def test_a_standin_model_flags_its_use_and_a_real_one_does_not(course):
    """What the figure check relies on: a forward pass of a stand-in model, or a look at its weights."""
    import torch

    from lecturekit import features, models, plotting

    net = models.imagenet_model("squeezenet1_1", standin=True)
    for use in (lambda: net(torch.rand(1, 3, 32, 32)), lambda: features.first_layer_filters(net)):
        plotting._standin["ran"] = False
        use()
        assert plotting.standin_ran()
    plotting._standin["ran"] = False
    course(torch.rand(1, 3, 32, 32))
    features.first_layer_filters(course)
    assert not plotting.standin_ran()
