"""Attribution benchmarks (issue 4): each technique against its physical limit, side by side in one run.

    python benchmarks/bench_attribution.py          # course model + squeezenet1_1 (stand-in weights)

- occlusion vs the time of one forward pass over all occluded copies, precomputed, in batches of the
  same size: target <= 1.2x (making the copies on the fly is the only extra work).
- saliency and Grad-CAM vs one forward plus one backward pass to the input (parameters frozen):
  target <= 1.2x.
- occlusion's peak memory (resident set growth, measured in a fresh process) at P and >= 10P patch
  positions: target bounded (about the same), not growing with P.

Timings alternate the two sides and keep the best of several repeats, so that the noise of a shared
machine hits both alike.
"""
import os
import resource
import subprocess
import sys

import torch

os.environ.setdefault("LECTUREKIT_STANDIN", "1")

from lecturekit import attribution, data, models  # noqa: E402
from timing import side_by_side  # noqa: E402 -- benchmarks/timing.py: the one timer


def occlusion_limit(model, x, target, patch, stride, batch_size):
    """The copies made beforehand (not timed), then only the forward passes (timed)."""
    H, W = x.shape[2:]
    corners = attribution.occlusion_positions((H, W), patch, stride)
    copies = x.repeat_interleave(len(corners), 0).clone()  # (N*P, 3, H, W)
    for i in range(len(x)):
        for p, (y0, x0) in enumerate(corners):
            copies[i * len(corners) + p, :, y0:y0 + patch, x0:x0 + patch] = 0
    target = torch.as_tensor(target).expand(len(x))

    def run():
        with torch.no_grad():
            model(x)
            for start in range(0, len(copies), batch_size):
                model(copies[start:start + batch_size])[:, 0]

    return run, len(corners)


def input_gradient(model, x, target):
    """One forward and one backward pass to the input, parameters frozen: the floor for saliency."""
    flags = [p.requires_grad for p in model.parameters()]
    target = torch.as_tensor(target).expand(len(x))

    def run():
        for p in model.parameters():
            p.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)

    return run


def peak_memory_child(stride: int) -> None:
    """Run in a fresh process: resident-set growth (MB) of one occlusion call after a warm-up."""
    model = models.course_model()
    x = data.shapes(1, seed=0).images
    attribution.occlusion(model, x, 0, patch=8, stride=8, batch_size=64, progress=False)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attribution.occlusion(model, x, 0, patch=8, stride=stride, batch_size=64, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)  # ru_maxrss is in kB on Linux


def peak_memory_naive_child(stride: int) -> None:
    """The counterfactual: all occluded copies made at once (as a one-liner would), then batched."""
    model = models.course_model()
    x = data.shapes(1, seed=0).images
    attribution.occlusion(model, x, 0, patch=8, stride=8, batch_size=64, progress=False)  # same warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run, _ = occlusion_limit(model, x, 0, 8, stride, 64)
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)


def peak_memory(stride: int, mode: str = "--memory") -> float:
    out = subprocess.run([sys.executable, __file__, mode, str(stride)], capture_output=True, text=True,
                         # Large blocks always mmap-ed and returned at free: the RSS then follows the
                         # memory in use, not glibc's heap fragmentation, and the numbers repeat.
                         check=True, env=dict(os.environ, LECTUREKIT_STANDIN="1", MALLOC_MMAP_THRESHOLD_="131072"))
    return float(out.stdout.strip().splitlines()[-1])


def main():
    # Memory first, in fresh child processes started before this process builds any model (a child
    # started after the squeezenet1_1 stand-in was built measured 0 MB for every variant).
    n_small = len(attribution.occlusion_positions((64, 64), 8, 8))
    n_large = len(attribution.occlusion_positions((64, 64), 8, 2))
    small, large = peak_memory(8), peak_memory(2)
    naive_small, naive_large = peak_memory(8, "--naive"), peak_memory(2, "--naive")
    print("| occlusion peak memory (RSS growth after warm-up, fresh process) | positions | lecturekit (MB) "
          "| all copies at once (MB) |\n|---|---|---|---|")
    print(f"| P | {n_small} | {small:.1f} | {naive_small:.1f} |")
    print(f"| {n_large / n_small:.0f}P | {n_large} | {large:.1f} | {naive_large:.1f} |")

    print()
    torch.manual_seed(0)
    rows = []
    course = models.course_model()
    batch = data.shapes(8, seed=0)
    x, y = batch.images, batch.labels

    # occlusion, course model: 8 images, patch 8, stride 4 (225 positions each), batches of 64
    ours = lambda: attribution.occlusion(course, x, y, patch=8, stride=4, batch_size=64, progress=False)  # noqa: E731
    limit, P = occlusion_limit(course, x, y, 8, 4, 64)
    t_ours, t_limit = side_by_side(ours, limit, repeat=3)
    rows.append((f"occlusion, CourseNet, 8 images x {P} positions", t_ours, t_limit, "<= 1.2x"))

    # occlusion in the wild: squeezenet1_1 (stand-in weights, same cost), 1 image 160 px, patch 32 stride 16
    net = models.imagenet_model("squeezenet1_1", standin=True)
    cat = data.sample_image("cat", size=160)
    ours = lambda: attribution.occlusion(net, cat, 281, patch=32, stride=16, batch_size=32, progress=False)  # noqa: E731
    limit, P = occlusion_limit(net, cat, 281, 32, 16, 32)
    t_ours, t_limit = side_by_side(ours, limit, repeat=3)
    rows.append((f"occlusion, squeezenet1_1, 1 image 160 px x {P} positions", t_ours, t_limit, "<= 1.2x"))

    # saliency and Grad-CAM vs forward + backward to the input
    xs = data.shapes(64, seed=1)
    floor = input_gradient(course, xs.images, xs.labels)
    t_sal, t_floor = side_by_side(lambda: attribution.saliency(course, xs.images, xs.labels), floor)
    rows.append(("saliency, CourseNet, 64 images", t_sal, t_floor, "<= 1.2x"))
    t_gc, t_floor = side_by_side(lambda: attribution.grad_cam(course, xs.images, xs.labels, "features.10"), floor)
    rows.append(("Grad-CAM (features.10), CourseNet, 64 images", t_gc, t_floor, "<= 1.2x"))
    cats = data.sample_image("cat", size=224).repeat(4, 1, 1, 1)
    floor = input_gradient(net, cats, 281)
    t_sal, t_floor = side_by_side(lambda: attribution.saliency(net, cats, 281), floor, repeat=3)
    rows.append(("saliency, squeezenet1_1, 4 images 224 px", t_sal, t_floor, "<= 1.2x"))
    t_gc, t_floor = side_by_side(lambda: attribution.grad_cam(net, cats, 281, "features.12"), floor, repeat=3)
    rows.append(("Grad-CAM (features.12), squeezenet1_1, 4 images 224 px", t_gc, t_floor, "<= 1.2x"))

    width = max(len(r[0]) for r in rows)
    print(f"| {'what':{width}} | ours (s) | limit (s) | ratio | target |\n|{'-' * (width + 2)}|---|---|---|---|")
    for what, t, t0, target in rows:
        print(f"| {what:{width}} | {t:.3f} | {t0:.3f} | {t / t0:.2f}x | {target} |")

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        peak_memory_child(int(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--naive":
        peak_memory_naive_child(int(sys.argv[2]))
    else:
        main()
