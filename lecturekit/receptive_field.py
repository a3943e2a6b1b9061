"""Receptive fields from the architecture: which input pixels a unit of a layer can see.

Araujo, Norris and Sim 2019, "Computing Receptive Fields of Convolutional Neural Networks" (Distill).
Per layer l with kernel k, stride s, padding p, dilation d, starting from one pixel (r_0 = 1, j_0 = 1,
a_0 = 0):

    r_l = r_{l-1} + (d (k - 1)) j_{l-1}       size (pixels)
    j_l = j_{l-1} s                           jump: input pixels between neighbouring units
    a_l = a_{l-1} - p j_{l-1}                 start: first input pixel of unit (0, 0)

This is the *theoretical* field; the effective one (where the gradient of a unit actually lands) is
measured in notebook 03 with ``lecturekit.attribution.gradient``. ``lecturekit.features.top_patches``
uses the field to cut the patches out.

Notebook: 03_activations
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import Layer, resolve_layer

__all__ = ["ReceptiveField", "receptive_field"]


# ---------------------------------------------------------------------------------------------------
# Receptive fields
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of the units of one layer, in input pixels.

    size: side of the square region a unit sees; jump: input pixels between neighbouring units (the
    product of the strides); start: first input pixel (row and column) of unit (0, 0), negative when
    padding reaches outside the image. Unit (y, x) sees rows ``start + y * jump`` to
    ``start + y * jump + size - 1``, and likewise columns.
    """

    size: int
    jump: int
    start: int

    @property
    def center(self) -> float:
        """Centre of unit (0, 0)'s region, in pixel coordinates (pixel i spans [i - 0.5, i + 0.5])."""
        return self.start + (self.size - 1) / 2

    def as_tensor(self) -> torch.Tensor:
        """(size, jump, start) as a float tensor (3,): what assignment 0's graded cell compares with."""
        return torch.tensor([self.size, self.jump, self.start], dtype=torch.float32)

    def box(self, y: int, x: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of unit (y, x)'s region, x1/y1 exclusive; clipped to the image when its size is given."""
        x0, y0 = self.start + x * self.jump, self.start + y * self.jump
        x1, y1 = x0 + self.size, y0 + self.size
        if height is not None and width is not None:
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        return x0, y0, x1, y1


_GLOBAL = "global"  # a value that depends on every input pixel (after global pooling, flatten, linear)


def _pair_equal(v, what: str, name: str) -> int:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if a != b:
        raise ValueError(f"receptive_field handles square {what}s only; {name} has {what} {tuple(v)}")
    return a


def _module_rf(module: nn.Module, name: str, rf):
    """The receptive field after one module, given the field ``rf = (size, jump, start)`` of its input."""
    if rf is None or rf == _GLOBAL:
        return rf
    r, j, a = rf
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k = _pair_equal(module.kernel_size, "kernel", name)
        s = _pair_equal(module.stride, "stride", name)
        p = module.padding
        if isinstance(p, str):  # "same" / "valid" (stride 1 only): torch pads (k_eff - 1) // 2 in front
            p = 0 if p == "valid" else None
        d = _pair_equal(getattr(module, "dilation", 1), "dilation", name)
        k_eff = d * (k - 1) + 1
        p = (k_eff - 1) // 2 if p is None else _pair_equal(p, "padding", name)
        return r + (k_eff - 1) * j, j * s, a - p * j  # the three equations of the module docstring
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)):
        return _GLOBAL
    if isinstance(module, (nn.ConvTranspose2d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample, nn.Unfold)):
        raise ValueError(f"receptive_field does not handle {type(module).__name__} ({name})")
    return rf  # elementwise: ReLU, BatchNorm, Dropout, Identity, ...


def _union(rfs: list, where: str):
    """Several inputs meet (concatenation, residual addition): the union of their regions."""
    rfs = [rf for rf in rfs if rf is not None]
    if not rfs:
        return None
    if any(rf == _GLOBAL for rf in rfs):
        return _GLOBAL
    if len({j for _, j, _ in rfs}) > 1:
        raise ValueError(f"inputs with different jumps {[j for _, j, _ in rfs]} meet at {where}; "
                         "receptive_field expects aligned branches")
    lo = min(a for _, _, a in rfs)
    hi = max(a + r for r, _, a in rfs)
    return hi - lo, rfs[0][1], lo


_GLOBAL_FUNCTIONS = {torch.flatten, torch.mean, torch.sum, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                     F.linear}
_GLOBAL_METHODS = {"flatten", "view", "reshape", "mean", "sum"}
_SPATIAL_FUNCTIONS = {F.conv2d, F.max_pool2d, F.avg_pool2d, F.interpolate, torch.conv2d}


def receptive_field(model: nn.Module, layer: Layer) -> ReceptiveField:
    """The receptive field of the units of ``layer``, computed from the architecture.

    The model is traced with ``torch.fx`` and the recurrence of the module docstring is carried along
    the graph, through every Conv2d, MaxPool2d and AvgPool2d (kernel, stride, padding, dilation);
    elementwise layers keep the field; where branches meet (Inception/Fire concatenation, residual
    addition) the field is the union of the branches'. Square kernels only. A layer after global
    pooling, flatten or a linear layer sees the whole image: ``ValueError``. A container layer
    (``"layer4"``) has the field of the last module it runs; a module called twice in the forward pass
    (ResNet's shared ``relu``) that of its first call, whose output :func:`activations` returns.

    Example: CourseNet ``features.9`` has size 40, jump 8, start -16; AlexNet's pool5 (``features.12``)
    size 195, jump 32 (Araujo et al. 2019, Table 1).

    Notebook: 03_activations
    """
    import torch.fx as fx

    name, _ = resolve_layer(model, layer)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 -- any tracing failure means: not a static graph
        raise ValueError(f"receptive_field needs a model that torch.fx can trace; {type(model).__name__} "
                         f"cannot be traced ({type(err).__name__}: {err})") from err
    modules = dict(model.named_modules())
    rf: dict = {}
    found = None
    for node in graph.nodes:
        inputs = [rf.get(n) for n in node.all_input_nodes]
        if node.op == "placeholder":
            rf[node] = (1, 1, 0) if found is None and not rf else None
        elif node.op == "get_attr":
            rf[node] = None  # a constant (buffer, parameter)
        elif node.op == "call_module":
            if len([i for i in inputs if i is not None]) > 1:
                raise ValueError(f"module {node.target} takes several image-dependent inputs")
            rf[node] = _module_rf(modules[node.target], node.target, _union(inputs, node.target))
            if node.target == name and (found is None or found.target != name):
                found = node  # a module called more than once (ResNet's relu): its first call, as in activations()
            elif node.target.startswith(name + ".") and (found is None or found.target != name):
                found = node  # a container: the last module it runs
        elif node.op in ("call_function", "call_method"):
            if node.target in _SPATIAL_FUNCTIONS:
                raise ValueError(f"receptive_field cannot follow the functional call {node.target} "
                                 f"in {type(model).__name__}.forward; use nn modules for convolutions and pooling")
            merged = _union(inputs, str(node.target))
            is_global = node.target in _GLOBAL_FUNCTIONS or (node.op == "call_method" and node.target in _GLOBAL_METHODS)
            rf[node] = _GLOBAL if merged is not None and is_global else merged
        else:
            rf[node] = _union(inputs, "output")
    if found is None:
        raise ValueError(f"layer {name!r} is not called in the traced forward pass of {type(model).__name__}")
    result = rf[found]
    if result == _GLOBAL:
        raise ValueError(f"the units of layer {name!r} see the whole image (after global pooling, flatten or "
                         "a linear layer): they have no local receptive field; choose a convolutional layer")
    if result is None:
        raise ValueError(f"layer {name!r} does not depend on the input image")
    return ReceptiveField(*map(int, result))
