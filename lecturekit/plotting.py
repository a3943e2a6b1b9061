"""Plots for the course: image grids with titles, heatmap overlays, learning curves (matplotlib).

Images come in as pixel-space tensors (N, 3, H, W) in [0, 1] (or (N, H, W) / (N, 1, H, W) grayscale);
maps as (N, H, W). Every function draws on a figure it returns, so notebooks can tweak or save it.
Overlays are RGB (never BGR) and do not rescale a map per image unless asked: magnitudes matter when
comparing explanations (Adebayo et al. 2018).
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np
import torch

__all__ = ["show_images", "show_grid", "overlay", "show_heatmaps", "moving_average", "learning_curves",
           "STANDIN_MARK", "title_for", "mark_standin", "figure_marked", "standin_ran", "FIGURE_MIME"]

# --- Layout checks: a notebook cell can assert that its figure is legible (issue 16) ---------------------


def _text_boxes(fig):
    """(label, display-space Bbox) of every non-empty title and the suptitle of ``fig``, as drawn."""
    fig.canvas.draw()
    fig.canvas.draw()  # twice: a layout engine places a suptitle added late (mark_standin) on the second pass
    renderer = fig.canvas.get_renderer()
    boxes = []
    for i, ax in enumerate(fig.axes):
        for text in (ax.title, ax._left_title, ax._right_title):  # the three title slots (loc=)
            if text.get_visible() and text.get_text():
                boxes.append((f"axes {i} title {text.get_text()!r}", text.get_window_extent(renderer), ax))
    if fig._suptitle is not None and fig._suptitle.get_text():  # Figure.get_suptitle needs mpl 3.8
        boxes.append((f"suptitle {fig._suptitle.get_text()!r}", fig._suptitle.get_window_extent(renderer), None))
    return boxes


def overlapping_titles(fig) -> list[str]:
    """Titles of ``fig`` that overlap another title or another subplot's drawing area; [] when legible.

    ``assert not lk.plotting.overlapping_titles(fig)`` in a notebook checks a grid's layout (a second row's
    titles running into the images above is the usual failure). Colour bars' axes count as subplots.
    """
    boxes = _text_boxes(fig)
    found = []
    for a, (name_a, box_a, ax_a) in enumerate(boxes):
        for name_b, box_b, _ in boxes[a + 1:]:
            if box_a.overlaps(box_b):
                found.append(f"{name_a} overlaps {name_b}")
        for j, ax in enumerate(fig.axes):
            if ax is not ax_a and ax.get_visible() and box_a.overlaps(ax.get_window_extent()):
                found.append(f"{name_a} overlaps the drawing area of axes {j}")
    return found


def legend_covers_data(ax) -> float:
    """Share of the plotted points of ``ax``'s lines that lie under its legend (0 when it has none).

    ``assert lk.plotting.legend_covers_data(ax) == 0`` checks that a legend hides no curve."""
    legend = ax.get_legend()
    if legend is None:
        return 0.0
    ax.figure.canvas.draw()
    box = legend.get_window_extent(ax.figure.canvas.get_renderer())
    points = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))  # (P, 2) display coordinates
        xy = xy[np.isfinite(xy).all(1)]
        if len(xy) > 1:  # the segments too, not only the markers: 20 points along each
            t = np.linspace(0, 1, 20, endpoint=False)[None, :, None]
            xy = np.concatenate([(xy[:-1, None] * (1 - t) + xy[1:, None] * t).reshape(-1, 2), xy[-1:]])
        points.append(xy)
    if not any(len(p) for p in points):
        return 0.0
    xy = np.concatenate(points)
    inside = (xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)
    return float(inside.mean())


__all__ += ["overlapping_titles", "legend_covers_data"]

# Appended to the title of every figure made with a stand-in ImageNet model (models.imagenet_model), so
# that a screenshot can never pass random weights off as a result.
STANDIN_MARK = " (stand-in weights)"


def _to_numpy_images(images) -> np.ndarray:
    """(N, 3, H, W) / (N, 1, H, W) / (N, H, W) tensor or array -> (N, H, W, 3) or (N, H, W) float."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, float)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x[None]  # a single (C, H, W) image
    if x.ndim == 4 and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4):
        raise ValueError(f"expected images of shape (N, 3, H, W), (N, 1, H, W) or (N, H, W), got {x.shape}")
    return x


def _grid_axes(n: int, ncols: int, size: float):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    # constrained layout leaves room for multi-line titles, which tight_layout let run into the row above
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def show_images(images, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.6,
                scale_each: bool = False, cmap: str = "gray", suptitle: str | None = None, model=None):
    """Show images in a grid with optional titles; returns the figure.

    ``scale_each``: stretch each image to its own [min, max] (for filters and feature maps, whose
    values are not pixels); otherwise values are clipped to [0, 1]. ``model``: the model the images
    come from; a stand-in model's figure is marked (:func:`mark_standin`).
    """
    x = _to_numpy_images(images)
    if titles is not None and len(titles) != len(x):
        raise ValueError(f"expected one title per image ({len(x)}), got {len(titles)}")
    fig, axes = _grid_axes(len(x), ncols, size)
    for i, (ax, im) in enumerate(zip(axes, x)):
        if scale_each:
            lo, hi = im.min(), im.max()
            im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
        ax.imshow(np.clip(im, 0, 1), cmap=cmap if im.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest" if im.shape[0] <= 32 else "antialiased")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return mark_standin(fig, model)


def show_grid(images, nrow: int = 8, scale_each: bool = True, padding: int = 1, title: str | None = None,
              figsize=(6, 6), model=None):
    """One image of many small ones via ``torchvision.utils.make_grid`` (filters, feature maps).

    ``model``: the model the images come from; a stand-in model's figure is marked in its title."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    grid = make_grid(x, nrow=nrow, normalize=scale_each, scale_each=scale_each, padding=padding, pad_value=1)
    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title_for(model, title))
    fig.tight_layout()
    return mark_standin(fig, model)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5, cmap: str = "jet",
            normalize: bool = True) -> np.ndarray:
    """An RGB (H, W, 3) array: ``image`` (3, H, W) in [0, 1] blended with ``heatmap`` (H, W).

    ``normalize``: scale the map to [0, 1] by its maximum absolute value (the sign-less maps of
    saliency, CAM); otherwise the map must already be in [0, 1].
    """
    import matplotlib

    img = _to_numpy_images(image)[0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    h = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, float)
    h = np.squeeze(h)
    if h.shape != img.shape[:2]:
        raise ValueError(f"expected a heatmap of the image's size {img.shape[:2]}, got {h.shape}")
    if normalize:
        peak = np.abs(h).max()
        h = np.abs(h) / peak if peak > 0 else np.zeros_like(h)
    colours = matplotlib.colormaps[cmap](np.clip(h, 0, 1))[..., :3]
    return np.clip((1 - alpha) * img + alpha * colours, 0, 1)


def show_heatmaps(images: torch.Tensor, maps: torch.Tensor, titles: Sequence[str] | None = None,
                  alpha: float = 0.5, ncols: int = 6, size: float = 2.0, cmap: str = "jet", model=None):
    """A row of images with their maps (N, H, W) overlaid; returns the figure (marked when ``model``
    has stand-in weights)."""
    if len(images) != len(maps):
        raise ValueError(f"expected as many maps as images, got {len(maps)} maps for {len(images)} images")
    blended = np.stack([overlay(images[i], maps[i], alpha=alpha, cmap=cmap) for i in range(len(images))])
    return show_images(blended.transpose(0, 3, 1, 2), titles=titles, ncols=ncols, size=size, model=model)


def moving_average(values: Sequence[float], window: int = 20) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` points average what is there so far."""
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"expected a window of at least 1, got {window}")
    csum = np.cumsum(np.insert(v, 0, 0.0))
    counts = np.minimum(np.arange(1, len(v) + 1), window)
    return (csum[1:] - csum[np.maximum(0, np.arange(1, len(v) + 1) - window)]) / counts


def learning_curves(history, window: int = 25, title: str | None = None):
    """Loss and accuracy against the step, raw (faint) with a moving average (solid); returns the figure.

    ``history``: a :class:`lecturekit.training.History` or a dict with ``loss`` (and optionally
    ``train_acc``, ``val_step``, ``val_acc``).
    """
    import matplotlib.pyplot as plt

    get = (lambda k: history.get(k, [])) if isinstance(history, dict) else (lambda k: getattr(history, k, []))
    loss = np.asarray(get("loss"), float)
    steps = np.arange(len(loss))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss (per step)")
    ax_loss.plot(steps, moving_average(loss, window), color="tab:blue", lw=2, label=f"moving average ({window})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    train_acc = np.asarray(get("train_acc"), float)
    if len(train_acc):
        ax_acc.plot(steps, train_acc, color="tab:orange", alpha=0.2, lw=0.8)
        ax_acc.plot(steps, moving_average(train_acc, window), color="tab:orange", lw=2, label="train (moving avg)")
    if len(get("val_acc")):
        ax_acc.plot(get("val_step"), get("val_acc"), "o-", color="tab:green", lw=2, label="validation")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def title_for(model, text: str) -> str:
    """``text``, with :data:`STANDIN_MARK` appended when ``model`` has stand-in weights (``model.standin``).

    ``ax.set_title(lk.plotting.title_for(model, "Grad-CAM, layer4"))``
    """
    if getattr(model, "standin", False) and not text.endswith(STANDIN_MARK):
        return text + STANDIN_MARK
    return text


def mark_standin(fig, model):
    """Mark a finished figure made with ``model``: its suptitle gets :data:`STANDIN_MARK` (in red when
    the figure had none). A figure of a model with real weights (or ``model=None``) is returned unchanged."""
    if not getattr(model, "standin", False) or figure_marked(fig):
        return fig
    current = fig._suptitle.get_text() if fig._suptitle is not None else ""  # Figure.get_suptitle needs mpl 3.8
    if current:
        fig.suptitle(title_for(model, current))
    else:
        fig.suptitle(STANDIN_MARK.strip(" ()"), color="tab:red")
    return fig


# ---- Which figures need the mark: a check that the executed notebook carries ------------------------
# A stand-in model (models.imagenet_model) calls note_standin() on every forward pass; in a Jupyter
# kernel the flag is reset before each cell, and every figure the cell displays carries one more
# output entry, FIGURE_MIME: {"standin": a stand-in model ran in this cell, "marked": the figure says
# "stand-in"}. A figure with standin and not marked also prints STANDIN_UNMARKED on stderr, so the
# author sees it at once and the built HTML shows it (lecturekit.course checks both).

FIGURE_MIME = "application/vnd.lecturekit.figure+json"
STANDIN_UNMARKED = "lecturekit: a stand-in model ran in this cell but this figure does not say so"
_standin = {"ran": False}


def note_standin() -> None:
    """Called by a stand-in model's forward pass: figures of the current cell must carry the mark."""
    _standin["ran"] = True


def standin_ran() -> bool:
    """Whether a stand-in model ran a forward pass in the current notebook cell (since import elsewhere)."""
    return _standin["ran"]


def figure_marked(fig) -> bool:
    """Whether any text of the figure (titles, suptitle, labels, annotations) says "stand-in"."""
    from matplotlib.text import Text

    return any("stand-in" in t.get_text().lower() for t in fig.findobj(Text))


def figure_check(fig, standin: bool | None = None) -> dict:
    """What :data:`FIGURE_MIME` carries for ``fig``; ``standin`` defaults to :func:`standin_ran`."""
    return {"standin": standin_ran() if standin is None else bool(standin), "marked": figure_marked(fig)}


def _figure_entry(fig) -> dict:
    check = figure_check(fig)
    if check["standin"] and not check["marked"]:
        print(f"{STANDIN_UNMARKED}: pass model= to the lecturekit.plotting helper, or call "
              "lk.plotting.mark_standin(fig, model) / ax.set_title(lk.plotting.title_for(model, ...))",
              file=sys.stderr, flush=True)
    return check


def install_figure_check(shell=None) -> bool:
    """In an IPython kernel: reset the stand-in flag before each cell and add :data:`FIGURE_MIME` to
    every displayed figure. Runs once per shell (on import of this module); False outside IPython."""
    if shell is None:  # IPython imported already means we may be in a kernel; importing it costs time
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or getattr(shell, "_lecturekit_figure_check", False):
        return shell is not None
    from IPython.core.formatters import JSONFormatter
    from matplotlib.figure import FigureBase
    from traitlets import Unicode

    class FigureCheckFormatter(JSONFormatter):  # a JSON entry beside the figure's image/png
        format_type = Unicode(FIGURE_MIME)

    def reset(*_args):
        _standin["ran"] = False

    formatter = FigureCheckFormatter(parent=shell.display_formatter)
    # Registered for FigureBase, Figure's base class: matplotlib_inline removes every formatter's entry
    # for Figure itself when the inline backend starts (select_figure_formats), and lookups follow the MRO.
    formatter.for_type(FigureBase, _figure_entry)
    shell.display_formatter.formatters[FIGURE_MIME] = formatter
    shell.events.register("pre_run_cell", reset)
    shell._lecturekit_figure_check = True
    return True

# --- Helpers the lecture notebooks used to define for themselves (issue 9): signed RGB maps and boxes ---

__all__ += ["signed_image", "draw_box"]


def signed_image(g, scale: float | None = None) -> np.ndarray:
    """A signed map (3, H, W) as an RGB picture (H, W, 3) in [0, 1]: grey is 0, brighter is positive.

    Each channel becomes ``0.5 + g / (2 * scale)``, so ``+scale`` maps to 1 and ``-scale`` to 0.
    ``scale``: the magnitude shown at full brightness; None uses the map's own ``max |g|`` (shapes
    only: two maps drawn this way cannot be compared in magnitude, pass one common ``scale`` for that).
    The gradient pictures of Springenberg et al. 2015 and Zeiler and Fergus 2014 are drawn this way.
    Notebook: 05_guided_backprop
    """
    a = g.detach().float().cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g, dtype=float)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"expected a signed map of shape (3, H, W), got shape {tuple(a.shape)}")
    if scale is None:
        scale = float(np.abs(a).max())
    elif not scale > 0:
        raise ValueError(f"expected scale to be a number > 0, got {scale}")
    picture = 0.5 + a / (2 * max(scale, 1e-12))  # (3, H, W): 0 -> grey
    return np.clip(picture, 0, 1).transpose(1, 2, 0)  # (H, W, 3)


def draw_box(ax, box, color: str = "white", lw: float = 1.5, **kwargs):
    """Draw ``box = (x0, y0, x1, y1)`` on an image axis: pixels x0..x1-1 and y0..y1-1 (end exclusive).

    The convention of ShapesWorld's ``boxes`` and of ``ReceptiveField.box``; the rectangle's edges
    lie on the pixels' outer borders (pixel centres are at integers in ``imshow``). Extra keywords go
    to ``matplotlib.patches.Rectangle`` (``ls="--"``, ``label=...``). Returns the patch.
    Notebook: 03_activations
    """
    from matplotlib.patches import Rectangle

    if len(box) != 4:
        raise ValueError(f"expected a box (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"expected x0 <= x1 and y0 <= y1 in the box (x0, y0, x1, y1), got {box!r}")
    return ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=lw,
                                  **kwargs))


install_figure_check()  # in a Jupyter kernel: the stand-in check of every figure
