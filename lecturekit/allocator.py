"""Keep freed memory in the process, so that training does not page-fault its buffers back in every step.

glibc's malloc serves every block above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised dynamically up
to 32 MiB on 64-bit systems) with a fresh ``mmap`` and returns it to the kernel on ``free``. CourseNet's
first activation at a batch of 128 is 128 x 32 x 64 x 64 floats = 64 MiB, above that ceiling, so every
training step maps its largest buffers anew and touches each page once more: measured on the 2-core
development machine over 60 steps of ``lecturekit train --biased`` at one thread, 4.7 M minor page faults
and 14.3 s of system time next to 37.9 s of user time. Raising both thresholds to 1 GiB lets malloc
reuse the freed blocks: 0.27 M faults and 1.1 s of system time, the same weights.

PyTorch's performance tuning guide recommends jemalloc or TCMalloc for CPU workloads, which reuse
memory better than the default; we tune glibc's own allocator with ``mallopt`` instead, because it is always there on
Linux and a student's machine may not have the others. Elsewhere (macOS,
Windows, musl) :func:`keep_freed_memory` does nothing and says so by returning False.

Child processes (the notebook kernels of ``lecturekit course``) read the same settings from the
environment: :data:`ENVIRONMENT`, which glibc reads at start-up (``mallopt(3)``, "Environment").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "ENVIRONMENT", "THRESHOLD_BYTES"]

THRESHOLD_BYTES = 1 << 30  # 1 GiB: above any buffer the course allocates, below the machine's memory

# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The same settings for a child process: glibc reads these at start-up (the trailing underscore is
# glibc's spelling of the environment variables).
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(THRESHOLD_BYTES), "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD_BYTES)}


def _glibc():
    """The running process's C library if it is glibc (it has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl and others: no mallopt, or one that ignores these parameters
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Make glibc keep freed blocks up to ``threshold`` bytes for reuse instead of unmapping them.

    Sets ``M_MMAP_THRESHOLD`` (blocks below it come from the heap, not from a fresh mmap) and
    ``M_TRIM_THRESHOLD`` (the heap is not shrunk while its free top is below it). Affects only
    allocations made afterwards. Returns True when set, False where the C library is not glibc.
    Costs memory only up to the largest working set the process reaches, which it holds anyway
    during a training step.
    """
    if not isinstance(threshold, int) or threshold <= 0 or threshold >= 1 << 31:
        raise ValueError(f"threshold must be a positive int below 2**31 bytes (mallopt takes a C int), "
                         f"got {threshold!r}")
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1 and ok
    return ok
