"""The one timer of the benchmarks (imported by the bench_*.py scripts, which run from this folder).

``timed(fn, repeat, reduce=min)`` runs ``fn`` ``repeat`` times and returns (the reduced seconds, the
last result): ``min`` (the default) is the best of the repeats, the usual estimate of the cost on a
noisy machine; ``statistics.median`` where a typical run is wanted. ``side_by_side(a, b)`` times two
functions alternately with the same loop, so that both see the same neighbours on a shared machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any], repeat: int = 1, reduce: Callable = min,
          clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """(reduce of the seconds of ``repeat`` calls of ``fn``, the last call's result)."""
    times, out = [], None
    for _ in range(repeat):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return reduce(times), out


def median_seconds(fn: Callable[[], Any], repeat: int = 1) -> float:
    """The median wall time of ``repeat`` calls: ``timed(fn, repeat, reduce=statistics.median)[0]``."""
    return timed(fn, repeat, reduce=statistics.median)[0]


def side_by_side(a: Callable[[], Any], b: Callable[[], Any], repeat: int = 5,
                 clock: Callable[[], float] = time.process_time) -> tuple[float, float]:
    """Best-of-``repeat`` seconds of two functions measured alternately (after one warm-up call each).

    The default clock is the CPU time of this process (all threads), not wall time: on a machine
    shared with other jobs the wall time mostly measures the neighbours, the CPU time the work done.
    """
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(timed(a, 1, clock=clock)[0])
        tb.append(timed(b, 1, clock=clock)[0])
    return min(ta), min(tb)


def print_table(rows: list[tuple[str, str, str, str]], widths: tuple[int, int, int] = (58, 18, 9)) -> None:
    """Print ``(measurement, times, result, target)`` rows as the Markdown table RESULTS.md copies."""
    a, b, c = widths
    print(f"| {'measurement':<{a}} | {'times':<{b}} | {'result':>{c}} | target |")
    print("|" + "-" * (a + 2) + "|" + "-" * (b + 2) + "|" + "-" * (c + 2) + "|--------|")
    for r in rows:
        print(f"| {r[0]:<{a}} | {r[1]:<{b}} | {r[2]:>{c}} | {r[3]} |")
