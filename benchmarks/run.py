"""Run every benchmark (``benchmarks/bench_*.py``), each in its own process, and print one summary table.

    python benchmarks/run.py                    # all of them (what `make bench` runs)
    python benchmarks/run.py --fast             # quick settings where a benchmark has them (--quick)
    python benchmarks/run.py --only grading features   # benchmarks whose name contains a word

Each benchmark prints its own table as it runs (copied here as it comes); the summary at the end lists
every benchmark with its exit status, its wall time and the rows its table flagged (``SLOW``,
``FAIL``, ``MISS``). A benchmark has a quick mode when it accepts ``--quick``: ``--fast`` passes it.
A separate process per benchmark keeps peak-memory measurements and thread settings independent.
The numbers for ``benchmarks/RESULTS.md`` come from a full run on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = re.compile(r"\b(SLOW|FAIL|FAILED|MISS)\b")


def discover(only: list[str] | None = None, folder: Path = HERE) -> list[Path]:
    """The benchmark scripts in ``folder``, sorted; ``only``: keep names containing one of the words."""
    scripts = sorted(Path(folder).glob("bench_*.py"))
    if only:
        scripts = [p for p in scripts if any(word in p.stem.removeprefix("bench_") for word in only)]
    return scripts


def has_quick_mode(script: Path) -> bool:
    return "--quick" in script.read_text(encoding="utf-8")


def run_one(script: Path, fast: bool, timeout: float) -> dict:
    """Run one benchmark in a fresh interpreter, streaming its output; return its summary row."""
    command = [sys.executable, str(script)] + (["--quick"] if fast and has_quick_mode(script) else [])
    env = dict(os.environ)
    # The benchmarks import lecturekit from this checkout, also when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    print(f"\n=== {script.name} {' '.join(command[2:])}".rstrip(), flush=True)
    start = time.perf_counter()
    flagged: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=HERE.parent, env=env)
    killed = threading.Event()

    def kill():  # also stops a benchmark that hangs without printing
        killed.set()
        proc.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            print(line, end="", flush=True)
            if FLAGS.search(line):
                flagged.append(line.strip())
        returncode = proc.wait()
    finally:
        watchdog.cancel()
    status = f"timeout ({timeout:.0f} s)" if killed.is_set() else ("ok" if returncode == 0 else f"exit {returncode}")
    return dict(name=script.stem, status=status, seconds=time.perf_counter() - start, flagged=flagged)


def summary(rows: list[dict]) -> str:
    width = max([len("benchmark")] + [len(r["name"]) for r in rows])
    lines = [f"| {'benchmark':{width}} | status | seconds | flagged rows |",
             f"|{'-' * (width + 2)}|--------|---------|--------------|"]
    for r in rows:
        flagged = "; ".join(r["flagged"])[:120] or "-"
        lines.append(f"| {r['name']:{width}} | {r['status']} | {r['seconds']:7.1f} | {flagged} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="pass --quick to benchmarks that have a quick mode")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="run benchmarks whose name contains a word")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark (default 3600)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # for the tests
    args = parser.parse_args(argv)
    scripts = discover(args.only, args.dir)
    if not scripts:
        print(f"no benchmark matches {args.only}; have: {[p.stem for p in discover(folder=args.dir)]}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(p.stem for p in scripts))
        return 0
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, {len(scripts)} benchmarks"
          f"{' (fast)' if args.fast else ''}")
    rows = [run_one(script, args.fast, args.timeout) for script in scripts]
    print("\n" + summary(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
