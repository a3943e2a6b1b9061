"""Texture and style: Gram matrices, texture synthesis, style transfer, fast (feed-forward) style transfer.

* **The Gram matrix** of a layer's features F (N, C, M), M = h w positions, is G = F F^T / M: which
  channels fire together, averaged over all positions, so that *where* things are is thrown away and
  only *what* co-occurs is kept (Gatys, Ecker and Bethge 2015, "Texture Synthesis Using Convolutional
  Neural Networks").
* **Texture synthesis** starts from seeded noise and matches the Gram matrices of a texture at several
  layers: L = sum_l w_l E_l, with E_l = 1 / (4 C_l^2) sum_ij (G_l - G^_l)_ij^2. With this Gram matrix
  (divided by M_l) E_l is exactly the paper's 1 / (4 N_l^2 M_l^2) sum (G - G^)^2 of the unnormalised
  one, and does not depend on the image size: a texture can be synthesised larger than its sample.
* **Style transfer** (Gatys, Ecker and Bethge 2016, "Image Style Transfer Using Convolutional Neural
  Networks"): L_total = content_weight L_content + style_weight L_style + tv_weight R_TV, where
  L_content is the mean squared difference of the features at one layer (the paper's
  1/2 sum (F - P)^2, divided by the number of entries, as in Johnson et al. 2016, so that the weights
  do not depend on the layer or the image size).
* **Fast style transfer** (Johnson, Alahi and Fei-Fei 2016, "Perceptual Losses for Real-Time Style
  Transfer and Super-Resolution"): a small feed-forward transformer network, with instance
  normalisation (Ulyanov, Vedaldi and Lempitsky 2016, "Instance Normalization: The Missing Ingredient
  for Fast Stylization"), is trained with the same losses on many content images, then stylises an
  image in one forward pass. ``lecturekit train-style`` reproduces the bundled network.

**Which features, offline.** The papers use ImageNet VGG-19. Without its weights, the course uses a
shallow network of *random* filters at several scales (Ustyuzhaninov, Brendel, Gatys and Bethge 2017,
"What does it take to generate natural textures?"), which already synthesises convincing textures:
:func:`random_feature_net`. :func:`feature_net` gives VGG when its weights are in torch's cache and
falls back to the random network, saying so, otherwise: stand-in (random) VGG weights are never used.

Texture quality is measured by statistics the synthesis does not optimise: the Gram distance under an
independently seeded random network (:func:`texture_distance`), the distance of the power spectra
(:func:`spectrum_distance`) and of the colour histograms (:func:`histogram_distance`).

Every image is (N, 3, H, W) in [0, 1] (DESIGN.md, contract 1); every optimisation leaves the model as
found (contract 5), takes ``seed=``, ``steps=`` and ``progress=``, and validates its input.

Notebooks: 11_texture_synthesis, 12_style_transfer, 13_fast_style_transfer
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import check_images, sample_image
from .hooks import Layer, forward_to, model_device, preserved, progress_bar, resolve_layer
from .models import Normalize

__all__ = [
    "gram", "content_loss", "layer_style_loss", "style_loss", "tv_loss",
    "RandomFeatureNet", "random_feature_net", "feature_net", "vgg_cached", "VGG_LAYERS", "COURSE_LAYERS",
    "Synthesis", "texture_synthesis", "style_transfer",
    "texture_distance", "spectrum_distance", "histogram_distance", "shuffle_pixels", "noise_like",
    "TransformerNet", "stylize", "fast_style_model", "train_fast_style", "training_crops",
    "FAST_STYLE_PATH", "FAST_STYLE_RECIPE", "TRAIN_IMAGES", "HELD_OUT_IMAGES",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------
# The losses: Gram matrix, content, style, total variation (one value per image)
# ---------------------------------------------------------------------------------------------------


def _check_features(F_: torch.Tensor, what: str = "features") -> torch.Tensor:
    if not isinstance(F_, torch.Tensor):
        raise TypeError(f"expected {what} to be a torch.Tensor (N, C, h, w) or (N, C, M), got {type(F_).__name__}")
    if F_.dim() not in (3, 4) or F_.shape[0] == 0 or F_.shape[1] == 0:
        raise ValueError(f"expected {what} of shape (N, C, h, w) or (N, C, M), got {tuple(F_.shape)}")
    return F_


def gram(F: torch.Tensor) -> torch.Tensor:
    """The Gram matrix G = F F^T / M of features F (N, C, h, w) or (N, C, M), M = h w: (N, C, C).

    G[n, i, j] = 1/M sum_k F[n, i, k] F[n, j, k], the co-occurrence of channels i and j averaged over
    the M positions (the lecture's "average over all HW pairs of vectors"; Gatys et al. 2015 sum
    instead, and divide by M^2 in the loss, which gives the same E_l). Notebook: 11_texture_synthesis
    """
    F = _check_features(F, "features F").flatten(2)  # (N, C, M)
    return F @ F.transpose(1, 2) / F.shape[-1]  # (N, C, C)


def content_loss(features: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """L_content = 1 / (C h w) sum (F - P)^2 per image: (N,) (Gatys et al. 2016, eq. 1, as a mean).

    features F: (N, C, h, w) of the image being optimised at the content layer; content P: the content
    image's features there, (N, ...) or (1, ...) for one content image. Notebook: 12_style_transfer
    """
    _check_features(features)
    if content.shape[1:] != features.shape[1:] or content.shape[0] not in (1, features.shape[0]):
        raise ValueError(f"expected content features of shape (1 or {features.shape[0]}, "
                         f"{', '.join(map(str, features.shape[1:]))}), got {tuple(content.shape)}")
    return (features - content).pow(2).flatten(1).mean(1)  # (N,)


def layer_style_loss(features: torch.Tensor, target_gram: torch.Tensor) -> torch.Tensor:
    """E_l = 1 / (4 C^2) sum_ij (G_ij - G^_ij)^2 per image, G = gram(features): (N,).

    features: (N, C, h, w) of the image being optimised; target_gram G^: (N or 1, C, C).
    Notebook: 11_texture_synthesis
    """
    G = gram(features)  # (N, C, C)
    C = G.shape[-1]
    if target_gram.shape[-2:] != (C, C) or target_gram.dim() != 3 or target_gram.shape[0] not in (1, G.shape[0]):
        raise ValueError(f"expected a target Gram matrix of shape (1 or {G.shape[0]}, {C}, {C}), "
                         f"got {tuple(target_gram.shape)}")
    return (G - target_gram).pow(2).sum((1, 2)) / (4 * C * C)  # (N,)


def _layer_weights(names: Sequence[str], layer_weights) -> dict[str, float]:
    """None (equal weights 1/L), a mapping name -> weight, or a sequence in the order of ``names``."""
    if layer_weights is None:
        return {name: 1.0 / len(names) for name in names}
    if isinstance(layer_weights, Mapping):
        missing = [n for n in names if n not in layer_weights]
        extra = [n for n in layer_weights if n not in names]
        if missing or extra:
            raise ValueError(f"expected one weight per style layer {list(names)}; "
                             f"missing {missing}, not a style layer {extra}")
        weights = {n: layer_weights[n] for n in names}
    else:
        weights = list(layer_weights)
        if len(weights) != len(names):
            raise ValueError(f"expected {len(names)} layer weights (one per style layer {list(names)}), "
                             f"got {len(weights)}")
        weights = dict(zip(names, weights))
    for name, w in weights.items():
        if not isinstance(w, numbers.Number) or w < 0:
            raise ValueError(f"expected layer weights >= 0, got {w!r} for {name!r}")
    return {n: float(w) for n, w in weights.items()}


def style_loss(features: Mapping[str, torch.Tensor], target_grams: Mapping[str, torch.Tensor],
               layer_weights=None) -> torch.Tensor:
    """L_style = sum_l w_l E_l over the style layers (Gatys et al. 2015, eq. 5): (N,).

    features: layer name -> (N, C_l, h_l, w_l) of the image being optimised; target_grams: layer name
    -> G^_l (N or 1, C_l, C_l) of the style (its keys are the style layers); layer_weights w_l: None
    (equal, 1/L each), a mapping name -> weight, or a sequence in the order of ``target_grams``.
    Notebook: 11_texture_synthesis
    """
    names = list(target_grams)
    if not names:
        raise ValueError("expected at least one style layer (target_grams is empty)")
    missing = [n for n in names if n not in features]
    if missing:
        raise ValueError(f"no features given for the style layers {missing}; got {list(features)}")
    w = _layer_weights(names, layer_weights)
    return sum(w[name] * layer_style_loss(features[name], target_grams[name]) for name in names)  # (N,)


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation per pixel, loop-free (Johnson et al. 2016, Mahendran and Vedaldi 2015): (N,).

        R_TV(x) = 1 / (H W) [ sum_{c,i,j} (x[c, i, j+1] - x[c, i, j])^2 + sum_{c,i,j} (x[c, i+1, j] - x[c, i, j])^2 ]

    over every pair of horizontal and every pair of vertical neighbours. Divided by the number of
    pixels H W so that ``tv_weight`` does not depend on the image size. x: (N, C, H, W).
    Notebook: 12_style_transfer
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    dx = x[..., :, 1:] - x[..., :, :-1]  # (N, C, H, W-1) horizontal neighbours
    dy = x[..., 1:, :] - x[..., :-1, :]  # (N, C, H-1, W) vertical neighbours
    return (dx.pow(2).flatten(1).sum(1) + dy.pow(2).flatten(1).sum(1)) / (x.shape[-2] * x.shape[-1])  # (N,)


# ---------------------------------------------------------------------------------------------------
# Feature networks: random multi-scale filters (offline), VGG (when cached), the course model
# ---------------------------------------------------------------------------------------------------


class _Scale(nn.Module):
    """One scale: downsample the image by ``down``, then k x k random filters and a ReLU."""

    def __init__(self, down: int, kernel: int, channels: int):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(3, channels, kernel, padding=kernel // 2, padding_mode="replicate")
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down > 1:
            # Antialiased (triangle-filter) downsampling: block averages would make blocky gradients.
            x = F.interpolate(x, scale_factor=1 / self.down, mode="bilinear", antialias=True,
                              align_corners=False)  # (N, 3, H/d, W/d)
        return self.relu(self.conv(x))  # (N, C, H/d, W/d)

    def extra_repr(self) -> str:
        return f"down={self.down}"


RANDOM_SCALES = ((1, 3), (2, 5), (4, 5), (8, 5), (16, 5))
"""(downsampling, kernel size) of each scale of :func:`random_feature_net`: receptive fields of
3, 10, 20, 40 and 80 pixels (the filters of Ustyuzhaninov et al. 2017 reach 55 px at full
resolution; an image pyramid reaches further at a fraction of the cost)."""


class RandomFeatureNet(nn.Module):
    """A shallow network of random filters at several scales (Ustyuzhaninov et al. 2017).

    Input (N, 3, H, W) in [0, 1], normalised inside; layers ``scale1`` ... ``scaleK`` side by side,
    each (N, channels, H / d, W / d): the image downsampled by d (antialiased), random k x k filters (Kaiming
    normal, no bias), a ReLU. The forward pass returns the list of the scales' feature maps.
    ``style_layers`` and ``content_layer`` name the layers the style functions use by default.
    """

    def __init__(self, channels: int = 64, scales: Sequence[tuple[int, int]] = RANDOM_SCALES):
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.names = [f"scale{i + 1}" for i in range(len(scales))]
        for name, (down, kernel) in zip(self.names, scales):
            self.add_module(name, _Scale(down, kernel, channels))
        self.style_layers = list(self.names)
        self.content_layer = "scale2"
        self.standin = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(x)
        return [getattr(self, name)(x) for name in self.names]  # K x (N, C, h_k, w_k)


def random_feature_net(seed: int = 0, channels: int = 64, scales: Sequence[tuple[int, int]] = RANDOM_SCALES,
                       device=None) -> RandomFeatureNet:
    """The offline feature network for texture and style: random multi-scale filters, seeded, eval mode.

    Ustyuzhaninov et al. 2017 ("What does it take to generate natural textures?", ICLR) show that one
    layer of random filters of several sizes with a ReLU matches textures about as well as trained VGG
    features. Weights: Kaiming normal from a local generator seeded by ``seed``; no parameter requires
    gradients. Notebook: 11_texture_synthesis
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"expected a positive number of channels, got {channels!r}")
    scales = [tuple(s) for s in scales]
    if not scales or any(len(s) != 2 or s[0] < 1 or s[1] < 1 or s[1] % 2 == 0 for s in scales):
        raise ValueError(f"expected scales as (downsampling >= 1, odd kernel size) pairs, got {scales}")
    net = RandomFeatureNet(channels, scales)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in net.names:
            conv = getattr(net, name).conv
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            conv.bias.zero_()
    net.seed = seed
    net.requires_grad_(False).eval()
    return net.to(device) if device is not None else net


VGG_LAYERS = {
    # Gatys et al. 2016: style at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1; content at relu4_2.
    "vgg19": (["features.1", "features.6", "features.11", "features.20", "features.29"], "features.22"),
    "vgg16": (["features.1", "features.6", "features.11", "features.18", "features.25"], "features.20"),
}
"""torchvision VGG layer names (style layers, content layer), as in the papers."""

COURSE_LAYERS = (["features.1", "features.4", "features.7", "features.10"], "features.7")
"""CourseNet's ReLUs (style layers) and its content layer, for comparing with the course model."""


def vgg_cached(name: str) -> bool:
    """Whether torchvision's ImageNet weights of ``name`` (e.g. "vgg19") are already in torch's cache."""
    from torchvision import models as tvm

    url = tvm.get_model_weights(name).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def feature_net(name: str = "auto", seed: int = 0, device=None) -> nn.Module:
    """A feature network for texture and style, with ``style_layers`` and ``content_layer`` set.

    name: ``"random"`` (:func:`random_feature_net`, offline), ``"vgg19"`` / ``"vgg16"`` (ImageNet
    VGG, the papers' choice, only when its weights are already in torch's cache), ``"course"`` (the
    course model, trained on ShapesWorld) or ``"auto"`` (VGG-19 when cached, else random).
    VGG is never downloaded here and never built with stand-in weights: without the cached file it
    says so and returns the random network (``model.standin`` is False for every network returned).
    Notebook: 11_texture_synthesis
    """
    from . import models

    if name == "random":
        return random_feature_net(seed=seed, device=device)
    if name == "course":
        model = models.course_model(device=device)
        model.style_layers, model.content_layer = list(COURSE_LAYERS[0]), COURSE_LAYERS[1]
        return model
    if name not in ("auto", *VGG_LAYERS):
        raise ValueError(f"expected a feature network 'auto', 'random', 'course' or one of {sorted(VGG_LAYERS)}, "
                         f"got {name!r}")
    vgg = "vgg19" if name == "auto" else name
    if not vgg_cached(vgg):
        message = (f"{vgg} ImageNet weights are not in torch's cache ({torch.hub.get_dir()}/checkpoints): "
                   "using the random multi-scale feature network instead (Ustyuzhaninov et al. 2017). "
                   "Random stand-in VGG weights are never used for style.")
        if name != "auto":
            warnings.warn(message, stacklevel=2)
        print(message, file=sys.stderr)
        return random_feature_net(seed=seed, device=device)
    model = models.imagenet_model(vgg, standin=False, device=device)
    model.style_layers, model.content_layer = list(VGG_LAYERS[vgg][0]), VGG_LAYERS[vgg][1]
    return model


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module as model, got {type(model).__name__}")
    if getattr(model, "standin", False):
        warnings.warn("this model has STAND-IN (random) weights, not trained ones: its Gram matrices are "
                      "not the papers'. Use lecturekit.style.feature_net() (VGG when cached, else random "
                      "multi-scale filters, which are meant to be random).", stacklevel=3)


def _style_layers(model: nn.Module, layers) -> list[str]:
    if layers is None:
        layers = getattr(model, "style_layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__} has no default style layers: pass layers=[...] "
                             "(names from model.named_modules())")
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("expected at least one style layer, got an empty list")
    return list(dict.fromkeys(resolve_layer(model, layer)[0] for layer in layers))


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"expected steps to be a positive integer, got {steps!r}")
    return int(steps)


def _check_weights(**weights) -> None:
    for key, value in weights.items():
        if not isinstance(value, numbers.Number) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
            raise ValueError(f"expected {key} to be a finite number >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# The optimisation: L-BFGS (as in the papers) or Adam, on the pixels, clamped to [0, 1]
# ---------------------------------------------------------------------------------------------------


class Synthesis(NamedTuple):
    """What :func:`texture_synthesis` and :func:`style_transfer` return: the image (N, 3, H, W) in [0, 1]
    and the loss terms per step, ``losses["total"]`` (steps,) and e.g. ``"style"``, ``"content"``,
    ``"tv"`` (each summed over the batch, before the step)."""

    image: torch.Tensor
    losses: dict


def _optimise(terms: Callable[[torch.Tensor], dict], x: torch.Tensor, steps: int, optimizer: str, lr,
              progress: bool, desc: str) -> Synthesis:
    """Minimise ``terms(x)["total"]`` (N,) over the pixels of ``x``, one forward and backward per step.

    L-BFGS (as in the papers): one iteration per step (no line search: one evaluation), pixels
    unconstrained, clamped to [0, 1] at the end (clamping between iterations breaks the curvature
    pairs that L-BFGS keeps, and it diverges); Adam: a step then a clamp (projected gradient descent).
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"expected optimizer 'lbfgs' or 'adam', got {optimizer!r}")
    x = x.detach().clone().requires_grad_(True)
    if optimizer == "lbfgs":
        # Tolerances 0: run every step asked for (the losses are small numbers, and the default
        # tolerances would stop early on a texture that is still improving).
        opt = torch.optim.LBFGS([x], lr=1.0 if lr is None else lr, max_iter=1, history_size=20,
                                tolerance_grad=0.0, tolerance_change=0.0)
    else:
        opt = torch.optim.Adam([x], lr=0.02 if lr is None else lr)
    history: dict[str, list] = {}

    def closure():
        opt.zero_grad()
        values = terms(x)  # name -> (N,)
        for key, v in values.items():
            history.setdefault(key, []).append(float(v.detach().sum()))
        total = values["total"].sum()
        total.backward()
        return total

    for _ in progress_bar(range(steps), progress, desc=desc):
        opt.step(closure)
        if optimizer == "adam":
            with torch.no_grad():
                x.clamp_(0, 1)
    return Synthesis(x.detach().clamp(0, 1), {k: torch.tensor(v) for k, v in history.items()})


def _noise(shape, seed: int, device) -> torch.Tensor:
    """Seeded uniform noise in [0, 1]: the start of a synthesis (and its noise baseline)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def texture_synthesis(model: nn.Module, texture: torch.Tensor, layers: Sequence[Layer] | None = None, *, layer_weights=None,
                      size: int | tuple[int, int] | None = None, steps: int = 200, optimizer: str = "lbfgs",
                      lr: float | None = None, tv_weight: float = 0.0, seed: int = 0,
                      progress: bool = True) -> Synthesis:
    """Texture synthesis (Gatys, Ecker and Bethge 2015): from seeded noise, match the texture's Gram matrices.

        x* = argmin_x sum_l w_l E_l(x),   E_l = 1 / (4 C_l^2) sum_ij (G_l(x) - G_l(texture))_ij^2

    texture: (N, 3, H, W) in [0, 1], one synthesis per texture. layers: the style layers (default
    ``model.style_layers``); layer_weights: w_l (default 1/L each). size: output side or (H, W)
    (default the texture's size: Gram matrices do not depend on it). optimizer: ``"lbfgs"`` (as in
    the paper; lr 1; clamped to [0, 1] at the end) or ``"adam"`` (lr 0.02 pixel units; clamped after
    each step); each step is one forward and one backward pass. ``tv_weight`` adds a little smoothness (:func:`tv_loss`).
    Returns ``Synthesis(image, losses)`` with losses ``"total"``, ``"style"`` (and ``"tv"``).
    Notebook: 11_texture_synthesis
    """
    _check_model(model)
    texture = check_images(texture, "texture")
    steps = _check_steps(steps)
    _check_weights(tv_weight=tv_weight)
    names = _style_layers(model, layers)
    device = model_device(model)
    texture = texture.detach().to(device)
    if size is None:
        size = tuple(texture.shape[-2:])
    elif isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"expected an output size of at least 8 x 8 pixels, got {size!r}")
    with preserved(model), forward_to(model, names, detach=False) as run:
        with torch.no_grad():
            acts = run(texture)
            targets = {name: gram(acts[name]).detach() for name in names}  # (N, C_l, C_l)
        weights = _layer_weights(names, layer_weights)

        def terms(x):
            L_style = style_loss(run(x), targets, weights)  # (N,)
            if not tv_weight:
                return {"total": L_style, "style": L_style}
            R = tv_loss(x)
            return {"total": L_style + tv_weight * R, "style": L_style, "tv": R}

        start = _noise((len(texture), 3, *size), seed, device)
        return _optimise(terms, start, steps, optimizer, lr, progress, "texture synthesis")


def style_transfer(model: nn.Module, content: torch.Tensor, style: torch.Tensor, content_layer=None,
                   style_layers=None, *, content_weight: float = 1.0, style_weight: float = 1e3,
                   tv_weight: float = 0.0, layer_weights=None, start: str = "content", steps: int = 200,
                   optimizer: str = "lbfgs", lr: float | None = None, seed: int = 0,
                   progress: bool = True) -> Synthesis:
    """Style transfer (Gatys, Ecker and Bethge 2016): the content of one image in the style of another.

        L_total = content_weight L_content(x) + style_weight L_style(x) + tv_weight R_TV(x)

    with L_content the mean squared feature difference at ``content_layer`` (:func:`content_loss`),
    L_style = sum_l w_l E_l over ``style_layers`` (:func:`style_loss`) and R_TV (:func:`tv_loss`).
    The layers default to ``model.content_layer`` and ``model.style_layers``. The paper's
    alpha / beta is ``content_weight / style_weight``.

    content: (N, 3, H, W) in [0, 1]; style: (1, 3, H', W') for one style for all, or (N, 3, H', W'),
    any size. start: ``"content"`` (the content image, fast) or ``"noise"`` (seeded, as in the paper).
    Returns ``Synthesis(image (N, 3, H, W), losses)`` with losses "total", "content", "style", "tv".
    Notebook: 12_style_transfer
    """
    _check_model(model)
    content = check_images(content, "content")
    style = check_images(style, "style")
    if len(style) not in (1, len(content)):
        raise ValueError(f"expected one style image or one per content image ({len(content)}), "
                         f"got {len(style)} style images for {len(content)} content images")
    steps = _check_steps(steps)
    _check_weights(content_weight=content_weight, style_weight=style_weight, tv_weight=tv_weight)
    if start not in ("content", "noise"):
        raise ValueError(f"expected start='content' or 'noise', got {start!r}")
    names = _style_layers(model, style_layers)
    if content_layer is None:
        content_layer = getattr(model, "content_layer", None)
        if content_layer is None:
            raise ValueError(f"{type(model).__name__} has no default content layer: pass content_layer=...")
    content_name, _ = resolve_layer(model, content_layer)
    device = model_device(model)
    content, style = content.detach().to(device), style.detach().to(device)
    with preserved(model), forward_to(model, list(dict.fromkeys([*names, content_name])), detach=False) as run:
        with torch.no_grad():
            targets = {name: gram(A).detach() for name, A in run(style).items() if name in names}
            P = run(content)[content_name].detach().clone()  # (N, C, h, w)
        weights = _layer_weights(names, layer_weights)

        def terms(x):
            acts = run(x)
            L_content = content_loss(acts[content_name], P)  # (N,)
            L_style = style_loss(acts, targets, weights)  # (N,)
            R = tv_loss(x)  # (N,)
            total = content_weight * L_content + style_weight * L_style + tv_weight * R
            return {"total": total, "content": L_content, "style": L_style, "tv": R}

        x0 = content if start == "content" else _noise(content.shape, seed, device)
        return _optimise(terms, x0, steps, optimizer, lr, progress, "style transfer")


# ---------------------------------------------------------------------------------------------------
# Texture quality: statistics the synthesis does not optimise, and two baselines
# ---------------------------------------------------------------------------------------------------


def noise_like(texture: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Baseline: seeded uniform noise of the texture's shape (the synthesis's own start image)."""
    texture = check_images(texture, "texture")
    return _noise(texture.shape, seed, texture.device)


def shuffle_pixels(texture: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Baseline: the texture's own pixels (RGB triples) in a seeded random order, (N, 3, H, W).

    Same colour histogram as the texture, none of its structure.
    """
    texture = check_images(texture, "texture")
    N, C, H, W = texture.shape
    order = torch.randperm(H * W, generator=torch.Generator().manual_seed(seed)).to(texture.device)
    return texture.flatten(2)[:, :, order].view(N, C, H, W)


def texture_distance(x: torch.Tensor, texture: torch.Tensor, seed: int = 1, channels: int = 64) -> torch.Tensor:
    """Gram distance under an independently seeded random network: (N,), 0 for identical statistics.

        d(x, t) = 1/K sum_k ||G_k(x) - G_k(t)||_F^2 / ||G_k(t)||_F^2

    over the K scales of ``random_feature_net(seed)``. The synthesis matches the Gram matrices of the
    network seeded 0; with ``seed=1`` every filter is different, so this statistic is not optimised.
    x: (N, 3, H, W); texture: (N or 1, 3, H', W'), any size. Notebook: 11_texture_synthesis
    """
    x, texture = check_images(x, "x"), check_images(texture, "texture")
    net = random_feature_net(seed=seed, channels=channels, device=x.device)
    with torch.no_grad():
        Gx = [gram(A) for A in net(x)]
        Gt = [gram(A) for A in net(texture.to(x.device))]
    return torch.stack([(a - b).pow(2).sum((1, 2)) / b.pow(2).sum((1, 2)) for a, b in zip(Gx, Gt)]).mean(0)


def _log_spectrum(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Radially averaged log power spectrum of the grey image, (N, bins), frequencies 0 .. 0.5."""
    grey = x.mean(1)  # (N, H, W)
    grey = grey - grey.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(grey).abs().pow(2) / grey[0].numel()  # (N, H, W)
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device)[None, :]
    radius = torch.sqrt(fx * fx + fy * fy)  # (H, W), cycles per pixel
    which = (radius / 0.5 * bins).long().clamp(max=bins - 1).flatten()  # (H W,) bin of each frequency
    keep = (radius.flatten() > 0) & (radius.flatten() <= 0.5)
    sums = torch.zeros(len(x), bins, device=x.device).index_add_(1, which[keep], power.flatten(1)[:, keep])
    counts = torch.zeros(bins, device=x.device).index_add_(0, which[keep], torch.ones(int(keep.sum()), device=x.device))
    return torch.log10(sums / counts.clamp_min(1) + 1e-10)  # (N, bins)


def spectrum_distance(x: torch.Tensor, texture: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Mean absolute difference of the radially averaged log10 power spectra (grey): (N,).

    1.0 means a tenfold difference of power at a typical frequency. x and texture may differ in size
    (frequencies are in cycles per pixel). Notebook: 11_texture_synthesis
    """
    x, texture = check_images(x, "x"), check_images(texture, "texture")
    return (_log_spectrum(x, bins) - _log_spectrum(texture.to(x.device), bins)).abs().mean(1)


def histogram_distance(x: torch.Tensor, texture: torch.Tensor, quantiles: int = 256) -> torch.Tensor:
    """Colour-histogram distance: the 1-D Wasserstein distance per channel, averaged, in pixel units: (N,).

    W1 = mean |Q_x(q) - Q_t(q)| over quantile levels q, for each of R, G, B (the mean distance a pixel
    value must move to turn one histogram into the other). Notebook: 11_texture_synthesis
    """
    x, texture = check_images(x, "x"), check_images(texture, "texture")
    q = (torch.arange(quantiles, device=x.device) + 0.5) / quantiles
    Qx = torch.quantile(x.flatten(2), q, dim=2)  # (q, N, 3)
    Qt = torch.quantile(texture.to(x.device).flatten(2), q, dim=2)  # (q, N or 1, 3)
    return (Qx - Qt).abs().mean((0, 2))


# ---------------------------------------------------------------------------------------------------
# Fast style transfer: a feed-forward transformer network (Johnson et al. 2016, instance norm)
# ---------------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Reflection padding, convolution, instance norm (Ulyanov et al. 2016), ReLU."""
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(c_in, c_out, kernel, stride),
                         nn.InstanceNorm2d(c_out, affine=True), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """x + conv-IN-ReLU-conv-IN(x) (He et al. 2016, as in Johnson et al. 2016's transformer)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
                                  nn.ReLU(inplace=True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Up(nn.Module):
    """Nearest-neighbour upsampling by 2, then a convolution: no checkerboard artefacts (Odena et al.
    2016, "Deconvolution and Checkerboard Artifacts"), instead of Johnson's transposed convolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = _conv(c_in, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TransformerNet(nn.Module):
    """Johnson et al. 2016's image transformation network, smaller: (N, 3, H, W) -> (N, 3, H, W), [0, 1].

    down: 9x9 conv, two stride-2 3x3 convs; ``residual_blocks`` residual blocks at H/4; up: two
    (upsample x2, 3x3 conv); a 9x9 conv and a sigmoid to pixel space. Instance norm throughout, so the
    network stylises images of any size (H and W are padded to a multiple of 4 and cropped back).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), residual_blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.down = nn.Sequential(_conv(3, c1, 9), _conv(c1, c2, 3, 2), _conv(c2, c3, 3, 2))
        self.residual = nn.Sequential(*[_Residual(c3) for _ in range(residual_blocks)])
        self.up = nn.Sequential(_Up(c3, c2), _Up(c2, c1))
        self.out = nn.Sequential(nn.ReflectionPad2d(4), nn.Conv2d(c1, 3, 9))
        self.config = dict(channels=list(channels), residual_blocks=residual_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        pad_h, pad_w = (-H) % 4, (-W) % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        y = self.out(self.up(self.residual(self.down(self.normalize(x)))))  # (N, 3, H', W')
        return torch.sigmoid(y[..., :H, :W])


FAST_STYLE_PATH = Path(__file__).parent / "weights" / "fast_style.pt"
TRAIN_IMAGES = ("coffee", "rocket", "temple", "grace_hopper", "brick", "grass")
"""Content images of the fast-style training crops (bundled with scikit-image, scikit-learn, matplotlib)."""
HELD_OUT_IMAGES = ("cat", "astronaut")
"""Photos the fast-style network never sees while training: stylise these to test it."""

FAST_STYLE_RECIPE = dict(style="flower", style_size=256, steps=400, batch_size=4, size=128, lr=3e-3,
                         content_weight=1.0, style_weight=50.0, tv_weight=1.0, seed=0, feature_seed=0,
                         channels=(12, 24, 48), residual_blocks=3)
"""The recipe of the bundled network (``lecturekit train-style``); the style is a photo's crop."""


def _recipe_style(recipe: Mapping) -> torch.Tensor:
    return sample_image(recipe["style"], size=recipe["style_size"])


def training_crops(n: int, size: int = 128, seed: int = 0, photos: Sequence[str] = TRAIN_IMAGES) -> torch.Tensor:
    """``n`` seeded random crops (n, 3, size, size) of the bundled photos named in ``photos``, flipped at random.

    Each crop picks a photo, a scale (the crop covers 1/4 to 1/2 of the photo's shorter side, resized
    to ``size``) and a position. Notebook: 13_fast_style_transfer
    """
    gen = torch.Generator().manual_seed(seed)
    pictures = [_photo(name) for name in photos]
    crops = []
    for _ in range(n):
        photo = pictures[int(torch.randint(len(pictures), (1,), generator=gen))]
        H, W = photo.shape[-2:]
        side = int(min(H, W) * (0.25 + 0.25 * float(torch.rand(1, generator=gen))))
        y = int(torch.randint(H - side + 1, (1,), generator=gen))
        x = int(torch.randint(W - side + 1, (1,), generator=gen))
        crop = F.interpolate(photo[:, :, y:y + side, x:x + side], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=True)
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.cat(crops).clamp(0, 1)


_PHOTOS: dict = {}


def _photo(name: str) -> torch.Tensor:
    if name not in _PHOTOS:  # decoding a JPEG per crop would cost more than the training step
        _PHOTOS[name] = sample_image(name)
    return _PHOTOS[name]


def _transformer(recipe: Mapping, seed: int) -> TransformerNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerNet(tuple(recipe["channels"]), int(recipe["residual_blocks"]))


def train_fast_style(steps: int | None = None, seed: int | None = None, out: str | Path | None = None,
                     progress: bool = True, **overrides) -> tuple[TransformerNet, dict]:
    """Train the fast style transfer network (Johnson et al. 2016) from ``FAST_STYLE_RECIPE``.

    Each step: a batch of fresh :func:`training_crops` y_c, the network's output y = f(y_c), and

        L = content_weight L_content(phi(y), phi(y_c)) + style_weight L_style(phi(y), G(style)) + tv_weight R_TV(y)

    with phi the random multi-scale feature network (seeded ``feature_seed``), Adam. Deterministic for
    a seed (one thread or many: the order of operations is fixed). ``out``: save
    ``{"model": state_dict, "meta": recipe and timing}`` there (load with ``weights_only=True``).
    ``overrides`` change recipe entries (``style=``, ``size=``, ...). Returns (network in eval mode,
    history with "loss", "content", "style", "seconds"). Notebook: 13_fast_style_transfer
    """
    recipe = dict(FAST_STYLE_RECIPE)
    unknown = [k for k in overrides if k not in recipe]
    if unknown:
        raise ValueError(f"unknown recipe entries {unknown}; expected some of {sorted(recipe)}")
    recipe.update(overrides, **({} if steps is None else {"steps": steps}), **({} if seed is None else {"seed": seed}))
    steps = _check_steps(recipe["steps"])
    phi = random_feature_net(seed=recipe["feature_seed"])
    net = _transformer(recipe, recipe["seed"])
    style = _recipe_style(recipe)
    names = list(phi.style_layers)
    content_name = phi.content_layer
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    history: dict = {"loss": [], "content": [], "style": []}
    start_time = time.perf_counter()

    with forward_to(phi, names, detach=False) as run:
        with torch.no_grad():
            targets = {name: gram(A).detach() for name, A in run(style).items()}  # (1, C, C)
        net.train()
        for step in progress_bar(range(steps), progress, desc="train-style"):
            y_c = training_crops(recipe["batch_size"], recipe["size"], seed=recipe["seed"] * 1_000_003 + step)
            with torch.no_grad():
                P = run(y_c)[content_name].detach().clone()  # (B, C, h, w)
            y = net(y_c)  # (B, 3, S, S)
            acts = run(y)
            L_content = content_loss(acts[content_name], P).mean()
            L_style = style_loss(acts, targets).mean()
            loss = recipe["content_weight"] * L_content + recipe["style_weight"] * L_style \
                + recipe["tv_weight"] * tv_loss(y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["loss"].append(loss.item())
            history["content"].append(L_content.item())
            history["style"].append(L_style.item())
    net.eval()
    history["seconds"] = time.perf_counter() - start_time
    if out is not None:
        meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()}
        meta.update(seconds=round(history["seconds"], 1), final_loss=float(np.mean(history["loss"][-50:])))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "meta": meta}, out)
    return net, history


def fast_style_model(pretrained: bool = True, path: str | Path | None = None, device=None) -> TransformerNet:
    """The bundled fast style transfer network (eval mode), or (``pretrained=False``) an untrained one.

    Read with ``torch.load(weights_only=True)``; ``model.meta`` holds its recipe (style image, steps,
    seconds). ``lecturekit train-style`` makes the file. Notebook: 13_fast_style_transfer
    """
    path = Path(path) if path is not None else FAST_STYLE_PATH
    if not pretrained:
        net = _transformer(FAST_STYLE_RECIPE, FAST_STYLE_RECIPE["seed"])
        net.meta = dict(FAST_STYLE_RECIPE)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"the fast-style network's weights are missing: expected {path}. "
                                    "Run `lecturekit train-style` to make them.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = state.get("meta", dict(FAST_STYLE_RECIPE))
        net = _transformer(meta, 0)
        net.load_state_dict(state["model"])
        net.meta = meta
    net.eval()
    return net.to(device) if device is not None else net


def stylize(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fast style transfer: one forward pass of the transformer network, (N, 3, H, W) -> (N, 3, H, W).

    x in [0, 1], any size; the result is detached, in [0, 1]. Notebook: 13_fast_style_transfer
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (a TransformerNet) as net, got {type(net).__name__}")
    x = check_images(x)
    with preserved(net), torch.no_grad():
        return net(x.to(model_device(net))).detach()
