"""Speed and quality of lecturekit.synthesis (issue 5), printed as tables for benchmarks/RESULTS.md.

Speed (targets): one optimisation step <= 1.2x one forward + backward pass (measured side by side,
interleaved); 200 steps of class visualisation on the course model <= 5 s; DeepDream with three
octaves at 224 px on SqueezeNet <= 60 s.
Quality: p(target) of every course-model class visualisation (>= 0.99), total variation per prior
against no prior (< 1), relative feature error of inversion per layer (< 0.1 at the first layers).

    python benchmarks/bench_synthesis.py [--quick]
"""
import os
import statistics
import sys

os.environ.setdefault("LECTUREKIT_STANDIN", "1")  # never download at run time; set "auto" to use cached ImageNet weights

import torch  # noqa: E402

import lecturekit as lk  # noqa: E402
from timing import print_table, median_seconds  # noqa: E402 -- benchmarks/timing.py: the one timer
from lecturekit import synthesis as S  # noqa: E402

QUICK = "--quick" in sys.argv


def fwd_bwd(model, x, c=0, repeats=1):
    """Forward and backward passes to the input, parameters frozen once (the reference cost)."""
    with lk.hooks.preserved(model):
        x = x.detach().requires_grad_(True)
        for _ in range(repeats):
            x.grad = None
            model(x)[:, c].sum().backward()


def speed():
    rows = []
    course = lk.models.course_model()
    x = torch.rand(1, 3, 64, 64)
    steps = 50
    fwd_bwd(course, x)
    S.class_visualization(course, 0, steps=5, progress=False)  # warm-up
    base, ours, priors = [], [], []
    for _ in range(3 if QUICK else 5):  # interleaved, so that the load of the machine hits both alike
        base.append(median_seconds(lambda: fwd_bwd(course, x, repeats=steps), 1) / steps)
        ours.append(median_seconds(lambda: S.class_visualization(course, 0, steps=steps, progress=False), 1) / steps)
        priors.append(median_seconds(lambda: S.class_visualization(course, 0, steps=steps, l2_weight=1e-3, jitter=2, blur_every=4,
                                                          progress=False), 1) / steps)
    b, o, p = statistics.median(base), statistics.median(ours), statistics.median(priors)
    rows.append(("course model: one step / (fwd + bwd), no prior", f"{o * 1e3:.2f} / {b * 1e3:.2f} ms", f"{o / b:.2f}x", "<= 1.2x"))
    rows.append(("course model: one step / (fwd + bwd), l2+jitter+blur", f"{p * 1e3:.2f} / {b * 1e3:.2f} ms", f"{p / b:.2f}x", "<= 1.2x"))
    t200 = median_seconds(lambda: S.class_visualization(course, 0, steps=200, progress=False), 1 if QUICK else 3)
    rows.append(("course model: 200 steps of class visualisation", "", f"{t200:.2f} s", "<= 5 s"))
    t200b = median_seconds(lambda: S.class_visualization(course, list(range(8)), steps=200, progress=False), 1)
    rows.append(("course model: 200 steps, all 8 classes in one batch", "", f"{t200b:.2f} s", "(info)"))

    squeeze = lk.models.imagenet_model("squeezenet1_1")
    photo = lk.data.sample_image("cat", size=224)
    fwd_bwd(squeeze, photo)
    base = median_seconds(lambda: fwd_bwd(squeeze, photo, repeats=5), 3) / 5
    step = median_seconds(lambda: S.class_visualization(squeeze, 130, steps=5, size=224, progress=False), 3) / 5
    rows.append(("SqueezeNet 224 px: one step / (fwd + bwd)", f"{step * 1e3:.0f} / {base * 1e3:.0f} ms", f"{step / base:.2f}x", "<= 1.2x"))
    tdream = median_seconds(lambda: S.deep_dream(squeeze, photo, "features.7", steps=10, octaves=3, progress=False), 1)
    rows.append(("SqueezeNet: DeepDream 3 octaves x 10 steps, 224 px, features.7", "", f"{tdream:.1f} s", "<= 60 s"))
    tdream12 = median_seconds(lambda: S.deep_dream(squeeze, photo, "features.12", steps=10, octaves=3, progress=False), 1)
    rows.append(("SqueezeNet: DeepDream 3 octaves x 10 steps, 224 px, features.12", "", f"{tdream12:.1f} s", "<= 60 s"))
    print(f"\nweights: SqueezeNet {'stand-in' if squeeze.standin else 'ImageNet'}; threads {torch.get_num_threads()}")
    print_table(rows, widths=(62, 22, 8))


def quality():
    course = lk.models.course_model()
    classes = lk.models.class_names(course)
    targets = list(range(len(classes)))
    print("\nclass visualisation, course model, 200 steps: p(target)")
    for label, kw in [("S_c, l2_weight=1e-3, jitter=1", dict(objective=None, target=targets, l2_weight=1e-3, jitter=1)),
                      ("log p_c, jitter=1, blur", dict(objective=S.class_logprob(targets), jitter=1, blur_every=4,
                                                      blur_sigma=0.5))]:
        x = S.class_visualization(course, steps=200, lr=0.02, progress=False, **kw)
        with torch.no_grad():
            p = course(x).softmax(1).diagonal()
        print(f"  {label:<26} min {p.min():.4f}  " + " ".join(f"{c}={v:.3f}" for c, v in zip(classes, p.tolist())))

    print("\ntotal variation per prior (star and heart, 100 steps), ratio to no prior")
    shown = [classes.index("star"), classes.index("heart")]
    priors = {"no prior": {}, "L2 3e-3": dict(l2_weight=3e-3), "jitter 3": dict(jitter=3),
              "blur every 2, sigma 0.8": dict(blur_every=2, blur_sigma=0.8), "clip norm 30%": dict(clip_value=30),
              "clip contribution 30%": dict(clip_contribution=30)}
    tv = {}
    for name, kw in priors.items():
        x = S.class_visualization(course, shown, steps=100, lr=0.02, progress=False, **kw)
        tv[name] = S.total_variation(x, reduction="none")
        with torch.no_grad():
            p = course(x).softmax(1)[[0, 1], shown]
        print(f"  {name:<26} TV/pixel {(tv[name] / 4096).tolist()}  ratio {(tv[name] / tv['no prior']).mean():.3f}"
              f"  p {p.tolist()}")

    print("\nfeature inversion, course model, 300 steps, tv_weight 0.01")
    x0 = lk.data.shapes(4, seed=21).images
    for layer in ["features.0", "features.1", "features.2", "features.4", "features.5", "features.7", "features.10"]:
        r = S.invert(course, x0, layer, steps=100 if QUICK else 300, tv_weight=0.01, progress=False)
        rms = (r.image - x0).pow(2).mean((1, 2, 3)).sqrt()
        print(f"  {layer:<12} relative feature error max {r.feature_error.max():.4f} mean {r.feature_error.mean():.4f}"
              f"   pixel RMS {rms.mean():.4f}")


if __name__ == "__main__":
    speed()
    if "--speed" not in sys.argv:
        quality()
