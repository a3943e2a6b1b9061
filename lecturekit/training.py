"""Training CourseNet on ShapesWorld, and the lecture's hyperparameter recipe as small functions.

The recipe (CS231n lecture "Training Neural Networks II", slides "Choosing Hyperparameters"):
1. check the initial loss (about log C for C classes, weight decay off);
2. overfit a small sample (about 100% training accuracy on a few minibatches);
3. find a learning rate that makes the loss drop within about 100 iterations;
4. a coarse random search, log-uniform learning rate and weight decay, short runs
   (random rather than grid search: Bergstra and Bengio 2012);
5. refine and train longer; 6. read the loss and accuracy curves.

Training data is drawn fresh for every step from ShapesWorld (an endless stream of new images), so
the model cannot memorise its training set; validation images come from seeds training never uses.

Notebook: 00_course_model
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .hooks import preserved, progress_bar
from .models import CourseNet, WEIGHTS_PATH, fuse_batchnorm

__all__ = ["History", "trainable_model", "train", "evaluate", "initial_loss", "overfit_small_sample", "lr_sweep",
           "random_search", "train_course_model", "TRAIN_SEED_OFFSET", "VALIDATION_SEED", "TEST_SEED",
           "RECIPE"]

# Seeds: training batch k of a run with seed s uses data seed TRAIN_SEED_OFFSET + s * 1_000_000 + k.
# Validation and test sets use seeds below that range, so training never sees them.
TRAIN_SEED_OFFSET = 10_000_000
VALIDATION_SEED = 1
TEST_SEED = 2

# The recipe that made the bundled weights (lecturekit train, notebook 00's refined run): SGD with
# Nesterov momentum and a one-cycle learning rate, on CourseNet with BatchNorm, folded afterwards.
RECIPE = dict(steps=700, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0)
# The dataset bias of the biased model (notebook 04): circles on snow 99% of the time, others 1%.
BIAS = 0.99


def trainable_model(seed: int = 0, pooling: str = "avg") -> CourseNet:
    """CourseNet with BatchNorm after every convolution, seeded: the network we train.

    After training, ``lecturekit.models.fuse_batchnorm`` folds it into the plain CourseNet.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CourseNet(batchnorm=True, pooling=pooling)


@dataclass
class History:
    """What a training run measured: per-step loss and training accuracy, periodic validation accuracy."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (a single step's loss is too noisy to compare runs)."""
        tail = max(1, len(self.loss) // 10)
        return float(np.mean(self.loss[-tail:]))


def _train_batch(seed: int, step: int, batch_size: int, sample: data.ShapesBatch | None,
                 bias: float | None = None):
    if sample is not None:  # a fixed sample: cycle through it
        n = len(sample)
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
        return sample.images[idx], sample.labels[idx]
    train_seed = TRAIN_SEED_OFFSET + seed * 1_000_000 + step
    b = data.shapes(batch_size, seed=train_seed) if bias is None else data.biased_shapes(batch_size, train_seed, bias)
    return b.images, b.labels


@torch.no_grad()
def evaluate(model: nn.Module, batch: data.ShapesBatch, batch_size: int = 500) -> float:
    """Accuracy of ``model`` on a ShapesBatch, in eval mode (the mode is restored afterwards)."""
    correct = 0
    with preserved(model, freeze=False):  # eval mode inside, the caller's mode restored after
        for start in range(0, len(batch), batch_size):
            logits = model(batch.images[start:start + batch_size])
            correct += (logits.argmax(1) == batch.labels[start:start + batch_size]).sum().item()
    return correct / len(batch)


@torch.no_grad()
def initial_loss(model: nn.Module, batch: data.ShapesBatch) -> float:
    """Cross-entropy of the untrained model: should be close to log(C) (step 1 of the recipe)."""
    with preserved(model, freeze=False):
        return F.cross_entropy(model(batch.images), batch.labels).item()


def train(model: nn.Module, steps: int, lr: float, weight_decay: float = 0.0, batch_size: int = 128,
          seed: int = 0, sample: data.ShapesBatch | None = None, val: data.ShapesBatch | None = None,
          val_every: int = 100, schedule: str = "constant", optimizer: str = "sgd",
          adversarial_eps: float = 0.0, progress: bool = True, bias: float | None = None) -> History:
    """Train ``model`` for ``steps`` minibatches and return its :class:`History`.

    ``optimizer``: ``"sgd"`` (Nesterov momentum 0.9, what the recipe uses) or ``"adamw"``.

    ``sample``: train on this fixed ShapesBatch (to overfit it, step 2 of the recipe); otherwise every
    step draws a fresh batch. ``schedule``: ``"constant"`` (what the recipe's search uses) or
    ``"onecycle"`` (warm-up then cosine decay, for the final run). ``val``: measured every ``val_every``
    steps and at the end. The training stops early if the loss becomes NaN.

    ``adversarial_eps`` > 0: fast adversarial training (Wong, Rice and Kolter 2020, "Fast is better
    than free"): each batch is replaced by FGSM examples from a random start in the L-infinity ball of
    radius eps (pixel units), step 1.25 eps; eps ramps up linearly over the first 30% of the steps
    (as in Gowal et al. 2018's schedules) so the network first learns the task. Notebook: 16_robust_models
    """
    steps = data.check_positive_int(steps, "steps")
    if not 0 <= adversarial_eps <= 1:
        raise ValueError(f"expected adversarial_eps in [0, 1] (pixel units, e.g. 8/255), got {adversarial_eps}")
    if not lr > 0:
        raise ValueError(f"expected a positive learning rate, got lr={lr}")
    # Dropout (and any other random layer) draws from the global generator: seed it inside fork_rng,
    # so that the run is reproducible and the caller's random state is left as found.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(model, steps, lr, weight_decay, batch_size, seed, sample, val, val_every, schedule,
                      optimizer, progress, adversarial_eps, bias)


def _train(model, steps, lr, weight_decay, batch_size, seed, sample, val, val_every, schedule, optimizer,
           progress, adversarial_eps, bias=None) -> History:
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adamw'")
    sched = None
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    elif schedule != "constant":
        raise ValueError(f"unknown schedule {schedule!r}; expected 'constant' or 'onecycle'")
    history = History()
    start = time.perf_counter()
    # channels_last: oneDNN's CPU convolutions run about 30% faster on this layout (measured on
    # 2 cores, benchmarks/RESULTS.md). Only the memory layout changes, not a single value.
    model.to(memory_format=torch.channels_last)
    model.train()
    for step in progress_bar(range(steps), progress, desc="train"):
        images, labels = _train_batch(seed, step, batch_size, sample, bias)
        if adversarial_eps:
            eps = adversarial_eps * min(1.0, (step + 1) / (0.3 * steps))
            images = _fgsm_random_start(model, images, labels, eps, gen=torch.Generator().manual_seed(seed * 100_003 + step))
        logits = model(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        history.step.append(step)
        history.loss.append(loss.item())
        history.train_acc.append((logits.argmax(1) == labels).float().mean().item())
        if not math.isfinite(history.loss[-1]):
            break
        if val is not None and ((step + 1) % val_every == 0 or step == steps - 1):
            history.val_step.append(step)
            history.val_acc.append(evaluate(model, val))
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


def _fgsm_random_start(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       gen: torch.Generator) -> torch.Tensor:
    """FGSM from a random start (Wong et al. 2020): delta ~ U(-eps, eps), one signed step of 1.25 eps, projected.

    In the model's current (training) mode, as in the paper; only the input's gradient is computed.
    """
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps  # (N, 3, H, W) uniform in the ball
    x_start = (x + delta).clamp(0, 1).requires_grad_(True)
    loss = F.cross_entropy(model(x_start.contiguous(memory_format=torch.channels_last)), y)
    (grad,) = torch.autograd.grad(loss, x_start)  # no parameter gradients
    delta = (x_start.detach() + 1.25 * eps * grad.sign() - x).clamp(-eps, eps)  # step, then project
    return (x + delta).clamp(0, 1).detach()


def overfit_small_sample(model: nn.Module, n: int = 64, steps: int = 150, lr: float = 0.05,
                         seed: int = 0, progress: bool = True, size: int = 64) -> History:
    """Step 2 of the recipe: train on ``n`` fixed ``size`` x ``size`` images, no weight decay, until it
    memorises them."""
    sample = data.shapes(n, seed=seed + 1000, size=size)
    return train(model, steps, lr, weight_decay=0.0, batch_size=min(n, 64), sample=sample,
                 seed=seed, progress=progress)


def lr_sweep(make_model, lrs, steps: int = 100, weight_decay: float = 1e-4, batch_size: int = 64,
             seed: int = 0, progress: bool = True, sample: data.ShapesBatch | None = None) -> dict[float, History]:
    """Step 3: a short run for each learning rate from the same initial weights; lr -> History.
    ``sample``: minibatches cycle through these images (as in :func:`train`) instead of fresh ones."""
    return {lr: train(make_model(), steps, lr, weight_decay, batch_size, seed=seed, sample=sample,
                      progress=progress) for lr in lrs}


def random_search(make_model, trials: int, steps: int, lr_range=(1e-3, 1.0), wd_range=(1e-6, 1e-2),
                  val: data.ShapesBatch | None = None, batch_size: int = 64, seed: int = 0,
                  progress: bool = True, sample: data.ShapesBatch | None = None) -> list[dict]:
    """Step 4: ``trials`` short runs with learning rate and weight decay drawn log-uniformly.

    Coarse to fine: call it again with narrower ranges around the best trial. ``sample``: minibatches
    cycle through these images (as in :func:`train`) instead of fresh ones.

    Returns one dict per trial: lr, weight_decay, final_loss, val_acc (if ``val``), history.
    """
    rng = np.random.default_rng(seed)
    results = []
    for trial in range(trials):
        lr = float(10 ** rng.uniform(*np.log10(lr_range)))
        wd = float(10 ** rng.uniform(*np.log10(wd_range)))
        h = train(make_model(), steps, lr, wd, batch_size, seed=seed, sample=sample, val=val, val_every=steps,
                  progress=progress)
        results.append(dict(lr=lr, weight_decay=wd, final_loss=h.final_loss,
                            val_acc=h.val_acc[-1] if h.val_acc else float("nan"), history=h))
    return results


def train_course_model(steps: int = RECIPE["steps"], lr: float = RECIPE["lr"],
                       weight_decay: float = RECIPE["weight_decay"], batch_size: int = RECIPE["batch_size"],
                       seed: int = RECIPE["seed"], out=WEIGHTS_PATH, val_size: int = 1000,
                       adversarial_eps: float = 0.0, progress: bool = True, pooling: str = "avg",
                       bias: float | None = None) -> tuple[CourseNet, History]:
    """Reproduce a bundled course model: the RECIPE's one-cycle run from seed ``seed``.

    ``pooling="max"`` trains the GMP variant (``course_model(weights="gmp")``); ``bias`` trains on
    ``data.biased_shapes(..., bias)`` and validates on the same biased distribution
    (``course_model(weights="biased")``).

    Trains :func:`trainable_model` (with BatchNorm), folds it into the plain CourseNet and saves
    ``{"model": state_dict, "recipe": ...}`` to ``out`` (None: do not save). Returns the plain model.
    ``seed=1`` makes the second model of the transfer experiments (``course_model(weights="seed1")``);
    ``adversarial_eps=8/255`` the robust model (``weights="robust"``, fast adversarial training).
    """
    model = trainable_model(seed, pooling)
    val = (data.shapes(val_size, seed=VALIDATION_SEED) if bias is None
           else data.biased_shapes(val_size, seed=VALIDATION_SEED, bias=bias))
    # Validated once, at the end: the bundled file records the final accuracy, and every 100 steps
    # cost about 6 s of a 5-minute run without changing the weights.
    history = train(model, steps, lr, weight_decay, batch_size, seed=seed, val=val, val_every=steps,
                    schedule="onecycle", adversarial_eps=adversarial_eps, progress=progress, bias=bias)
    model = fuse_batchnorm(model)
    if out is not None:
        recipe = dict(steps=steps, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      adversarial_eps=adversarial_eps, pooling=pooling, bias=bias,
                      val_acc=history.val_acc[-1], seconds=round(history.seconds, 1),
                      torch=str(torch.__version__))
        torch.save({"model": model.state_dict(), "recipe": recipe}, out)
    return model, history
