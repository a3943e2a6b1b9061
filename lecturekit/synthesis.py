"""Synthesizing images: gradient ascent with image priors, DeepDream, feature inversion.

Three ways to make an image from a network instead of explaining one:

* **Gradient ascent** (class visualisation): I* = argmax_I S_c(I) - lambda ||I||^2, from a grey or noisy
  start (Simonyan et al. 2014, "Deep Inside Convolutional Networks"), with the "natural image" priors of
  Yosinski et al. 2015 ("Understanding Neural Networks Through Deep Visualization"): L2 decay,
  periodic Gaussian blur, clipping pixels of small norm, clipping pixels of small contribution; and
  jitter, the random shifts of DeepDream (Mordvintsev et al. 2015), which Olah et al. 2017 call
  "transformation robustness". The same for a neuron or a channel of an intermediate layer, and a
  Fourier-space, colour-decorrelated parameterisation (Olah et al. 2017, "Feature Visualization", distill.pub).
* **DeepDream** (Mordvintsev et al. 2015, "Inceptionism"): set a layer's gradient to its activation,
  i.e. ascend 0.5 ||A||^2, with jitter, normalised steps and octaves.
* **Feature inversion** (Mahendran and Vedaldi 2015, "Understanding Deep Image Representations by
  Inverting Them"): x* = argmin ||Phi(x) - Phi0||^2 / ||Phi0||^2 + lambda_a R_alpha(x) + lambda_TV R_TV^beta(x).

Objectives compose as in Lucent (``optvis/objectives.py``): small objects that add and scale, and are
*maximised*::

    obj = channel("features.6", 3) - 1e-3 * total_variation()
    img = class_visualization(model, objective=obj)

Pixel space (DESIGN.md, contract 1): every image is (N, 3, H, W) in [0, 1]. The papers work on
mean-subtracted images, whose zero is the mean image; here that zero is **grey, 0.5**: ``start="zeros"``
is a grey image, and the L2 / alpha-norm priors and the "clip to zero" priors pull pixels to 0.5.
Parameterisations: ``param="pixel"`` optimises the image itself by projected gradient ascent (each
step is followed by a **clamp** to [0, 1]); ``param="fourier"`` optimises a scaled spectrum mapped
through a colour decorrelation and a **sigmoid**, so its image is always inside (0, 1).

Every optimisation leaves the model as found (contract 5: ``lk.hooks.preserved``, hooks removed in
``finally``), takes ``seed=``, ``steps=`` and ``progress=`` (tqdm), and validates its input.

Notebooks: 08_gradient_ascent, 09_deepdream, 10_feature_inversion
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import (Target, check_channel, check_images, check_model, check_nonnegative, check_positive_int,
                   check_targets, gaussian_blur)
from .hooks import OUTPUT as _OUTPUT, Layer, forward_to, model_device, preserved, progress_bar, renamed, resolve_layer

__all__ = [
    "Objective", "class_score", "class_logprob", "channel", "neuron", "layer_norm", "total_variation", "l2", "alpha_norm",
    "evaluator", "ascent_step", "dream_step", "inversion_loss", "class_visualization", "deep_dream", "invert",
    "Inversion", "GREY", "high_frequency_share",
]

GREY = 0.5  # the pixel-space image that the papers' zero (mean-subtracted) image corresponds to
# _OUTPUT (hooks.OUTPUT): the key under which an objective reads the model's output (class scores)


# ---------------------------------------------------------------------------------------------------
# Objectives: small functions of (image, activations) that add and scale (after Lucent)
# ---------------------------------------------------------------------------------------------------


class Objective:
    """A quantity to *maximise*, one value per image: ``obj(x, acts) -> (N,)``.

    ``x`` is the image batch (N, 3, H, W) that the model sees, ``acts`` maps layer names to their
    activations (and ``"<output>"`` to the model's output). ``layers`` names what it reads. Objectives
    add, subtract and scale by numbers: ``channel("features.6", 3) - 1e-3 * total_variation()``.
    ``n`` is the batch size the objective implies (a list of classes or channels), or None.
    """

    def __init__(self, fn: Callable, layers: Sequence[str] = (), name: str = "objective", n: int | None = None):
        self.fn, self.layers, self.name, self.n = fn, tuple(dict.fromkeys(layers)), name, n

    def __call__(self, x: torch.Tensor, acts) -> torch.Tensor:
        return self.fn(x, acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    @staticmethod
    def _join_n(a, b):
        if a is not None and b is not None and a != b:
            raise ValueError(f"cannot combine objectives for batches of {a} and {b} images")
        return a if a is not None else b

    def __add__(self, other):
        if isinstance(other, numbers.Number):
            return Objective(lambda x, a: self(x, a) + other, self.layers, f"{self.name} + {other}", self.n)
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(lambda x, a: self(x, a) + other(x, a), self.layers + other.layers,
                         f"{self.name} + {other.name}", self._join_n(self.n, other.n))

    __radd__ = __add__

    def __neg__(self):
        return -1 * self

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, k):
        if not isinstance(k, numbers.Number):
            return NotImplemented  # a product of two objectives has no use in the lecture
        return Objective(lambda x, a: k * self(x, a), self.layers, f"{k} * {self.name}", self.n)

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / k)


def _indices(index, name: str):
    """An int (same for every image) or a sequence (one per image) -> (LongTensor or int, n)."""
    if isinstance(index, bool):
        raise TypeError(f"expected an integer {name}, got a bool")
    if isinstance(index, (int, np.integer)):
        return int(index), None
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.is_floating_point() or len(index) == 0:
        raise TypeError(f"expected an integer {name} or a non-empty 1-D sequence of them, got {index!r}")
    return index.long(), len(index)


def _select(A: torch.Tensor, index) -> torch.Tensor:
    """A[:, index] for an int, A[i, index_i] for a LongTensor (one per image); (N, ...) either way."""
    if isinstance(index, int):
        return A[:, index]
    return A[torch.arange(len(A), device=A.device), index.to(A.device)]


@renamed(c="target")
def class_score(target: Target | Sequence[int]) -> Objective:
    """The raw class score S_target (before softmax), as in Simonyan et al. 2014: ``(N,)``.

    ``target``: a class index, or one per image (then the batch has ``len(target)`` images).
    """
    k, n = _indices(target, "class index")

    def fn(x, acts):
        S = acts[_OUTPUT]  # (N, n_classes)
        if S.dim() != 2:
            raise ValueError(f"expected the model to output class scores (N, n_classes), got {tuple(S.shape)}")
        check_targets(k, len(S), S.shape[1])  # a class out of range fails here, by name
        return _select(S, k)

    return Objective(fn, [_OUTPUT], f"class_score({target})", n)


@renamed(c="target")
def class_logprob(target: Target | Sequence[int]) -> Objective:
    """log p_c = S_c - log sum_j exp S_j: the class score relative to the others, (N,).

    Ascending S_c alone can raise another class's score faster; log p_c cannot (the softmax
    objective that Simonyan et al. 2014 avoid for the opposite reason: it can rise by lowering
    the other scores).
    """
    k, n = _indices(target, "class index")

    def fn(x, acts):
        S = acts[_OUTPUT]  # (N, n_classes)
        check_targets(k, len(S), S.shape[1])
        return _select(S.log_softmax(1), k)

    return Objective(fn, [_OUTPUT], f"class_logprob({target})", n)


def _check_channel(A: torch.Tensor, layer: str, index) -> None:
    if A.dim() < 2:
        raise ValueError(f"expected channels (N, C, ...) at layer {layer!r}, got {tuple(A.shape)}")
    check_channel(index, A.shape[1], layer)


@renamed(k="channel")
def channel(layer: str, channel: int | Sequence[int]) -> Objective:
    """Mean activation of one channel of ``layer`` over its positions: ``A[:, channel].mean((h, w))``, (N,).

    ``channel``: an index, or one per image (then the batch has ``len(channel)`` images).
    """
    idx, n = _indices(channel, "channel")

    def fn(x, acts):
        A = acts[layer]  # (N, C, h, w)
        _check_channel(A, layer, idx)
        return _select(A, idx).flatten(1).mean(1)

    return Objective(fn, [layer], f"channel({layer!r}, {channel})", n)


@renamed(k="channel")
def neuron(layer: str, channel: int | Sequence[int], position: tuple[int, int] | None = None) -> Objective:
    """One neuron: ``A[:, channel, y, x]`` of ``layer`` at ``position=(y, x)`` (default: the centre), (N,)."""
    idx, n = _indices(channel, "channel")

    def fn(img, acts):
        A = acts[layer]  # (N, C, h, w)
        _check_channel(A, layer, idx)
        if A.dim() != 4:
            raise ValueError(f"neuron() needs feature maps (N, C, h, w) at {layer!r}, got {tuple(A.shape)}")
        h, w = A.shape[-2:]
        y, x = (h // 2, w // 2) if position is None else position
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"expected a position inside the {h}x{w} maps of {layer!r}, got (y, x) = ({y}, {x})")
        return _select(A, idx)[:, y, x]

    return Objective(fn, [layer], f"neuron({layer!r}, {channel}, {position})", n)


def layer_norm(layer: str) -> Objective:
    """DeepDream's objective 0.5 ||A||^2 per image: its gradient with respect to A is A itself."""
    return Objective(lambda x, acts: 0.5 * acts[layer].pow(2).flatten(1).sum(1), [layer], f"layer_norm({layer!r})")


def total_variation(x: torch.Tensor | None = None, beta: float = 2.0, reduction: str = "sum"):
    """Total variation R_TV^beta (Mahendran and Vedaldi 2015, eq. for R_V^beta), loop-free.

        R(x) = sum_{c, i, j} ((x[c, i, j+1] - x[c, i, j])^2 + (x[c, i+1, j] - x[c, i, j])^2) ^ (beta / 2)

    summed over the (H-1) x (W-1) positions where both differences exist and over channels.
    With an image ``x`` (N, C, H, W): the value, a 0-dim tensor summed over the batch
    (``reduction="sum"``) or one per image (``reduction="none"``, shape (N,)).
    Without ``x``: the :class:`Objective` of the image being optimised (subtract it to penalise).
    """
    if not isinstance(beta, numbers.Number) or beta <= 0:
        raise ValueError(f"expected beta > 0, got {beta!r}")
    if x is None:
        return Objective(lambda img, acts: total_variation(img, beta, "none"), [], f"total_variation({beta})")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor (N, C, H, W) or nothing (for the objective), got "
                        f"{type(x).__name__}; pass beta=... by name")
    if x.dim() != 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"expected images of shape (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
    if reduction not in ("sum", "none"):
        raise ValueError(f"expected reduction 'sum' or 'none', got {reduction!r}")
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]  # (N, C, H-1, W-1) horizontal differences
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]  # (N, C, H-1, W-1) vertical differences
    sq = dx * dx + dy * dy
    if beta >= 2:
        r = sq if beta == 2 else sq.pow(beta / 2)
    else:
        # s^(beta/2) has an infinite slope at s = 0 for beta < 2: shift by a tiny eps and subtract its
        # value, so that flat regions contribute exactly 0 and their gradient is finite.
        eps = 1e-12 if x.dtype == torch.float64 else 1e-8
        r = (sq + eps).pow(beta / 2) - eps ** (beta / 2)
    per_image = r.flatten(1).sum(1)  # (N,)
    return per_image.sum() if reduction == "sum" else per_image


def high_frequency_share(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """The share of an image's spectral energy above ``cutoff`` cycles per pixel, per image: (N,).

        E(f) = |FFT2(x_c - mean(x_c))(f)|^2,    share = sum_{|f| > cutoff} E(f) / sum_f E(f)

    summed over channels, |f| = sqrt(f_y^2 + f_x^2) in cycles per pixel (0.5 is the Nyquist limit).
    Unlike total variation, which also falls when an image only loses contrast, the share is
    unchanged by scaling the image about its mean (x -> 0.5 + a (x - 0.5)): it measures smoothness
    alone. 0 for a flat image. ``x`` may be any finite (N, C, H, W) signal, e.g. the detail a method
    added to an image (``result - photo``). Used to judge the image priors of gradient ascent.
    Notebook: 08_gradient_ascent
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not torch.isfinite(x).all():
        raise ValueError(f"expected finite images (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if not 0 < cutoff < 0.5 * 2 ** 0.5:
        raise ValueError(f"expected cutoff in (0, 0.707) cycles per pixel, got {cutoff}")
    centred = (x - x.mean((-2, -1), keepdim=True)).double()  # (N, C, H, W) the DC term removed
    energy = torch.fft.fft2(centred).abs().pow(2).sum(1)  # (N, H, W) summed over channels
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64, device=x.device)  # cycles per pixel
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64, device=x.device)
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff  # (H, W)
    total = energy.flatten(1).sum(1)
    share = (energy * high).flatten(1).sum(1) / total.clamp(min=1e-300)
    return torch.where(total > 0, share, torch.zeros_like(share)).float()


def l2() -> Objective:
    """The L2 prior ||I||^2 of the centred image I = x - 0.5 (subtract it: ``S_c - lam * l2()``), (N,)."""
    return Objective(lambda x, acts: (x - GREY).pow(2).flatten(1).sum(1), [], "l2")


def alpha_norm(alpha: float = 6.0) -> Objective:
    """Mahendran and Vedaldi's alpha-norm prior R_alpha = sum |x - 0.5|^alpha per image, (N,)."""
    return Objective(lambda x, acts: (x - GREY).abs().pow(alpha).flatten(1).sum(1), [], f"alpha_norm({alpha})")


# ---------------------------------------------------------------------------------------------------
# Evaluating an objective: one forward pass with the needed activations captured
# ---------------------------------------------------------------------------------------------------


@contextmanager
def evaluator(model: nn.Module, objective: Objective) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Evaluate an objective: yields ``evaluate(x) -> objective values (N,)``, differentiable in x.

    The hooks are set once for the whole block (an optimisation calls ``evaluate`` every step), and
    the forward pass stops after the deepest layer the objective reads. Use it inside
    ``lecturekit.hooks.preserved(model)`` to leave the model as found::

        with preserved(model), evaluator(model, channel("features.6", 3)) as evaluate:
            values = evaluate(x)  # (N,)
    """
    layers = [name for name in objective.layers if name != _OUTPUT]
    # detach=False: the ascent differentiates through the activations. Without the output, the
    # forward pass stops after the deepest layer the objective reads.
    with forward_to(model, layers, output=_OUTPUT in objective.layers, detach=False) as run:

        def evaluate(x: torch.Tensor) -> torch.Tensor:
            values = objective(x, run(x))
            if values.dim() != 1 or len(values) != len(x):
                raise ValueError(f"expected the objective to give one value per image ({len(x)},), "
                                 f"got {tuple(values.shape)}")
            return values

        yield evaluate


def _jitter(x: torch.Tensor, jitter: int, gen: torch.Generator | None) -> tuple[int, int]:
    if jitter <= 0:
        return 0, 0
    ox, oy = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
    return ox, oy


def _normalised(g: torch.Tensor) -> torch.Tensor:
    """g / mean|g| per image, the normalised step of the DeepDream notebook (scale-free learning rate)."""
    return g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# The steps (small public pieces, reused by the loops below and by the graded assignment)
# ---------------------------------------------------------------------------------------------------


def _ascent_grad(evaluate, x: torch.Tensor, shift=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of sum(objective) with respect to x, the model seeing x rolled by ``shift``."""
    x = x.detach().requires_grad_(True)
    seen = torch.roll(x, shifts=shift, dims=(-1, -2)) if shift != (0, 0) else x
    values = evaluate(seen)  # (N,)
    (g,) = torch.autograd.grad(values.sum(), x)
    return g, values.detach()


def _ascent_update(evaluate, x: torch.Tensor, lr: float, l2_weight: float, blur_sigma: float = 0.0,
                   shift=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """The step of :func:`ascent_step` with the objective's hooks already set.

    Returns (new x, g_objective): the gradient of the objective alone, without the L2 term, which is
    what clipping by contribution reads (Yosinski et al. 2015: the pixel's contribution to the
    activation, not to the regularised objective)."""
    g_objective, _ = _ascent_grad(evaluate, x, shift)  # d objective / dx, the model seeing x rolled by shift
    g = g_objective
    if l2_weight:
        g = g - 2 * l2_weight * (x - GREY)  # d/dx of -l2_weight ||x - 0.5||^2, written out
    x = (x + lr * _normalised(g)).clamp(0, 1)
    if blur_sigma > 0:
        x = gaussian_blur(x, blur_sigma)
    return x.detach(), g_objective


@renamed(l2="l2_weight")
def ascent_step(model: nn.Module, x: torch.Tensor, target: Target, lr: float = 0.05, l2_weight: float = 0.0,
                blur_sigma: float = 0.0) -> torch.Tensor:
    """One step of gradient ascent on I* = argmax S_c(I) - l2_weight ||I||^2, then an optional Gaussian blur.

        g = d/dx [S_c(x) - l2_weight * ||x - 0.5||^2]     x <- clamp(x + lr * g / mean|g|, 0, 1)
        x <- gaussian_blur(x, sigma)                       (if blur_sigma > 0, Yosinski et al. 2015)

    x: (N, 3, H, W) in [0, 1]; target: a class index or LongTensor (N,); the step is normalised per
    image (lr = mean change of a pixel). Returns the new image, detached, (N, 3, H, W) in [0, 1].
    :func:`class_visualization` repeats this step (with jitter and clipping priors between steps).
    Notebook: 08_gradient_ascent
    """
    check_model(model)
    x = check_images(x)
    objective = class_score(check_targets(target, len(x)))
    with preserved(model), evaluator(model, objective) as evaluate:
        x, _ = _ascent_update(evaluate, x, lr, l2_weight, blur_sigma)
    return x


def dream_step(model: nn.Module, x: torch.Tensor, layer: Layer, lr: float = 0.01, jitter: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One DeepDream step (Mordvintsev et al. 2015): ascend 0.5 ||A||^2 at ``layer``.

        shift x by a random (ox, oy) (jitter);  A = Phi_layer(x);  g = dA/dx^T A (the layer's gradient
        set to its activation);  x <- clamp(x + lr * g / mean|g|, 0, 1);  shift back.

    x: (N, 3, H, W) in [0, 1]. Returns the new image, detached, same shape. Notebook: 09_deepdream
    """
    check_model(model)
    x = check_images(x)
    name, _ = resolve_layer(model, layer)
    with preserved(model), evaluator(model, layer_norm(name)) as evaluate:
        return _dream_step(evaluate, x, lr, jitter, generator)


def _dream_step(evaluate, x, lr, jitter, gen):
    shift = _jitter(x, jitter, gen)
    g, _ = _ascent_grad(evaluate, x, shift)  # d(0.5||A||^2)/dx = (dA/dx)^T A
    return (x + lr * _normalised(g)).clamp(0, 1).detach()


def inversion_loss(features: torch.Tensor, target_features: torch.Tensor, x: torch.Tensor,
                   tv_weight: float = 0.0, alpha_weight: float = 0.0, alpha: float = 6.0,
                   beta: float = 2.0) -> torch.Tensor:
    """Mahendran and Vedaldi 2015, one value per image (N,):

        ||Phi(x) - Phi0||^2 / ||Phi0||^2 + alpha_weight * R_alpha(x) / (H W) + tv_weight * R_TV^beta(x) / (H W)

    features, target_features: (N, ...) Phi(x) and Phi0; x: (N, 3, H, W) the image (R_alpha is taken
    of the centred image x - 0.5). The priors are divided by the number of pixels H*W so that the
    weights do not depend on the image size (the paper divides by H W B^alpha for the same reason).
    Notebook: 10_feature_inversion
    """
    if features.shape != target_features.shape:
        raise ValueError(f"expected features of the target's shape {tuple(target_features.shape)}, "
                         f"got {tuple(features.shape)}")
    diff = (features - target_features).flatten(1).pow(2).sum(1)  # (N,)
    norm = target_features.flatten(1).pow(2).sum(1).clamp_min(1e-12)  # (N,)
    hw = x.shape[-1] * x.shape[-2]
    loss = diff / norm
    if alpha_weight:
        loss = loss + alpha_weight * (x - GREY).abs().pow(alpha).flatten(1).sum(1) / hw
    if tv_weight:
        loss = loss + tv_weight * total_variation(x, beta=beta, reduction="none") / hw
    return loss


# ---------------------------------------------------------------------------------------------------
# Parameterisations: pixels (projected, clamp) and Fourier (decorrelated colour, sigmoid)
# ---------------------------------------------------------------------------------------------------

# Square root of the colour correlation of ImageNet, as in Lucid/Lucent (Olah et al. 2017): mixing
# decorrelated channels through it makes each optimised channel a roughly independent colour.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


# Spread of the random start spectrum. Lucent uses 0.01, which renders an image within about 0.003 of
# grey: on CourseNet that start lies where every ReLU below some features.9 channels is off, so their
# gradient is exactly zero, Adam never moves, and the result is a flat grey square (issue 16). At 0.1
# the start is still nearly grey (pixel std about 0.02) but every channel of features.9 gets a gradient.
_FOURIER_SD = 0.1


def _fourier(n: int, size: int, gen: torch.Generator, device, decay_power: float = 1.0, sd: float = _FOURIER_SD):
    """Olah et al. 2017: image = sigmoid(colour_mix(irfft2(scale * spectrum))), scale ~ 1/frequency.

    Returns the parameter (N, 3, size, size//2+1, 2) and the function that renders it to (N, 3, S, S).
    Written here (Lucent is not a dependency) after lucent/optvis/param/spatial.py and color.py, with a
    wider random start (``sd``, see _FOURIER_SD) so that the ascent leaves it.
    """
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)  # (S, S//2+1)
    scale = (1.0 / freqs.clamp_min(1.0 / size) ** decay_power).to(device)[None, None, :, :, None]
    spectrum = (torch.randn(n, 3, size, size // 2 + 1, 2, generator=gen) * sd).to(device).requires_grad_(True)
    color = _COLOR_SQRT.to(device)

    def render() -> torch.Tensor:
        image = torch.fft.irfftn(torch.view_as_complex(scale * spectrum), s=(size, size), norm="ortho") / 4.0
        image = torch.einsum("nchw,dc->ndhw", image, color)  # decorrelated -> RGB
        return torch.sigmoid(image)  # (N, 3, S, S) in (0, 1)

    return spectrum, render


def _percentile_clip(x: torch.Tensor, score: torch.Tensor, pct: float) -> torch.Tensor:
    """Set to grey the pixels whose ``score`` (N, H, W) is below its ``pct``-th percentile per image."""
    q = torch.quantile(score.flatten(1), pct / 100.0, dim=1).view(-1, 1, 1)  # (N, 1, 1)
    keep = (score >= q).unsqueeze(1)  # (N, 1, H, W)
    return torch.where(keep, x, torch.full_like(x, GREY))


def _pixel_ascent(evaluate, x: torch.Tensor, steps: int, lr: float, l2_weight: float, jitter: int,
                  blur_every: int, blur_sigma: float, clip_value: float, clip_contribution: float,
                  gen: torch.Generator, progress: bool) -> torch.Tensor:
    """Projected gradient ascent on the pixels: :func:`ascent_step` repeated, priors between steps."""
    for step in progress_bar(range(steps), progress, desc="class visualization"):
        shift = _jitter(x, jitter, gen)
        blur = blur_sigma if blur_every and (step + 1) % blur_every == 0 else 0.0
        x_new, g = _ascent_update(evaluate, x, lr, l2_weight, blur, shift)
        if clip_value:
            x_new = _percentile_clip(x_new, (x_new - GREY).norm(dim=1), clip_value)
        if clip_contribution:
            # First-order drop of the objective (the L2 term left out) if the pixel were set to grey
            # (Yosinski et al. 2015), with the gradient of this step's image x, read before the update.
            x_new = _percentile_clip(x_new, ((x_new - GREY) * g).sum(1).abs(), clip_contribution)
        x = x_new
    return x.detach()


def _fourier_ascent(evaluate, n: int, size: int, steps: int, lr: float, jitter: int,
                    gen: torch.Generator, device, progress: bool) -> torch.Tensor:
    """Adam on a 1/f-scaled, colour-decorrelated spectrum mapped through a sigmoid (Olah et al. 2017)."""
    spectrum, render = _fourier(n, size, gen, device)
    optimizer = torch.optim.Adam([spectrum], lr=lr)
    for _ in progress_bar(range(steps), progress, desc="class visualization (fourier)"):
        optimizer.zero_grad()
        image = render()  # (N, 3, S, S) in (0, 1)
        shift = _jitter(image, jitter, gen)
        seen = torch.roll(image, shifts=shift, dims=(-1, -2)) if shift != (0, 0) else image
        (-evaluate(seen).sum()).backward()  # maximise: descend on the negative
        optimizer.step()
    with torch.no_grad():
        return render().detach()


@renamed(l2="l2_weight")
def class_visualization(model: nn.Module, target: Target | None = None, *, steps: int = 200, lr: float = 0.02,
                        l2_weight: float = 0.0, jitter: int = 0, blur_every: int = 0, blur_sigma: float = 0.5,
                        clip_value: float = 0.0, clip_contribution: float = 0.0, start: str | torch.Tensor = "zeros",
                        seed: int = 0, size: int | None = None, param: str = "pixel",
                        objective: Objective | None = None, progress: bool = True) -> torch.Tensor:
    """Gradient ascent on the image: I* = argmax_I S_c(I) - l2_weight ||I||^2 (Simonyan et al. 2014), with
    the priors of Yosinski et al. 2015 and DeepDream's jitter switchable one at a time.

    target: a class index or one per image (LongTensor (N,)); or pass ``objective=`` (e.g.
    ``channel("features.6", 3)`` or ``neuron(...)``) to visualise an intermediate unit instead.
    Priors (all off by default, so each can be switched on alone):

    * ``l2_weight``: the L2 penalty lambda ||I||^2 of the centred image I = x - 0.5 (decays towards grey);
    * ``jitter``: the model sees the image rolled by a random shift of up to ``jitter`` pixels
      (DeepDream, Mordvintsev et al. 2015; Olah et al. 2017's "transformation robustness");
    * ``blur_every``: every so many steps, Gaussian-blur the image with ``blur_sigma`` (pixels);
    * ``clip_value``: after each step, set to grey the pixels whose norm |I| (over colours) is in the
      lowest ``clip_value`` percent;
    * ``clip_contribution``: the same for pixels whose contribution |sum_c I * dS/dI| is small, dS/dI
      the objective's gradient alone (the L2 term left out) at the image before the step.

    Pixel parameterisation: :func:`ascent_step` repeated (normalised gradient ascent on the image,
    clamped to [0, 1] after each step). ``param="fourier"``: Adam on a 1/f-scaled,
    colour-decorrelated spectrum mapped through a sigmoid (Olah et al. 2017), from a small seeded
    random spectrum (``start`` is then unused); blur and clipping act on pixels and are then not
    available; try ``lr=0.05``.
    ``start``: ``"zeros"`` (grey, the papers' zero image), ``"noise"`` (seeded), or images (N, 3, H, W)
    in [0, 1] to start from, one per target (e.g. the mean image of a cluster of a class's images:
    multifaceted visualisation, Nguyen et al. 2016; ``size`` is then theirs). ``size``: the side of the
    square image (default: ``model.input_size`` or 64). Returns (N, 3, size, size) in [0, 1].
    Notebook: 08_gradient_ascent
    """
    check_model(model)
    steps = check_positive_int(steps, "steps")
    if isinstance(start, torch.Tensor):
        start = check_images(start, "start")
        if param == "fourier":
            raise ValueError("a start image needs param='pixel' (the Fourier parameterisation starts from its spectrum)")
    elif start not in ("zeros", "noise"):
        raise ValueError(f"expected start='zeros', 'noise' or images (N, 3, H, W), got {start!r}")
    if param not in ("pixel", "fourier"):
        raise ValueError(f"expected param='pixel' or 'fourier', got {param!r}")
    for name, value in dict(lr=lr, l2_weight=l2_weight, jitter=jitter, blur_every=blur_every,
                            blur_sigma=blur_sigma).items():
        check_nonnegative(value, name)
    for name, value in dict(clip_value=clip_value, clip_contribution=clip_contribution).items():
        if not 0 <= value < 100:
            raise ValueError(f"expected {name} to be a percentile in [0, 100), got {value!r}")
    if param == "fourier" and (blur_every or clip_value or clip_contribution):
        raise ValueError("blur_every, clip_value and clip_contribution act on pixels: use them with "
                         "param='pixel' (with param='fourier', use l2_weight, jitter or a total_variation() objective)")
    if (target is None) == (objective is None):
        raise ValueError("expected either a class target or an objective= (not both, not neither)")
    if objective is None:
        objective = class_score(target)
    elif not isinstance(objective, Objective):
        raise TypeError(f"expected objective to be a lecturekit.synthesis.Objective, got {type(objective).__name__}")
    size = int(size or getattr(model, "input_size", 64))
    if size < 8:
        raise ValueError(f"expected an image size of at least 8 pixels, got {size}")
    n = objective.n or 1
    if isinstance(start, torch.Tensor):
        if objective.n is not None and len(start) != objective.n:
            raise ValueError(f"expected one start image per target ({objective.n}), got {len(start)}")
        n, size = len(start), start.shape[-1]
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)

    with preserved(model):
        if param == "fourier":
            if l2_weight:
                objective = objective - l2_weight * l2()  # pixels are derived: through autograd
            with evaluator(model, objective) as evaluate:
                return _fourier_ascent(evaluate, n, size, steps, lr, int(jitter), gen, device, progress)
        if isinstance(start, torch.Tensor):
            x = start.detach().clone().to(device)
        elif start == "zeros":
            x = torch.full((n, 3, size, size), GREY, device=device)
        else:
            x = (GREY + 0.1 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1).to(device)
        with evaluator(model, objective) as evaluate:
            return _pixel_ascent(evaluate, x, steps, lr, l2_weight, int(jitter), int(blur_every), blur_sigma,
                                 clip_value, clip_contribution, gen, progress)


# ---------------------------------------------------------------------------------------------------
# DeepDream and feature inversion
# ---------------------------------------------------------------------------------------------------


def deep_dream(model: nn.Module, x: torch.Tensor, layer: Layer, *, steps: int = 10, lr: float = 0.01,
               octaves: int = 3, octave_scale: float = 1.4, jitter: int = 16, seed: int = 0,
               progress: bool = True) -> torch.Tensor:
    """DeepDream (Mordvintsev, Olah and Tyka 2015): amplify what ``layer`` already sees in ``x``.

    For each of ``octaves`` scales, smallest first (each ``octave_scale`` times smaller than the
    next), run ``steps`` of :func:`dream_step` (ascent on 0.5 ||A||^2 with jitter and normalised
    steps); the detail added at one scale is upsampled and carried to the next, as in the original
    notebook. x: (N, 3, H, W) in [0, 1]; returns the dreamed image, same shape, in [0, 1].
    Notebook: 09_deepdream
    """
    check_model(model)
    x = check_images(x)
    steps = check_positive_int(steps, "steps")
    name, _ = resolve_layer(model, layer)
    octaves = check_positive_int(octaves, "octaves")
    if not octave_scale > 1:
        raise ValueError(f"expected octave_scale > 1, got {octave_scale!r}")
    x = x.detach().to(model_device(model))
    H, W = x.shape[-2:]
    sizes = [(max(8, round(H / octave_scale ** i)), max(8, round(W / octave_scale ** i))) for i in range(octaves)][::-1]
    bases = [F.interpolate(x, size=s, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
             if s != (H, W) else x for s in sizes]
    gen = torch.Generator().manual_seed(seed)
    detail = torch.zeros_like(bases[0])
    with preserved(model), evaluator(model, layer_norm(name)) as evaluate:
        for i in progress_bar(range(steps * octaves), progress, desc="deep dream"):
            base = bases[i // steps]
            if i % steps == 0:  # a new octave: carry the detail added so far up to its size
                detail = F.interpolate(detail, size=base.shape[-2:], mode="bilinear", align_corners=False)
                image = (base + detail).clamp(0, 1)
            image = _dream_step(evaluate, image, lr, int(jitter), gen)
            if i % steps == steps - 1:
                detail = image - base
    return image.detach()


class Inversion(NamedTuple):
    """What :func:`invert` returns: the image (N, 3, H, W) in [0, 1] and the relative feature error
    ||Phi(x) - Phi0|| / ||Phi0|| per image (N,)."""

    image: torch.Tensor
    feature_error: torch.Tensor


def invert(model: nn.Module, x: torch.Tensor, layer: Layer, *, steps: int = 200, lr: float = 0.05,
           tv_weight: float = 0.01, alpha_weight: float = 0.0, alpha: float = 6.0, beta: float = 2.0,
           seed: int = 0, progress: bool = True) -> Inversion:
    """Feature inversion (Mahendran and Vedaldi 2015): the image whose features at ``layer`` match x's.

        x* = argmin_x ||Phi(x) - Phi0||^2 / ||Phi0||^2 + alpha_weight R_alpha(x) + tv_weight R_TV^beta(x)

    (see :func:`inversion_loss` for the normalisation of the priors), from a seeded random start,
    with Adam and a clamp to [0, 1] after each step. x: (N, 3, H, W) in [0, 1].
    Returns ``Inversion(image, feature_error)``: the reconstruction (N, 3, H, W) and the relative
    feature error ||Phi(x*) - Phi0|| / ||Phi0|| (N,) (not squared).
    Notebook: 10_feature_inversion
    """
    check_model(model)
    x = check_images(x)
    steps = check_positive_int(steps, "steps")
    name, _ = resolve_layer(model, layer)
    for key, value in dict(lr=lr, tv_weight=tv_weight, alpha_weight=alpha_weight).items():
        check_nonnegative(value, key)
    if alpha < 1 or beta <= 0:
        raise ValueError(f"expected alpha >= 1 and beta > 0, got alpha={alpha}, beta={beta}")
    x = x.detach().to(model_device(model))
    gen = torch.Generator().manual_seed(seed)
    with preserved(model), forward_to(model, [name], detach=False) as run:
        with torch.no_grad():
            target = run(x)[name].detach().clone()  # Phi0 (N, ...)
        image = (GREY + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1).to(x.device).requires_grad_(True)
        optimizer = torch.optim.Adam([image], lr=lr)
        for _ in progress_bar(range(steps), progress, desc="feature inversion"):
            optimizer.zero_grad()
            loss = inversion_loss(run(image)[name], target, image, tv_weight, alpha_weight, alpha, beta)
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():
                image.clamp_(0, 1)
        with torch.no_grad():
            Phi = run(image)[name]
            error = (Phi - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp_min(1e-12)
    return Inversion(image.detach(), error.detach())
