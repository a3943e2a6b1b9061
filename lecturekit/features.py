"""What the network learned: filters, activations, last-layer embeddings, maximally activating patches.

- First-layer filters can be looked at directly as small RGB images (Krizhevsky et al. 2012, Fig. 3;
  Zeiler and Fergus 2014, "Visualizing and Understanding Convolutional Networks").
- The last layer's feature vectors: nearest neighbours in feature space retrieve images of the same
  class where pixel space fails (Krizhevsky et al. 2012, Fig. 4); PCA and t-SNE (van der Maaten and
  Hinton 2008) lay them out in 2-D.
- Maximally activating patches (Girshick et al. 2014, "Rich feature hierarchies", Fig. 4; Springenberg
  et al. 2015): the image crops, cut out by the unit's receptive field, that excite a channel most.
- Receptive fields from the architecture: ``lecturekit.receptive_field`` (re-exported here as
  ``features.receptive_field``), used to cut the patches out; and measured, by occlusion, as the
  empirical receptive field (Zhou et al. 2015, "Object Detectors Emerge in Deep Scene CNNs").

Activations are collected under ``torch.no_grad``, batch by batch, with hooks that are removed when
the call ends (lecturekit.hooks.capture); the forward pass stops at the requested layer.

Notebooks: 01_filters, 02_last_layer, 03_activations
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import check_channel, check_images, check_positive_int
from .hooks import Layer, forward_to, iterate_batches, model_device, preserved, progress_bar, renamed, resolve_layer
from .receptive_field import ReceptiveField, receptive_field  # noqa: F401 -- re-exported: features.receptive_field

__all__ = [
    "first_layer_filters", "layer_weights", "show_filters", "activations", "embed", "nearest_neighbours",
    "neighbour_agreement", "snap_to_grid", "show_thumbnails", "ReceptiveField", "receptive_field",
    "Facets", "facets", "Patches", "top_patches", "EmpiricalField", "empirical_receptive_field",
    "FeatureView", "feature_view", "show_feature_view",
]

# ---------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------


def layer_weights(model: nn.Module, layer: Layer) -> torch.Tensor:
    """The weights of a convolution given by name or module, detached: (C_out, C_in, k, k)."""
    name, module = resolve_layer(model, layer)
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"expected a Conv2d layer, but {name!r} is a {type(module).__name__}")
    return module.weight.detach().clone()


def first_layer_filters(model: nn.Module) -> torch.Tensor:
    """The filters of the model's first convolution (in ``named_modules`` order): (C_out, 3, k, k).

    These act on (normalised) RGB pixels, so each can be shown as a small colour image: AlexNet's
    11x11 filters learn oriented edges, colour blobs and Gabor-like gratings (Krizhevsky et al. 2012).

    Notebook: 01_filters
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().clone()  # (C_out, C_in, k, k)
            if w.shape[1] != 3:
                raise ValueError(f"expected the first convolution ({name}) to take 3 RGB channels, got {w.shape[1]}")
            return w
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")


def show_filters(weights: torch.Tensor, nrow: int | None = None, max_out: int = 64, max_in: int = 16,
                 title: str | None = None, figsize=(6, 6)):
    """Show convolution weights as a grid, each filter scaled to its own [min, max]; returns the figure.

    RGB filters (C_out, 3, k, k) are shown in colour (one tile per filter); filters of a higher layer
    (C_out, C_in, k, k) as grayscale tiles, one row per output filter and one column per input channel
    (the first ``max_out`` x ``max_in``). Uses torchvision's ``make_grid(normalize=True, scale_each=True)``.

    Notebook: 01_filters
    """
    from .plotting import show_grid

    w = weights.detach().float().cpu()
    if w.dim() != 4:
        raise ValueError(f"expected weights of shape (C_out, C_in, k, k), got {tuple(w.shape)}")
    if w.shape[1] == 3:
        tiles = w[:max_out]  # (n, 3, k, k)
        nrow = nrow or math.ceil(math.sqrt(len(tiles)))
    else:
        n_out, n_in = min(max_out, w.shape[0]), min(max_in, w.shape[1])
        tiles = w[:n_out, :n_in].reshape(n_out * n_in, 1, *w.shape[2:])  # (n_out * n_in, 1, k, k)
        nrow = n_in
    return show_grid(tiles, nrow=nrow, scale_each=True, padding=1, title=title, figsize=figsize)


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # channels_last: about twice as fast for these convolutions on CPU (measured in bench_features)
    return x.contiguous(memory_format=torch.channels_last)


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """A tensor (N, 3, H, W) in slices of ``batch_size``, or an iterable of such tensors as it comes."""
    if isinstance(images, torch.Tensor):
        check_images(images, "x")
        for s in iterate_batches(len(images), batch_size):
            yield images[s]
    else:
        for batch in images:
            yield check_images(batch, "each batch of images")


def activations(model: nn.Module, x: torch.Tensor, layer: Layer, batch_size: int = 256,
                progress: bool = False) -> torch.Tensor:
    """The output of ``layer`` for images ``x`` (N, 3, H, W) in [0, 1]: (N, C, h, w), or (N, D).

    Computed batch by batch under ``torch.no_grad`` in eval mode, stopping the forward pass at the
    layer; no hook is left behind and the model is left as found (contract 5). The result is detached
    and on ``x``'s device. For the feature vector before CourseNet's classifier use ``layer="pool"``
    and ``.flatten(1)`` -> (N, 128).

    Notebooks: 02_last_layer, 03_activations
    """
    check_images(x)
    name, _ = resolve_layer(model, layer)
    device = model_device(model)
    parts = []
    with preserved(model), torch.no_grad(), forward_to(model, [name]) as run:  # stops after the layer
        for s in progress_bar(list(iterate_batches(len(x), batch_size)), progress, desc=f"activations {name}"):
            parts.append(run(_channels_last(x[s].to(device)))[name].contiguous().to(x.device))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------
# The last layer: embeddings and nearest neighbours
# ---------------------------------------------------------------------------------------------------


def _as_2d_float(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() < 2 or t.shape[0] == 0:
        raise ValueError(f"expected {name} of shape (N, D) with N >= 1, got {tuple(t.shape)}")
    return t.detach().flatten(1).float()


def embed(feats: torch.Tensor, method: str = "tsne", seed: int = 0, n_components: int = 2,
          perplexity: float = 30.0, steps: int = 1000, threads: int | None = 1) -> torch.Tensor:
    """Feature vectors (N, D) (or (N, C, h, w), flattened) -> (N, n_components) positions.

    ``method="pca"``: scikit-learn's PCA, a linear projection on the directions of largest variance.
    ``method="tsne"``: scikit-learn's t-SNE (van der Maaten and Hinton 2008), which keeps
    neighbourhoods: points that are close in feature space stay close in the plane. As is common, the
    features are first reduced to 50 dimensions by PCA; perplexity is capped at (N - 1) / 3, ``steps``
    is t-SNE's number of iterations (at least 250). ``threads``: OpenMP threads for t-SNE; the default 1
    is deliberate: on a busy 2-core machine the default thread pool made Barnes-Hut t-SNE 3-4x slower
    (41 s against 12 s for 600 points, measured); ``None`` keeps scikit-learn's default.

    Notebook: 02_last_layer
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = _as_2d_float(feats, "feats").cpu().numpy().astype(np.float64)  # (N, D)
    if not np.isfinite(X).all():
        raise ValueError("expected finite feature values, found NaN or inf")
    if method == "pca":
        Y = PCA(n_components=n_components, random_state=seed).fit_transform(X)
    elif method == "tsne":
        if len(X) < 4:
            raise ValueError(f"t-SNE needs at least 4 points, got {len(X)}")
        if X.shape[1] > 50 and len(X) > 50:
            X = PCA(n_components=50, random_state=seed).fit_transform(X)
        from threadpoolctl import threadpool_limits

        import inspect

        # scikit-learn 1.5 renamed n_iter to max_iter (and 1.7 removed n_iter); pyproject allows >= 1.2
        iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
        tsne = TSNE(n_components=n_components, init="pca", random_state=seed, perplexity=min(perplexity, (len(X) - 1) / 3),
                    **{iters: max(250, steps)})
        with threadpool_limits(limits=threads, user_api="openmp"):
            Y = tsne.fit_transform(X)
    else:
        raise ValueError(f"unknown embedding method {method!r}; expected 'tsne' or 'pca'")
    return torch.from_numpy(np.ascontiguousarray(Y)).float()


def nearest_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int = 5, exclude_self: bool = False,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``bank`` (N, D) to each row of ``query`` (M, D), Euclidean distance.

    Returns ``(indices, distances)``, both (M, k), nearest first. ``exclude_self=True`` (when ``query``
    is ``bank``) leaves each point out of its own neighbours. Images (N, 3, H, W) are flattened: that
    is nearest neighbours in pixel space. Queries are processed in chunks, so memory is (chunk, N).

        ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b

    Notebook: 02_last_layer
    """
    Q, B = _as_2d_float(query, "query"), _as_2d_float(bank, "bank")
    if Q.shape[1] != B.shape[1]:
        raise ValueError(f"expected query and bank of the same dimension, got {Q.shape[1]} and {B.shape[1]}")
    if exclude_self and len(Q) != len(B):
        raise ValueError(f"exclude_self needs query and bank to be the same points, got {len(Q)} and {len(B)}")
    n_avail = len(B) - int(exclude_self)
    if not 1 <= k <= n_avail:
        raise ValueError(f"expected k between 1 and {n_avail} (the bank's size{' minus the point itself' if exclude_self else ''}), got {k}")
    B = B.to(Q.device)
    centre = B.mean(0)  # shifting both sets changes no distance, but shrinks the norms, and with them
    Q, B = Q - centre, B - centre  # the float32 cancellation error of the expansion below
    b2 = (B * B).sum(1)  # (N,)
    idx, dist = [], []
    for s in iterate_batches(len(Q), chunk):
        q = Q[s]  # (m, D)
        d2 = ((q * q).sum(1, keepdim=True) + b2 - 2 * q @ B.T).clamp_(min=0)  # (m, N) one matrix product
        if exclude_self:
            rows = torch.arange(s.start, s.stop, device=Q.device)
            d2[rows - s.start, rows] = float("inf")
        _, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)  # (m, k)
        exact = (q[:, None, :] - B[i]).norm(dim=2)  # (m, k) the chosen distances, computed directly
        exact, order = torch.sort(exact, dim=1, stable=True)
        idx.append(i.gather(1, order))
        dist.append(exact)
    return torch.cat(idx), torch.cat(dist)


def neighbour_agreement(feats: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Top-k neighbour label agreement: the fraction of each point's k nearest neighbours (itself left
    out) that share its label, averaged over all points. 1.0 = every neighbour of the same class;
    1 / n_classes is chance for balanced classes.

    Notebook: 02_last_layer
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or len(labels) != len(feats):
        raise ValueError(f"expected one label per feature vector ({len(feats)},), got {tuple(labels.shape)}")
    idx, _ = nearest_neighbours(feats, feats, k, exclude_self=True)  # (N, k)
    labels = labels.to(idx.device)
    return (labels[idx] == labels[:, None]).float().mean().item()


def snap_to_grid(xy: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Assign 2-D points (N, 2) to distinct cells of a rows x cols grid, keeping the layout: (N, 2) (row, col).

    The assignment minimises the total squared distance between each point (scaled to the grid) and
    its cell, solved exactly by scipy's ``linear_sum_assignment`` (a Hungarian-style solver), like the
    grid pictures of Karpathy's cnnembed pages. Needs N <= rows * cols.

    Notebook: 02_last_layer
    """
    from scipy.optimize import linear_sum_assignment

    P = _as_2d_float(xy, "xy").cpu().numpy().astype(np.float64)
    if P.shape[1] != 2:
        raise ValueError(f"expected 2-D points (N, 2), got {P.shape}")
    if len(P) > rows * cols:
        raise ValueError(f"expected at most rows * cols = {rows * cols} points, got {len(P)}")
    lo, hi = P.min(0), P.max(0)
    P = (P - lo) / np.where(hi > lo, hi - lo, 1.0)  # (N, 2) in [0, 1]
    P = P[:, ::-1] * [rows - 1, cols - 1]  # (row, col) coordinates: y up = row 0 at the top below
    P[:, 0] = (rows - 1) - P[:, 0]
    cells = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    cost = ((P[:, None, :] - cells[None, :, :]) ** 2).sum(-1)  # (N, rows * cols)
    point, cell = linear_sum_assignment(cost)
    out = np.empty((len(P), 2), dtype=np.int64)
    out[point] = cells[cell]
    return torch.from_numpy(out)


@renamed(images="x")
def show_thumbnails(xy: torch.Tensor, x: torch.Tensor, zoom: float | None = None, labels=None,
                    grid: tuple[int, int] | None = None, title: str | None = None, figsize=(9, 9)):
    """The lecture's picture: each image drawn as a thumbnail at its 2-D position; returns the figure.

    ``grid=(rows, cols)``: snap the images to a grid first (:func:`snap_to_grid`) so that none overlap.
    ``labels`` (N,) colour a thin frame per class. ``zoom``: thumbnail scale (default: fill the grid's
    cells, or 0.35 without a grid).

    Notebook: 02_last_layer
    """
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    check_images(x)
    if len(xy) != len(x):
        raise ValueError(f"expected one position per image, got {len(xy)} positions for {len(x)} images")
    pos = snap_to_grid(xy, *grid).flip(1).float() * torch.tensor([1.0, -1.0]) if grid else torch.as_tensor(xy).float()
    pos = pos.numpy()
    if zoom is None:  # OffsetImage draws an image at `zoom` points per pixel: fill ~80% of a cell
        zoom = 0.8 * min(figsize) * 72 / max(grid) / x.shape[-1] if grid else 0.35
    fig, ax = plt.subplots(figsize=figsize)
    colours = plt.get_cmap("tab10")
    for i in range(len(x)):
        frame = dict(edgecolor=colours(int(labels[i]) % 10), lw=1.5) if labels is not None else dict(lw=0)
        box = AnnotationBbox(OffsetImage(x[i].permute(1, 2, 0).cpu().numpy(), zoom=zoom),
                             pos[i], frameon=labels is not None, pad=0.05, bboxprops=frame)
        ax.add_artist(box)
    pad = 0.5 if grid else 0.05 * (pos.max(0) - pos.min(0)).max()
    ax.set_xlim(pos[:, 0].min() - pad, pos[:, 0].max() + pad)
    ax.set_ylim(pos[:, 1].min() - pad, pos[:, 1].max() + pad)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


@dataclass
class Facets:
    """A set of images split into clusters by their features (Nguyen et al. 2016).

    labels: (N,) each image's cluster, clusters numbered by size, largest first; means: (k, 3, H, W)
    each cluster's mean image; centres: (k, D) each cluster's mean feature vector; sizes: (k,).
    """

    labels: torch.Tensor
    means: torch.Tensor
    centres: torch.Tensor
    sizes: torch.Tensor


@renamed(images="x")
def facets(model: nn.Module, x: torch.Tensor, layer: Layer = "pool", k: int = 3, seed: int = 0,
           batch_size: int = 256) -> Facets:
    """Cluster images by their features at ``layer`` with k-means: the facets of a class.

    Nguyen, Yosinski and Clune 2016 ("Multifaceted Feature Visualization") observe that one class
    neuron responds to several kinds of images (a grocery store seen from outside and inside); they
    cluster the class's training images in feature space and start one gradient ascent from each
    cluster's **mean image**, which gives one visualisation per facet. Here: scikit-learn's ``KMeans``
    (``n_init=10``, seeded) on the flattened activations (N, D) of ``x`` (N, 3, H, W) in [0, 1].
    Start :func:`lecturekit.synthesis.class_visualization` from ``means`` with ``start=``.

    Notebook: 08_gradient_ascent
    """
    from sklearn.cluster import KMeans

    check_images(x)
    k = check_positive_int(k, "k")
    if k > len(x):
        raise ValueError(f"expected k at most the number of images ({len(x)}), got k={k}")
    feats = activations(model, x, layer, batch_size=batch_size).flatten(1).double().cpu()  # (N, D)
    found = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats.numpy())  # (N,)
    found = torch.from_numpy(found).long()
    sizes = torch.bincount(found, minlength=k)
    order = torch.sort(sizes, descending=True, stable=True).indices  # cluster order: largest first
    labels = torch.argsort(order)[found]  # old cluster id -> its rank
    onehot = F.one_hot(labels, k).double()  # (N, k)
    counts = onehot.sum(0).clamp(min=1)  # (k,)
    means = torch.einsum("nk,nchw->kchw", onehot, x.detach().cpu().double()) / counts.view(-1, 1, 1, 1)
    centres = onehot.T @ feats / counts[:, None]  # (k, D)
    return Facets(labels.to(x.device), means.float().to(x.device), centres.float().to(x.device), sizes[order].to(x.device))


# ---------------------------------------------------------------------------------------------------
# Maximally activating patches
# ---------------------------------------------------------------------------------------------------


@dataclass
class Patches:
    """The k image crops that excite one channel most, strongest first.

    crops: (k, 3, r, r) in [0, 1], r the receptive field's size, padded with ``pad_value`` where the
    field reaches outside the image; values: (k,) the activations; index: (k,) the images' indices;
    positions: (k, 2) the units' (y, x) in the layer's maps; boxes: (k, 4) the crops in the image
    (x0, y0, x1, y1), clipped to it, x1/y1 exclusive; rf: the receptive field used.
    """

    crops: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    rf: ReceptiveField

    def __len__(self) -> int:
        return len(self.values)


def _crop(image: torch.Tensor, rf: ReceptiveField, y: int, x: int, pad_value: float) -> torch.Tensor:
    """Unit (y, x)'s region of ``image`` (3, H, W), padded where it leaves the image: (3, r, r)."""
    P = max(0, -rf.start) + rf.size  # enough padding for every unit whose field touches the image
    padded = F.pad(image, (P, P, P, P), value=pad_value)
    x0, y0, _, _ = rf.box(y, x)
    return padded[:, y0 + P: y0 + P + rf.size, x0 + P: x0 + P + rf.size]


class _RunningTopK:
    """The k strongest images of one channel so far, strongest first, with their crops."""

    def __init__(self, k: int, rf: ReceptiveField, pad_value: float):
        self.k, self.rf, self.pad_value = k, rf, pad_value
        self.values = torch.empty(0)
        self.index = torch.empty(0, dtype=torch.long)
        self.positions = torch.empty(0, 2, dtype=torch.long)
        self.crops = torch.empty(0, 3, rf.size, rf.size)

    def update(self, batch: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, first: int) -> None:
        """batch (B, 3, H, W) on the CPU; v (B,) each image's strongest response; pos (B, 2) its (y, x)."""
        n_old = len(self.values)
        cand_v = torch.cat([self.values, v])
        cand_i = torch.cat([self.index, torch.arange(first, first + len(v))])
        cand_pos = torch.cat([self.positions, pos])
        keep = torch.sort(cand_v, descending=True, stable=True).indices[: self.k]  # stable: ties -> earlier image
        crops = [self.crops[c] if c < n_old else _crop(batch[c - n_old], self.rf, *cand_pos[c].tolist(), self.pad_value)
                 for c in keep.tolist()]  # only the winners are cropped
        self.values, self.index, self.positions = cand_v[keep], cand_i[keep], cand_pos[keep]
        self.crops = torch.stack(crops)

    def result(self, H: int, W: int, device) -> Patches:
        boxes = torch.tensor([self.rf.box(y, x, H, W) for y, x in self.positions.tolist()], dtype=torch.long)
        return Patches(self.crops.to(device), self.values.to(device), self.index.to(device),
                       self.positions.to(device), boxes.reshape(-1, 4).to(device), self.rf)


@renamed(images="x")
def top_patches(model: nn.Module, x: torch.Tensor | Iterable[torch.Tensor], layer: Layer, channel: int | list[int],
                k: int = 9, batch_size: int = 256, pad_value: float = 0.5,
                progress: bool = False) -> Patches | list[Patches]:
    """The ``k`` images whose unit of ``channel`` at ``layer`` responds most, cropped by its receptive field.

    ``x``: a tensor (N, 3, H, W) in [0, 1], or an iterable of such batches (a generator keeps the
    images themselves out of memory). For each image the strongest unit of the channel (its maximum
    over positions) is its score; the k best images are kept in a running top-k while the batches
    stream by (only k crops are ever stored), so memory stays flat as N grows. Ties go to the earlier
    image, so the result does not depend on ``batch_size``. Returns a :class:`Patches`; ``channel`` may
    also be a list of channels, which gives a list of Patches from one pass over the images.

    Raises ``ValueError`` for an unknown layer, a layer without local receptive field, a channel out of
    range, or k larger than the number of images.

    Notebook: 03_activations
    """
    channels = [channel] if isinstance(channel, (int, np.integer)) and not isinstance(channel, bool) else channel
    if not isinstance(channels, (list, tuple)) or not channels or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in channels):
        raise TypeError(f"expected an int channel or a non-empty list of ints, got {channel!r}")
    k = check_positive_int(k, "k")
    if isinstance(x, torch.Tensor) and k > len(x):
        raise ValueError(f"expected k at most the number of images ({len(x)}), got k={k}")
    name, _ = resolve_layer(model, layer)
    rf = receptive_field(model, name)
    device = model_device(model)
    tops = [_RunningTopK(k, rf, pad_value) for _ in channels]
    chosen = torch.tensor([int(c) for c in channels])
    seen, H, W, out_device = 0, None, None, None
    with preserved(model), torch.no_grad(), forward_to(model, [name]) as run:  # stops after the layer
        for batch in progress_bar(_batches(x, batch_size), progress, desc=f"top patches {name}"):
            out_device = batch.device
            A = run(_channels_last(batch.to(device)))[name].contiguous()  # (B, C, h, w)
            if A.dim() != 4:
                raise ValueError(f"expected layer {name!r} to give maps (N, C, h, w), got {tuple(A.shape)}")
            check_channel(chosen if channels is channel else int(channel), A.shape[1], name)
            H, W, w = batch.shape[2], batch.shape[3], A.shape[3]
            v, where = A[:, chosen.to(A.device)].flatten(2).float().cpu().max(2)  # (B, n_channels) strongest unit
            batch_cpu = batch.cpu()
            for j, top in enumerate(tops):
                pos = torch.stack([where[:, j] // w, where[:, j] % w], 1)  # (B, 2) (y, x)
                top.update(batch_cpu, v[:, j], pos, seen)
            seen += len(v)
    if seen == 0:
        raise ValueError("expected at least one image, got an empty iterable")
    if k > seen:
        raise ValueError(f"expected k at most the number of images ({seen}), got k={k}")
    results = [top.result(H, W, out_device) for top in tops]
    return results if channels is channel else results[0]


# ---------------------------------------------------------------------------------------------------
# Empirical receptive fields (Zhou et al. 2015)
# ---------------------------------------------------------------------------------------------------


@dataclass
class EmpiricalField:
    """A unit's empirical receptive field, measured by occlusion over its top images.

    map: (2H - 1, 2W - 1) the discrepancy maps averaged over the k images, each shifted so that its
    unit's theoretical field centre sits at the middle pixel (H - 1, W - 1) (half a pixel up-left of it
    for an even field size); maps: (k, 2H - 1, 2W - 1) the aligned maps of each image; size: the side
    of the smallest centred square that holds ``mass`` of the averaged map's total; index: (k,) the top
    images; positions: (k, 2) their strongest units (y, x); rf: the theoretical receptive field.
    """

    map: torch.Tensor
    maps: torch.Tensor
    size: int
    index: torch.Tensor
    positions: torch.Tensor
    rf: ReceptiveField


def _centred_square_side(m: torch.Tensor, mass: float) -> int:
    """The smallest odd side s = 2h + 1 of a square centred at the middle of ``m`` (2H-1, 2W-1) holding
    at least ``mass`` of ``m.sum()`` (``m`` >= 0); 0 for an all-zero map."""
    total = m.sum().item()
    if total <= 0:
        return 0
    cy, cx = (m.shape[0] - 1) // 2, (m.shape[1] - 1) // 2
    for h in range(max(cy, cx) + 1):
        if m[max(0, cy - h): cy + h + 1, max(0, cx - h): cx + h + 1].sum().item() >= mass * total * (1 - 1e-6):
            return 2 * h + 1
    return 2 * max(cy, cx) + 1


@renamed(images="x")
def empirical_receptive_field(model: nn.Module, x: torch.Tensor, layer: Layer, channel: int, k: int = 8,
                              patch: int = 3, stride: int = 1, fill: float | None = None, mass: float = 0.9,
                              batch_size: int = 256, seed: int = 0, progress: bool = False) -> EmpiricalField:
    """Where a unit actually looks: occlusion discrepancy maps over its top images, aligned and averaged.

    Zhou et al. 2015 ("Object Detectors Emerge in Deep Scene CNNs", Sec. 3.2): for each of the ``k``
    images in ``x`` (N, 3, H, W) that excite ``channel`` at ``layer`` most (:func:`top_patches`), take its
    strongest unit (y*, x*) and slide a ``patch`` x ``patch`` occluder with ``stride`` over the image;
    the discrepancy of occluder position o is

        d_o = | A_c(y*, x*)(image) - A_c(y*, x*)(image with o occluded) |,

    spread over the pixels the occluder covers and averaged per pixel over the occluders covering it
    (so ``stride`` > 1 still gives a dense map). The occluder is filled with uniform random pixels, as
    in the paper (drawn once per image from a local generator seeded by ``seed``), or with the grey
    level ``fill``. Each map is shifted so that the unit's theoretical field centre is the map's middle,
    then the k maps are averaged. The paper finds this empirical field much smaller than the
    theoretical one (``rf.size``); ``size`` measures it as the side of the smallest centred square
    holding ``mass`` of the discrepancy. Spreading each discrepancy over its occluder widens the map by
    ``patch - 1`` on each side, so a unit that sees one pixel measures ``2 patch - 1``: the measure
    errs on the large side, which makes "smaller than the theoretical field" a conservative finding.

    Only occluders that overlap the unit's theoretical field are run through the model: the others
    cannot change the unit, their discrepancy is exactly 0 (they still count in the per-pixel average).
    Runs under ``torch.no_grad`` in eval mode, the forward pass stopping at the layer; the model is
    left as found.

    Notebook: 03_activations
    """
    check_images(x)
    patch, stride = check_positive_int(patch, "patch"), check_positive_int(stride, "stride")
    N, _, H, W = x.shape
    if patch > min(H, W):
        raise ValueError(f"expected patch at most the image size {min(H, W)}, got {patch}")
    if fill is not None and not 0.0 <= float(fill) <= 1.0:
        raise ValueError(f"expected fill to be a grey level in [0, 1] or None (random pixels), got {fill}")
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"expected mass in (0, 1], got {mass}")
    top = top_patches(model, x, layer, channel, k=k, batch_size=batch_size)  # checks layer, channel, k
    name, _ = resolve_layer(model, layer)
    rf, device = top.rf, model_device(model)
    gen = torch.Generator().manual_seed(seed)
    ys, xs = list(range(0, H - patch + 1, stride)), list(range(0, W - patch + 1, stride))
    count = torch.zeros(H, W)  # (H, W) occluders covering each pixel, over the whole grid
    for oy in ys:
        for ox in xs:
            count[oy: oy + patch, ox: ox + patch] += 1
    maps = torch.zeros(len(top), 2 * H - 1, 2 * W - 1)
    with preserved(model), torch.no_grad(), forward_to(model, [name]) as run:
        for j in progress_bar(range(len(top)), progress, desc=f"empirical receptive field {name}"):
            image = x[int(top.index[j])].detach().cpu().float()  # (3, H, W)
            uy, ux = top.positions[j].tolist()
            bx0, by0, bx1, by1 = rf.box(uy, ux, H, W)  # the theoretical field, clipped, x1/y1 exclusive
            corners = [(oy, ox) for oy in ys for ox in xs  # occluders that overlap the field
                       if oy < by1 and oy + patch > by0 and ox < bx1 and ox + patch > bx0]
            noise = (torch.rand(3, H, W, generator=gen) if fill is None else torch.full((3, H, W), float(fill)))
            base = run(image[None].to(device))[name][0, channel, uy, ux].float().cpu()
            total = torch.zeros(H, W)  # (H, W) summed discrepancy of the occluders covering each pixel
            for s in iterate_batches(len(corners), batch_size):
                batch = image.repeat(s.stop - s.start, 1, 1, 1)  # (b, 3, H, W)
                for b, (oy, ox) in enumerate(corners[s]):
                    batch[b, :, oy: oy + patch, ox: ox + patch] = noise[:, oy: oy + patch, ox: ox + patch]
                a = run(batch.to(device))[name][:, channel, uy, ux].float().cpu()  # (b,)
                for d, (oy, ox) in zip((a - base).abs().tolist(), corners[s]):
                    total[oy: oy + patch, ox: ox + patch] += d
            d_map = total / count.clamp(min=1)  # (H, W) mean discrepancy per pixel
            cy = min(max(math.floor(rf.start + uy * rf.jump + (rf.size - 1) / 2), 0), H - 1)  # field centre
            cx = min(max(math.floor(rf.start + ux * rf.jump + (rf.size - 1) / 2), 0), W - 1)
            oy0, ox0 = H - 1 - cy, W - 1 - cx  # where the image's (0, 0) lands on the canvas
            maps[j, oy0: oy0 + H, ox0: ox0 + W] = d_map
    mean = maps.mean(0)  # (2H - 1, 2W - 1)
    return EmpiricalField(mean.to(x.device), maps.to(x.device), _centred_square_side(mean, float(mass)),
                          top.index, top.positions, rf)


# ---------------------------------------------------------------------------------------------------
# The explorer's pure function (lecturekit.widgets.feature_explorer draws it)
# ---------------------------------------------------------------------------------------------------


@dataclass
class FeatureView:
    """What the layer/channel explorer shows: one image's maps of a layer, and a channel's top patches."""

    layer: str
    channel: int
    image: torch.Tensor  # (3, H, W)
    maps: torch.Tensor  # (C, h, w) the layer's activation maps for the image
    patches: Patches  # the channel's top patches over all images


@renamed(images="x")
def feature_view(model: nn.Module, x: torch.Tensor, layer: Layer, channel: int, index: int = 0, k: int = 8,
                 batch_size: int = 256) -> FeatureView:
    """Activation maps of ``x[index]`` at ``layer`` and the top-``k`` patches of ``channel`` over ``x``.

    Notebook: 03_activations
    """
    check_images(x)
    if not 0 <= index < len(x):
        raise ValueError(f"expected an image index in [0, {len(x)}), got {index}")
    name, _ = resolve_layer(model, layer)
    maps = activations(model, x[index: index + 1], name)[0]  # (C, h, w)
    if maps.dim() != 3:
        raise ValueError(f"expected layer {name!r} to give maps (C, h, w), got {tuple(maps.shape)}")
    check_channel(channel, maps.shape[0], name)
    patches = top_patches(model, x, name, channel, k=min(k, len(x)), batch_size=batch_size)
    return FeatureView(name, int(channel), x[index], maps, patches)


def show_feature_view(view: FeatureView, ncols: int = 16, figsize=(11, 6.5)):
    """Draw a :class:`FeatureView`: the image, its activation maps (grayscale, one scale for all maps so
    that weak channels look dark; the chosen channel framed in red) and the channel's top patches.

    Notebook: 03_activations
    """
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    maps = view.maps.detach().float().cpu()  # (C, h, w)
    peak = maps.max().item()
    C = len(maps)
    ncols = min(ncols, C)
    tiles = (maps / peak if peak > 0 else maps).clamp(0, 1)[:, None].repeat(1, 3, 1, 1)  # (C, 3, h, w)
    tiles = torch.nn.functional.pad(tiles, (1, 1, 1, 1), value=0.25)
    tiles[view.channel, :, [0, -1], :] = torch.tensor([1.0, 0, 0])[:, None, None]  # a red frame
    tiles[view.channel, :, :, [0, -1]] = torch.tensor([1.0, 0, 0])[:, None, None]
    grid = make_grid(tiles, nrow=ncols, padding=1, pad_value=1.0)
    patches = make_grid(view.patches.crops.cpu(), nrow=len(view.patches), padding=2, pad_value=1.0)
    fig = plt.figure(figsize=figsize)
    spec = fig.add_gridspec(2, 2, width_ratios=[1, 4], height_ratios=[3, 1.2])
    ax_img, ax_maps, ax_patch = fig.add_subplot(spec[0, 0]), fig.add_subplot(spec[0, 1]), fig.add_subplot(spec[1, :])
    ax_img.imshow(view.image.detach().cpu().permute(1, 2, 0).numpy())
    ax_img.set_title("image")
    ax_maps.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax_maps.set_title(f"{view.layer}: {C} activation maps (max {peak:.2f}); channel {view.channel} in red")
    ax_patch.imshow(patches.permute(1, 2, 0).numpy(), interpolation="nearest")
    rf = view.patches.rf
    ax_patch.set_title(f"channel {view.channel}: top {len(view.patches)} patches (receptive field {rf.size}x{rf.size}), "
                       f"activations {', '.join(f'{v:.2f}' for v in view.patches.values.tolist())}", fontsize=9)
    for ax in (ax_img, ax_maps, ax_patch):
        ax.axis("off")
    fig.tight_layout()
    return fig
