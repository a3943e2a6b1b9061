"""Building the course: each lecture notebook executed into an HTML page that reads the same offline.

``lecturekit course`` (``make course``) runs :func:`build_course`. What a page needs from the
internet in a plain nbconvert export is removed or replaced at build time:

- **Equations**: ``$...$`` and ``$$...$$`` in markdown become MathML (latex2mathml, pure Python),
  which browsers render natively, instead of waiting for MathJax from a CDN. The page then needs no
  script at all, and a test can read the equations out of the HTML without a browser.
- **Explorers**: a widget needs the widget renderer (a CDN script) and a live kernel. The explorers
  of :mod:`lecturekit.widgets` also carry an ``image/png`` of their current figure in their display
  data; the build keeps that picture and drops the widget view. Progress bars that closed (``leave=False``)
  are dropped, as JupyterLab drops them; one still on the page is drawn as a static bar.
- No CDN script (require.js, MathJax, mermaid, the widget manager) is written into the page.

The build also checks what a reader would be misled or put off by (:func:`notebook_problems`,
:func:`html_problems`): a figure made in a cell where a stand-in model ran that does not say so
(:data:`lecturekit.plotting.FIGURE_MIME`), raw ``$`` math, a progress bar left unfinished, a
traceback. ``build/index.html`` lists every notebook with its status, run time, stand-in use and
problems; the executed notebooks are kept beside the pages (``NAME.ipynb``).
"""
from __future__ import annotations

import html
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import allocator

__all__ = ["build_course", "build_notebook", "run_notebook", "offline_notebook", "notebook_html", "math_to_mathml",
           "notebook_problems", "html_problems", "write_index", "STANDIN_LINE"]

STANDIN_LINE = "STAND-IN WEIGHTS"  # what models.imagenet_model prints once per stand-in model
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

# ---- Equations: LaTeX in markdown -> MathML ---------------------------------------------------------

# Code (fenced blocks, inline code spans) is left alone; then $$...$$ (display) and $...$ (inline, no
# space just inside the dollars, so "costs $5 and $6" stays text; it may wrap onto the next line, not across
# a paragraph). \$ is a literal dollar.
_CODE = re.compile(r"(^```.*?^```|^~~~.*?^~~~|`[^`\n]+`)", re.S | re.M)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$])\$(?![\s$])((?:\\\$|[^$\n]|\n(?![ \t]*\n))+?)(?<![\s\\])\$(?!\$|\d)")


def mathml_available() -> bool:
    """Whether latex2mathml is installed (``pip install latex2mathml``; the ``dev`` extra has it)."""
    import importlib.util

    return importlib.util.find_spec("latex2mathml") is not None


def _mathml(tex: str, display: bool) -> str:
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception:  # noqa: BLE001 - latex2mathml raises many types; show the source rather than fail
        return f'<code class="lk-tex">{html.escape(tex)}</code>'


def math_to_mathml(markdown: str) -> str:
    """Replace the ``$...$`` / ``$$...$$`` equations of a markdown text with MathML elements.

    Code blocks and code spans are kept as written. An equation latex2mathml cannot convert is shown
    as code (its LaTeX source), never as raw dollars. Without latex2mathml the text is returned as is.
    """
    if not mathml_available():
        return markdown
    parts = _CODE.split(markdown)
    for i in range(0, len(parts), 2):  # even parts are prose, odd parts code
        text = _DISPLAY.sub(lambda m: "\n" + _mathml(m.group(1), True) + "\n", parts[i])
        parts[i] = _INLINE.sub(lambda m: _mathml(m.group(1), False), text)
    return "".join(parts)


# ---- Executing a notebook, with a heartbeat ----------------------------------------------------------

def _client_class():
    from nbclient import NotebookClient

    class CourseClient(NotebookClient):
        """NotebookClient that remembers which widgets were closed (a finished ``leave=False`` bar) and
        which cell runs (for the heartbeat)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed_widgets: set[str] = set()
            self.current = (-1, time.perf_counter())

        def handle_comm_msg(self, outs, msg, cell_index):
            if msg["msg_type"] == "comm_close":
                self.closed_widgets.add(msg["content"]["comm_id"])
            return super().handle_comm_msg(outs, msg, cell_index)

        async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
            self.current = (cell_index, time.perf_counter())
            return await super().async_execute_cell(cell, cell_index, *args, **kwargs)

    return CourseClient


def run_notebook(path: Path, fast: bool = False, timeout: int = 1800, standin: str | None = None,
                 heartbeat: float = 30.0, log: Callable[[str], None] = print):
    """Execute one notebook in a fresh kernel; returns ``(notebook, record)``.

    The kernel gets ``LECTUREKIT_FAST=1`` when ``fast``, ``LECTUREKIT_STANDIN`` = ``standin`` (default:
    as set, else ``auto``: real ImageNet weights when cached or downloadable) and matplotlib's inline
    backend. A line is logged when the notebook starts and every ``heartbeat`` seconds while it runs
    (which cell, elapsed time). ``record``: name, status ("ok" or "failed: ..."), seconds, standin
    (a stand-in model was built), error (the failing cell's traceback), closed_widgets.
    """
    import nbformat
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    # allocator.ENVIRONMENT first, so that a value the user set wins; an inherited MPLBACKEND=Agg
    # would hide every figure, so the inline backend always wins.
    env = {**allocator.ENVIRONMENT, **os.environ, "MPLBACKEND": INLINE_BACKEND}
    env["LECTUREKIT_STANDIN"] = standin or os.environ.get("LECTUREKIT_STANDIN") or "auto"
    if fast:
        env["LECTUREKIT_FAST"] = "1"
    client = _client_class()(nb, timeout=timeout, kernel_name="python3",
                             resources={"metadata": {"path": str(path.parent)}})
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    code_number = {i: k + 1 for k, i in enumerate(i for i, c in enumerate(nb.cells) if c.cell_type == "code")}
    start = time.perf_counter()
    log(f"{path.stem}: started ({n_code} code cells)")
    done = threading.Event()

    def beat():
        while not done.wait(heartbeat):
            index, since = client.current
            log(f"{path.stem}: cell {code_number.get(index, '?')}/{n_code} running "
                f"({time.perf_counter() - since:.0f} s in it, {time.perf_counter() - start:.0f} s in all)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    status, error = "ok", ""
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        status, error = "failed: " + str(err).strip().splitlines()[-1][:200], str(err)[-6000:]
    except Exception as err:  # noqa: BLE001 - a dead kernel or a timeout: the page still gets written
        status, error = f"failed: {type(err).__name__}: {str(err).strip()[:200]}", str(err)[-6000:]
    finally:
        done.set()
        thread.join()
    record = dict(name=path.stem, title=_notebook_title(nb, path), status=status,
                  seconds=time.perf_counter() - start, standin=_used_standin(nb), error=error,
                  closed_widgets=sorted(client.closed_widgets))
    return nb, record


def _notebook_title(nb, path: Path) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def _outputs(nb):
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            yield index, output


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    return str(output.get("data", {}).get("text/plain", ""))


def _used_standin(nb) -> bool:
    """Whether a stand-in ImageNet model was built (its one line) or drew a figure."""
    from .plotting import FIGURE_MIME

    return any(STANDIN_LINE in _text(o) or (o.get("data", {}).get(FIGURE_MIME) or {}).get("standin")
               for _, o in _outputs(nb))


# ---- Making the executed notebook static ----------------------------------------------------------------

def _bar(state: dict, model_id: str) -> dict | None:
    """A tqdm.notebook bar's final state (desc, value, max, style, right text), or None if not a bar."""
    model = state.get(model_id, {}).get("state", {})
    if model.get("_model_name") != "HBoxModel":
        return None
    children = [state.get(str(c).replace("IPY_MODEL_", ""), {}).get("state", {}) for c in model.get("children", [])]
    progress = [c for c in children if c.get("_model_name") in ("FloatProgressModel", "IntProgressModel")]
    texts = [c.get("value", "") for c in children if c.get("_model_name") == "HTMLModel"]
    if not progress:
        return None
    bar = progress[0]
    return dict(desc=re.sub("<[^>]+>", "", texts[0] if texts else ""), right=texts[-1] if len(texts) > 1 else "",
                value=float(bar.get("value", 0)), max=float(bar.get("max", 100)), style=bar.get("bar_style", ""))


def offline_notebook(nb, closed_widgets=()):
    """The executed notebook as a reader sees it offline (a copy; the original is left as is).

    Markdown equations become MathML; an output that shows a widget keeps its static picture
    (``image/png``, the explorers') and loses the widget view; a closed widget (a finished progress bar)
    is dropped; a bar still shown becomes a static ``<progress>`` bar with tqdm's text; any other widget
    becomes a line saying it is interactive. The widget state is dropped (nothing renders it offline).
    """
    import copy

    from nbformat import v4

    nb = copy.deepcopy(nb)
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    closed = set(closed_widgets)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = math_to_mathml(cell.source)
            continue
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            view = data.get(WIDGET_VIEW)
            if view is None:
                outputs.append(output)
                continue
            model_id = view.get("model_id", "")
            if "image/png" in data:  # an explorer: its current picture
                data.pop(WIDGET_VIEW)
                outputs.append(output)
            elif model_id in closed:  # a bar with leave=False that finished: gone, as in JupyterLab
                continue
            elif (bar := _bar(state, model_id)) is not None:
                style = {"danger": "#d9534f", "success": "#5cb85c"}.get(bar["style"], "#2196f3")
                outputs.append(v4.new_output("display_data", data={"text/html": (
                    f'<div class="lk-progress">{html.escape(bar["desc"])} <progress value="{bar["value"]:g}" '
                    f'max="{bar["max"]:g}" style="accent-color:{style}"></progress> {bar["right"]}</div>')}))
            else:
                outputs.append(v4.new_output("display_data", data={
                    "text/plain": "[an interactive widget: run the notebook in JupyterLab or Colab to use it]"}))
        cell.outputs = outputs
    return nb


_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{#- lecturekit: no script from the internet (require.js, MathJax, mermaid, the widget manager). -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style>math[display=block]{margin:.6em 0}.lk-progress{font-family:monospace;
font-size:85%;padding:.2em 0}.lk-progress progress{width:12em;vertical-align:middle}</style>{%- endblock extra_css -%}
"""


def notebook_html(nb) -> str:
    """The HTML page of an (offline-prepared) notebook: nbconvert's lab template with no CDN script."""
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(extra_loaders=[jinja2.DictLoader({"lecturekit.html.j2": _TEMPLATE})],
                            template_file="lecturekit.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body


# ---- Checks: what a reader must not see ----------------------------------------------------------------

# A tqdm text bar's counter: "29/30 [" (the bar of a loop that stopped early, or a stale redraw).
_TEXT_BAR = re.compile(r"(\d+)/(\d+) \[")


def notebook_problems(nb, closed_widgets=()) -> list[str]:
    """Problems of an executed notebook: unmarked stand-in figures, unfinished bars, tracebacks, and
    torchvision's misleading "Downloading: URL" line.

    Each is one line naming the cell (its index in the notebook, from 0).
    """
    from .plotting import FIGURE_MIME, STANDIN_UNMARKED

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    closed = set(closed_widgets)
    problems = []
    for index, cell in enumerate(nb.cells):  # unmarked figures: the FIGURE_MIME entries, else the warnings
        outputs = cell.get("outputs", [])
        checks = [o.get("data", {}).get(FIGURE_MIME) for o in outputs]
        unmarked = max(sum(bool(c and c.get("standin") and not c.get("marked")) for c in checks),
                       sum(_text(o).count(STANDIN_UNMARKED) for o in outputs))
        if unmarked:
            problems.append(f"cell {index}: {unmarked} figure(s) made where a stand-in model ran "
                            "without saying 'stand-in'")
    for index, output in _outputs(nb):
        data = output.get("data", {})
        if re.search(r'Downloading: "?https?://', _text(output)):  # torchvision's line, printed also when the download then fails
            problems.append(f"cell {index}: a 'Downloading: ...' line (one line per stand-in model is enough)")
        if output.get("output_type") == "error":
            problems.append(f"cell {index}: traceback ({output.get('ename')}: {str(output.get('evalue'))[:80]})")
        elif "Traceback (most recent call last)" in _text(output):
            problems.append(f"cell {index}: a traceback is printed")
        view = data.get(WIDGET_VIEW)
        if view is not None and view.get("model_id") not in closed:
            bar = _bar(state, view.get("model_id", ""))
            if bar is not None and (bar["value"] < bar["max"] or bar["style"] == "danger"):
                problems.append(f"cell {index}: progress bar left at {bar['value']:g}/{bar['max']:g}"
                                f"{' (red)' if bar['style'] == 'danger' else ''}: {bar['desc']}")
        if output.get("output_type") == "stream":
            # the last state of each text bar: what is left after its final carriage return
            for line in output.get("text", "").split("\n"):
                last = line.rstrip().split("\r")[-1]
                m = _TEXT_BAR.search(last)
                if m and int(m.group(1)) < int(m.group(2)):
                    problems.append(f"cell {index}: text progress bar left at {m.group(1)}/{m.group(2)}")
    return problems


def _rendered_markdown(page: str) -> list[str]:
    """The visible text of the markdown cells of a page (code and MathML removed)."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack: list[tuple[str, bool]] = []  # (tag, inside markdown)
            self.texts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag, attrs):
            if tag in ("br", "img", "hr", "input", "meta", "link", "col", "area", "base", "wbr", "source"):
                return
            classes = (dict(attrs).get("class") or "").split()
            inside = (self.stack[-1][1] if self.stack else False) or "jp-RenderedMarkdown" in classes
            self.stack.append((tag, inside))
            if tag in ("code", "pre", "math", "script", "style"):
                self.skip += 1

        def handle_endtag(self, tag):
            while self.stack:
                open_tag, _ = self.stack.pop()
                if open_tag in ("code", "pre", "math", "script", "style"):
                    self.skip -= 1
                if open_tag == tag:
                    break

        def handle_data(self, data):
            if self.stack and self.stack[-1][1] and not self.skip:
                self.texts.append(data)

    reader = Reader()
    reader.feed(page)
    return reader.texts


_RAW_MATH = re.compile(r"\$\$|\$[^\s$][^$]*\$|\\(frac|sum|partial|mathbf|left|right)\b")


def html_problems(page: str) -> list[str]:
    """Problems of a built page: raw ``$`` math in rendered markdown, a script or stylesheet from the
    internet, an unfinished static bar, a stand-in figure without the mark, a traceback."""
    from .plotting import STANDIN_UNMARKED

    problems = []
    text = " ".join(_rendered_markdown(page))
    for m in _RAW_MATH.finditer(text):
        problems.append(f"raw math in the text: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    for m in re.finditer(r"<(script|link)\b[^>]*(src|href)=\"(https?:)?//[^\"]+\"", page):
        problems.append(f"loads from the internet: {m.group(0)[:120]}")
    for tag in re.findall(r"<progress\b[^>]*>", page):  # attributes in any order (nbconvert sorts them)
        value, max_ = (re.search(rf'{name}="([\d.e+-]+)"', tag) for name in ("value", "max"))
        if value and max_ and float(value.group(1)) < float(max_.group(1)):
            problems.append(f"progress bar left at {value.group(1)}/{max_.group(1)}")
    if STANDIN_UNMARKED in page:
        problems.append("a figure made where a stand-in model ran does not say 'stand-in'")
    if "Traceback (most recent call last)" in page or 'class="ansi-red-fg">---------' in page:
        problems.append("a traceback is shown")
    return problems


# ---- The whole course -------------------------------------------------------------------------------------

def build_notebook(path: Path, out: Path, fast: bool = False, timeout: int = 1800, standin: str | None = None,
                   heartbeat: float = 30.0, log: Callable[[str], None] = print) -> dict:
    """Execute one notebook into ``out/NAME.html`` (and the executed ``out/NAME.ipynb``); its record,
    with ``problems`` (:func:`notebook_problems` and :func:`html_problems`)."""
    import nbformat

    out.mkdir(parents=True, exist_ok=True)
    nb, record = run_notebook(path, fast=fast, timeout=timeout, standin=standin, heartbeat=heartbeat, log=log)
    nbformat.write(nb, out / f"{record['name']}.ipynb")
    page = notebook_html(offline_notebook(nb, record["closed_widgets"]))
    (out / f"{record['name']}.html").write_text(page, encoding="utf-8")
    problems = notebook_problems(nb, record["closed_widgets"])
    # the page repeats what the notebook shows (a stand-in warning, a traceback): only what is new
    record["problems"] = problems + [p for p in html_problems(page) if not any(
        word in p and any(word in q for q in problems) for word in ("stand-in", "traceback"))]
    return record


def build_course(root: Path, out: Path, fast: bool = False, timeout: int = 1800,
                 only: list[str] | None = None, heartbeat: float = 30.0,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Execute each notebook of ``root/notebooks`` (in order) into ``out/NAME.html``, plus ``out/index.html``.

    ImageNet cells use the real weights when they are cached or downloadable, stand-ins otherwise
    (``LECTUREKIT_STANDIN=auto`` unless set). Prints a line when each notebook starts, a heartbeat
    every ``heartbeat`` seconds, and one line when it ends. Returns one record per notebook
    (name, title, status, seconds, standin, problems).
    """
    log = log or (lambda line: print(line, flush=True))
    notebooks = sorted((Path(root) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in only)]
    out = Path(out)
    if not mathml_available():
        log("latex2mathml is not installed: equations stay as LaTeX source ($...$); pip install latex2mathml")
    results = []
    for path in notebooks:
        record = build_notebook(path, out, fast=fast, timeout=timeout, heartbeat=heartbeat, log=log)
        results.append(record)
        problems = record["problems"]
        log(f"{path.name:45s} {record['status'][:40]:10s} {record['seconds']:6.1f} s"
            + ("  stand-in weights" if record["standin"] else "")
            + (f"  {len(problems)} problem(s):" if problems else ""))
        for problem in record["problems"]:
            log(f"    {problem}")
        write_index(out, results)  # after each notebook, so a stopped build still has its index
    return results


def write_index(out: Path, results: list[dict]) -> Path:
    """``out/index.html``: every notebook with its status, run time, stand-in use and problems."""
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        problems = r.get("problems", [])
        rows.append(
            f'<tr><td><a href="{html.escape(r["name"])}.html">{html.escape(r["title"])}</a></td>'
            f'<td class="{"ok" if ok else "bad"}">{html.escape(r["status"])}</td>'
            f'<td class="num">{r["seconds"]:.0f} s</td>'
            f'<td>{"<b>yes</b>" if r.get("standin") else "no"}</td>'
            f'<td>{"<br>".join(html.escape(p) for p in problems) if problems else "none"}</td></tr>')
    total = sum(r["seconds"] for r in results)
    page = (
        "<!doctype html><html lang='en'><meta charset='utf-8'><title>Visualizing and Understanding CNNs</title>"
        "<style>body{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.35em .6em;"
        "text-align:left;vertical-align:top}td.num{text-align:right;white-space:nowrap}.ok{color:#2e7d32}"
        ".bad{color:#c62828}b{color:#c62828}</style>"
        "<h1>Visualizing and Understanding CNNs</h1>"
        f"<p>The executed notebooks of the course ({len(results)} notebooks, {total / 60:.1f} min). "
        "<b>Stand-in weights</b>: the ImageNet weights were not available (no network, nothing cached), "
        "so the in-the-wild figures of that notebook come from seeded random weights, and each says so; "
        "its course-model figures are real.</p>"
        "<table><tr><th>notebook</th><th>status</th><th>run time</th><th>stand-in weights</th>"
        f"<th>problems</th></tr>{''.join(rows)}</table></html>")
    path = Path(out) / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
