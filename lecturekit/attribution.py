"""Which pixels matter: occlusion, saliency, guided backprop, deconvnet, CAM, Grad-CAM, Shapley values.

Every function takes pixel-space images ``x`` (N, 3, H, W) in [0, 1] and a class ``target`` (an int
or a LongTensor (N,)), and returns a detached map on the input's device: (N, H, W) at input
resolution unless noted. Maps are returned *unscaled* (no per-image min-max): the sanity checks of
notebook 07 need the magnitudes. The model is left as found (``lecturekit.hooks.preserved``).

Papers:
- Zeiler and Fergus 2014, "Visualizing and Understanding Convolutional Networks" (occlusion, deconvnet)
- Simonyan, Vedaldi and Zisserman 2014, "Deep Inside Convolutional Networks" (saliency, segmentation)
- Springenberg et al. 2015, "Striving for Simplicity: The All Convolutional Net" (guided backprop)
- Zhou et al. 2016, "Learning Deep Features for Discriminative Localization" (CAM)
- Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks" (Grad-CAM, guided Grad-CAM)
- Strumbelj and Kononenko 2014, "Explaining prediction models and individual predictions with feature
  contributions" (Shapley value sampling by permutations)

Notebooks: 04_occlusion_saliency, 05_guided_backprop, 06_cam_gradcam
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from contextlib import nullcontext

from .data import (Target, check_baseline, check_channel, check_images, check_maps, check_positive_int,
                   check_targets, gaussian_blur)
from .hooks import (Layer, ReluRule, capture, iterate_batches, model_device, preserved, progress_bar, relu_backward,
                    resolve_layer, target_score)

__all__ = ["occlusion", "occlusion_positions", "gradient", "saliency", "guided_relu", "deconvnet_relu",
           "guided_backprop", "deconvnet", "cam", "class_score_maps", "grad_cam", "guided_grad_cam", "shapley", "saliency_to_mask",
           "mask_iou"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"expected {name} as an int or a pair of ints, got a bool")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise TypeError(f"expected {name} as an int or a pair of ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


# ---- occlusion (Zeiler and Fergus 2014) -----------------------------------------------------------

def occlusion_positions(size: tuple[int, int], patch, stride) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the patch positions on an image of ``size`` (H, W).

    Positions step by ``stride`` from 0; a last position flush with the bottom/right edge is added
    when the stride does not land there, so that every pixel is covered at least once.
    """
    (H, W), (ph, pw), (sh, sw) = size, _pair(patch, "patch"), _pair(stride, "stride")
    if ph < 1 or pw < 1 or ph > H or pw > W:
        raise ValueError(f"expected a patch between 1x1 and the image size {H}x{W}, got {ph}x{pw}")
    if sh < 1 or sw < 1:
        raise ValueError(f"expected a positive stride, got {(sh, sw)}")
    ys = list(range(0, H - ph + 1, sh))
    xs = list(range(0, W - pw + 1, sw))
    ys += [H - ph] if ys[-1] != H - ph else []
    xs += [W - pw] if xs[-1] != W - pw else []
    return [(y, x) for y in ys for x in xs]


def occlusion(model: nn.Module, x: torch.Tensor, target: Target, patch=8, stride=4, baseline=0.0,
              output: str = "score", batch_size: int = 64, progress: bool = True,
              incremental: bool | None = None) -> torch.Tensor:
    """Occlusion sensitivity (Zeiler and Fergus 2014): how much the target's score drops when a patch is hidden.

    A patch of ``baseline`` (a grey level in [0, 1] or an image) slides over the image with ``stride``;
    for each position p the drop is ``d_p = f_c(x) - f_c(x with patch p occluded)``, and each pixel's
    value is the mean of d_p over all positions p whose patch covers it. ``output``: ``"score"``
    (raw class score) or ``"prob"`` (softmax probability, as in the paper's figures).

    The occluded copies are made batch by batch (``batch_size`` copies at a time, images and
    positions together), so memory does not grow with the number of positions, and the result does
    not depend on ``batch_size``.

    ``incremental``: recompute for each copy only the cone of influence of its patch, from the clean
    image's cached activations (Nakandala et al. 2019; :mod:`lecturekit.incremental`): the same map,
    up to float32 round-off, several times faster. None (the default) uses it where the model allows
    and otherwise runs the plain method (with a one-line warning when a layer is unknown to it);
    True insists (ValueError naming the layer it cannot run); False always runs the plain method.

    x: (N, 3, H, W) in [0, 1]; returns (N, H, W), positive where hiding a pixel lowers the score.
    Notebook: 04_occlusion_saliency
    """
    x = check_images(x)
    N, _, H, W = x.shape
    ph, pw = _pair(patch, "patch")
    corners = occlusion_positions((H, W), (ph, pw), stride)  # P positions (y, x), row-major grid
    batch_size = check_positive_int(batch_size, "batch_size")
    device = model_device(model, x.device)
    xd = x.to(device)
    base = check_baseline(baseline, xd).expand(N, 3, H, W)  # (N, 3, H, W), a view
    P = len(corners)
    with preserved(model), torch.no_grad():
        scores = model(xd)  # (N, K)
        target = check_targets(target, N, scores.shape[1]).to(device)
        s0 = target_score(scores, target, output)  # (N,)
        drops = torch.empty(N * P, device=device, dtype=s0.dtype)  # d_p for every image and position
        engine = _incremental_model(model, incremental, xd[:1], corners, (ph, pw), base[:1])
        if engine is not None:  # image by image: the clean activations of one image cached at a time
            for i in range(N):
                engine.prepare(xd[i:i + 1])
                jobs = iterate_batches(P, batch_size)
                for job in progress_bar(jobs, progress, -(-P // batch_size), f"occlusion (incremental) {i + 1}/{N}"):
                    scores = engine.scores(corners[job], (ph, pw), base[i:i + 1])  # (B, K)
                    drops[i * P + job.start:i * P + job.stop] = s0[i] - target_score(scores, target[i].expand(len(scores)), output)
        jobs = iterate_batches(N * P, batch_size) if engine is None else []
        for job in progress_bar(jobs, progress, -(-N * P // batch_size), "occlusion"):
            n = torch.arange(job.start, job.stop, device=device) // P  # which image
            copies = xd[n]  # (B, 3, H, W), made here, never all at once
            for b, j in enumerate(range(job.start, job.stop)):  # paste the patches: slices, no masks
                (y0, x0), i = corners[j % P], j // P
                copies[b, :, y0:y0 + ph, x0:x0 + pw] = base[i, :, y0:y0 + ph, x0:x0 + pw]
            drops[job] = s0[n] - target_score(model(copies), target[n], output)  # (B,)
        # Spread the drops back to pixels. The positions form a grid ys x xs and the patch at
        # (y, x) is rows(y) x cols(x), so sum_p d_p [pixel in patch p] = R^T D C with R (ny, H) and
        # C (nx, W) the row and column indicators: two small matrix products, no (P, H, W) tensor.
        ys, xs = sorted({c[0] for c in corners}), sorted({c[1] for c in corners})
        i, j = torch.arange(H, device=device), torch.arange(W, device=device)
        y_, x_ = torch.tensor(ys, device=device)[:, None], torch.tensor(xs, device=device)[:, None]
        R = ((i >= y_) & (i < y_ + ph)).to(drops.dtype)  # (ny, H)
        C = ((j >= x_) & (j < x_ + pw)).to(drops.dtype)  # (nx, W)
        D = drops.view(N, len(ys), len(xs))  # (N, ny, nx)
        total = torch.einsum("yh,nyx,xw->nhw", R, D, C)  # (N, H, W) summed drops over covering patches
        count = R.sum(0)[:, None] * C.sum(0)[None, :]  # (H, W) positions covering each pixel
    return (total / count).to(x.device)


def _incremental_model(model: nn.Module, incremental: bool | None, x, corners, patch, base):
    """The model read for incremental occlusion, or None for the plain method (``incremental`` as in occlusion).

    With ``incremental=None`` a probe of a few positions of the first image must show at least 1.5x
    fewer multiply-adds than the plain method (a small image, whose cones soon cover whole maps, may not).
    """
    from . import incremental as inc  # its own module: a graph interpreter, not a technique of the lecture

    if incremental is False:
        return None
    if incremental not in (None, True):
        raise TypeError(f"expected incremental to be True, False or None, got {incremental!r}")
    try:
        engine = inc.IncrementalModel(model)
        if incremental is None:
            probe = corners[::max(1, len(corners) // 4)][:4]  # spread over the image
            engine.prepare(x)
            engine.scores(probe, patch, base)
            if engine.macs * 1.5 > engine.full_macs * len(probe):
                return None
            engine.macs = 0
        return engine
    except inc.Unsupported as err:
        if incremental:
            raise ValueError(f"incremental occlusion cannot run this model: {err}") from err
        if "nothing to gain" not in str(err):
            warnings.warn(f"occlusion: plain method, not incremental: {err}", stacklevel=3)
        return None


# ---- gradients: saliency, guided backprop, deconvnet (Simonyan 2014, Springenberg 2015) -----------

def gradient(model: nn.Module, x: torch.Tensor, target: Target | None = None, layer: Layer | None = None,
             channel: int | None = None, position: tuple[int, int] | None = None,
             rule: ReluRule | None = None) -> torch.Tensor:
    """The plain, signed input gradient ``d S_target / d x`` (N, 3, H, W), or of one neuron.

    The objective is the target's raw class score S_target (before the softmax, not the loss), or
    with ``layer`` and ``channel`` one neuron of an intermediate layer: the activation at ``position``
    (y, x) of that channel, by default the position where the channel is largest in each image.
    ``rule``: a ReLU backward rule ``(f_positive, R) -> R_l`` (:func:`guided_relu`,
    :func:`deconvnet_relu`); None is ordinary backpropagation. Images are independent: one backward
    pass for the batch. x: (N, 3, H, W) in [0, 1]; returns (N, 3, H, W), signed.
    Notebook: 04_occlusion_saliency
    """
    x = check_images(x)
    N = len(x)
    if layer is not None:
        resolve_layer(model, layer)
        if target is not None:
            raise ValueError("expected either a target class or a neuron (layer=, channel=), not both")
        if channel is None:
            raise ValueError("expected a channel with layer=...: the neuron is (layer, channel[, position])")
    device = model_device(model, x.device)
    with preserved(model):
        xg = x.detach().to(device).clone().requires_grad_(True)
        rules = relu_backward(model, rule) if rule is not None else nullcontext()
        with rules, capture(model, [layer] if layer is not None else [], detach=False) as acts:
            scores = model(xg)  # (N, K)
            if layer is None:
                if target is None:
                    raise ValueError("expected a target class (or layer= and channel= for a neuron)")
                target = check_targets(target, N, scores.shape[1]).to(device)
                objective = target_score(scores, target)  # (N,) raw class scores, before softmax
            else:
                name, _ = resolve_layer(model, layer)
                objective = _neuron(acts[name], channel, position, name)  # (N,)
            (grad,) = torch.autograd.grad(objective.sum(), xg)  # (N, 3, H, W)
    return grad.detach().to(x.device)


def _neuron(A: torch.Tensor, channel: int, position=None, layer: str | None = None) -> torch.Tensor:
    """One activation per image from A (N, C, h, w) (or (N, C)): channel at position, default its max."""
    if not isinstance(channel, int):
        raise TypeError(f"expected an integer channel index, got {channel!r}")
    check_channel(channel, A.shape[1], layer)
    a = A[:, channel]  # (N, h, w) or (N,)
    if a.dim() == 1:
        return a
    a = a.flatten(1)  # (N, h*w)
    h, w = A.shape[2:]
    if position is None:
        index = a.detach().argmax(1)  # the strongest activation of the channel in each image
    else:
        y, x_ = position
        if not (0 <= y < h and 0 <= x_ < w):
            raise ValueError(f"expected a position (y, x) inside the layer's {h}x{w} maps, got {position}")
        index = torch.full((len(a),), y * w + x_, device=a.device)
    return a.gather(1, index[:, None])[:, 0]


def saliency(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """Saliency map (Simonyan et al. 2014): ``M_ij = max_c |d S_target / d x_cij|``.

    S is the raw class score (before the softmax, not the loss); the absolute gradient is reduced by
    the maximum over the colour channels. x: (N, 3, H, W) in [0, 1]; returns (N, H, W) >= 0.
    Notebook: 04_occlusion_saliency
    """
    grad = gradient(model, x, target)  # (N, 3, H, W)
    return grad.abs().amax(1)  # (N, H, W)


def guided_relu(f_positive: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation's ReLU rule (Springenberg et al. 2015, Fig. 1): ``R_l = (f_l > 0)(R_{l+1} > 0) R_{l+1}``.

    f_positive: the forward mask (f_l > 0) of the ReLU's input; R: the gradient from above.
    """
    return f_positive * (R > 0) * R


def deconvnet_relu(f_positive: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The deconvnet's ReLU rule (Zeiler and Fergus 2014): ``R_l = (R_{l+1} > 0) R_{l+1}``, the forward mask ignored."""
    return (R > 0) * R


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target | None = None, layer: Layer | None = None,
                    channel: int | None = None, position: tuple[int, int] | None = None) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): at every ReLU, ``R_l = (f_l > 0)(R_{l+1} > 0) R_{l+1}``.

    The gradient of the target's raw class score, or of one neuron (``layer``, ``channel``, and
    ``position`` (y, x) in that layer's maps, by default where the channel is largest), with respect
    to the pixels, with every nn.ReLU's backward replaced by :func:`guided_relu`. In-place ReLUs work
    (``lecturekit.hooks.relu_backward``). x: (N, 3, H, W) in [0, 1]; returns (N, 3, H, W), signed.
    Notebook: 05_guided_backprop
    """
    return gradient(model, x, target, layer, channel, position, rule=guided_relu)


def deconvnet(model: nn.Module, x: torch.Tensor, target: Target | None = None, layer: Layer | None = None,
              channel: int | None = None, position: tuple[int, int] | None = None) -> torch.Tensor:
    """Deconvnet (Zeiler and Fergus 2014) as a backward rule: at every ReLU, ``R_l = (R_{l+1} > 0) R_{l+1}``.

    The forward mask (f > 0) is ignored (:func:`deconvnet_relu`); max-pooling switches and transposed
    convolutions are what the ordinary gradient already does. Arguments as in :func:`guided_backprop`;
    returns (N, 3, H, W).
    Notebook: 05_guided_backprop
    """
    return gradient(model, x, target, layer, channel, position, rule=deconvnet_relu)


# ---- CAM (Zhou et al. 2016) and Grad-CAM (Selvaraju et al. 2017) ----------------------------------

_CAM_LAYERS = [("features.10", "classifier"), ("layer4", "fc")]  # CourseNet, torchvision ResNets


def _upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear as in both papers."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _cam_layers(model: nn.Module, layer: Layer | None, fc: Layer | None) -> tuple[str, nn.Linear, str]:
    """The last feature maps' name, the linear layer after the global pooling and its name."""
    names = dict(model.named_modules())
    if layer is None or fc is None:
        found = [pair for pair in _CAM_LAYERS if pair[0] in names and pair[1] in names]
        if not found:
            raise ValueError("cannot tell which layers feed the global pooling: pass layer= "
                             "(the last feature maps) and fc= (the linear layer after the pooling)")
        layer, fc = (layer or found[0][0]), (fc or found[0][1])
    layer, _ = resolve_layer(model, layer)
    fc_name, linear = resolve_layer(model, fc)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"expected fc to be an nn.Linear layer, got {type(linear).__name__} ({fc_name!r})")
    return layer, linear, fc_name


def _score_maps(model: nn.Module, x: torch.Tensor, layer: str, linear: nn.Linear, fc_name: str):
    """Scores (N, K) and the linear layer applied at every position of A: (N, K, h, w) without bias.

    Checks that the scores are a global average or max pooling of these maps plus the bias.
    """
    device = model_device(model, x.device)
    with capture(model, [layer]) as acts:
        scores = model(x.to(device))  # (N, K)
    A = acts[layer]  # (N, C, h, w)
    if A.dim() != 4 or A.shape[1] != linear.in_features:
        raise ValueError(f"expected {layer!r} to give (N, {linear.in_features}, h, w) maps for {fc_name!r}, "
                         f"got {tuple(A.shape)}")
    M = torch.einsum("kc,nchw->nkhw", linear.weight, A)  # (N, K, h, w): M_c(i, j) = sum_k w_k^c A_k(i, j)
    bias = linear.bias if linear.bias is not None else 0  # (K,)
    # GAP: mean_ij M_c = S_c - b_c exactly. GMP (the CAM paper's comparison): S_c = sum_k w_k^c max_ij A_k + b_c.
    gap = M.mean((2, 3)) + bias  # (N, K)
    gmp = linear(A.amax((2, 3)))  # (N, K)
    if not (torch.allclose(gap, scores, rtol=1e-3, atol=1e-3) or torch.allclose(gmp, scores, rtol=1e-3, atol=1e-3)):
        raise ValueError(f"the model is not global pooling + linear after {layer!r}: the class scores are "
                         f"neither the mean nor the max-pooled features through {fc_name!r}; use grad_cam")
    return scores, M


def cam(model: nn.Module, x: torch.Tensor, target: Target, layer: Layer | None = None, fc: Layer | None = None, upsample: bool = True) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016): ``M_c(i, j) = sum_k w_k^c A_k(i, j)``.

    For networks whose score is ``S_c = sum_k w_k^c GAP(A_k) + b_c``: A (N, C, h, w) are the last
    feature maps (``layer``) and w the weights of the linear layer ``fc``. Then GAP(M_c) = S_c - b_c
    exactly, which is checked: a model of another shape raises ValueError. The paper computes the same
    map for its global *max* pooling networks (Table 2), so ``S_c = sum_k w_k^c max_ij A_k + b_c`` is
    accepted too (``course_model(weights="gmp")``). Defaults: CourseNet (``features.10``,
    ``classifier``) and torchvision ResNets (``layer4``, ``fc``).
    Returns (N, H, W) upsampled bilinearly, or (N, h, w) with ``upsample=False``; no ReLU, unscaled.
    Notebook: 06_cam_gradcam
    """
    x = check_images(x)
    layer, linear, fc_name = _cam_layers(model, layer, fc)
    with preserved(model), torch.no_grad():
        scores, maps = _score_maps(model, x, layer, linear, fc_name)  # (N, K), (N, K, h, w)
        target = check_targets(target, len(x), scores.shape[1]).to(maps.device)
        M = maps[torch.arange(len(x), device=maps.device), target]  # (N, h, w) the target class's map
    return (_upsample(M, x.shape[2:]) if upsample else M).to(x.device)


def class_score_maps(model: nn.Module, x: torch.Tensor, layer: Layer | None = None,
                     fc: Layer | None = None) -> torch.Tensor:
    """The network run fully convolutionally: the class scores at every position, (N, K, h, w).

    ``S_c(i, j) = sum_k w_k^c A_k(i, j) + b_c``: the linear layer ``fc`` after the global pooling applied
    to the feature vector of every position of ``layer`` (N, C, h, w), before pooling. On a larger
    image than the training size, this gives one score map per class, as the CAM paper's 451x451
    AlexNet gives an 8x8 map (Zhou et al. 2016; Long, Shelhamer and Darrell 2015 for fully
    convolutional networks). For a GAP network the mean of the maps over positions is the model's
    scores. Not upsampled: h x w is the layer's grid.
    Notebook: 06_cam_gradcam
    """
    x = check_images(x)
    layer, linear, fc_name = _cam_layers(model, layer, fc)
    with preserved(model), torch.no_grad():
        _, M = _score_maps(model, x, layer, linear, fc_name)  # (N, K, h, w)
        S = M + (linear.bias[None, :, None, None] if linear.bias is not None else 0)  # S_c(i, j)
    return S.to(x.device)


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target, layer: Layer, relu: bool = True,
             upsample: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k alpha_k^c A_k)``, ``alpha_k^c = mean_ij dS_c/dA_k(i, j)``.

    A (N, C, h, w) is the output of ``layer`` and S_c the raw class score. ``relu=False`` drops the
    paper's ReLU (to see the negative evidence). Returns (N, H, W) upsampled bilinearly to the input
    size, or (N, h, w) with ``upsample=False``; unscaled. On a GAP + linear network at its last
    feature maps, ``grad_cam = ReLU(cam) / (h * w)``.
    Notebook: 06_cam_gradcam
    """
    x = check_images(x)
    name, _ = resolve_layer(model, layer)
    device = model_device(model, x.device)
    with preserved(model), capture(model, [name], detach=False) as acts:  # A stays in the graph
        # Parameters are frozen: the input must require grad for A to be part of a graph.
        scores = model(x.detach().to(device).requires_grad_(True))  # (N, K)
        target = check_targets(target, len(x), scores.shape[1]).to(device)
        A = acts[name]  # (N, C, h, w)
        if A.dim() != 4:
            raise ValueError(f"expected {name!r} to give feature maps (N, C, h, w), got {tuple(A.shape)}")
        (dA,) = torch.autograd.grad(target_score(scores, target).sum(), A)  # backward to A only, not to x
        alpha = dA.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        M = (alpha * A).sum(1).detach()  # (N, h, w)
    M = M.clamp(min=0) if relu else M
    return (_upsample(M, x.shape[2:]) if upsample else M).to(x.device)


def guided_grad_cam(model: nn.Module, x: torch.Tensor, target: Target, layer: Layer) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop times the upsampled Grad-CAM, (N, 3, H, W).

    Notebook: 06_cam_gradcam
    """
    return guided_backprop(model, x, target) * grad_cam(model, x, target, layer)[:, None]


# ---- Shapley values of patches (Strumbelj and Kononenko 2014) -------------------------------------

def shapley(model: nn.Module, x: torch.Tensor, target: Target, patch=8, samples: int = 32, seed: int = 0,
            baseline=0.0, output: str = "score", per_patch: bool = False, batch_size: int = 64,
            progress: bool = True) -> torch.Tensor:
    """Shapley values of image patches, estimated by permutation sampling.

    The players are the patches of a grid (``patch`` pixels, the last row/column may be smaller);
    a coalition S is the image with the patches outside S replaced by ``baseline``. For each of
    ``samples`` random orders, the patches are switched on one after another and each gets its
    marginal contribution ``f(S + {i}) - f(S)``; the estimate is the mean over the orders. Each order
    telescopes, so the values always sum to ``f(x) - f(baseline)`` (efficiency); a patch the model
    ignores gets exactly 0. ``seed`` fixes the orders.

    x: (N, 3, H, W) in [0, 1]. Returns (N, H, W), each pixel holding its patch's value, or with
    ``per_patch=True`` the values on the grid, (N, gh, gw). Cost: samples * (gh*gw + 1) forward passes.
    Notebook: 04_occlusion_saliency
    """
    x = check_images(x)
    N, _, H, W = x.shape
    ph, pw = _pair(patch, "patch")
    if ph < 1 or pw < 1 or ph > H or pw > W:
        raise ValueError(f"expected a patch between 1x1 and the image size {H}x{W}, got {ph}x{pw}")
    samples = check_positive_int(samples, "samples")
    batch_size = check_positive_int(batch_size, "batch_size")
    gh, gw = -(-H // ph), -(-W // pw)
    D = gh * gw  # players
    device = model_device(model, x.device)
    xd = x.to(device)
    base = check_baseline(baseline, xd)
    # Which player owns each pixel: (H, W) in [0, D).
    owner = (torch.arange(H, device=device)[:, None] // ph) * gw + torch.arange(W, device=device)[None] // pw
    gen = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.randperm(D, generator=gen) for _ in range(N * samples)])  # (N*samples, D)
    # rank[o, i]: when player i is switched on in order o; coalition k holds players with rank < k.
    rank = torch.empty_like(orders).scatter_(1, orders, torch.arange(D).expand_as(orders)).to(device)
    K = D + 1  # coalitions per order: empty, ..., all
    with preserved(model), torch.no_grad():
        n_classes = model(xd[:1]).shape[1]
        target = check_targets(target, N, n_classes).to(device)
        f = torch.empty(N * samples, K, device=device, dtype=x.dtype)  # f(coalition k of order o)
        jobs = iterate_batches(N * samples * K, batch_size)
        for job in progress_bar(jobs, progress, -(-N * samples * K // batch_size), "shapley"):
            j = torch.arange(job.start, job.stop, device=device)
            o, k = j // K, j % K  # order, coalition size
            n = o // samples
            on = rank[o][:, owner] < k[:, None, None]  # (B, H, W) pixels of switched-on players
            b = base if base.shape[0] == 1 else base[n]
            images = torch.where(on[:, None], xd[n], b)  # (B, 3, H, W)
            f[o, k] = target_score(model(images), target[n], output)
        # marginal contribution of the player switched on at step k: f[k+1] - f[k]
        marginal = f[:, 1:] - f[:, :-1]  # (N*samples, D), by step
        by_player = marginal.gather(1, rank)  # (N*samples, D), by player
        values = by_player.view(N, samples, D).mean(1)  # (N, D)
    if per_patch:
        return values.view(N, gh, gw).to(x.device)
    return values[:, owner].to(x.device)  # (N, H, W)


# ---- saliency to segmentation (Simonyan et al. 2014, section 3.1) --------------------------------

def saliency_to_mask(maps: torch.Tensor, quantile: float = 0.8, sigma: float = 0.0) -> torch.Tensor:
    """A foreground mask from a map: the pixels above the map's ``quantile`` (per image), (N, H, W) bool.

    A simple stand-in for the paper's GrabCut step. Simonyan et al. (2014, Sec. 3.1) seed GrabCut's
    colour models with the pixels above the map's 95% quantile (foreground) and below its 30% quantile
    (background) and let GrabCut label the rest by colour; here one threshold, ``quantile``, labels
    every pixel, with no colour model.
    ``sigma`` > 0 first smooths the map with a Gaussian (torchvision), which saliency maps need.
    Notebook: 04_occlusion_saliency
    """
    maps = check_maps(maps)
    if not 0 <= quantile < 1:
        raise ValueError(f"expected a quantile in [0, 1), got {quantile}")
    maps = gaussian_blur(maps.float(), sigma)  # (N, H, W); sigma=0 leaves the map as it is
    flat = maps.flatten(1).float()
    level = torch.quantile(flat, quantile, dim=1)  # (N,)
    return maps > level[:, None, None]


def mask_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Intersection over union of two (N, H, W) bool masks, per image, (N,); 0 when both are empty."""
    if pred.shape != true.shape or pred.dim() != 3:
        raise ValueError(f"expected two (N, H, W) masks of the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    pred, true = pred.bool(), true.to(pred.device).bool()
    inter = (pred & true).flatten(1).sum(1).float()
    union = (pred | true).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
