"""The course build (``lecturekit course``, ``make course``), one notebook at a time: wall and CPU time.

    python benchmarks/bench_course.py                     # every notebook, full settings (issue 15)
    python benchmarks/bench_course.py --threads 1         # one torch thread: the CPU time is the work done
    python benchmarks/bench_course.py --only 00 08        # notebooks whose name starts with these
    python benchmarks/bench_course.py --quick             # the FAST settings (what `make bench --fast` runs)

Each notebook is built exactly as ``lecturekit course`` builds it (:func:`lecturekit.course.build_notebook`:
a fresh kernel, the executed notebook, its HTML page) into ``--out`` (default: a temporary folder). The
table gives per notebook the wall time, the kernel's CPU time (user + sys of the kernel process and its
children, from ``getrusage(RUSAGE_CHILDREN)`` once the kernel has ended), the mean 1-minute load average
during the run, the status, and the slowest cell. On a machine shared with other jobs the wall time
mostly measures the neighbours; the CPU time at ``--threads 1`` is the work done, and on a quiet 2-core
machine the wall time is at most that. So the targets are checked against the CPU time at ``--threads 1``
and against the wall time otherwise (with more threads the CPU time counts every thread, also while it
waits for the others, and says nothing about how long a student waits).

Targets (issue 15): each notebook's full setting within 5 minutes, the whole build within 15 minutes.
A row over 5 minutes is flagged ``SLOW``, a failed notebook ``FAIL``.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's lecturekit, also when it is not installed
from timing import print_table  # noqa: E402 -- benchmarks/timing.py: the one table printer

NOTEBOOK_TARGET_S = 300.0  # each notebook, full settings
COURSE_TARGET_S = 900.0  # the whole build


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _slowest_cell(nb) -> tuple[int, float]:
    """(code-cell number from 1, wall seconds) of the slowest cell, from nbclient's timing metadata."""
    from datetime import datetime

    best = (0, 0.0)
    number = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        number += 1
        execution = cell.get("metadata", {}).get("execution", {})
        start, end = execution.get("iopub.execute_input"), execution.get("shell.execute_reply")
        if start and end:
            seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                       - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
            best = max(best, (number, seconds), key=lambda b: b[1])
    return best


def bench_notebook(path: Path, out: Path, fast: bool, timeout: int, heartbeat: float) -> dict:
    """Build one notebook as the course build does; its record plus cpu_s, load and the slowest cell."""
    import nbformat

    from lecturekit.course import build_notebook

    loads: list[float] = []
    done = threading.Event()

    def sample():
        while True:
            loads.append(os.getloadavg()[0])
            if done.wait(5.0):
                break

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = _children_cpu()
    record = build_notebook(path, out, fast=fast, timeout=timeout, heartbeat=heartbeat,
                            log=lambda line: print("   ", line, file=sys.stderr, flush=True))
    record["cpu_s"] = _children_cpu() - cpu0  # the kernel was shut down and reaped by now
    done.set()
    sampler.join()
    record["load"] = sum(loads) / len(loads)
    record["slowest"] = _slowest_cell(nbformat.read(out / f"{record['name']}.ipynb", as_version=4))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="notebooks whose name starts with one of these (00 08 ...)")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads of each kernel (default: as set)")
    parser.add_argument("--quick", action="store_true", help="the FAST settings (LECTUREKIT_FAST=1)")
    parser.add_argument("--out", help="build folder (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if args.threads:  # the kernels inherit these; torch reads OMP_NUM_THREADS when it starts
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.pop("LECTUREKIT_FAST", None)  # build_notebook sets it for --quick; never inherited
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in args.only)]
    setting = "FAST settings" if args.quick else "full settings"
    print(f"course build, {setting}, threads: {os.environ.get('OMP_NUM_THREADS', 'default')}, "
          f"{os.cpu_count()} CPUs, LECTUREKIT_STANDIN={os.environ.get('LECTUREKIT_STANDIN', 'auto')}", flush=True)
    measure = "cpu_s" if args.threads == 1 else "seconds"  # the module docstring says why
    label = "CPU" if measure == "cpu_s" else "wall"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows, records = [], []
        for path in notebooks:
            r = bench_notebook(path, out, fast=args.quick, timeout=args.timeout, heartbeat=args.heartbeat)
            records.append(r)
            flag = "FAIL " if r["status"] != "ok" else ("SLOW " if r[measure] > NOTEBOOK_TARGET_S else "")
            cell, cell_s = r["slowest"]
            rows.append((r["name"] + (" (stand-in)" if r["standin"] else ""),
                         f"wall {r['seconds']:.0f}, CPU {r['cpu_s']:.0f}, load {r['load']:.1f}, "
                         f"slowest cell {cell} ({cell_s:.0f} s)",
                         flag + r["status"][:60], f"{label} <= {NOTEBOOK_TARGET_S:.0f} s"))
            print(" | ".join(rows[-1]), flush=True)
        wall, cpu = sum(r["seconds"] for r in records), sum(r["cpu_s"] for r in records)
        ok = sum(r["status"] == "ok" for r in records)
        total = cpu if measure == "cpu_s" else wall
        rows.append(("total", f"wall {wall:.0f}, CPU {cpu:.0f}",
                     ("SLOW " if total > COURSE_TARGET_S else "") + f"{ok}/{len(records)} ok",
                     f"{label} <= {COURSE_TARGET_S:.0f} s"))
        print()
        print_table(rows, widths=(40, 58, 12))
        print("CPU s at one thread is the work done; wall s includes the machine's other jobs")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
