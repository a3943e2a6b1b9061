"""Benchmark lecturekit.features (issue 3): speed of feature vectors and top patches, flat memory.

    python benchmarks/bench_features.py            # the full table (about 2 minutes on 2 cores)
    python benchmarks/bench_features.py --quick    # smaller sizes, to check the script runs

Targets: feature vectors of 5,000 ShapesWorld images in <= 10 s; top patches over 5,000 images in
<= 20 s; memory of activations/top_patches flat when the image count grows tenfold.

Memory is measured as the peak resident set size (RSS, from /proc/self/statm, sampled every 2 ms by
a thread) during the call, minus the RSS just before it, each case in a fresh Python process so that
memory freed by an earlier case cannot hide a later one. tracemalloc is no use here: PyTorch's CPU
allocator does not go through Python's allocator, so tracemalloc does not see tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

import lecturekit as lk
from timing import timed  # benchmarks/timing.py: the one timer

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Sample RSS in a thread while the block runs; ``.extra`` = peak minus the RSS at the start (bytes)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def generated(n: int, seed: int = 0, chunk: int = 256):
    """ShapesWorld images made batch by batch: the images themselves never all sit in memory."""
    for start in range(0, n, chunk):
        yield lk.data.shapes(min(chunk, n - start), seed=seed + start).images


def memory_child(case: str, n: int) -> None:
    """Run one memory case in this (fresh) process and print a JSON line."""
    model = lk.models.course_model()
    lk.features.activations(model, lk.data.shapes(16, seed=1).images, "features.0")  # warm up: allocator, fx
    lk.features.top_patches(model, lk.data.shapes(16, seed=1).images, "features.6", 0, k=4)
    if case.endswith("generator"):
        images = generated(n)
    else:
        images = lk.data.shapes(n, seed=0).images
    with PeakRSS() as mem:
        if case == "activations pool":
            out = lk.features.activations(model, images, "pool")
            result_bytes = out.numel() * out.element_size()
        elif case.startswith("top_patches"):
            lk.features.top_patches(model, images, "features.6", 0, k=9)
            result_bytes = 0
        else:
            raise ValueError(case)
    print(json.dumps({"case": case, "n": n, "extra_mb": mem.extra / 2**20, "result_mb": result_bytes / 2**20}))


def main(quick: bool) -> None:
    torch.manual_seed(0)
    n = 1000 if quick else 5000
    model = lk.models.course_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = []

    t_data, batch = timed(lambda: lk.data.shapes(n, seed=0))
    rows.append((f"make {n:,} ShapesWorld images (lk.data.shapes)", t_data, None))
    x = batch.images
    lk.features.activations(model, x[:64], "pool")  # warm-up

    def plain_forward():  # reference: the plain model, contiguous (NCHW) input, no hooks, up to pool
        with torch.no_grad():
            return torch.cat([model.pool(model.features(model.normalize(x[i: i + 256]))) for i in range(0, n, 256)])

    t_plain, ref = timed(plain_forward)
    rows.append((f"plain forward to pool, NCHW, {n:,} images (reference)", t_plain, None))
    t_feat, feats = timed(lambda: lk.features.activations(model, x, "pool"))
    assert torch.allclose(feats, ref, atol=1e-4)
    rows.append((f"activations(pool): features of {n:,} images", t_feat, 10.0))
    t_tp, _ = timed(lambda: lk.features.top_patches(model, x, "features.6", 0, k=9))
    rows.append((f"top_patches(features.6, 1 channel) over {n:,} images", t_tp, 20.0))
    t_tp8, _ = timed(lambda: lk.features.top_patches(model, x, "features.9", list(range(8)), k=9))
    rows.append((f"top_patches(features.9, 8 channels, one pass), {n:,} images", t_tp8, 20.0))
    t_nn, _ = timed(lambda: lk.features.neighbour_agreement(feats.flatten(1), batch.labels, k=5))
    rows.append((f"top-5 neighbour agreement, {n:,} x 128 features", t_nn, None))

    print(f"\n{'speed':<64}{'seconds':>9}{'target':>9}")
    for name, seconds, target in rows:
        print(f"{name:<64}{seconds:>9.2f}{('<= %g' % target) if target else '':>9}")

    sizes = (100, 1000) if quick else (500, 5000)
    print(f"\n{'memory (peak RSS during the call minus RSS before; fresh process each)':<74}"
          f"{'N':>6}{'extra MB':>10}{'result MB':>10}")
    for case in ["activations pool", "top_patches tensor", "top_patches generator"]:
        for size in sizes:
            out = subprocess.run([sys.executable, __file__, "--memory-child", case, str(size)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{case:<74}{r['n']:>6}{r['extra_mb']:>10.1f}{r['result_mb']:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "N"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
    else:
        main(args.quick)
