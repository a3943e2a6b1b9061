"""Speed and quality of lecturekit.style (issue 10), printed as tables for benchmarks/RESULTS.md.

Speed (targets): one optimisation step <= 1.2x one forward + backward pass of the feature network
(measured side by side, interleaved); style transfer of a 256 px image end to end <= 60 s; the
bundled fast-style network stylises a 512 px image in <= 0.5 s; ``lecturekit train-style`` <= 10 min
(read from the bundled file's record; ``--train`` trains again and times it).
Quality: the independent Gram distance (random network seed 1) and the spectrum distance of
syntheses against the two baselines (noise, shuffled pixels).

    python benchmarks/bench_style.py [--quick] [--train] [--speed] [--fast-only] [--threads N]

``--fast-only``: only the fast-style rows. ``--threads N``: torch threads; on a machine shared with other
jobs, ``--threads 1`` with the CPU-time rows gives the work done, which the neighbours do not inflate
(idle OpenMP threads spin while their partner waits for a core).
"""
import os
import statistics
import sys
import time

os.environ.setdefault("LECTUREKIT_STANDIN", "1")  # never download at run time

import torch  # noqa: E402

import lecturekit as lk  # noqa: E402
from lecturekit import style as S  # noqa: E402
from timing import print_table, median_seconds, timed as timed_with  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

QUICK = "--quick" in sys.argv
if "--threads" in sys.argv:
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))


def timed(fn, repeats=1):
    """Median seconds of ``repeats`` calls: the shared benchmarks/timing.py timer."""
    return median_seconds(fn, repeats)


def bare_step(net, x, targets, steps):
    """The same loss and gradient in plain PyTorch: forward, Gram matrices, E_l, backward (no hooks,
    no optimiser): the reference cost of one step."""
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        x.grad = None
        maps = net(x)
        loss = sum(((A.flatten(2) @ A.flatten(2).transpose(1, 2) / A[0, 0].numel() - G) ** 2).sum()
                   / (4 * G.shape[-1] ** 2) for A, G in zip(maps, targets)) / len(maps)
        loss.backward()


def net_only(net, x, steps):
    """Forward and backward of the feature network alone (sum of its maps), no Gram matrices."""
    x = x.clone().requires_grad_(True)
    for _ in range(steps):
        x.grad = None
        sum(A.sum() for A in net(x)).backward()


def speed():
    rows = []
    net = S.random_feature_net(seed=0)
    for size in (() if "--fast-only" in sys.argv else (128, 256)):
        texture = lk.data.sample_image("gravel", size=size)
        x = S.noise_like(texture)
        with torch.no_grad():
            targets = [S.gram(A) for A in net(texture)]
        steps = 10 if size == 128 else 4
        bare_step(net, x, targets, 2)
        S.texture_synthesis(net, texture, steps=2, progress=False)  # warm-up
        base, bare, ours, adam = [], [], [], []
        for _ in range(3 if QUICK else 5):  # interleaved, so that the machine's load hits all alike
            base.append(timed(lambda: net_only(net, x, steps)) / steps)
            bare.append(timed(lambda: bare_step(net, x, targets, steps)) / steps)
            ours.append(timed(lambda: S.texture_synthesis(net, texture, steps=steps, progress=False)) / steps)
            adam.append(timed(lambda: S.texture_synthesis(net, texture, steps=steps, optimizer="adam",
                                                          progress=False)) / steps)
        b, r, o, a = (statistics.median(v) for v in (base, bare, ours, adam))
        rows.append((f"{size} px: L-BFGS step / bare fwd+Gram+bwd", f"{o * 1e3:.0f} / {r * 1e3:.0f} ms", f"{o / r:.2f}x", "<= 1.2x"))
        rows.append((f"{size} px: Adam step / bare fwd+Gram+bwd", f"{a * 1e3:.0f} / {r * 1e3:.0f} ms", f"{a / r:.2f}x", "<= 1.2x"))
        rows.append((f"{size} px: L-BFGS step / network fwd+bwd alone", f"{o * 1e3:.0f} / {b * 1e3:.0f} ms", f"{o / b:.2f}x", "(info)"))

    if "--fast-only" not in sys.argv:
        content = lk.data.sample_image("cat", size=256)
        style = lk.data.sample_image("flower", size=256)
        t_style = timed(lambda: S.style_transfer(net, content, style, style_weight=100.0, tv_weight=1.0, steps=60,
                                                 progress=False))
        rows.append(("style transfer 256 px, 60 L-BFGS steps, end to end", "", f"{t_style:.1f} s", "<= 60 s"))

    fast = S.fast_style_model()
    photo = lk.data.sample_image("astronaut", size=512)
    S.stylize(fast, photo)  # warm-up
    t_fast = timed(lambda: S.stylize(fast, photo), 3 if QUICK else 7)
    rows.append(("fast style: one 512 px forward pass (median)", "", f"{t_fast:.3f} s", "<= 0.5 s"))
    cpu_fast, _ = timed_with(lambda: S.stylize(fast, photo), 3 if QUICK else 7, clock=time.process_time)
    rows.append((f"fast style: one 512 px forward pass, best CPU time ({torch.get_num_threads()} threads)", "",
                 f"{cpu_fast:.3f} s", "<= 0.5 s"))
    rows.append(("fast style: bundled weights file", "", f"{S.FAST_STYLE_PATH.stat().st_size / 1e6:.2f} MB", "<= 2 MB"))
    meta = fast.meta
    rows.append((f"train-style as recorded in the bundled file ({meta['steps']} steps)", "",
                 f"{meta['seconds']:.0f} s", "<= 600 s"))
    if "--train" in sys.argv:
        start, cpu = time.perf_counter(), time.process_time()
        S.train_fast_style(progress=False)
        rows.append(("train-style, timed now (wall)", "", f"{time.perf_counter() - start:.0f} s", "<= 600 s"))
        rows.append(("train-style, timed now (CPU time)", "", f"{time.process_time() - cpu:.0f} s", "<= 600 s"))

    print(f"\nthreads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} (2 cores)")
    print_table(rows, widths=(58, 18, 9))


def quality():
    net = S.random_feature_net(seed=0)
    size, steps = (64, 50) if QUICK else (128, 200)
    print(f"\ntexture synthesis, random multi-scale net, {size} px, {steps} L-BFGS steps")
    print(f"| texture | candidate | Gram distance (seed 1) | spectrum | histogram |\n|---|---|--:|--:|--:|")
    for name in ("brick", "grass", "gravel"):
        texture = lk.data.sample_image(name, size=size)
        synth = S.texture_synthesis(net, texture, steps=steps, progress=False).image
        for label, x in (("synthesis", synth), ("noise", S.noise_like(texture)), ("shuffled", S.shuffle_pixels(texture))):
            print(f"| {name} | {label} | {S.texture_distance(x, texture).item():.4f} | "
                  f"{S.spectrum_distance(x, texture).item():.3f} | {S.histogram_distance(x, texture).item():.3f} |")


if __name__ == "__main__":
    speed()
    if "--speed" not in sys.argv and "--fast-only" not in sys.argv:
        quality()
