"""The ``lecturekit`` command: ``lab``, ``course``, ``train``, ``grade`` and ``assignments``.

    lecturekit lab                 open the course in JupyterLab
    lecturekit course [--fast]     execute every lecture notebook into build/ (HTML + index page)
    lecturekit train [--out FILE]  reproduce the bundled course-model weights from the recipe's seed
    lecturekit train --seed 1      ... the second course model (transfer attacks, notebook 15)
    lecturekit train --robust      ... the adversarially trained course model (notebook 16)
    lecturekit train-style [--out FILE]  reproduce the bundled fast style transfer network
    lecturekit grade SUBMISSION.ipynb [--against A]   score a submission in a sandbox (a folder: one CSV row each)
    lecturekit assignments [--check]                  write assignments/ from solutions/
    lecturekit colab [--source SPEC] [--check]        the Colab install cell of every notebook
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "build_course", "find_root", "installed_course"]


def find_root(start: Path | None = None) -> Path:
    """The course folder: the nearest parent of ``start`` (default: cwd) that holds notebooks/."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir():
            return folder
    raise SystemExit(f"no notebooks/ folder found in {here} or its parents; run this inside the course folder")


def installed_course() -> Path | None:
    """The copy of the course installed with the wheel (``share/lecturekit``), or None (editable install)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("lecturekit") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        parts = file.parts
        if parts[-1].endswith(".ipynb") and parts[-3:-1] == ("lecturekit", "notebooks") and "share" in parts:
            return Path(file.locate()).resolve().parent.parent
    return None


def build_course(root: Path, out: Path, fast: bool = False, timeout: int = 1800,
                 only: list[str] | None = None, **kwargs) -> list[dict]:
    """Execute the notebooks into an offline HTML build with an index: see :func:`lecturekit.course.build_course`."""
    from .course import build_course as build

    return build(root, out, fast=fast, timeout=timeout, only=only, **kwargs)


def _cmd_course(args) -> int:
    try:
        root = find_root()
        out = Path(args.out) if args.out else root / "build"
    except SystemExit:  # outside a checkout: the notebooks installed with the wheel, built into ./build
        root = installed_course()
        if root is None:
            raise
        out = Path(args.out) if args.out else Path.cwd() / "build"
        print(f"no notebooks/ folder here: running the notebooks installed with lecturekit ({root})")
    results = build_course(root, out, fast=args.fast, only=args.only or None, heartbeat=args.heartbeat)
    problems = sum(len(r["problems"]) for r in results)
    print(f"{sum(r['status'] == 'ok' for r in results)}/{len(results)} notebooks ran; "
          f"{sum(r['standin'] for r in results)} used stand-in ImageNet weights; {problems} problem(s) listed "
          f"in the index. Open {out / 'index.html'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _cmd_lab(args) -> int:
    root = find_root()
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print("JupyterLab is not installed: pip install 'lecturekit[lab]' (or `make lab`)", file=sys.stderr)
        return 1
    extra = list(args.extra)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        extra.append("--allow-root")  # Jupyter refuses to start as root (containers, Colab-like VMs) without it
    return subprocess.call([sys.executable, "-m", "jupyter", "lab", str(root / "notebooks"), *extra])


def _cmd_train(args) -> int:
    from . import allocator, data, models, training

    allocator.keep_freed_memory()  # every step's 64 MiB activations reused, not mapped anew (RESULTS: -80-92% sys CPU)

    # One bundled file per variant (models.BUNDLED_WEIGHTS): --seed 1 the second model (notebook 15),
    # --robust fast adversarial training (notebook 16), --pooling max the GMP model (notebook 06) and
    # --biased the model trained on circles on snow (notebook 04). Each variant changes one thing.
    if sum([args.robust, args.biased, args.pooling == "max"]) > 1:
        print("choose one of --robust, --pooling max and --biased (each bundled variant changes one thing)",
              file=sys.stderr)
        return 2
    eps = args.eps if args.robust else 0.0
    variant = ("robust" if args.robust else "gmp" if args.pooling == "max" else "biased" if args.biased
               else {0: "standard", 1: "seed1"}.get(args.seed))
    if args.out:
        out = Path(args.out)
    elif variant is not None:
        out = models.weights_path(variant)
    else:  # other seeds get a file of their own
        out = models.WEIGHTS_PATH.with_name(f"coursenet_seed{args.seed}.pt")
    bias = training.BIAS if args.biased else None
    model, history = training.train_course_model(steps=args.steps, seed=args.seed, out=out, adversarial_eps=eps,
                                                 pooling=args.pooling, bias=bias, progress=not args.quiet)
    test = (data.shapes(2000, seed=training.TEST_SEED) if bias is None
            else data.biased_shapes(2000, seed=training.TEST_SEED, bias=bias))
    print(f"trained {args.steps} steps{f' adversarially (eps {eps * 255:.3g}/255)' if eps else ''} in "
          f"{history.seconds:.0f} s; validation accuracy {history.val_acc[-1]:.4f}; held-out test accuracy "
          f"{training.evaluate(model, test):.4f}; saved {out}")
    return 0


def _cmd_train_style(args) -> int:
    from . import style

    net, history = style.train_fast_style(steps=args.steps, seed=args.seed, out=Path(args.out),
                                          progress=not args.quiet)
    size = Path(args.out).stat().st_size / 1e6
    print(f"trained {len(history['loss'])} steps in {history['seconds']:.0f} s; final loss "
          f"{sum(history['loss'][-50:]) / len(history['loss'][-50:]):.4g}; saved {args.out} ({size:.2f} MB)")
    return 0


def _cmd_grade(args) -> int:
    from . import grader

    limits = dict(cell_timeout=args.cell_timeout, timeout=args.timeout, sandbox=False if args.no_sandbox else None,
                  memory=int(args.memory * 2**20) if args.memory else None)
    target = Path(args.submission)
    if not target.exists():
        print(f"no such submission: {target} (expected a .ipynb file or a folder of them)", file=sys.stderr)
        return 2
    if args.no_sandbox:
        print(grader.NO_SANDBOX_WARNING, file=sys.stderr)
    against = None  # a folder without --against: each notebook is graded against the assignment of its name
    try:
        if args.against or target.is_file():
            assignment = Path(args.against) if args.against else grader._official_assignment(target.name)
            against = grader.load_key(assignment, Path(args.solution) if args.solution else None)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"cannot build the answer key: {err}", file=sys.stderr)
        return 2
    try:
        if target.is_dir():
            out = Path(args.json) if args.json else target.parent / f"{target.name}-reports"
            reports = grader.grade_folder(
                target, against=against, jobs=args.jobs, out=out, similarity=True,
                on_report=lambda student, r: print(f"{student}: {r.score:g}/{r.max_score:g}", file=sys.stderr),
                **limits)
            table = grader.reports_to_csv(reports)
            if args.csv:
                grader._write_atomically(Path(args.csv), table)
            else:
                print(table, end="")
            print(f"reports in {out} (COMPLETE marks a finished batch; similarity.csv lists near-identical "
                  "solutions)", file=sys.stderr)
            return 0
        report = grader.grade(target, against=against, **limits)
    except grader.SandboxUnavailable as err:
        print(f"refusing to grade: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the reports written so far are complete; the batch is not (no COMPLETE marker)",
              file=sys.stderr)
        return 130
    finally:
        if against is not None:
            against.close()
    print(grader.format_report(report))
    if args.json:
        grader._write_atomically(Path(args.json), json.dumps(report.to_json(), indent=2))
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


def _cmd_colab(args) -> int:
    from . import colab

    root = find_root()
    try:
        source = colab.validate_source(args.source) if args.source else colab.configured_source(root)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.source and not args.check:
        colab.set_configured_source(root, source)  # pyproject.toml stays the one place it is configured
    changed = colab.rewrite_notebooks(root, source, check_only=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(root)}")
    if args.check and changed:
        print(f"run `lecturekit colab` to write the install cell for {source} into them", file=sys.stderr)
        return 1
    print(f"{len(changed)} notebooks {'to change' if args.check else 'changed'}; Colab installs from {source}")
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
    p.add_argument("--heartbeat", type=float, default=30.0, metavar="SECONDS",
                   help="while a cell runs, print which one every SECONDS (default 30)")
    p.set_defaults(func=_cmd_course)

    p = sub.add_parser("train", help="reproduce the bundled course-model weights")
    p.add_argument("--out", help=f"where to save (default: the bundled file, {WEIGHTS_PATH.name} for seed 0, "
                   "coursenet_seed1.pt for --seed 1, coursenet_robust.pt for --robust)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"], help="training seed (1: the second course model)")
    p.add_argument("--robust", action="store_true",
                   help="fast adversarial training (FGSM with random start, Wong et al. 2020): the robust model")
    p.add_argument("--eps", type=float, default=8 / 255, help="with --robust: the L-inf radius in pixel units (8/255)")
    p.add_argument("--pooling", choices=("avg", "max"), default="avg",
                   help="global pooling: avg (GAP, the course model) or max (GMP, notebook 06)")
    p.add_argument("--biased", action="store_true",
                   help="train on data.biased_shapes (circles on snow, notebook 04)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    from .style import FAST_STYLE_PATH, FAST_STYLE_RECIPE

    p = sub.add_parser("train-style", help="reproduce the bundled fast style transfer network")
    p.add_argument("--out", default=str(FAST_STYLE_PATH), help=f"where to save (default: {FAST_STYLE_PATH})")
    p.add_argument("--steps", type=int, default=FAST_STYLE_RECIPE["steps"])
    p.add_argument("--seed", type=int, default=FAST_STYLE_RECIPE["seed"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_style)

    p = sub.add_parser("grade", help="score a submission (or a folder of them), each in its own sandbox")
    p.add_argument("submission", help="a .ipynb file, or a folder of them (one CSV row per student)")
    p.add_argument("--against", help="the official assignment (default: assignments/<same name> of this course); "
                   "its graded cells and points are used, whatever the submission did to them")
    p.add_argument("--solution", help="the instructor's solution the references are computed from "
                   "(default: solutions/<name> next to the assignment)")
    p.add_argument("--json", help="write the JSON report here (for a folder: the folder of reports, "
                   "default <folder>-reports)")
    p.add_argument("--csv", help="for a folder: write the CSV here (default: print it)")
    p.add_argument("--cell-timeout", type=float, default=60, help="seconds per cell (default 60)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per notebook (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    p.add_argument("--memory", type=float, help="MiB of memory per process in the sandbox (default 2048)")
    p.add_argument("--no-sandbox", action="store_true", help="grade without bubblewrap: UNPROTECTED, for "
                   "submissions you trust (the grader refuses otherwise when no sandbox is available)")
    p.set_defaults(func=_cmd_grade)

    p = sub.add_parser("assignments", help="write assignments/ from solutions/ (solution blocks -> stubs)")
    p.add_argument("--check", action="store_true", help="write nothing; fail when assignments/ is out of date")
    p.set_defaults(func=_cmd_assignments)

    p = sub.add_parser("colab", help="write the Colab install cell (one source for every notebook)")
    p.add_argument("--source", help="PyPI name, wheel URL or git URL to install from; saved as "
                   "[tool.lecturekit] colab_source in pyproject.toml (default: the value saved there)")
    p.add_argument("--check", action="store_true", help="write nothing; fail when a notebook's cell differs")
    p.set_defaults(func=_cmd_colab)

    # `lecturekit lab --no-browser --port 8899`: options argparse does not know go to jupyter lab
    # (REMAINDER alone does not take arguments that start with a dash).
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "lab":
        args.extra = unknown + list(args.extra)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
