"""Adversarial examples: fooling images, FGSM, PGD, DeepFool, universal perturbations, patches, evolution.

Every attack works in pixel space (DESIGN.md, contract 1): images ``x`` (N, 3, H, W) in [0, 1], the
model normalises inside, and a budget ``eps`` is in pixel units (8/255 is eight grey levels). Results
are detached images in [0, 1] on the input's device; the model is left as found (``hooks.preserved``),
also when a call raises. ``target`` is the true class for an untargeted attack (whose loss rises) and
the class to reach for a targeted one (``targeted=True``, whose loss falls).

Papers:
- Szegedy et al. 2014, "Intriguing properties of neural networks" (fooling images)
- Goodfellow, Shlens and Szegedy 2015, "Explaining and Harnessing Adversarial Examples" (FGSM)
- Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks" (PGD)
- Moosavi-Dezfooli, Fawzi and Frossard 2016, "DeepFool" (the minimal step to the nearest boundary)
- Moosavi-Dezfooli et al. 2017, "Universal adversarial perturbations"
- Shafahi et al. 2020, "Universal Adversarial Training" (the batched signed-gradient universal perturbation)
- Brown et al. 2017, "Adversarial Patch"
- Nguyen, Yosinski and Clune 2015, "Deep Neural Networks are Easily Fooled" (evolved fooling images)
- Wong, Rice and Kolter 2020, "Fast is better than free" (fast adversarial training, lecturekit.training)

Notebooks: 14_adversarial_examples, 15_universal_patch_evolved, 16_robust_models
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Target, check_images, check_targets
from .hooks import iterate_batches, model_device, preserved, progress_bar

__all__ = ["fgsm", "pgd", "pgd_step", "project", "fooling_image", "FoolingResult", "deepfool_step", "deepfool",
           "universal_perturbation", "UniversalResult", "fooling_rate", "paste_patch", "random_positions",
           "adversarial_patch", "PatchResult", "patch_success_rate", "evolve_fooling_images", "EvolvedResult",
           "cppn_render", "accuracy", "accuracy_under_attack", "transfer_matrix", "NORMS"]

NORMS = ("linf", "l2")


# ---- input checks and shared mechanics -------------------------------------------------------------

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module as model, got {type(model).__name__}")


def _check_eps(eps, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or math.isnan(eps) or eps < 0 or math.isinf(eps):
        raise ValueError(f"expected {name} to be a finite number >= 0 in pixel units (8/255 = 8 grey levels), "
                         f"got {eps!r}")
    return float(eps)


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"expected {name} to be a positive integer, got {value!r}")
    return int(value)


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return norm


def _targets(model, x: torch.Tensor, target, targeted: bool, labels, device) -> torch.Tensor:
    """target -> LongTensor (N,) on ``device``, checked against the class count and the true labels."""
    with torch.no_grad():
        n_classes = model(x[:1].to(device)).shape[1]
    target = check_targets(target, len(x), n_classes)
    if targeted and labels is not None:
        labels = check_targets(labels, len(x), n_classes)
        same = (target == labels).nonzero().flatten()
        if len(same):
            raise ValueError(f"a targeted attack needs a target other than the true class; images "
                             f"{same.tolist()[:8]} have target == label (use targeted=False to push away "
                             "from the true class)")
    return target.to(device)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to scale images one by one."""
    return v.view(-1, *([1] * 3))


def _l2(v: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each image of v (N, 3, H, W) -> (N,)."""
    return v.flatten(1).norm(dim=1)


def _loss_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x of J = sum_i CE(f(x_i), target_i), (N, 3, H, W), and the logits (N, K), one forward/backward."""
    x = x.detach().requires_grad_(True)
    logits = model(x)  # (N, K)
    loss = F.cross_entropy(logits, target, reduction="sum")  # a sum: each image's gradient is its own
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def _normalised_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_image(_l2(grad).clamp_min(1e-12))


def project(delta: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Project perturbations delta (N, 3, H, W) onto the ball ||delta|| <= eps of ``norm``.

    L-inf: clip each pixel to [-eps, eps]. L2: delta * min(1, eps / ||delta||_2), per image.
    Notebook: 14_adversarial_examples
    """
    eps, norm = _check_eps(eps), _check_norm(norm)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * _per_image((eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0))


# ---- FGSM and PGD (Goodfellow et al. 2015, Madry et al. 2018) -------------------------------------------

def fgsm(model: nn.Module, x: torch.Tensor, target: Target, eps: float, targeted: bool = False,
         labels=None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): x' = clamp(x + eps * sign(grad_x J(x, y)), 0, 1).

    J is the cross-entropy of the raw scores. Untargeted (default): ``target`` is the true class y and
    the step ascends its loss. ``targeted=True``: ``target`` is the class to reach and the step
    *descends* its loss, x' = clamp(x - eps * sign(grad_x J(x, t)), 0, 1); pass the true ``labels`` to
    have a target equal to the true class rejected. x: (N, 3, H, W) in [0, 1]; returns (N, 3, H, W).
    Notebook: 14_adversarial_examples
    """
    _check_model(model)
    x, eps = check_images(x), _check_eps(eps)
    device = model_device(model, x.device)
    with preserved(model):
        target = _targets(model, x, target, targeted, labels, device)
        x0 = x.detach().to(device)
        grad, _ = _loss_grad(model, x0, target)  # (N, 3, H, W)
        direction = -1.0 if targeted else 1.0  # targeted: down the target's loss
        x_adv = (x0 + direction * eps * grad.sign()).clamp(0, 1)
    return x_adv.detach().to(x.device)


def pgd_step(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, target: Target, eps: float, step_size: float,
             norm: str = "linf", targeted: bool = False) -> torch.Tensor:
    """One step of projected gradient descent (Madry et al. 2018) from the current ``x_adv``:

        x_adv <- clamp(x + P_eps(x_adv + step_size * d - x), 0, 1)

    with d = sign(g) (L-inf) or g / ||g||_2 (L2), g = +-grad J(x_adv, target) (minus when targeted), and
    P_eps the projection onto the eps-ball around the clean images ``x`` (:func:`project`).
    x_adv, x: (N, 3, H, W) in [0, 1]; target: LongTensor (N,). Returns the new x_adv, detached.
    Notebook: 14_adversarial_examples
    """
    norm = _check_norm(norm)
    target = check_targets(target, len(x))
    with preserved(model):
        grad, _ = _loss_grad(model, x_adv, target.to(x_adv.device))
    step = _normalised_step(-grad if targeted else grad, norm)  # (N, 3, H, W)
    delta = project(x_adv.detach() + step_size * step - x, eps, norm)
    return (x + delta).clamp(0, 1).detach()


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A point drawn uniformly in the eps-ball around x (L-inf: per pixel; L2: direction and radius)."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    else:
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=gen)
        radius = eps * torch.rand(len(x), generator=gen) ** (1.0 / d)  # uniform in the ball's volume
        delta = direction / _per_image(_l2(direction)) * _per_image(radius)
    return (x + delta.to(x.device)).clamp(0, 1)


def pgd(model: nn.Module, x: torch.Tensor, target: Target, eps: float, step_size: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, seed: int = 0, targeted: bool = False,
        labels=None, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018): ``steps`` of :func:`pgd_step` in the eps-ball.

    ``norm``: ``"linf"`` or ``"l2"`` ball of radius ``eps`` (pixel units) around x. ``step_size``
    default 2.5 eps / steps (Madry et al.). ``random_start``: start from a point drawn uniformly in the
    ball (seeded by ``seed``), else from x. Untargeted: ``target`` is the true class; ``targeted=True``:
    the class to reach (``labels``, when given, must differ from it). Images are processed in batches
    of ``batch_size``. x: (N, 3, H, W) in [0, 1]; returns (N, 3, H, W) with ||x' - x|| <= eps.
    Notebook: 14_adversarial_examples
    """
    _check_model(model)
    x, eps, norm = check_images(x), _check_eps(eps), _check_norm(norm)
    steps = _check_count(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else _check_eps(step_size, "step_size")
    device = model_device(model, x.device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with preserved(model):
        target = _targets(model, x, target, targeted, labels, device)
        for part in progress_bar(list(iterate_batches(len(x), batch_size)), progress, desc="pgd"):
            x0 = x[part].detach().to(device)
            x_adv = _random_start(x0, eps, norm, gen) if random_start and eps > 0 else x0.clone()
            for _ in range(steps):
                x_adv = pgd_step(model, x_adv, x0, target[part], eps, step_size, norm, targeted)
            out.append(x_adv)
    return torch.cat(out).to(x.device)


# ---- fooling images: ascend another class's score until the network agrees (Szegedy et al. 2014) ------

@dataclass
class FoolingResult:
    """What :func:`fooling_image` found: images (N, 3, H, W), p_target (N,), steps (N,) taken until p_target
    reached the threshold (or the budget), fooled (N,) bool, and the size of the change: linf (N,), l2 (N,)."""

    images: torch.Tensor
    p_target: torch.Tensor
    steps: torch.Tensor
    fooled: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor


def fooling_image(model: nn.Module, x: torch.Tensor, target: Target, threshold: float = 0.99, lr: float = 0.5 / 255,
                  steps: int = 200) -> FoolingResult:
    """The lecture's recipe: start from a real image, pick another class, ascend that class until the
    network is fooled, and report how small the change is.

        repeat:  stop (per image) as soon as p_target(x) >= threshold, or after ``steps`` steps;
                 x <- clamp(x + lr * sign(g), 0, 1),   g = grad_x log p_target(x)

    The class is ascended as its log-probability log p_t = S_t - log sum_j exp S_j: ascending the raw
    score S_t alone can raise another class's score faster (a ring's score lifts the circle's; see
    notebook 08), so that p_t never reaches the threshold.

    Images that are done are no longer changed. ``lr`` is the change of each pixel per step in pixel
    units (0.5/255: half a grey level), so after t steps no pixel moved more than t * lr.
    x: (N, 3, H, W) in [0, 1]; target: class index or LongTensor (N,). Returns a :class:`FoolingResult`
    with L-inf and L2 norms of x' - x. Notebook: 14_adversarial_examples
    """
    _check_model(model)
    x = check_images(x)
    steps = _check_count(steps, "steps")
    if not 0 < threshold < 1:
        raise ValueError(f"expected a probability threshold in (0, 1), got {threshold!r}")
    lr = _check_eps(lr, "lr")
    device = model_device(model, x.device)
    with preserved(model):
        target = _targets(model, x, target, False, None, device)
        x0 = x.detach().to(device)
        x_adv = x0.clone()
        taken = torch.zeros(len(x), dtype=torch.long, device=device)
        rows = torch.arange(len(x), device=device)
        for step in range(steps + 1):
            x_adv.requires_grad_(True)
            scores = model(x_adv)  # (N, K)
            p = scores.detach().softmax(1)[rows, target]  # (N,)
            active = p < threshold  # the stopping rule, checked before every step
            if not active.any() or step == steps:
                break
            log_p = scores.log_softmax(1)[rows, target]  # (N,) log p_target = S_t - logsumexp(S)
            (g,) = torch.autograd.grad(log_p.sum(), x_adv)  # (N, 3, H, W)
            step = lr * g.sign()  # (N, 3, H, W): a signed step, like FGSM's, on the target's score
            with torch.no_grad():
                x_adv = torch.where(_per_image(active), (x_adv + step).clamp(0, 1), x_adv)
            taken += active.long()
        x_adv = x_adv.detach()
        delta = x_adv - x0
    return FoolingResult(x_adv.to(x.device), p.to(x.device), taken.to(x.device), (p >= threshold).to(x.device),
                         delta.flatten(1).abs().amax(1).to(x.device), _l2(delta).to(x.device))


# ---- DeepFool and universal perturbations (Moosavi-Dezfooli et al. 2016, 2017) ------------------------

def _class_gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores f (K,) of one image x (1, 3, H, W) and their gradients (K, 3, H, W), in one forward/backward:
    the image is repeated K times and copy k backpropagates score k (cheaper than K backward passes)."""
    with torch.no_grad():
        K = model(x).shape[1]
    xs = x.detach().expand(K, *x.shape[1:]).clone().requires_grad_(True)  # (K, 3, H, W)
    scores = model(xs)  # (K, K), all rows equal
    (grads,) = torch.autograd.grad(scores.diagonal().sum(), xs)  # row k: d f_k / dx
    return scores[0].detach(), grads


def deepfool_step(model: nn.Module, x: torch.Tensor, target: Target, norm: str = "l2") -> torch.Tensor:
    """One DeepFool step (Moosavi-Dezfooli et al. 2016, Alg. 2): the smallest change r that reaches the
    nearest class boundary of the model linearised at x.

        w_k = grad f_k - grad f_target,  f'_k = f_k - f_target,  l = argmin_{k != target} |f'_k| / ||w_k||_q
        r = |f'_l| / ||w_l||_2^2 * w_l          (L2, q = 2)
        r = |f'_l| / ||w_l||_1 * sign(w_l)       (L-inf, q = 1)

    x: one image (1, 3, H, W) (not clamped: r may leave [0, 1]); returns r (1, 3, H, W), detached. For a
    linear model, x + r lies exactly on the boundary between ``target`` (the class x is in, the one to leave) and the nearest class.
    Notebook: 15_universal_patch_evolved
    """
    norm = _check_norm(norm)
    target = int(target)
    with preserved(model):
        f, grads = _class_gradients(model, x)  # (K,), (K, 3, H, W)
    w = grads - grads[target]  # (K, 3, H, W)
    f_diff = (f - f[target]).abs()  # (K,)
    q_norm = w.flatten(1).abs().sum(1) if norm == "linf" else w.flatten(1).norm(dim=1)  # dual norm, (K,)
    distance = f_diff / q_norm.clamp_min(1e-12)
    distance[target] = float("inf")
    l = int(distance.argmin())
    if norm == "linf":
        r = f_diff[l] / q_norm[l].clamp_min(1e-12) * w[l].sign()
    else:
        r = f_diff[l] / q_norm[l].clamp_min(1e-12) ** 2 * w[l]
    return r.unsqueeze(0).detach()


def deepfool(model: nn.Module, x: torch.Tensor, norm: str = "l2", overshoot: float = 0.02,
             steps: int = 50) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016) on one image x (1, 3, H, W): repeat :func:`deepfool_step`
    until the predicted class changes; returns the total perturbation (1 + overshoot) * sum r_i (1, 3, H, W).
    The image x + r is not clamped. Notebook: 15_universal_patch_evolved
    """
    with preserved(model), torch.no_grad():
        label = int(model(x).argmax(1))
    r_total = torch.zeros_like(x)
    for _ in range(_check_count(steps, "steps")):
        with preserved(model), torch.no_grad():
            if int(model(x + (1 + overshoot) * r_total).argmax(1)) != label:
                break
        r_total = r_total + deepfool_step(model, x + (1 + overshoot) * r_total, label, norm)
    return ((1 + overshoot) * r_total).detach()


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model(x[part]).argmax(1) for part in iterate_batches(len(x), batch_size)])


def fooling_rate(model: nn.Module, x: torch.Tensor, v: torch.Tensor, batch_size: int = 512,
                 clean: torch.Tensor | None = None) -> float:
    """The fraction of images whose predicted class changes when v is added: k(clamp(x + v)) != k(x)
    (Moosavi-Dezfooli et al. 2017). x: (N, 3, H, W) in [0, 1]; v: (1, 3, H, W); ``clean``: k(x) (N,)
    when the caller has it already (one forward pass fewer). Notebook: 15_universal_patch_evolved
    """
    x = check_images(x)
    device = model_device(model, x.device)
    with preserved(model):
        x = x.to(device)
        clean = _predict(model, x, batch_size) if clean is None else clean.to(device)
        fooled = _predict(model, (x + v.to(device)).clamp(0, 1), batch_size)
    return (clean != fooled).float().mean().item()


@dataclass
class UniversalResult:
    """A universal perturbation v (1, 3, H, W) with ||v|| <= eps, and the fooling rate on the images it was
    built from after each pass over them (``rates``)."""

    v: torch.Tensor
    rates: list = field(default_factory=list)
    eps: float = 0.0
    norm: str = "linf"


def universal_perturbation(model: nn.Module, x: torch.Tensor, eps: float, norm: str = "linf",
                           delta: float = 0.2, epochs: int = 5, overshoot: float = 0.02, deepfool_steps: int = 10,
                           seed: int = 0, progress: bool = True, method: str = "deepfool",
                           batch_size: int = 128) -> UniversalResult:
    """Universal adversarial perturbation: one v for all images, ||v|| <= eps.

    ``method="deepfool"`` (Moosavi-Dezfooli et al. 2017, Algorithm 1, one image at a time):

        v = 0;  while fooling rate on X < 1 - delta and passes < epochs:
            for x_i in X (in a seeded random order):
                if k(x_i + v) == k(x_i):
                    dv = DeepFool(x_i + v)            # the smallest change that flips x_i + v
                    v  = P_{norm, eps}(v + dv)         # back onto the eps-ball

    ``method="sgd"`` (Shafahi et al. 2020, "Universal Adversarial Training", Alg. 1, batched): each pass
    takes batches B of ``batch_size`` images (seeded order) and one projected signed-gradient step

        v <- P_{norm, eps}(v + a * d),  d = sign(g) (L-inf) or g / ||g||_2 (L2),
        g = grad_v mean_{i in B} min(CE(f(clamp(x_i + v)), k(x_i)), 10)

    with a = eps / 4 in the first half of the passes and eps / 10 after; the clipped loss keeps images
    that v already fools from dominating g. One forward and backward pass per batch serves every image
    of it, where DeepFool spends several per image: on the course model, ``sgd`` fools far more images
    at the same eps (benchmarks/RESULTS.md).

    x: the images to build v from (N, 3, H, W) in [0, 1]; measure it on images it never saw with
    :func:`fooling_rate`. ``epochs``: passes over x; each stops early once the fooling rate on x reaches
    1 - ``delta``. Returns a :class:`UniversalResult`. Notebook: 15_universal_patch_evolved
    """
    _check_model(model)
    x, eps, norm = check_images(x), _check_eps(eps), _check_norm(norm)
    epochs, deepfool_steps = _check_count(epochs, "epochs"), _check_count(deepfool_steps, "deepfool_steps")
    batch_size = _check_count(batch_size, "batch_size")
    if method not in ("deepfool", "sgd"):
        raise ValueError(f"expected method 'deepfool' or 'sgd', got {method!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"expected delta (1 - the fooling rate to reach) in [0, 1), got {delta!r}")
    device = model_device(model, x.device)
    gen = torch.Generator().manual_seed(seed)

    with preserved(model):
        X = x.detach().to(device)
        labels = _predict(model, X)  # k(x_i), (N,)
        v = torch.zeros_like(X[:1])  # (1, 3, H, W)
        rates = []
        for epoch in range(epochs):
            order = torch.randperm(len(X), generator=gen).to(device)
            if method == "sgd":
                step_size = eps / 4 if epoch < max(1, epochs // 2) else eps / 10
                for part in progress_bar(list(iterate_batches(len(X), batch_size)), progress,
                                         desc="universal perturbation"):
                    idx = order[part]
                    v = v.detach().requires_grad_(True)
                    logits = model((X[idx] + v).clamp(0, 1))  # (B, K)
                    loss = F.cross_entropy(logits, labels[idx], reduction="none").clamp(max=10.0).mean()
                    (g,) = torch.autograd.grad(loss, v)  # (1, 3, H, W)
                    v = project(v.detach() + step_size * _normalised_step(g, norm), eps, norm)
            else:
                for i in progress_bar(order.tolist(), progress, desc="universal perturbation"):
                    xi = (X[i:i + 1] + v).clamp(0, 1)
                    with torch.no_grad():
                        if int(model(xi).argmax(1)) != int(labels[i]):
                            continue  # already fooled by v
                    dv = deepfool(model, xi, norm=norm, overshoot=overshoot, steps=deepfool_steps)
                    v = project(v + dv, eps, norm)
            rates.append(fooling_rate(model, X, v, clean=labels))
            if rates[-1] >= 1 - delta:
                break
    return UniversalResult(v.detach().to(x.device), rates, eps, norm)


# ---- the adversarial patch (Brown et al. 2017) -----------------------------------------------------------

def random_positions(n: int, size: tuple[int, int], patch: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) top-left corners (y, x) drawn uniformly so that a ``patch``-sided square fits in ``size`` (H, W)."""
    H, W = size
    ys = torch.randint(0, H - patch + 1, (n,), generator=gen)
    xs = torch.randint(0, W - patch + 1, (n,), generator=gen)
    return torch.stack([ys, xs], 1)


def paste_patch(x: torch.Tensor, patch: torch.Tensor, positions) -> torch.Tensor:
    """Paste ``patch`` (3, s, s) onto each image of x (N, 3, H, W) with its top-left corner at
    ``positions`` ((y, x) for all images, or (N, 2), one per image): A(p, x, l) of Brown et al. 2017.

    Differentiable with respect to the patch (the optimisation goes through it); x is not changed.
    Notebook: 15_universal_patch_evolved
    """
    if patch.dim() != 3 or patch.shape[0] != 3 or patch.shape[1] != patch.shape[2]:
        raise ValueError(f"expected a square patch of shape (3, s, s), got {tuple(patch.shape)}")
    s, (H, W) = patch.shape[1], x.shape[-2:]
    positions = torch.as_tensor(positions).long().reshape(-1, 2).expand(len(x), 2)
    if (positions < 0).any() or (positions[:, 0] > H - s).any() or (positions[:, 1] > W - s).any():
        raise ValueError(f"expected every {s}x{s} patch inside the {H}x{W} image, got corners {positions.tolist()[:4]}")
    out = x.clone()
    for i, (y0, x0) in enumerate(positions.tolist()):
        out[i, :, y0:y0 + s, x0:x0 + s] = patch  # (3, s, s) replaces the pixels under it
    return out


@dataclass
class PatchResult:
    """An adversarial patch (3, s, s) in [0, 1] for class ``target``, and the training success rate per
    ``log_every`` steps (``history``)."""

    patch: torch.Tensor
    target: int
    history: list = field(default_factory=list)


def adversarial_patch(model: nn.Module, x: torch.Tensor, target: Target, patch: int = 16, steps: int = 300,
                      lr: float = 0.05, batch_size: int = 32, seed: int = 0, progress: bool = True) -> PatchResult:
    """The adversarial patch (Brown et al. 2017): p* = argmax_p E_{x ~ X, l ~ L} log Pr(target | A(p, x, l)).

    Each step draws ``batch_size`` images of x (N, 3, H, W) and a random position l for each, pastes
    the patch (:func:`paste_patch`) and takes an Adam step on the patch pixels (clamped to [0, 1]).
    ``patch``: its side in pixels. The paper also draws rotations and scales; here only positions.
    Returns a :class:`PatchResult`; measure it on unseen images with :func:`patch_success_rate`.
    Notebook: 15_universal_patch_evolved
    """
    _check_model(model)
    x = check_images(x)
    steps, patch, batch_size = _check_count(steps, "steps"), _check_count(patch, "patch"), _check_count(batch_size, "batch_size")
    if patch > min(x.shape[-2:]):
        raise ValueError(f"expected a patch no larger than the images ({tuple(x.shape[-2:])}), got {patch}")
    device = model_device(model, x.device)
    gen = torch.Generator().manual_seed(seed)
    with preserved(model):
        target_t = _targets(model, x, int(target), False, None, device)
        p = torch.rand(3, patch, patch, generator=gen).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([p], lr=lr)
        history = []
        for step in progress_bar(range(steps), progress, desc="adversarial patch"):
            idx = torch.randint(0, len(x), (batch_size,), generator=gen)
            where = random_positions(batch_size, x.shape[-2:], patch, gen)
            logits = model(paste_patch(x[idx].to(device), p, where))  # (B, K)
            loss = F.cross_entropy(logits, target_t[:1].expand(batch_size))  # -mean log Pr(target | A(p, x, l))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                p.clamp_(0, 1)
            if step % 25 == 0 or step == steps - 1:
                history.append((logits.argmax(1) == int(target)).float().mean().item())
    return PatchResult(p.detach().to(x.device), int(target), history)


def patch_success_rate(model: nn.Module, x: torch.Tensor, patch: torch.Tensor, target: Target, labels=None,
                       positions: int = 4, seed: int = 0) -> float:
    """The fraction of (image, position) pairs classified as ``target`` once ``patch`` is pasted at a random
    position, ``positions`` positions per image; images whose true ``labels`` are the target are left out.
    Notebook: 15_universal_patch_evolved
    """
    x = check_images(x)
    if labels is not None:
        keep = check_targets(labels, len(x)) != int(target)
        x = x[keep.to(x.device)]
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model, x.device)
    hits = 0
    with preserved(model), torch.no_grad():
        for _ in range(_check_count(positions, "positions")):
            where = random_positions(len(x), x.shape[-2:], patch.shape[-1], gen)
            pred = _predict(model, paste_patch(x.to(device), patch.to(device), where))
            hits += (pred == int(target)).sum().item()
    return hits / (len(x) * positions)


# ---- evolved fooling images (Nguyen, Yosinski and Clune 2015) -------------------------------------------

_ACTIVATIONS: tuple[Callable, ...] = (torch.sin, torch.tanh, lambda t: torch.exp(-t * t), torch.abs)


def cppn_render(genomes: dict, size: int) -> torch.Tensor:
    """Render CPPN genomes to images (P, 3, size, size) in [0, 1].

    A compositional pattern-producing network (Stanley 2007) maps each pixel's coordinates
    (x, y, r = sqrt(x^2 + y^2), 1) through a small network whose nodes use periodic, symmetric and
    sigmoid-like activations (sin, tanh, gaussian, abs), then a sigmoid to RGB: regular, repeated
    patterns like the paper's. ``genomes``: ``{"weights": [(P, d_in, d_out), ...], "act": (P, L, H) ints}``.
    """
    lin = torch.linspace(-1, 1, size)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    coords = torch.stack([xs, ys, (xs * xs + ys * ys).sqrt(), torch.ones_like(xs)]).view(1, 4, -1)  # (1, 4, S*S)
    P = genomes["weights"][0].shape[0]
    h = coords.expand(P, -1, -1)  # (P, 4, S*S): one row per input, then per node
    for layer, w in enumerate(genomes["weights"][:-1]):
        z = torch.bmm(w.transpose(1, 2), h)  # (P, H, S*S) = w^T h
        h = torch.empty_like(z)
        for i, f in enumerate(_ACTIVATIONS):  # each node's own activation, computed only where it is used
            nodes = genomes["act"][:, layer] == i  # (P, H)
            h[nodes] = f(z[nodes])  # (nodes using f, S*S)
    rgb = torch.sigmoid(torch.bmm(genomes["weights"][-1].transpose(1, 2), h))  # (P, 3, S*S)
    return rgb.view(P, 3, size, size)


def _random_cppn(P: int, gen: torch.Generator, hidden: int = 12, layers: int = 3) -> dict:
    dims = [4] + [hidden] * layers + [3]
    weights = [torch.randn(P, a, b, generator=gen) * (2.0 / math.sqrt(a)) for a, b in zip(dims[:-1], dims[1:])]
    return {"weights": weights, "act": torch.randint(0, len(_ACTIVATIONS), (P, layers, hidden), generator=gen)}


def _mutate_cppn(g: dict, gen: torch.Generator, sigma: torch.Tensor, rate: float) -> dict:
    """Gaussian noise of scale ``sigma`` (P,) (one per genome) on a fraction ``rate`` of the weights; the
    genomes mutated at the full scale (the largest sigma) also change each node's activation with
    probability rate/4, the finer ones only nudge weights."""
    weights = []
    for w in g["weights"]:
        hit = torch.rand(w.shape, generator=gen) < rate
        weights.append(w + hit * sigma.view(-1, 1, 1) * torch.randn(w.shape, generator=gen))
    coarse = (sigma == sigma.max()).view(-1, 1, 1)
    swap = (torch.rand(g["act"].shape, generator=gen) < rate / 4) & coarse
    act = torch.where(swap, torch.randint(0, len(_ACTIVATIONS), g["act"].shape, generator=gen), g["act"])
    return {"weights": weights, "act": act}


def _take(g, idx: torch.Tensor):
    if isinstance(g, dict):
        return {"weights": [w[idx] for w in g["weights"]], "act": g["act"][idx]}
    return g[idx]


def _put(archive, idx: torch.Tensor, new, src: torch.Tensor) -> None:
    if isinstance(archive, dict):
        for a, b in zip(archive["weights"], new["weights"]):
            a[idx] = b[src]
        archive["act"][idx] = new["act"][src]
    else:
        archive[idx] = new[src]


def _log_odds(logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p, in double precision (near p = 1, 1 - p is -expm1(log p))."""
    logp = logp.double()
    return logp - torch.log(-torch.expm1(logp))


@dataclass
class EvolvedResult:
    """The MAP-Elites archive: one elite image per class (K, 3, S, S), its confidence p_class (K,), the number
    of model queries (images shown to the model), the lowest elite confidence after each generation, and how
    many times a stalled class was restarted from another class's elite (cross-niche seeding)."""

    images: torch.Tensor
    confidence: torch.Tensor
    queries: int
    generations: int
    history: list = field(default_factory=list)
    encoding: str = "direct"
    restarts: int = 0


def evolve_fooling_images(model: nn.Module, encoding: str = "cppn", generations: int = 200, children: int = 4,
                          size: int = 64, threshold: float = 0.9999, sigma: float | None = None,
                          rate: float | None = None, scales: int = 4, patience: int | None = 50, gain: float = 1.0,
                          seed: int = 0,
                          progress: bool = True) -> EvolvedResult:
    """Evolve images the network classifies with confidence >= ``threshold``, reading only its outputs
    (Nguyen, Yosinski and Clune 2015): no gradients, a black box.

    MAP-Elites (Mouret and Clune 2015) with one niche per class: the archive keeps, for each class c,
    the image with the highest p_c found so far (its elite). Each class also has a *parent*, the image
    its lineage climbs from (at first its elite). Each generation shows K * ``children`` mutated
    children to the model (one query per image), shared among the parents of the classes still below
    ``threshold`` (all K at first, so ``children`` each; the last hard class gets them all), and any
    child that beats the parent or the elite of *any* class replaces it. A parent's children are
    mutated at ``scales`` step sizes, sigma * 4^-j for j = 0 .. scales-1: the coarse ones explore, the
    fine ones climb the last digits (1 - p_c of 1e-4 needs steps far smaller than the ones that found
    p_c = 0.9). Fitness is compared as log p_c (float32 probabilities round to 1 near 0.99999).

    Cross-niche seeding: a class whose lineage has not gained ``gain`` in log-odds,
    log(p_c / (1 - p_c)), over ``patience`` generations sits on (or creeps up) a local optimum, and its own
    lineage will not leave it in time. Its parent is replaced by the elite of
    another class (first the one with the highest p_c, then the next best at each further restart):
    the paper saw a champion of one class often become the parent of another's. The new lineage may
    start below the old elite, which the archive keeps until a better image is found. ``patience=None``
    turns this off. Stops as soon as every class reaches ``threshold``, else after ``generations``: pass
    a generous cap.

    ``encoding``: ``"direct"`` (the genome is the pixels; Gaussian mutation of a fraction ``rate`` of
    them, where the paper uses polynomial mutation) or ``"cppn"`` (the genome is a small CPPN,
    :func:`cppn_render`; the paper evolves its topology with NEAT, here the topology is fixed and the
    weights and, at the coarsest scale, the activation functions mutate). Returns an :class:`EvolvedResult`.
    Notebook: 15_universal_patch_evolved
    """
    _check_model(model)
    if encoding not in ("direct", "cppn"):
        raise ValueError(f"unknown encoding {encoding!r}; expected 'direct' or 'cppn'")
    generations, children = _check_count(generations, "generations"), _check_count(children, "children")
    scales = _check_count(scales, "scales")
    patience = None if patience is None else _check_count(patience, "patience")
    gain = _check_eps(gain, "gain")
    if not 0 < threshold < 1:
        raise ValueError(f"expected a confidence threshold in (0, 1), got {threshold!r}")
    sigma = (0.5 if encoding == "cppn" else 0.3) if sigma is None else _check_eps(sigma, "sigma")
    rate = (0.2 if encoding == "cppn" else 0.05) if rate is None else rate
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)

    def render(genomes):
        return (cppn_render(genomes, size) if encoding == "cppn" else genomes).to(device)

    def mutate(genomes, step):  # step: (P,) the mutation scale of each child
        if encoding == "cppn":
            return _mutate_cppn(genomes, gen, step, rate)
        hit = torch.rand(genomes.shape, generator=gen) < rate
        return (genomes + hit * step.view(-1, 1, 1, 1) * torch.randn(genomes.shape, generator=gen)).clamp(0, 1)

    with preserved(model), torch.no_grad():
        K = model(torch.full((1, 3, size, size), 0.5, device=device)).shape[1]
        queries = 1
        n = K * children  # children per generation: the queries of one generation
        pool = _random_cppn(n, gen) if encoding == "cppn" else torch.rand(n, 3, size, size, generator=gen)
        logp = model(render(pool)).log_softmax(1).cpu()  # (n, K)
        queries += n
        best, src = logp.max(0)  # (K,) per class: the best of the initial population
        elites, parents = _take(pool, src), _take(pool, src)  # the archive; where each lineage climbs from
        elite_logp = logp[src]  # (K, K): row j = log p of every class for class j's elite
        fit, stall = best.clone(), torch.zeros(K, dtype=torch.long)  # each parent's log p_c; generations flat
        mark = _log_odds(fit)  # (K,) each lineage's log-odds when it last gained ``gain``
        restarts = torch.zeros(K, dtype=torch.long)
        log_threshold = math.log(threshold)
        ladder = sigma * 4.0 ** -torch.arange(scales, dtype=torch.float32)  # (scales,) sigma, sigma/4, ...
        history, generation = [], 0
        for _ in progress_bar(range(generations), progress, desc=f"evolve ({encoding})"):
            todo = (best < log_threshold).nonzero().flatten()  # classes still below the threshold
            if len(todo) == 0:
                break  # every class is there
            generation += 1
            mothers = todo[torch.arange(n) % len(todo)]  # (n,) round robin over them
            step = ladder[(torch.arange(n) // len(todo)) % scales]  # (n,) each parent's children at every scale
            kids = mutate(_take(parents, mothers), step)
            logp = model(render(kids)).log_softmax(1).cpu()  # (n, K)
            queries += n
            top, who = logp.max(0)  # (K,) the best child for each class
            climbed = top > fit  # the lineage moves up
            idx = climbed.nonzero().flatten()
            _put(parents, idx, kids, who[idx])
            fit[idx] = top[idx]
            gained = _log_odds(fit) >= mark + gain  # (K,) progress, not a creep up the last digits
            mark, stall = torch.where(gained, _log_odds(fit), mark), torch.where(gained, 0, stall + 1)
            idx = (top > best).nonzero().flatten()  # a new elite
            _put(elites, idx, kids, who[idx])
            best[idx], elite_logp[idx] = top[idx], logp[who[idx]]
            if patience is not None and K > 1:
                for c in todo[stall[todo] >= patience].tolist():  # cross-niche seeding of stalled classes
                    donors = elite_logp[:, c].clone()  # (K,) log p_c of each class's elite
                    donors[c] = -math.inf
                    donor = donors.argsort(descending=True)[restarts[c] % (K - 1)]  # best first, then the next
                    _put(parents, torch.tensor([c]), elites, donor.view(1))
                    fit[c], stall[c], restarts[c] = elite_logp[donor, c], 0, restarts[c] + 1
                    mark[c] = _log_odds(fit[c])
            history.append(best.exp().min().item())
        images = render(elites).detach()
        confidence = model(images).softmax(1).diagonal()
        queries += K
    return EvolvedResult(images.cpu(), confidence.cpu(), queries, generation, history, encoding,
                         int(restarts.sum()))


# ---- measuring attacks -----------------------------------------------------------------------------------

def accuracy(model: nn.Module, x: torch.Tensor, labels, batch_size: int = 512) -> float:
    """The fraction of images x (N, 3, H, W) classified as ``labels`` (N,)."""
    x = check_images(x)
    device = model_device(model, x.device)
    labels = check_targets(labels, len(x)).to(device)
    with preserved(model):
        return (_predict(model, x.to(device), batch_size) == labels).float().mean().item()


def accuracy_under_attack(model: nn.Module, x: torch.Tensor, labels, eps_values, attack: str = "pgd",
                          nested: bool = False, **attack_kwargs) -> dict[float, float]:
    """``{eps: accuracy}`` of ``model`` on ``attack(model, x, labels, eps)`` for each eps (pixel units);
    ``attack``: ``"fgsm"`` or ``"pgd"`` (``attack_kwargs`` go to it, e.g. ``steps=10``).

    ``nested=True`` goes through the eps in increasing order and attacks only the images still classified
    correctly: an image fooled at a smaller eps counts as fooled at every larger one, since its adversarial
    example lies inside the larger ball too. Accuracy at eps is then that of the strongest of the attacks
    at eps and below (at most the plain figure), for the work on the images still standing: on an
    undefended model most images fall at the small eps, so the large ones cost little.
    Notebook: 14_adversarial_examples
    """
    attacks = {"fgsm": fgsm, "pgd": pgd}
    if attack not in attacks:
        raise ValueError(f"unknown attack {attack!r}; expected one of {sorted(attacks)}")
    if not nested:
        result = {}
        for eps in eps_values:
            x_adv = x if eps == 0 else attacks[attack](model, x, labels, eps, **attack_kwargs)
            result[float(eps)] = accuracy(model, x_adv, labels)
        return result
    x = check_images(x)
    device = model_device(model, x.device)
    labels = check_targets(labels, len(x)).to(device)
    with preserved(model):
        standing = _predict(model, x.to(device)) == labels  # (N,) correct on the clean images
    result = {}
    for eps in sorted(float(e) for e in eps_values):
        idx = standing.nonzero().flatten()  # the images no smaller eps has fooled
        if eps > 0 and len(idx):
            x_adv = attacks[attack](model, x[idx.to(x.device)], labels[idx], eps, **attack_kwargs)
            with preserved(model):
                standing[idx] = _predict(model, x_adv.to(device)) == labels[idx]
        result[eps] = standing.float().mean().item()
    return result


def transfer_matrix(models: dict, x: torch.Tensor, labels, attack: Callable | None = None) -> torch.Tensor:
    """Black-box transfer (Szegedy et al. 2014; Papernot et al. 2016): entry [i, j] is the fraction of
    images, correctly classified by model j, that model j misclassifies once attacked on model i.

    ``models``: ``{name: model}`` (M models); ``attack(model, x, labels) -> x_adv`` (default: PGD-10,
    L-inf eps 8/255). The diagonal is the white-box success rate. Returns (M, M).
    Notebook: 15_universal_patch_evolved
    """
    x = check_images(x)
    labels = check_targets(labels, len(x))
    attack = attack or (lambda m, xs, ys: pgd(m, xs, ys, 8 / 255, steps=10))
    names = list(models)
    correct = {}
    for name in names:
        m = models[name]
        with preserved(m):
            correct[name] = (_predict(m, x.to(model_device(m))).cpu() == labels)
    out = torch.zeros(len(names), len(names))
    for i, source in enumerate(names):
        x_adv = attack(models[source], x, labels)
        for j, victim in enumerate(names):
            m = models[victim]
            with preserved(m):
                wrong = _predict(m, x_adv.to(model_device(m))).cpu() != labels
            keep = correct[victim]
            out[i, j] = wrong[keep].float().mean() if keep.any() else float("nan")
    return out
