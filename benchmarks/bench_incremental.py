"""Incremental occlusion (issue 17) against the plain batched method and Captum's Occlusion, in one run.

    python benchmarks/bench_incremental.py            # 224 px, squeezenet1_1 and resnet18 (stand-in weights)
    python benchmarks/bench_incremental.py --quick    # 160 px, fewer settings
    python benchmarks/bench_incremental.py --threads 2

1. Whole maps, 224 px image, patch 16 stride 8 (729 positions): lecturekit incremental vs lecturekit
   plain (``incremental=False``: batches of occluded copies through the model) vs Captum's Occlusion
   at its best ``perturbations_per_eval``; each of the three at its best batch setting, chosen on the
   same image with stride 16.
   Target: incremental >= 3x faster than both. The maps are compared too (max abs difference).
   The theoretical ratio: multiply-adds of the plain method / of the incremental one
   (``lecturekit.incremental.occlusion_cost``; convolutions and linear layers).
2. The speed-up as a function of patch size and stride: one batch of 64 positions from the middle of
   the image, plain forward pass of the 64 copies vs the incremental scores, beside the FLOP ratio.
3. Peak memory (resident-set growth in a fresh process) of incremental occlusion at P and about 10P
   positions: target bounded.

CPU time of this process (``time.process_time``) in one thread by default: the machine's 2 cores are
shared with other jobs, and the CPU time of one thread measures the work, not the neighbours. Captum
is a benchmark-only peer (``pip install captum``); without it its column says so.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import torch

os.environ.setdefault("LECTUREKIT_STANDIN", "1")

from lecturekit import attribution, data, incremental, models  # noqa: E402
from timing import timed  # noqa: E402 -- benchmarks/timing.py: the one timer


def cpu(fn):
    """(CPU seconds, result) of one call."""
    return timed(fn, 1, clock=time.process_time)


def captum_occlusion(model, x, target, patch, stride, per_eval):
    from captum.attr import Occlusion

    def run():
        with torch.no_grad():
            return Occlusion(model).attribute(x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                                              baselines=0.0, target=target, perturbations_per_eval=per_eval)[:, 0]
    return run


def whole_maps(name, size, patch, stride, batch_sizes, per_evals):
    net = models.imagenet_model(name, standin=True)
    x = data.sample_image("cat", size=size)
    target = 281
    P = len(attribution.occlusion_positions((size, size), patch, stride))

    def best(make, choices):
        """The fastest setting on a cheaper grid (stride 2x), then the whole map with it: (seconds, map, setting)."""
        times = {k: cpu(make(2 * stride, k))[0] for k in choices} if len(choices) > 1 else {choices[0]: 0}
        k = min(times, key=times.get)
        return (*cpu(make(stride, k)), k)

    def ours(incremental):
        return lambda s, b: lambda: attribution.occlusion(net, x, target, patch, s, batch_size=b, progress=False,
                                                          incremental=incremental)

    attribution.occlusion(net, x, target, patch, 4 * stride, batch_size=16, progress=False)  # warm-up
    t_plain, m_plain, b_plain = best(ours(False), batch_sizes)
    t_fast, m_fast, b_fast = best(ours(True), batch_sizes)
    row = dict(what=f"{name}, {size} px, patch {patch} stride {stride}, {P} positions", plain=t_plain, fast=t_fast,
               b_plain=b_plain, b_fast=b_fast,
               diff=(m_fast - m_plain).abs().max().item(), scale=m_plain.abs().max().item())
    try:
        import captum  # noqa: F401
    except ImportError:
        row.update(captum=None, per_eval="captum not installed")
    else:  # its best batch setting (perturbations_per_eval), chosen the same way
        make = lambda s, k: captum_occlusion(net, x, target, patch, s, k)  # noqa: E731
        t_captum, m_captum, k = best(make, per_evals)
        row.update(captum=t_captum, per_eval=k, captum_diff=(m_captum - m_plain).abs().max().item())
    return row


def one_batch(net, x, patch, stride, n=64):
    """Plain forward of n occluded copies vs their incremental scores, and the multiply-add ratio."""
    corners = attribution.occlusion_positions(tuple(x.shape[2:]), patch, stride)
    middle = max(0, len(corners) // 2 - n // 2)
    corners = corners[middle:middle + n]
    copies = x.repeat(len(corners), 1, 1, 1)
    for b, (y0, x0) in enumerate(corners):
        copies[b, :, y0:y0 + patch, x0:x0 + patch] = 0
    engine = incremental.IncrementalModel(net)
    with torch.no_grad():
        engine.prepare(x)
        base = torch.zeros_like(x)
        net(copies[:2]), engine.scores(corners[:2], (patch, patch), base)  # warm-up
        engine.macs = 0
        t_fast = min(cpu(lambda: engine.scores(corners, (patch, patch), base))[0] for _ in range(2))
        t_plain = min(cpu(lambda: net(copies))[0] for _ in range(2))
    flops = engine.full_macs * len(corners) / (engine.macs / 2)
    return t_plain, t_fast, flops


def peak_memory_child(name: str, size: int, stride: int) -> None:
    """Run in a fresh process: resident-set growth (MB) of one incremental occlusion call after a warm-up."""
    torch.set_num_threads(1)
    net = models.imagenet_model(name, standin=True)
    x = data.sample_image("cat", size=size)
    attribution.occlusion(net, x, 281, patch=16, stride=16, batch_size=64, progress=False, incremental=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attribution.occlusion(net, x, 281, patch=16, stride=stride, batch_size=64, progress=False, incremental=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024, after / 1024)  # ru_maxrss is in kB on Linux: growth and peak, MB


def peak_memory(name: str, size: int, stride: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, __file__, "--memory", name, str(size), str(stride)], capture_output=True,
                         text=True, check=True,
                         env=dict(os.environ, LECTUREKIT_STANDIN="1", MALLOC_MMAP_THRESHOLD_="131072"))
    return tuple(map(float, out.stdout.strip().splitlines()[-1].split()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="160 px and fewer settings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    parser.add_argument("--parts", nargs="+", default=["memory", "whole", "sweep"], help="memory whole sweep")
    parser.add_argument("--models", nargs="+", default=["squeezenet1_1", "resnet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64],
                        help="lecturekit batch sizes to choose the best from (one: no choice)")
    parser.add_argument("--per-evals", nargs="+", type=int, default=[16, 64, 256],
                        help="Captum perturbations_per_eval to choose the best from (one: no choice)")
    parser.add_argument("--n", type=int, default=64, help="positions per batch in the sweep")
    args = parser.parse_args()
    size = 160 if args.quick else 224
    load = os.getloadavg()[0]

    # Memory first, in fresh processes, before this one builds a model.
    if "memory" in args.parts:
        strides = (16, 5)  # both above the batch size (64): the batches are full in both
        P = [len(attribution.occlusion_positions((size, size), 16, s)) for s in strides]
        mem = [peak_memory("squeezenet1_1", size, s) for s in strides]
        copies = P[1] * 3 * size * size * 4 / 2 ** 20  # MB of float32 images, were all copies made at once
        print(f"| incremental occlusion, squeezenet1_1 {size} px, fresh process | positions | RSS growth after a "
              f"warm-up at P (MB) | peak RSS (MB) |\n|---|---|---|---|")
        print(f"| P | {P[0]} | {mem[0][0]:.1f} | {mem[0][1]:.0f} |\n| {P[1] / P[0]:.0f}P | {P[1]} | {mem[1][0]:.1f} "
              f"| {mem[1][1]:.0f} |\n(all {P[1]} occluded copies at once would take {copies:.0f} MB)\n")
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPU cores, load average {load:.1f} at the start")
    names = ("squeezenet1_1",) if args.quick else tuple(args.models)
    if "whole" in args.parts:
        rows = [whole_maps(name, size, 16, 8, args.batch_sizes, args.per_evals) for name in names]
        print("\n| whole map (CPU s; batch size / per_eval) | lecturekit incremental | lecturekit plain | Captum Occlusion "
              "| plain / incr. | Captum / incr. | max diff (max of map) | target |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            captum_t = f"{r['captum']:.1f} ({r['per_eval']})" if r["captum"] is not None else r["per_eval"]
            captum_x = f"{r['captum'] / r['fast']:.1f}x" if r["captum"] is not None else "-"
            flag = "" if r["plain"] / r["fast"] >= 3 and (r["captum"] is None or r["captum"] / r["fast"] >= 3) else " MISS"
            print(f"| {r['what']} | {r['fast']:.1f} ({r['b_fast']}) | {r['plain']:.1f} ({r['b_plain']}) | {captum_t} "
                  f"| {r['plain'] / r['fast']:.1f}x | {captum_x} | {r['diff']:.1e} ({r['scale']:.1e}) | >= 3x{flag} |")
    if "sweep" in args.parts:
        print(f"\n| speed-up by patch and stride (one batch of {args.n} positions) | patch | stride | plain (s) "
              "| incremental (s) | measured | FLOP ratio |\n|---|---|---|---|---|---|---|")
        grid = [(8, 8), (16, 8), (16, 4), (32, 16), (48, 16)] if not args.quick else [(16, 8), (32, 16)]
        for name in names:
            net = models.imagenet_model(name, standin=True)
            x = data.sample_image("cat", size=size)
            for patch, stride in grid:
                t_plain, t_fast, flops = one_batch(net, x, patch, stride, args.n)
                print(f"| {name} {size} px | {patch} | {stride} | {t_plain:.2f} | {t_fast:.2f} "
                      f"| {t_plain / t_fast:.1f}x | {flops:.1f}x |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory":
        peak_memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
