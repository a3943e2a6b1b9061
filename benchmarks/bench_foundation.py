"""Foundation benchmarks (issue 2): ShapesWorld generation rate, course-model training time and accuracy.

    python benchmarks/bench_foundation.py            # generation + held-out accuracy of the bundled model
    python benchmarks/bench_foundation.py --train    # also retrain from the recipe (about 5 minutes)

Targets: >= 2,000 ShapesWorld images per second; training <= 5 minutes on 2 CPU cores; the bundled
model >= 97% accurate on 2,000 fresh held-out images (a seed that training never used).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from lecturekit import data, models, training
from timing import timed  # benchmarks/timing.py: the one timer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", action="store_true", help="retrain the course model from the recipe")
    args = parser.parse_args()
    rows = []
    data.shapes(256, seed=0)  # warm-up
    n = 5000
    seconds = timed(lambda: data.shapes(n, seed=1), 3)[0]
    rows.append(("ShapesWorld generation (64 px)", f"{n / seconds:,.0f} images/s", ">= 2,000 images/s"))

    test = data.shapes(2000, seed=training.TEST_SEED)
    accuracy = training.evaluate(models.course_model(), test)
    rows.append(("bundled model, held-out accuracy (2,000 images, seed 2)", f"{accuracy:.2%}", ">= 97%"))
    recipe = torch.load(models.WEIGHTS_PATH, weights_only=True)["recipe"]
    rows.append(("bundled model, training time recorded in the checkpoint", f"{recipe['seconds']:.0f} s", "<= 300 s"))
    rows.append(("bundled weights file", f"{models.WEIGHTS_PATH.stat().st_size / 1e6:.2f} MB", "<= 2 MB"))

    if args.train:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "w.pt"
            start = time.perf_counter()
            model, history = training.train_course_model(out=out, progress=False)
            wall = time.perf_counter() - start
            retrained = training.evaluate(model, test)
            same = torch.equal(torch.load(out, weights_only=True)["model"]["classifier.weight"],
                               torch.load(models.WEIGHTS_PATH, weights_only=True)["model"]["classifier.weight"])
        rows.append(("`lecturekit train` wall time (recipe, from scratch)", f"{wall:.0f} s", "<= 300 s"))
        rows.append(("retrained model, held-out accuracy", f"{retrained:.2%}", ">= 97%"))
        rows.append(("retrained weights identical to the bundled ones", str(same), "(same torch build)"))

    width = max(len(r[0]) for r in rows)
    print(f"| {'what':{width}} | measured | target |\n|{'-' * (width + 2)}|---|---|")
    for what, value, target in rows:
        print(f"| {what:{width}} | {value} | {target} |")


if __name__ == "__main__":
    main()
