"""Write a notebook from a plain-text outline (used to author the course notebooks).

Cells are separated by lines of the form ``# %% [markdown]`` or ``# %%`` (the "percent" format that
Jupytext, VS Code and Spyder read); markdown cells have each line prefixed with ``# ``. The
committed .ipynb files are the source of truth; this only saves typing JSON by hand.

    python tools/nb.py notebooks/src/00_course_model.py notebooks/00_course_model.ipynb
"""
import sys

import nbformat


def cells_from_percent(text: str):
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def main(src: str, dst: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_from_percent(open(src, encoding="utf-8").read())
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for cell in nb.cells:  # stable ids keep diffs small
        cell.pop("id", None)
    nb.nbformat_minor = 4
    nbformat.write(nb, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
