"""The ``lecturekit`` command: ``lab``, ``course``, ``train``, ``grade`` and ``assignments``.

    lecturekit lab                 open the course in JupyterLab
    lecturekit course [--fast]     execute every lecture notebook into build/ (HTML + index page)
    lecturekit train [--out FILE]  reproduce the bundled course-model weights from the recipe's seed
    lecturekit grade SUBMISSION.ipynb [--json FILE]   score a submission (a folder: one CSV row each)
    lecturekit assignments [--check]                  write assignments/ from solutions/
"""
from __future__ import annotations

import argparse
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "build_course", "find_root"]


def find_root(start: Path | None = None) -> Path:
    """The course folder: the nearest parent of ``start`` (default: cwd) that holds notebooks/."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir():
            return folder
    raise SystemExit(f"no notebooks/ folder found in {here} or its parents; run this inside the course folder")


def _notebook_title(path: Path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def build_course(root: Path, out: Path, fast: bool = False, timeout: int = 1800,
                 only: list[str] | None = None) -> list[dict]:
    """Execute each notebook of ``root/notebooks`` (in order) into ``out/NAME.html``, plus ``out/index.html``.

    ImageNet cells use the real weights when they are cached or downloadable, stand-ins otherwise
    (``LECTUREKIT_STANDIN=auto`` unless already set). Returns one dict per notebook with its status.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in only)]
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LECTUREKIT_STANDIN", "auto")
    if fast:
        os.environ["LECTUREKIT_FAST"] = "1"
    exporter = HTMLExporter()
    results = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        status = "ok"
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except CellExecutionError as err:
            status = "failed: " + str(err).strip().splitlines()[-1][:200]
        seconds = time.perf_counter() - start
        body, _ = exporter.from_notebook_node(nb)
        (out / f"{path.stem}.html").write_text(body, encoding="utf-8")
        results.append(dict(name=path.stem, title=_notebook_title(path), status=status, seconds=seconds))
        print(f"{path.name:45s} {status:10s} {seconds:6.1f} s", flush=True)
    rows = "\n".join(
        f'<li><a href="{html.escape(r["name"])}.html">{html.escape(r["title"])}</a>'
        f' <small>({r["status"]}, {r["seconds"]:.0f} s)</small></li>' for r in results)
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Visualizing and Understanding CNNs</title>"
        "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}li{margin:.4em 0}</style>"
        f"<h1>Visualizing and Understanding CNNs</h1><p>Executed notebooks of the course.</p><ol>{rows}</ol>",
        encoding="utf-8")
    return results


def _cmd_course(args) -> int:
    root = find_root()
    out = Path(args.out) if args.out else root / "build"
    results = build_course(root, out, fast=args.fast, only=args.only or None)
    print(f"open {out / 'index.html'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _cmd_lab(args) -> int:
    root = find_root()
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print("JupyterLab is not installed: pip install 'lecturekit[lab]' (or `make lab`)", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "jupyter", "lab", str(root / "notebooks"), *args.extra])


def _cmd_train(args) -> int:
    from . import data, training
    from .models import weights_path

    # --pooling max / --biased make notebook 06's GMP model and notebook 04's biased model; their
    # default out path is their own bundled file (models.weights_path).
    if args.biased and args.pooling == "max":
        print("choose one of --pooling max and --biased (each bundled variant changes one thing)", file=sys.stderr)
        return 2
    variant = "gmp" if args.pooling == "max" else "biased" if args.biased else None
    out = Path(args.out) if args.out else weights_path(variant or "standard")
    args.out = out
    bias = training.BIAS if args.biased else None
    model, history = training.train_course_model(steps=args.steps, seed=args.seed, out=out,
                                                 progress=not args.quiet, pooling=args.pooling, bias=bias)
    test = (data.shapes(2000, seed=training.TEST_SEED) if bias is None
            else data.biased_shapes(2000, seed=training.TEST_SEED, bias=bias))
    print(f"trained {args.steps} steps in {history.seconds:.0f} s; validation accuracy "
          f"{history.val_acc[-1]:.4f}; held-out test accuracy {training.evaluate(model, test):.4f}; "
          f"saved {args.out}")
    return 0


def _cmd_grade(args) -> int:
    from . import grader

    limits = dict(cell_timeout=args.cell_timeout, timeout=args.timeout)
    if args.against:
        limits["reference"] = Path(args.against)
    target = Path(args.submission)
    if target.is_dir():
        reports = grader.grade_folder(target, jobs=args.jobs, **limits)
        for student, report in reports.items():
            print(f"{student}: {report.score:g}/{report.max_score:g}", file=sys.stderr)
        table = grader.reports_to_csv(reports)
        if args.csv:
            Path(args.csv).write_text(table, encoding="utf-8")
        else:
            print(table, end="")
        if args.json:
            folder = Path(args.json)
            folder.mkdir(parents=True, exist_ok=True)
            for student, report in reports.items():
                name = student.replace("/", "__").replace(os.sep, "__") + ".json"
                (folder / name).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        return 0
    if not target.is_file():
        print(f"no such submission: {target} (expected a .ipynb file or a folder of them)", file=sys.stderr)
        return 2
    report = grader.grade(target, **limits)
    print(grader.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    return 0


def _cmd_assignments(args) -> int:
    from . import grader

    root = find_root()
    changed = grader.write_assignments(root / "solutions", root / "assignments", check_only=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(root)}")
    if args.check and changed:
        print("run `lecturekit assignments` to regenerate them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from .models import WEIGHTS_PATH
    from .training import RECIPE

    parser = argparse.ArgumentParser(prog="lecturekit", description="Visualizing and Understanding CNNs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lab", help="open the course in JupyterLab")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to jupyter lab")
    p.set_defaults(func=_cmd_lab)

    p = sub.add_parser("course", help="execute every lecture notebook into an HTML build with an index")
    p.add_argument("--out", help="output folder (default: build/ in the course folder)")
    p.add_argument("--fast", action="store_true", help="LECTUREKIT_FAST=1: small iteration counts")
    p.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 04")
    p.set_defaults(func=_cmd_course)

    p = sub.add_parser("train", help="reproduce the bundled course-model weights")
    p.add_argument("--out", default=None, help=f"where to save (default: {WEIGHTS_PATH}, or the variant's file)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--pooling", choices=("avg", "max"), default="avg",
                   help="global pooling: avg (GAP, the course model) or max (GMP, notebook 06)")
    p.add_argument("--biased", action="store_true",
                   help="train on data.biased_shapes (circles on snow, notebook 04)")
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("grade", help="score a submission (or a folder of them) with nbval")
    p.add_argument("submission", help="a .ipynb file, or a folder of them (one CSV row per student)")
    p.add_argument("--json", help="write the JSON report here (for a folder: a folder of reports)")
    p.add_argument("--csv", help="for a folder: write the CSV here (default: print it)")
    p.add_argument("--cell-timeout", type=float, default=60, help="seconds per cell (default 60)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per notebook (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    p.add_argument("--against", help="the assignment notebook: its graded cells and points are used, "
                   "whatever the submission did to them")
    p.set_defaults(func=_cmd_grade)

    p = sub.add_parser("assignments", help="write assignments/ from solutions/ (solution blocks -> stubs)")
    p.add_argument("--check", action="store_true", help="write nothing; fail when assignments/ is out of date")
    p.set_defaults(func=_cmd_assignments)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
