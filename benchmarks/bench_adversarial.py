"""Speed and strength of lecturekit.adversarial (issue 11), printed as tables for benchmarks/RESULTS.md.

Speed (targets): one PGD step <= 1.2x one forward + backward pass to the input (side by side,
interleaved); PGD-10 on 256 images at most as slow as torchattacks' PGD (the most-used PyTorch attack
library; benchmark only, never a dependency: skipped with a message when it is not installed).
Strength, on held-out ShapesWorld images (seed lecturekit.training.TEST_SEED) with the course model:
accuracy under FGSM and PGD-10 at eps in {1, 2, 4, 8}/255, for the standard, second-seed and robust
course models.

    python benchmarks/bench_adversarial.py [--quick] [--speed] [--threads N]

``--speed``: the speed table only. ``--threads N``: torch threads (on a machine shared with other jobs,
``--threads 1`` keeps idle OpenMP threads from spinning, which inflates the CPU time of both sides).
"""
import os
import statistics
import sys
import time

os.environ.setdefault("LECTUREKIT_STANDIN", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lecturekit as lk  # noqa: E402
from lecturekit import adversarial as A  # noqa: E402
from timing import median_seconds, side_by_side  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

QUICK = "--quick" in sys.argv
if "--threads" in sys.argv:
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))


def fwd_bwd(model, x, y):
    """The reference cost: one forward and one backward pass to the input, parameters frozen."""
    with lk.hooks.preserved(model):
        x = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)


def timed(fn, repeats=1):
    """Median seconds of ``repeats`` calls: the shared benchmarks/timing.py timer."""
    return median_seconds(fn, repeats)


def speed():
    model = lk.models.course_model()
    test = lk.data.shapes(256, seed=lk.training.TEST_SEED)
    x, y = test.images, test.labels
    eps = 8 / 255
    rows = []
    x64, y64 = x[:64], y[:64]
    fwd_bwd(model, x64, y64)
    base, step = [], []
    for _ in range(3 if QUICK else 7):  # interleaved, so that the machine's load hits both alike
        base.append(timed(lambda: fwd_bwd(model, x64, y64)))
        step.append(timed(lambda: A.pgd_step(model, x64, x64, y64, eps, eps / 4)))
    b, s = statistics.median(base), statistics.median(step)
    rows.append(("one PGD step / one fwd + bwd, 64 images", f"{s * 1e3:.1f} / {b * 1e3:.1f} ms", f"{s / b:.2f}x", "<= 1.2x"))
    try:
        import torchattacks
    except ImportError:
        ours = timed(lambda: A.pgd(model, x, y, eps, steps=10), 1 if QUICK else 3)
        rows.append(("PGD-10, 256 images: lecturekit", f"{ours:.2f} s", "", ""))
        rows.append(("torchattacks.PGD", "not installed: pip install torchattacks to compare", "", ""))
    else:
        attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=True)
        # alternately, best of the repeats, in CPU seconds of this process and in wall seconds
        repeat = 2 if QUICK else 3
        cpu_ours, cpu_theirs = side_by_side(lambda: A.pgd(model, x, y, eps, steps=10), lambda: attack(x, y), repeat)
        wall_ours, wall_theirs = side_by_side(lambda: A.pgd(model, x, y, eps, steps=10), lambda: attack(x, y), repeat,
                                              clock=time.perf_counter)
        rows.append(("PGD-10, 256 images: lecturekit / torchattacks, CPU time", f"{cpu_ours:.2f} / {cpu_theirs:.2f} s",
                     f"{cpu_ours / cpu_theirs:.2f}x", "<= 1x"))
        rows.append(("PGD-10, 256 images: lecturekit / torchattacks, wall time", f"{wall_ours:.2f} / {wall_theirs:.2f} s",
                     f"{wall_ours / wall_theirs:.2f}x", "<= 1x"))
        acc_ours, acc_theirs = A.accuracy(model, A.pgd(model, x, y, eps, steps=10), y), A.accuracy(model, attack(x, y), y)
        rows.append(("  accuracy under each (same eps, steps, step size)", f"{acc_ours:.3f} / {acc_theirs:.3f}", "", ""))
    print("| what | measured | ratio | target |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def strength():
    n = 256 if QUICK else 1000
    test = lk.data.shapes(n, seed=lk.training.TEST_SEED)
    levels = [0, 1, 2, 4, 8]
    eps_values = [level / 255 for level in levels]
    print(f"\nAccuracy on {n} held-out images (PGD-10: random start, step 2.5 eps / 10)\n")
    print("| model | attack | " + " | ".join(f"{level}/255" for level in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    for weights in ("standard", "seed1", "robust"):
        model = lk.models.course_model(weights=weights)
        for attack, kwargs in (("fgsm", {}), ("pgd", dict(steps=10))):
            start = time.perf_counter()
            acc = A.accuracy_under_attack(model, test.images, test.labels, eps_values, attack=attack, **kwargs)
            print(f"| {weights} | {attack.upper()}{'-10' if attack == 'pgd' else ''} | "
                  + " | ".join(f"{acc[e]:.3f}" for e in eps_values) + f" |  ({time.perf_counter() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    speed()
    print(f"\nload average after the speed table {os.getloadavg()[0]:.1f}")
    if "--speed" not in sys.argv:
        strength()
