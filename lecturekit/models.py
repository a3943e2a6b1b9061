"""The course's models: CourseNet trained on ShapesWorld, and torchvision's ImageNet classifiers.

Every model returned here is in eval mode and carries its normalisation inside (a ``normalize``
submodule applied first), so that every technique works in pixel space [0, 1] (DESIGN.md, contract 1).
Layer names stay exactly as torchvision and the papers name them (``"features.12"``, ``"layer4"``).

CourseNet is a plain conv/ReLU/max-pool network ending in global average pooling and one linear
layer, the architecture for which CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative
Localization") is exact.

Notebook: 00_course_model
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from .data import CLASSES

__all__ = [
    "Normalize",
    "CourseNet",
    "fuse_batchnorm",
    "course_model",
    "imagenet_model",
    "class_names",
    "default_device",
    "with_normalization",
    "WEIGHTS_PATH",
    "WeightsUnavailable",
    "BUNDLED_WEIGHTS",
    "weights_path",
    "SHAPES_MEAN",
    "SHAPES_STD",
]

WEIGHTS_PATH = Path(__file__).parent / "weights" / "coursenet.pt"
# The bundled CourseNet weights, by name: the course model, the same recipe from another seed (for
# transfer attacks, notebook 15) and the adversarially trained model (notebook 16). `lecturekit train`
# (with --seed 1, --robust) reproduces each.
BUNDLED_WEIGHTS = {"standard": "coursenet.pt", "seed1": "coursenet_seed1.pt", "robust": "coursenet_robust.pt"}
# The lessons' variants (notebooks 04 and 06): global max pooling instead of average pooling (GAP
# versus GMP, Zhou et al. 2016, Table 2; `lecturekit train --pooling max`) and a model trained on the
# biased ShapesWorld of `data.biased_shapes` (`lecturekit train --biased`).
BUNDLED_WEIGHTS.update(gmp="coursenet_gmp.pt", biased="coursenet_biased.pt")
# How each bundled model is built and reproduced: its global pooling and its `lecturekit train` flags.
POOLING = {"gmp": "max"}
TRAIN_FLAGS = {"seed1": " --seed 1", "robust": " --robust", "gmp": " --pooling max", "biased": " --biased"}


def weights_path(weights: str = "standard") -> Path:
    """The file of the bundled CourseNet weights named ``weights`` (one of ``BUNDLED_WEIGHTS``)."""
    if weights not in BUNDLED_WEIGHTS:
        raise ValueError(f"unknown course-model weights {weights!r}; expected one of {sorted(BUNDLED_WEIGHTS)}")
    return WEIGHTS_PATH if weights == "standard" else WEIGHTS_PATH.parent / BUNDLED_WEIGHTS[weights]
# CourseNet's input normalisation: channel statistics of ShapesWorld's first palette. Today's palette
# (muted backgrounds) measures mean 0.44 and std 0.20 per channel; the bundled weights were trained
# with these values, and BatchNorm after the first convolution absorbs any such affine map, so they
# stay until the next retraining (tests/test_models.py checks they stay close).
SHAPES_MEAN = (0.499, 0.484, 0.474)
SHAPES_STD = (0.275, 0.276, 0.279)


class Normalize(nn.Module):
    """(x - mean) / std per channel, for pixel-space input (N, 3, H, W) in [0, 1]."""

    def __init__(self, mean, std):
        super().__init__()
        # Non-persistent buffers: they move with .to(device) but stay out of state_dict, so the
        # checkpoints of torchvision and of CourseNet load unchanged.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class CourseNet(nn.Module):
    """Conv/ReLU/max-pool features, global average pooling, one linear layer.

    Input (N, 3, 64, 64) in [0, 1] (any size >= 16 works); output (N, n_classes) raw class scores.
    The first convolution has 32 filters of 5x5 so that they are worth looking at (notebook 01).
    Layers: ``features.0`` conv 5x5 -> ``features.2`` pool (32x32) -> ``features.3`` conv ->
    ``features.5`` pool (16x16) -> ``features.6`` conv -> ``features.8`` pool (8x8) -> ``features.9``
    conv -> ``features.10`` ReLU, the last feature maps A (N, 128, 8, 8) -> ``pool`` -> ``classifier``.
    ``pooling="max"`` makes ``pool`` a global *max* pooling (GMP), the CAM paper's comparison
    (Zhou et al. 2016, Table 2); the default ``"avg"`` is GAP.

    ``batchnorm=True`` puts a BatchNorm2d after every convolution, for training only: BatchNorm
    (Ioffe and Szegedy 2015) shortens the long initial plateau of this task several times over.
    :func:`fuse_batchnorm` then folds each BatchNorm into its convolution, which gives back the plain
    network above with the same outputs; the bundled model is that plain network.
    """

    def __init__(self, n_classes: int = len(CLASSES), widths=(32, 32, 64, 128), batchnorm: bool = False,
                 pooling: str = "avg"):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError(f"expected pooling to be 'avg' or 'max', got {pooling!r}")
        c1, c2, c3, c4 = widths
        self.normalize = Normalize(SHAPES_MEAN, SHAPES_STD)

        def block(c_in, c_out, k, pool):
            layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2)]
            layers += [nn.BatchNorm2d(c_out)] if batchnorm else []
            layers += [nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if pool else [])
            return layers

        self.features = nn.Sequential(*block(3, c1, 5, True), *block(c1, c2, 3, True),
                                      *block(c2, c3, 3, True), *block(c3, c4, 3, False))
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(c4, n_classes)
        self.class_names = list(CLASSES[:n_classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A = self.features(self.normalize(x))  # (N, C, h, w)
        return self.classifier(self.pool(A).flatten(1))  # (N, n_classes)


@torch.no_grad()
def fuse_batchnorm(model: CourseNet) -> CourseNet:
    """A plain CourseNet computing what ``model`` (with BatchNorm, in eval mode) computes.

    Each BatchNorm after a convolution is an affine map per channel, so it folds into the
    convolution: W' = W * g, b' = (b - mu) * g + beta with g = gamma / sqrt(var + eps).
    """
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    if len(norms) != len(convs):
        raise ValueError("expected a CourseNet built with batchnorm=True (one BatchNorm per convolution)")
    widths = tuple(c.out_channels for c in convs)
    pooling = "max" if isinstance(model.pool, nn.AdaptiveMaxPool2d) else "avg"
    plain = CourseNet(n_classes=model.classifier.out_features, widths=widths, pooling=pooling)
    plain_convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    for conv, bn, target in zip(convs, norms, plain_convs):
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        target.weight.copy_(conv.weight * g[:, None, None, None])
        target.bias.copy_((conv.bias - bn.running_mean) * g + bn.bias)
    plain.classifier.load_state_dict(model.classifier.state_dict())
    return plain.eval()


def course_model(pretrained: bool = True, seed: int = 0, device=None, weights: str = "standard") -> CourseNet:
    """CourseNet in eval mode: the bundled ShapesWorld weights, or (``pretrained=False``) seeded random ones.

    The weights ship inside the package (``lecturekit/weights/coursenet.pt``) and are read with
    ``torch.load(weights_only=True)``: offline, and nothing is unpickled. ``lecturekit train`` makes them.
    ``weights``: ``"standard"`` (the course model), ``"seed1"`` (the same recipe from training seed 1,
    for transfer attacks), ``"robust"`` (fast adversarial training, eps = 8/255; notebook 16),
    ``"gmp"`` (global max pooling; notebook 06) or ``"biased"`` (trained on ``data.biased_shapes``,
    circles on snow; notebook 04).
    """
    path = weights_path(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CourseNet(pooling=POOLING.get(weights, "avg"))
    if pretrained:
        if not path.is_file():
            flag = TRAIN_FLAGS.get(weights, "")
            raise FileNotFoundError(f"the course model's weights are missing: expected {path}. "
                                    f"Run `lecturekit train{flag}` to make them.")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"] if "model" in state else state)
    model.eval()
    return model.to(device) if device is not None else model


def with_normalization(model: nn.Module, mean, std) -> nn.Module:
    """Make ``model`` normalise its own pixel-space input, keeping its layer names.

    Adds a ``normalize`` submodule and swaps the model's class for a subclass whose ``forward``
    applies it first. Unlike wrapping in ``nn.Sequential``, the layer names stay as torchvision
    names them (``features.12``, not ``1.features.12``), so they match papers and tutorials.
    """
    if isinstance(getattr(model, "normalize", None), Normalize):
        raise ValueError("this model already normalises its input")
    base = type(model)
    model.normalize = Normalize(mean, std)

    def forward(self, x):
        return base.forward(self, self.normalize(x))

    model.__class__ = type(f"Normalized{base.__name__}", (base,), {"forward": forward})
    return model


def _standin_mode(standin: bool | str | None) -> str:
    """"yes", "no" or "auto" (real weights if they can be had, stand-ins otherwise; the default)."""
    if standin is None:
        standin = os.environ.get("LECTUREKIT_STANDIN", "").strip().lower() or "auto"
    if standin in (True, "1", "true", "yes"):
        return "yes"
    if standin == "auto":
        return "auto"
    if standin in (False, "0", "false", "no"):
        return "no"
    raise ValueError(f"expected standin to be True, False or 'auto', got {standin!r}")


def imagenet_model(name: str = "squeezenet1_1", standin: bool | str | None = None, seed: int = 0,
                   weights: str = "DEFAULT", device=None) -> nn.Module:
    """A torchvision ImageNet classifier by name, in eval mode, normalisation inside, pixel-space input.

    The weights come through torchvision's weights API, from the torch hub cache
    (``torch.hub.get_dir()/checkpoints``) when the checkpoint is there, downloaded into it once otherwise.
    When they cannot be had (no network, no file), the model gets the same architecture with seeded
    random **stand-in** weights, and one line on stderr says so: every cell of a notebook still runs,
    but the pictures mean nothing. ``model.standin`` is then True, and
    :func:`lecturekit.plotting.title_for` marks every figure title made with it.

    ``standin``: ``"auto"`` (the default, also ``LECTUREKIT_STANDIN=auto`` or unset) as above;
    ``True`` (or ``LECTUREKIT_STANDIN=1``, what the tests set) stand-ins without trying the network;
    ``False`` (or ``LECTUREKIT_STANDIN=0``) the real weights or a RuntimeError naming the file and folder.
    ``class_names(model)`` gives the 1,000 labels.
    """
    from torchvision import models as tvm

    try:
        weights_enum = tvm.get_model_weights(name)
    except (ValueError, KeyError) as err:
        import difflib

        known = tvm.list_models(module=tvm)
        close = difflib.get_close_matches(name, known, n=5)
        raise ValueError(f"unknown torchvision classification model {name!r}; closest: {close}") from err
    chosen = weights_enum[weights] if isinstance(weights, str) else weights
    mode = _standin_mode(standin)
    state, reason = None, "standin=True or LECTUREKIT_STANDIN=1"
    if mode != "yes":
        try:
            state = _imagenet_state_dict(chosen)
        except WeightsUnavailable as err:
            if mode == "no":
                raise
            reason = err.reason
    if state is None:
        # One line, on stderr (red in Jupyter), instead of a banner plus a warning that repeats it.
        print(f"!! STAND-IN WEIGHTS: {name} has seeded random weights, not the trained ImageNet ones "
              f"({reason}); every cell runs, but its predictions and pictures are meaningless.",
              file=sys.stderr, flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = tvm.get_model(name, weights=None)
        model.standin = True
    else:
        model = tvm.get_model(name, weights=None)
        model.load_state_dict(state)
        model.standin = False
    preprocess = chosen.transforms()
    model = with_normalization(model, preprocess.mean, preprocess.std)
    if model.standin:
        _flag_standin_use(model)
    model.class_names = list(chosen.meta["categories"])
    model.input_size = preprocess.crop_size[0]
    model.eval()
    return model.to(device) if device is not None else model


def _flag_standin_use(model: nn.Module) -> None:
    """Each forward pass of a stand-in model, and each look at its layers or weights (``named_modules``,
    through which ``modules``, ``parameters`` and every layer lookup go), tells lecturekit.plotting,
    whose figure check then expects the cell's figures to say "stand-in" (the class is swapped, as in
    with_normalization: no hook)."""
    from .plotting import note_standin

    base = type(model)

    def forward(self, x):
        note_standin()
        return base.forward(self, x)

    def named_modules(self, *args, **kwargs):
        note_standin()
        return base.named_modules(self, *args, **kwargs)

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "named_modules": named_modules})


class WeightsUnavailable(RuntimeError):
    """The ImageNet checkpoint is neither in the torch hub cache nor downloadable; ``.reason`` in a few words."""

    def __init__(self, weights, folder: Path, reason: str):
        self.reason = reason
        filename = os.path.basename(weights.url)
        super().__init__(
            f"cannot load the ImageNet weights {weights}: the checkpoint file {filename} is not in the "
            f"torch hub cache folder {folder} and it could not be downloaded ({reason}). Either download "
            f"{weights.url} into {folder}, or pass standin=True (or set LECTUREKIT_STANDIN=1) to run "
            "with random stand-in weights.")


def _imagenet_state_dict(weights) -> dict:
    """The checkpoint from the torch hub cache, downloaded into it first when missing; WeightsUnavailable if neither."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(weights.url)
    cached = checkpoints / filename
    if not cached.is_file():
        if os.environ.get("LECTUREKIT_OFFLINE"):
            raise WeightsUnavailable(weights, checkpoints, f"LECTUREKIT_OFFLINE is set; no {filename} in {checkpoints}")
        import socket

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)  # a dead network fails within seconds, not minutes
        try:
            # Downloaded here rather than through torchvision, which prints "Downloading: URL" before it
            # tries, also when it then fails. The progress bar appears only once data flows; the file
            # is written to a temporary name and moved into place, so a failure leaves nothing behind.
            checkpoints.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), progress=True)
        except OSError as err:  # URLError, timeouts, DNS failures are all OSErrors
            reason = str(getattr(err, "reason", None) or err).strip()[:80] or type(err).__name__
            raise WeightsUnavailable(weights, checkpoints, f"no network: {reason}; no {filename} in {checkpoints}") \
                from err
        finally:
            socket.setdefaulttimeout(previous)
    return weights.get_state_dict(progress=False, check_hash=False)  # reads the cached file


def default_device() -> torch.device:
    """Where the notebooks put their models and images: the GPU when there is one, else the CPU.

    ``LECTUREKIT_DEVICE`` (e.g. ``cpu``, ``cuda:1``, ``mps``) overrides the choice. Every technique
    then runs on the device of its model and input (DESIGN.md, contract 4):
    ``model = lk.models.course_model(device=lk.models.default_device())``, ``x = x.to(model_device)``.
    """
    wanted = os.environ.get("LECTUREKIT_DEVICE", "").strip()
    if wanted:
        try:
            return torch.device(wanted)
        except RuntimeError as err:
            raise ValueError(f"expected LECTUREKIT_DEVICE to name a torch device (cpu, cuda, cuda:1, mps), "
                             f"got {wanted!r}") from err
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def class_names(model: nn.Module) -> list[str]:
    """The class labels of a lecturekit model (CourseNet or imagenet_model), index -> name."""
    names = getattr(model, "class_names", None)
    if names is None:
        raise ValueError(f"{type(model).__name__} carries no class names; expected a model from "
                         "lecturekit.models.course_model() or imagenet_model()")
    return list(names)
