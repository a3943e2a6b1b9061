"""allocator: glibc keeps large freed blocks for reuse once tuned, in this process and in kernels.

mallopt changes the process for good, so each check that tunes the allocator runs in a fresh Python
child. What the tuning does is read from glibc itself (mallinfo2: bytes in mmapped blocks against
bytes in the heap), not from page-fault counts, which depend on the heap's history.
"""
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbformat import v4

from lecturekit import allocator, course

GLIBC = allocator._glibc() is not None and hasattr(allocator._glibc(), "mallinfo2")
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc >= 2.33 (mallinfo2) needed to read the allocator")

# A child that allocates one 64 MiB block (CourseNet's first activation at batch 128) and reports where
# glibc put it: "mmap" (a mapping of its own, unmapped on free) or "heap" (kept for reuse on free).
WHERE_IS_THE_BLOCK = textwrap.dedent("""
    import ctypes, sys
    from lecturekit import allocator
    if sys.argv[1] == "tune":
        assert allocator.keep_freed_memory() is True
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2()
    block = libc.malloc(64 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    mapped = during.hblkhd - before.hblkhd >= 64 << 20
    in_heap = during.uordblks - before.uordblks >= 64 << 20
    kept = after.arena >= during.arena  # the heap was not trimmed when the block came back
    print("mmap" if mapped and not in_heap else "heap kept" if in_heap and kept else
          f"unexpected: {before} {during} {after}")
""")


def _where_is_the_block(mode: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", WHERE_IS_THE_BLOCK, mode], capture_output=True, text=True,
                         env=env, check=True, timeout=60)
    return out.stdout.strip()


@needs_glibc
def test_untuned_glibc_maps_a_64_mib_block_of_its_own():
    """The reason for the module: without tuning, the block is a fresh mapping (unmapped on free)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _where_is_the_block("plain", env) == "mmap"


@needs_glibc
def test_keep_freed_memory_puts_the_block_in_the_heap_and_keeps_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _where_is_the_block("tune", env) == "heap kept"


@needs_glibc
def test_the_environment_tunes_a_child_process_the_same_way():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **allocator.ENVIRONMENT}
    assert _where_is_the_block("plain", env) == "heap kept"


@pytest.mark.parametrize("threshold", [0, -1, 1 << 31, 2.5, "1G"])
def test_a_threshold_mallopt_cannot_take_is_refused(threshold):
    with pytest.raises(ValueError, match="positive int below 2"):
        allocator.keep_freed_memory(threshold)


def test_the_tuning_does_not_change_what_training_computes(tmp_path):
    """Same seed, tuned or not: identical weights, bit for bit (only where memory comes from changes)."""
    script = textwrap.dedent("""
        import sys, torch
        from lecturekit import allocator, training
        torch.set_num_threads(1)
        if sys.argv[1] == "tune":
            allocator.keep_freed_memory()
        model, _ = training.train_course_model(steps=3, batch_size=16, val_size=8, out=sys.argv[2],
                                               progress=False)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for mode in ("plain", "tune"):
        subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / f"{mode}.pt")], env=env, check=True,
                       timeout=300)
    import torch
    plain, tuned = (torch.load(tmp_path / f"{m}.pt")["model"] for m in ("plain", "tune"))
    assert plain.keys() == tuned.keys()
    assert all(torch.equal(plain[k], tuned[k]) for k in plain)


@pytest.mark.slow
def test_course_kernels_get_the_tuning_and_a_users_own_value_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    nb = v4.new_notebook(cells=[v4.new_code_cell(
        "import os\nprint(os.environ['MALLOC_MMAP_THRESHOLD_'], os.environ['MALLOC_TRIM_THRESHOLD_'])")])
    path = tmp_path / "env.ipynb"
    nbformat.write(nb, path)
    executed, record = course.run_notebook(path, fast=True, timeout=120, heartbeat=60, log=lambda line: None)
    assert record["status"] == "ok", record
    assert executed.cells[0].outputs[0]["text"].split() == [allocator.ENVIRONMENT["MALLOC_MMAP_THRESHOLD_"],
                                                           "12345"]
