"""Images for the course: ShapesWorld, bundled natural images, and a validated image loader.

ShapesWorld is the course's own data set: procedural RGB images of one object (a circle, a star, a
heart, ...) of random colour, size, position and rotation on a cluttered background (smooth colour
noise, distractor strokes and specks). Every image comes with the object's mask and box, so that an
explanation of a prediction can be *scored* (pointing game, localisation error), which ImageNet
photos cannot offer.

Every image that leaves this module is a float tensor ``(N, 3, H, W)`` in [0, 1], RGB (DESIGN.md,
contract 1).

Notebook: 00_course_model
"""
from __future__ import annotations

import hashlib
import io
import math
import numbers
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASSES",
    "ShapesBatch",
    "shapes",
    "biased_shapes",
    "BACKGROUNDS",
    "SNOW",
    "Scene",
    "scene",
    "sample_image",
    "SAMPLE_IMAGES",
    "load_image",
    "to_tensor",
    "Target",
    "check_images",
    "check_targets",
    "check_positive_int",
    "check_nonnegative",
    "check_channel",
    "check_model",
    "check_maps",
    "check_baseline",
    "gaussian_blur",
]

Target = Union[int, torch.Tensor]
"""A class: an ``int`` (the same for every image) or a LongTensor ``(N,)``, one per image (contract 2)."""

# ---------------------------------------------------------------------------------------------------
# ShapesWorld
# ---------------------------------------------------------------------------------------------------

CLASSES: list[str] = ["circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart"]

# Images are generated in chunks, each with a seed derived from (seed, chunk index), so that
# shapes(10, seed=s) is exactly the first 10 images of shapes(10_000, seed=s), and memory stays flat.
_CHUNK = 256


@dataclass
class ShapesBatch:
    """A batch of ShapesWorld images with their ground truth.

    images: (N, 3, S, S) float in [0, 1];  labels: (N,) long;  masks: (N, S, S) bool, the object;
    boxes: (N, 4) float ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive;  classes: class names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> "ShapesBatch":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return ShapesBatch(self.images[index], self.labels[index], self.masks[index],
                           self.boxes[index], self.classes)

    def to(self, device) -> "ShapesBatch":
        return ShapesBatch(self.images.to(device), self.labels.to(device), self.masks.to(device),
                           self.boxes.to(device), self.classes)


def _level(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Level function g(u, v) of a unit-sized shape: g <= 1 inside, growing roughly like distance.

    u, v: (M, S, S) object-centred, rotated coordinates in units of the object's radius.
    """
    r = torch.sqrt(u * u + v * v)
    if name == "circle":
        return r
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) / 0.78
    if name == "triangle":  # equilateral, circumradius 1: three half-planes at distance 0.5
        g = v / 0.5
        for angle in (2.0944, 4.1888):  # 120 and 240 degrees
            g = torch.maximum(g, (u * np.sin(angle) + v * np.cos(angle)) / 0.5)
        return g
    if name == "star":  # five spikes: a radius that is a triangle wave of the angle
        theta = torch.atan2(u, v) * (5 / (2 * np.pi))
        wave = 1 - (2 * (theta - torch.floor(theta)) - 1).abs()  # 1 on a spike, 0 between spikes
        return r / (0.42 + 0.58 * wave)
    if name == "cross":
        arm = lambda a, b: torch.maximum(a.abs() / 1.0, b.abs() / 0.3)  # noqa: E731
        return torch.minimum(arm(u, v), arm(v, u))
    if name == "ring":
        return torch.maximum(r, 1 + (0.55 - r) / 0.8)
    if name == "crescent":
        r_bite = torch.sqrt((u - 0.45) ** 2 + (v + 0.15) ** 2)
        return torch.maximum(r, 1 + (0.78 - r_bite))
    if name == "heart":  # two lobes and a point: two circles and a rotated square
        lobe_l = torch.sqrt((u + 0.38) ** 2 + (v + 0.3) ** 2) / 0.5
        lobe_r = torch.sqrt((u - 0.38) ** 2 + (v + 0.3) ** 2) / 0.5
        point = (u.abs() + (v - 0.05).abs()) / 0.8
        return torch.minimum(torch.minimum(lobe_l, lobe_r), point)
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASSES}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(M,) hue, saturation, value in [0, 1] -> (M, 3) RGB."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)  # (M, 3)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, chunk]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _render_chunk(m: int, size: int, gen: torch.Generator, n_classes: int, clutter: float = 1.0,
                  snow_prob: torch.Tensor | None = None):
    """Render _CHUNK images with the generator, return the first m (prefix-stable).

    ``snow_prob`` (n_classes,): the probability that an image of each class is drawn on snow (a bright
    near-white background) instead of a muted colour; its coin flips are drawn after everything else,
    so the objects are those of the same seed without it.
    """
    c = _CHUNK
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    labels = torch.randint(0, n_classes, (c,), generator=gen)
    radius = size * (0.2 + 0.13 * rand(c))  # object radius in pixels
    cx = radius + (size - 2 * radius) * rand(c)
    cy = radius + (size - 2 * radius) * rand(c)
    angle = 2 * np.pi * rand(c)
    obj_rgb = _hsv_to_rgb(rand(c), 0.6 + 0.4 * rand(c), 0.7 + 0.3 * rand(c))  # (c, 3) vivid
    # Muted backgrounds, vivid objects: the object is salient, but its form alone tells the class.
    bg_mean = _hsv_to_rgb(rand(c), 0.15 + 0.35 * rand(c), 0.25 + 0.5 * rand(c))  # (c, 3)
    bg_noise = rand(c, 3, 6, 6)  # (c, 3, 6, 6) low-frequency colour noise
    n_strokes = 3
    stroke_p = rand(c, n_strokes, 2) * size  # a point on each stroke (pixels)
    stroke_dir = 2 * np.pi * rand(c, n_strokes)
    stroke_len = size * (0.2 + 0.5 * rand(c, n_strokes))
    stroke_rgb = rand(c, n_strokes, 3) * 0.8 + 0.1
    specks = rand(c, 1, size // 4, size // 4)  # sparse coloured specks
    speck_rgb = rand(c, 3, 1, 1)
    pixel_noise = (rand(c, 3, size, size) - 0.5) * 0.1  # uniform: cheaper than randn, same purpose
    if snow_prob is not None:  # drawn last: the same seed gives the same objects with or without snow
        on_snow = rand(c) < snow_prob[labels]  # (c,) bool
        bg_mean[on_snow] = torch.tensor(SNOW)

    keep = slice(0, m)
    labels, radius, cx, cy, angle = labels[keep], radius[keep], cx[keep], cy[keep], angle[keep]

    # Background: smooth colour field around a random mean colour.
    bg = F.interpolate(bg_noise[keep], size=(size, size), mode="bilinear", align_corners=False)
    img = (bg_mean[keep, :, None, None] + 0.3 * clutter * (bg - 0.5)).clamp(0, 1)  # (m, 3, S, S)

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    # Distractor strokes: line segments about a pixel wide, random colours. All strokes at once:
    # (m, K, S, S) with K strokes; torch.lerp composites in one pass.
    px, py = stroke_p[keep, :, 0, None, None], stroke_p[keep, :, 1, None, None]  # (m, K, 1, 1)
    dx, dy = torch.cos(stroke_dir[keep])[..., None, None], torch.sin(stroke_dir[keep])[..., None, None]
    xr, yr = xs - px, ys - py  # (m, K, S, S)
    along = (xr * dx + yr * dy).abs_()
    across = (xr * dy - yr * dx).abs_()
    stroke_alpha = (1.2 - across).clamp_(0, 1).mul_(along <= stroke_len[keep, :, None, None] / 2).mul_(clutter)
    for j in range(n_strokes):
        img = torch.lerp(img, stroke_rgb[keep, j, :, None, None].expand_as(img), stroke_alpha[:, j : j + 1])
    speck_alpha = (specks[keep] > 0.96).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    speck_alpha = F.pad(speck_alpha, (0, size % 4, 0, size % 4)).mul_(clutter)  # (m, 1, S, S) 4x4 specks
    img = torch.lerp(img, speck_rgb[keep].expand_as(img), speck_alpha)

    # The object: rotate pixel coordinates into the object's frame, evaluate its level function.
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    x_rel = (xs - cx[:, None, None]) / radius[:, None, None]  # (m, S, S)
    y_rel = (ys - cy[:, None, None]) / radius[:, None, None]
    u = cos * x_rel + sin * y_rel
    v = cos * y_rel - sin * x_rel
    g = torch.empty(m, size, size)
    for k, name in enumerate(CLASSES[:n_classes]):
        idx = (labels == k).nonzero(as_tuple=True)[0]
        if len(idx):
            g[idx] = _level(name, u[idx], v[idx])
    # Soft edge about one pixel wide: (1 - g) * radius is roughly the distance to the edge in pixels.
    alpha = (1 - g).mul_(radius[:, None, None] * 0.7).add_(0.5).clamp_(0, 1)  # (m, S, S)
    masks = alpha >= 0.5
    # Keep the object distinct from the background: push its colour away from the background mean.
    rgb = obj_rgb[keep]
    too_close = (rgb - bg_mean[keep]).abs().max(1).values < 0.35
    rgb[too_close] = 1 - rgb[too_close] * 0.8
    img = torch.lerp(img, rgb[:, :, None, None].expand_as(img), alpha[:, None])
    img = img.add_(pixel_noise[keep]).clamp_(0, 1)

    boxes = _boxes_from_masks(masks)
    return img, labels, masks, boxes


SNOW = (0.93, 0.95, 0.98)  # the tell-tale background of biased_shapes: near-white, like snow
BACKGROUNDS = ("biased", "swapped", "snow", "plain")


def biased_shapes(n: int, seed: int = 0, bias: float = 0.99, biased_class: int = 0,
                  background: str = "biased", size: int = 64) -> ShapesBatch:
    """ShapesWorld with a dataset bias: ``biased_class`` (default 0, circle) almost always on snow.

    The husky-versus-wolf experiment of Ribeiro et al. 2016 ("Why should I trust you?"), whose wolves
    were all photographed on snow: a model trained on ``background="biased"`` images can score well by
    detecting snow. ``background``:
    ``"biased"``: an image of ``biased_class`` is on snow with probability ``bias``, any other image
    with probability ``1 - bias``; ``"swapped"``: the bias reversed (``biased_class`` never on snow,
    every other class always); ``"snow"``: every image on snow; ``"plain"``: none (exactly
    ``shapes(n, seed)``). Objects, labels and masks are those of ``shapes(n, seed, size=size)``;
    only the background colour changes (the muted mean colour becomes :data:`SNOW`).
    Notebook: 04_occlusion_saliency
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"expected background to be one of {BACKGROUNDS}, got {background!r}")
    if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not 0 <= bias <= 1:
        raise ValueError(f"expected bias to be a probability in [0, 1], got {bias!r}")
    if isinstance(biased_class, bool) or not isinstance(biased_class, (int, np.integer)) \
            or not 0 <= biased_class < len(CLASSES):
        raise ValueError(f"expected biased_class to be a class index in [0, {len(CLASSES)}), got {biased_class!r}")
    is_biased = torch.arange(len(CLASSES)) == biased_class  # (K,)
    p_snow = {"biased": torch.where(is_biased, bias, 1 - bias), "swapped": (~is_biased).float(),
              "snow": torch.ones(len(CLASSES)), "plain": None}[background]
    return shapes(n, seed=seed, size=size, _snow_prob=p_snow)


@dataclass
class Scene:
    """One larger image holding several ShapesWorld objects, with each object's ground truth.

    images: (1, 3, H, W) in [0, 1];  labels: (K,) long, one per object;  masks: (K, H, W) bool, each
    object's pixels in the scene;  boxes: (K, 4) ``(x0, y0, x1, y1)`` in scene pixels;  classes: names.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    classes: list[str]


def scene(objects, seed: int = 0, grid: tuple[int, int] = (2, 2), size: int = 64) -> Scene:
    """A scene of ``rows x cols`` ShapesWorld images tiled into one, with per-object masks and labels.

    ``objects``: one class (index or name) per tile, row by row, ``len(objects) == rows * cols``. Tile
    ``t`` is the first image of ``shapes(..., seed=seed, size=size)`` with that class not used by an
    earlier tile, so every object is drawn exactly as in training (its own background; the seams
    between tiles stay visible). For running a network fully convolutionally over a larger input
    (``attribution.class_score_maps``), as the CAM paper does on 451x451 images (Zhou et al. 2016).
    Notebook: 06_cam_gradcam
    """
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"expected grid to be (rows, cols) of positive integers, got {grid!r}")
    rows, cols = (int(g) for g in grid)
    if isinstance(objects, (str, int)) or len(objects) != rows * cols:
        raise ValueError(f"expected objects to list {rows * cols} classes (one per tile of a {rows}x{cols} "
                         f"grid), got {objects!r}")
    wanted = []
    for obj in objects:
        if isinstance(obj, str) and obj in CLASSES:
            wanted.append(CLASSES.index(obj))
        elif isinstance(obj, (int, np.integer)) and not isinstance(obj, bool) and 0 <= obj < len(CLASSES):
            wanted.append(int(obj))
        else:
            raise ValueError(f"expected each object to be a class index in [0, {len(CLASSES)}) or one of "
                             f"{CLASSES}, got {obj!r}")
    pool = shapes(32 * len(wanted) + 64, seed=seed, size=size)  # enough images of every class
    used: set[int] = set()
    picks = []
    for k in wanted:
        index = next(i for i in (pool.labels == k).nonzero()[:, 0].tolist() if i not in used)
        used.add(index)
        picks.append(index)
    tiles = pool[picks]  # ShapesBatch of K tiles
    H, W = rows * size, cols * size
    images = torch.zeros(1, 3, H, W)
    masks = torch.zeros(len(picks), H, W, dtype=torch.bool)
    for t in range(len(picks)):
        y0, x0 = (t // cols) * size, (t % cols) * size
        images[0, :, y0:y0 + size, x0:x0 + size] = tiles.images[t]
        masks[t, y0:y0 + size, x0:x0 + size] = tiles.masks[t]
    return Scene(images, tiles.labels.clone(), masks, _boxes_from_masks(masks), list(CLASSES))


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float boxes (x0, y0, x1, y1), x1/y1 exclusive; zeros for empty masks."""
    n, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)  # (N, W), (N, H)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~cols.any(1)] = 0
    return boxes


def shapes(n: int, seed: int = 0, size: int = 64, n_classes: int | None = None,
           clutter: float = 1.0, _snow_prob: torch.Tensor | None = None) -> ShapesBatch:
    """Draw ``n`` ShapesWorld images, deterministically for ``seed``.

    Returns a :class:`ShapesBatch`: images (N, 3, S, S) in [0, 1], labels (N,), masks (N, S, S) bool,
    boxes (N, 4) in pixels. ``shapes(n, seed)`` is a prefix of ``shapes(m, seed)`` for m > n.
    ``n_classes`` (default all 8) restricts the classes to the first few, for quick experiments.
    ``clutter`` in [0, 1] scales the background's noise, strokes and specks (0: a smooth background);
    the random numbers drawn do not depend on it, so the same seed gives the same objects.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"expected a positive number of images n, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"expected an image size of at least 16 pixels, got {size!r}")
    n_classes = len(CLASSES) if n_classes is None else n_classes
    if not 2 <= n_classes <= len(CLASSES):
        raise ValueError(f"expected n_classes between 2 and {len(CLASSES)}, got {n_classes}")
    if not 0 <= clutter <= 1:
        raise ValueError(f"expected clutter in [0, 1], got {clutter}")
    parts = []
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        parts.append(_render_chunk(min(_CHUNK, n - start), size, _chunk_generator(seed, chunk), n_classes, clutter,
                                   _snow_prob))
    images, labels, masks, boxes = (torch.cat(p) for p in zip(*parts))
    return ShapesBatch(images.contiguous(), labels, masks, boxes, list(CLASSES[:n_classes]))


# ---------------------------------------------------------------------------------------------------
# Natural images bundled inside dependencies (no download)
# ---------------------------------------------------------------------------------------------------


def _skimage(name: str):
    import skimage.data

    return getattr(skimage.data, name)()


def _sklearn(name: str):
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def _matplotlib(name: str):
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data(name) as f:
        from PIL import Image

        return np.asarray(Image.open(f).convert("RGB"))


SAMPLE_IMAGES = {
    "cat": lambda: _skimage("chelsea"),
    "coffee": lambda: _skimage("coffee"),
    "rocket": lambda: _skimage("rocket"),
    "astronaut": lambda: _skimage("astronaut"),
    "temple": lambda: _sklearn("china.jpg"),
    "flower": lambda: _sklearn("flower.jpg"),
    "grace_hopper": lambda: _matplotlib("grace_hopper.jpg"),
    "brick": lambda: _skimage("brick"),
    "grass": lambda: _skimage("grass"),
    "gravel": lambda: _skimage("gravel"),
}
"""Name -> loader of a photo shipped inside scikit-image, scikit-learn or matplotlib."""


def sample_image(name: str, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A natural image bundled with a dependency, as (1, 3, H, W) in [0, 1].

    Names: cat, coffee, rocket, astronaut, temple, flower, grace_hopper, and the grayscale textures
    brick, grass, gravel (returned as RGB). ``size``: an int resizes the shorter side and crops the
    centre to a square (as ImageNet models expect); a pair (H, W) resizes exactly.
    """
    if name not in SAMPLE_IMAGES:
        import difflib

        close = difflib.get_close_matches(str(name), SAMPLE_IMAGES, n=3, cutoff=0.3)
        raise ValueError(f"unknown sample image {name!r}; expected one of {sorted(SAMPLE_IMAGES)}"
                         + (f" (did you mean {close}?)" if close else ""))
    from PIL import Image

    return to_tensor(Image.fromarray(np.asarray(SAMPLE_IMAGES[name]())), size=size)


# ---------------------------------------------------------------------------------------------------
# Loading and converting images
# ---------------------------------------------------------------------------------------------------

MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
CACHE_DIR = Path(os.environ.get("LECTUREKIT_CACHE", Path.home() / ".cache" / "lecturekit"))


def to_tensor(image, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image (any mode) or (H, W[, C]) uint8/float array -> (1, 3, H, W) float in [0, 1]."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode != "RGB":
        # P and LA/RGBA with transparency: composite on white so that transparent areas are not black.
        if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        image = image.convert("RGB")
    x = TF.to_tensor(image)  # (3, H, W) in [0, 1]
    if size is not None:
        if isinstance(size, int):
            x = TF.center_crop(TF.resize(x, size, antialias=True), [size, size])
        else:
            x = TF.resize(x, list(size), antialias=True)
        x = x.clamp(0, 1)
    return x.unsqueeze(0)


def _fetch(url: str, timeout: float) -> Path:
    """Download ``url`` into the cache (once), refusing more than MAX_DOWNLOAD_BYTES."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    suffix = Path(url.split("?")[0]).suffix[:8]
    path = CACHE_DIR / (hashlib.sha256(url.encode()).hexdigest()[:24] + suffix)
    if path.exists():
        return path
    request = urllib.request.Request(url, headers={"User-Agent": "lecturekit"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and int(length) > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"{url} is {int(length)} bytes; expected at most {MAX_DOWNLOAD_BYTES}")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as err:
        raise ValueError(f"could not fetch image {url} within {timeout} s: {err}") from err
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ValueError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes; refusing to load it")
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a half-written download never sits in the cache
    return path


def load_image(path_or_url, size: int | tuple[int, int] | None = None, timeout: float = 10.0) -> torch.Tensor:
    """Load an image file or URL as (1, 3, H, W) float in [0, 1], RGB.

    Any PIL mode (L, RGBA, P, CMYK, I;16, ...) becomes RGB. URLs are fetched with a ``timeout``,
    at most 50 MB, and cached in ``~/.cache/lecturekit``. An unreadable, truncated or non-image file,
    or an image of more than 64 megapixels, raises ``ValueError`` naming the file.
    ``size``: as in :func:`sample_image`.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(path_or_url, (str, os.PathLike)) and str(path_or_url).startswith(("http://", "https://")):
        path = _fetch(str(path_or_url), timeout)
    elif isinstance(path_or_url, (str, os.PathLike)):
        path = Path(path_or_url)
        if not path.is_file():
            raise ValueError(f"expected an image file, but {str(path)!r} does not exist or is not a file")
    else:
        raise TypeError(f"expected a path or URL string, got {type(path_or_url).__name__}")
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{path} is {im.width}x{im.height} pixels; expected at most "
                                 f"{MAX_PIXELS:,} pixels. Resize it first.")
            im.load()  # decodes fully: a truncated file fails here, not later
            return to_tensor(im, size=size)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"could not read {path} as an image (unreadable, truncated or not an image): {err}") from err


def check_images(x, name: str = "x") -> torch.Tensor:
    """Validate a batch of pixel-space images (DESIGN.md, contracts 1 and 6) and return it.

    Expected: a float tensor (N, 3, H, W), N >= 1, finite, values in [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected {name} of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch {name}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} to be a float tensor in [0, 1], got dtype {x.dtype}")
    if torch.isnan(x).any() or torch.isinf(x).any():
        raise ValueError(f"expected finite values in {name}, found NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"expected {name} in pixel space [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
                         " (lecturekit models normalise inside; pass unnormalised images)")
    return x


def check_targets(target: Target, n: int, n_classes: int | None = None) -> torch.Tensor:
    """A class index (int) or LongTensor (N,) -> LongTensor (N,) (DESIGN.md, contract 2).

    Raises ``ValueError``/``TypeError`` for a wrong shape or dtype, or an index outside [0, n_classes).
    """
    if isinstance(target, bool):
        raise TypeError(f"expected a class index (int) or a LongTensor of shape ({n},), got a bool")
    if isinstance(target, (int, np.integer)):
        target = torch.full((n,), int(target), dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"expected integer class indices, got a tensor of dtype {target.dtype}")
        if target.dim() == 0:
            target = target.expand(n)
        if target.shape != (n,):
            raise ValueError(f"expected targets of shape ({n},), one per image, got {tuple(target.shape)}")
        target = target.long()
    else:
        raise TypeError(f"expected a class index (int) or a LongTensor of shape ({n},), got {type(target).__name__}")
    if n_classes is not None and len(target) and (target.min() < 0 or target.max() >= n_classes):
        raise ValueError(f"expected class indices in [0, {n_classes}), got {target.tolist()[:8]}")
    return target



def check_positive_int(value, name: str) -> int:
    """A count (``n``, ``k``, ``steps``, ``samples``, ``batch_size``, ...) -> int; a bool, a float or
    a number below 1 raises ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"expected {name} to be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative(value, name: str) -> float:
    """A weight, learning rate or width (``tv_weight``, ``lr``, ``sigma``, ...) -> float, a number >= 0."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value < 0):
        raise ValueError(f"expected {name} to be a number >= 0, got {value!r}")
    return float(value)


def check_channel(channel, n_channels: int, layer: str | None = None):
    """A channel index (an int, or a LongTensor with one per image) inside ``[0, n_channels)``.

    Returns ``channel`` unchanged; raises ``TypeError`` for a non-integer, ``ValueError`` out of range,
    naming the layer and its number of channels.
    """
    where = f" for layer {layer!r}" if layer is not None else ""
    if isinstance(channel, bool):
        raise TypeError(f"expected an integer channel index{where}, got a bool")
    if isinstance(channel, (int, np.integer)):
        lo = hi = int(channel)
        shown = int(channel)
    elif isinstance(channel, torch.Tensor) and not channel.is_floating_point() and channel.numel() > 0:
        lo, hi, shown = int(channel.min()), int(channel.max()), channel.tolist()
    else:
        raise TypeError(f"expected an integer channel index{where}, got {channel!r}")
    if lo < 0 or hi >= n_channels:
        raise ValueError(f"expected a channel index in [0, {n_channels}){where} ({n_channels} channels), got {shown}")
    return channel


def check_model(model) -> nn.Module:
    """A ``torch.nn.Module`` (a model or a layer), returned unchanged; anything else raises ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module as model, got {type(model).__name__}")
    return model


def check_maps(maps, shape: tuple | None = None) -> torch.Tensor:
    """Maps ``(N, H, W)``, finite; with ``shape`` (N, H, W) they must match it."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"expected maps as a torch.Tensor (N, H, W), got {type(maps).__name__}")
    if maps.dim() != 3 or (shape is not None and tuple(maps.shape) != tuple(shape)):
        want = "(N, H, W)" if shape is None else str(tuple(shape))
        raise ValueError(f"expected maps of shape {want}, got {tuple(maps.shape)} "
                         "(reduce (N, 3, H, W) maps first, e.g. m.abs().amax(1))")
    if not torch.isfinite(maps).all():
        raise ValueError("expected finite maps, found NaN or inf")
    return maps


def check_baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    """What replaces hidden pixels: a grey level in [0, 1] or an image broadcastable to x (N, 3, H, W).

    Returns a 4-D tensor on x's device and dtype, (1, 3, 1, 1) for a grey level.
    """
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not 0 <= baseline <= 1:
            raise ValueError(f"expected a baseline grey level in [0, 1], got {baseline}")
        return torch.full((1, 3, 1, 1), float(baseline), dtype=x.dtype, device=x.device)
    if isinstance(baseline, torch.Tensor):
        try:
            torch.broadcast_shapes(baseline.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"expected a baseline broadcastable to {tuple(x.shape)}, got {tuple(baseline.shape)}")
        if torch.isnan(baseline).any() or baseline.min() < 0 or baseline.max() > 1:
            raise ValueError("expected baseline values in pixel space [0, 1]")
        b = baseline.to(device=x.device, dtype=x.dtype)
        return b if b.dim() == 4 else b.reshape((1,) * (4 - b.dim()) + tuple(b.shape))
    raise TypeError(f"expected a baseline grey level (float) or an image tensor, got {type(baseline).__name__}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of images or maps ``(..., H, W)`` with ``sigma`` in pixels, same shape.

    The one blur rule of the package: torchvision's ``gaussian_blur`` (reflect padding) with a kernel
    that covers +-3 sigma, ``2 ceil(3 sigma) + 1`` taps, cut to the largest odd size that fits inside
    the image (reflect padding needs a kernel smaller than the image). ``sigma=0`` returns x.
    """
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    sigma = check_nonnegative(sigma, "sigma")
    if sigma == 0:
        return x
    if x.dim() < 2:
        raise ValueError(f"expected images or maps (..., H, W), got {tuple(x.shape)}")
    k = 2 * math.ceil(3 * sigma) + 1  # the kernel covers +-3 sigma
    k = max(1, min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1))  # and fits inside the image
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:])  # torchvision blurs (B, C, H, W); each map on its own
    return tv_blur(flat, [k, k], [sigma, sigma]).reshape(shape)
