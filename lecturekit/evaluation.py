"""Scoring explanations: pointing game, localisation error, deletion/insertion, randomisation checks.

ShapesWorld gives every image the mask and the box of its object, so a map can be scored against
the ground truth, and the faithfulness of a map to the model can be measured without it.

Papers:
- Zhang et al. 2016/2018, "Top-down Neural Attention by Excitation Backprop" (pointing game)
- Zhou et al. 2016 (CAM) and Selvaraju et al. 2017 (Grad-CAM): weakly supervised localisation error
- Petsiuk, Das and Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
  Models" (deletion and insertion curves)
- Adebayo et al. 2018, "Sanity Checks for Saliency Maps" (cascading model randomisation)

Notebook: 07_evaluating_explanations
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import (Target, check_baseline, check_images, check_maps, check_positive_int, check_targets,
                   gaussian_blur)
from .hooks import Layer, iterate_batches, model_device, preserved, progress_bar, resolve_layer, target_score

__all__ = ["pointing_game", "map_to_box", "box_iou", "localisation_error", "Curve", "deletion_curve",
           "insertion_curve", "randomisation_check", "RandomisationResult"]


# ---- ground truth: pointing game, localisation ----------------------------------------------------

def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016): a hit when the map's maximum falls on the object.

    maps: (N, H, W); masks: (N, H, W) bool, the object. With ``tolerance`` t (pixels; the paper uses
    15 on ImageNet-sized images) a maximum within distance t of the mask also counts. Ties go to the
    first maximum in row-major order. Returns hits (N,) bool; the accuracy is ``hits.float().mean()``.
    Notebook: 07_evaluating_explanations
    """
    maps = check_maps(maps)
    if not isinstance(masks, torch.Tensor) or masks.shape != maps.shape:
        raise ValueError(f"expected masks of shape {tuple(maps.shape)} like the maps, "
                         f"got {tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}")
    if tolerance < 0:
        raise ValueError(f"expected a tolerance >= 0 pixels, got {tolerance}")
    N, H, W = maps.shape
    masks = masks.to(maps.device).bool()
    peak = maps.flatten(1).argmax(1)  # (N,)
    py, px = peak // W, peak % W
    ys = torch.arange(H, device=maps.device)[None, :, None]
    xs = torch.arange(W, device=maps.device)[None, None, :]
    near = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 <= tolerance ** 2  # (N, H, W)
    return (near & masks).flatten(1).any(1)


def map_to_box(maps: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """The box of the largest connected region where the map is above ``fraction`` of its maximum.

    As in CAM (Zhou et al. 2016: 20% of the max) and Grad-CAM (15%). maps: (N, H, W); returns boxes
    (N, 4) float ``(x0, y0, x1, y1)``, x1/y1 exclusive like ShapesWorld's; zeros when the map has no
    positive value. Connected components: ``scipy.ndimage.label`` (8-connectivity).
    """
    from scipy import ndimage

    maps = check_maps(maps)
    if not 0 < fraction < 1:
        raise ValueError(f"expected a fraction of the maximum in (0, 1), got {fraction}")
    boxes = torch.zeros(len(maps), 4)
    for i, m in enumerate(maps.detach().float().cpu().numpy()):
        top = m.max()
        if top <= 0:
            continue
        labels, count = ndimage.label(m >= fraction * top, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        ys, xs = np.nonzero(labels == 1 + sizes.argmax())
        boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float)
    return boxes.to(maps.device)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired boxes (N, 4) ``(x0, y0, x1, y1)``, x1/y1 exclusive -> (N,)."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] != 4:
        raise ValueError(f"expected two (N, 4) box tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.float(), b.float().to(a.device)
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area = lambda c: (c[:, 2] - c[:, 0]).clamp(min=0) * (c[:, 3] - c[:, 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def localisation_error(maps: torch.Tensor, boxes: torch.Tensor, fraction: float = 0.2,
                       iou: float = 0.5) -> torch.Tensor:
    """Weakly supervised localisation (CAM and Grad-CAM papers): wrong unless the map's box overlaps.

    The box of each map (:func:`map_to_box`, ``fraction`` of the max) is correct when its IoU with
    the true box (N, 4) is at least ``iou``. Returns errors (N,) bool; the error rate is
    ``errors.float().mean()``. The papers' top-1 error also counts a wrong class as an error: pass
    maps of the predicted class and OR the result with ``predicted != label``.
    Notebook: 07_evaluating_explanations
    """
    predicted = map_to_box(maps, fraction)
    return box_iou(predicted, boxes.to(predicted.device)) < iou


# ---- faithfulness: deletion and insertion (Petsiuk et al. 2018) -----------------------------------

@dataclass
class Curve:
    """A deletion or insertion curve: ``scores[n, k]`` after changing ``fractions[k]`` of the pixels.

    fractions: (S + 1,) from 0 to 1; scores: (N, S + 1); auc: (N,) area under the curve (trapezoid
    rule over the fraction in [0, 1]). Deletion: lower is better; insertion: higher is better.
    """

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


def _curve(model, x, target, maps, steps, start, end, output, batch_size, progress, desc) -> Curve:
    """Images go from ``start`` to ``end`` pixel by pixel, most important first (by ``maps``)."""
    N, _, H, W = x.shape
    maps = check_maps(maps, (N, H, W))
    steps = check_positive_int(steps, "steps")
    batch_size = check_positive_int(batch_size, "batch_size")
    device = model_device(model, x.device)
    order = maps.to(device).flatten(1).argsort(dim=1, descending=True, stable=True)  # (N, HW)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(H * W, device=device).expand_as(order))
    rank = rank.view(N, 1, H, W)  # rank[n] = 0 for the most important pixel
    counts = torch.round(torch.linspace(0, H * W, steps + 1, device=device)).long()  # pixels changed
    K = steps + 1
    scores = torch.empty(N, K, device=device, dtype=x.dtype)
    with preserved(model), torch.no_grad():
        n_classes = model(start[:1]).shape[1]
        target = check_targets(target, N, n_classes).to(device)
        for job in progress_bar(iterate_batches(N * K, batch_size), progress, -(-N * K // batch_size), desc):
            j = torch.arange(job.start, job.stop, device=device)
            n, k = j // K, j % K
            changed = rank[n] < counts[k][:, None, None, None]  # (B, 1, H, W)
            s = start if start.shape[0] == 1 else start[n]
            e = end if end.shape[0] == 1 else end[n]
            images = torch.where(changed, e, s)  # (B, 3, H, W)
            scores[n, k] = target_score(model(images), target[n], output)
    fractions = counts.float() / (H * W)
    auc = torch.trapezoid(scores, fractions, dim=1)
    return Curve(fractions.to(x.device), scores.to(x.device), auc.to(x.device))


def deletion_curve(model: nn.Module, x: torch.Tensor, target: Target, maps: torch.Tensor, steps: int = 32,
                   baseline=0.0, output: str = "prob", batch_size: int = 64, progress: bool = True) -> Curve:
    """Deletion (Petsiuk et al. 2018): remove pixels most important first, watch the class probability fall.

    Pixels are replaced by ``baseline`` (black, 0.0, by default) in ``steps`` equal slices of the
    ranking given by ``maps`` (N, H, W). RISE's own code sets removed pixels to zero in the
    *normalised* input, which is the dataset's mean colour, not black; ``baseline=0.45`` (about
    ImageNet's mean grey) comes closer to it, black is the larger, less natural change. A map that finds the evidence makes the curve drop
    fast: a small area under the curve is good. x: (N, 3, H, W) in [0, 1]; returns a :class:`Curve`.
    Notebook: 07_evaluating_explanations
    """
    x = check_images(x)
    xd = x.to(model_device(model, x.device))
    return _curve(model, x, target, maps, steps, xd, check_baseline(baseline, xd), output, batch_size, progress,
                  "deletion")


def insertion_curve(model: nn.Module, x: torch.Tensor, target: Target, maps: torch.Tensor, steps: int = 32,
                    baseline="blur", output: str = "prob", batch_size: int = 64, progress: bool = True) -> Curve:
    """Insertion (Petsiuk et al. 2018): start from a blurred copy and put pixels back, most important first.

    ``baseline``: ``"blur"`` (Gaussian, sigma 5 pixels, with lecturekit's one blur rule: a kernel of
    2 * 15 + 1 pixels cut to fit the image; RISE also uses sigma 5, but with an 11-pixel kernel on
    224-pixel images, a milder blur), a grey level, or an image.
    A good map makes the curve rise fast: a large area under the curve is good. Returns a :class:`Curve`.
    Notebook: 07_evaluating_explanations
    """
    x = check_images(x)
    xd = x.to(model_device(model, x.device))
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(f"expected baseline='blur', a grey level or an image, got {baseline!r}")
        start = gaussian_blur(xd, 5.0)  # (N, 3, H, W)
    else:
        start = check_baseline(baseline, xd).expand_as(xd)
    return _curve(model, x, target, maps, steps, start, xd, output, batch_size, progress, "insertion")


# ---- sanity checks (Adebayo et al. 2018) ----------------------------------------------------------

@dataclass
class RandomisationResult:
    """``correlation[l, n]``: Spearman rank correlation between image n's original map and its map
    after the top ``l + 1`` layers (``layers[: l + 1]``) were re-initialised; ``maps[l]`` those maps."""

    layers: list[str]
    correlation: torch.Tensor
    original: torch.Tensor
    maps: list[torch.Tensor]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    a, b = a.flatten().double().cpu().numpy(), b.flatten().double().cpu().numpy()
    if a.std() == 0 or b.std() == 0:
        return float("nan")  # a constant map has no ranking
    return float(spearmanr(a, b).statistic)


def _reinitialise(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # the layer's own initialisation, as in the paper
        else:
            for p in module.parameters(recurse=False):
                p.normal_(0, float(p.std()) if p.numel() > 1 else 0.01)


def randomisation_check(method, model: nn.Module, x: torch.Tensor, target: Target,
                        layers: list[Layer] | None = None, seed: int = 0,
                        absolute: bool = True, **kwargs) -> RandomisationResult:
    """Cascading model randomisation (Adebayo et al. 2018): does the map change when the weights do?

    ``method(model, x, target, **kwargs)`` makes maps (N, H, W) or (N, 3, H, W). The layers with
    weights (``layers``, by default every module that owns parameters, from the output back to the
    input) are re-initialised one after another, cumulatively, on a copy of the model, and each
    time the maps are compared with the originals by Spearman rank correlation (of absolute values
    with ``absolute=True``, as in the paper's main figures). A method that explains the model gives
    correlations that fall towards 0; one that does not depend on the weights stays high.
    The model passed in is not changed. Returns a :class:`RandomisationResult`.
    Notebook: 07_evaluating_explanations
    """
    x = check_images(x)
    if not callable(method):
        raise TypeError(f"expected method to be a function (model, x, target) -> maps, got {type(method).__name__}")
    if layers is None:
        layers = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][::-1]
    else:
        layers = [resolve_layer(model, layer)[0] for layer in layers]
    if not layers:
        raise ValueError("expected a model with parameters to randomise")
    reduce = (lambda m: m.abs()) if absolute else (lambda m: m)  # noqa: E731
    original = method(model, x, target, **kwargs).detach()
    shadow = copy.deepcopy(model)  # the model passed in is never touched
    modules = dict(shadow.named_modules())
    correlation = torch.empty(len(layers), len(x), device=x.device)  # (L, N), on the input's device (contract 4)
    maps = []
    with preserved(shadow):
        for l, name in enumerate(layers):
            _reinitialise(modules[name], seed + l)
            m = method(shadow, x, target, **kwargs).detach()
            maps.append(m)
            for n in range(len(x)):
                correlation[l, n] = _spearman(reduce(original[n]), reduce(m[n]))
    return RandomisationResult(layers, correlation, original, maps)
