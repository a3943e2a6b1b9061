"""Exact incremental occlusion: recompute only what an occluding patch changes.

Nakandala, Kumar and Papakonstantinou 2019, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations" (SIGMOD; the system is called Krypton).

A patch changes the input rows lo..hi (and some columns). A convolution or pooling with kernel k,
stride s, padding p and dilation d (k' = d (k - 1) + 1) reads input rows ``o s - p .. o s - p + k' - 1``
for its output row o, so the output rows that change are

    ceil((lo + p - k' + 1) / s) .. floor((hi + p) / s)        clipped to the map,

likewise the columns; elementwise layers (ReLU, batch norm in eval, dropout in eval, the input
normalisation) keep the region, and where branches meet (SqueezeNet's Fire concatenation, ResNet's
residual addition) it is the union of the branches'. Everything outside the region is the clean
image's activation. So the clean image runs once and every activation is kept; then, for a batch of
patches, each layer computes for each patch only a window holding its changed region, from the input
window that this needs: the clean activation with the changed values pasted in, and the border
filled as the layer pads it. Where the window covers (nearly) the whole map, the windows are pasted
into full copies and the rest of the network runs as usual; global pooling and the classifier always
do. The model is read as a graph with ``torch.fx``; a layer this module does not know raises
:class:`Unsupported`, never a guess.

Notebook: 04_occlusion_saliency
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["Unsupported", "IncrementalModel", "cone_of_influence", "occlusion_cost"]

FULL_FRACTION = 1.0
"""Above this share of a map's positions the window is given up for full copies of the map.

It is always given up once it covers the whole map: a convolution on the window then reads the map
plus its zero border assembled by hand, where on full copies the library pads natively, about 10%
faster (one thread, ResNet-18's layer4: 0.50 against 0.45 s for 64 copies). Measured on the whole
occlusion map of ResNet-18 (224 px, patch 16, stride 8, one thread), windows until they cover the map
were 2-9% faster than giving up at 0.6 of it, and SqueezeNet's were no slower
(benchmarks/RESULTS.md, issue 17).
"""

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
                        nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardtanh, F.elu,
                          torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.hardswish}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_GLOBAL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_GLOBAL_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear, torch.mean,
                     torch.sum, torch.amax}
_GLOBAL_METHODS = {"flatten", "view", "reshape", "mean", "sum", "amax", "size"}


class Unsupported(ValueError):
    """The model has a layer that incremental inference cannot run on a region (the reason in one line)."""


@dataclass
class _Local:
    """A batch of B occluded maps, each the clean map except inside its window.

    D: (B, C, L0, L1) the values of each patch's window; at: (B, 2) the window's top-left (row, col);
    lo, hi: (B, 2) first and last changed row and column (the true region, inside the window);
    size: the map's (H, W).
    """

    D: torch.Tensor
    at: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    size: tuple[int, int]


@dataclass
class _Full:
    """A batch of B whole maps (or class scores), run through the layers as usual."""

    X: torch.Tensor


@dataclass
class _Spatial:
    """What a convolution or pooling reads: kernel, stride, padding, dilation (each (rows, cols)) and fill."""

    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]
    fill: float  # the value of the padding: 0 for convolutions, -inf for max pooling


def _too_big(L: torch.Tensor, size: torch.Tensor) -> bool:
    """Whether a window of L (rows, cols) on a map of ``size`` is given up for full copies of the map
    (``FULL_FRACTION`` says when, and why a window covering the whole map always is)."""
    covers = bool((L >= size).all())
    return covers or bool(L[0] * L[1] > FULL_FRACTION * size[0] * size[1])


def _two(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _spatial(module: nn.Module) -> _Spatial | None:
    """The geometry of a layer this module can run on a window, None for one it cannot."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
            return None
        p = (0, 0) if module.padding == "valid" else _two(module.padding)
        return _Spatial(_two(module.kernel_size), _two(module.stride), p, _two(module.dilation), 0.0)
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        s = module.stride if module.stride is not None else module.kernel_size
        return _Spatial(_two(module.kernel_size), _two(s), _two(module.padding), _two(module.dilation), -math.inf)
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is None and not module.ceil_mode:
        if module.padding not in (0, (0, 0)) and not module.count_include_pad:
            return None  # the divisor would change at the borders
        s = module.stride if module.stride is not None else module.kernel_size
        return _Spatial(_two(module.kernel_size), _two(s), _two(module.padding), (1, 1), 0.0)
    return None


def _elementwise(module: nn.Module) -> bool:
    if isinstance(module, _ELEMENTWISE_MODULES):
        return True
    if isinstance(module, (nn.Dropout, nn.Dropout2d)):
        return not module.training
    if isinstance(module, nn.BatchNorm2d):  # eval: a per-channel affine map with the running statistics
        return not module.training and module.running_mean is not None
    return False


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 -- any tracing failure means: no static graph to follow
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(modules[node.target]).__name__})"
    return f"{node.op} {getattr(node.target, '__name__', node.target)!s} ({node.name})"


class IncrementalModel:
    """A model read as a graph, run on occluded copies of one image by recomputing only what changes.

    ``prepare(x)`` runs the clean image (1, 3, H, W) and keeps every activation; ``scores(corners,
    patch, baseline)`` gives the class scores (B, K) of the B occluded copies. ``macs`` counts the
    multiply-adds of the convolutions and linear layers computed so far, ``full_macs`` those of one
    plain forward pass. Raises :class:`Unsupported` when the model has a layer it cannot handle.
    Build it with the model in eval mode (``hooks.preserved``).
    """

    def __init__(self, model: nn.Module):
        self.graph_module = _trace(model)
        self.modules = dict(self.graph_module.named_modules())
        self.nodes = list(self.graph_module.graph.nodes)
        self._check()
        last_use = {n: user for user in self.nodes for n in user.all_input_nodes}  # the last user wins
        self._done: dict = {}  # node -> the values no later node needs, freed after it ran
        for n, user in last_use.items():
            self._done.setdefault(user, []).append(n)
        self.clean: dict = {}
        self._padded: dict = {}
        self.macs = 0
        self.full_macs = 0
        self.regions: list | None = None  # with record=True in scores(): (node, map size, lo, hi) of patch 0

    # ---- which layers may see a region ---------------------------------------------------------------

    def _kind(self, node: fx.Node) -> str | None:
        """'spatial', 'elementwise', 'merge' (cat, +, ...), 'global' (runs on full maps) or None (unknown)."""
        if node.op == "call_module":
            module = self.modules[node.target]
            if _spatial(module) is not None:
                return "spatial"
            if _elementwise(module):
                return "elementwise"
            if isinstance(module, _GLOBAL_MODULES):
                return "global"
            return None
        if node.op == "call_function":
            if node.target in _ELEMENTWISE_FUNCTIONS:
                return "elementwise"
            if node.target in _ARITHMETIC:
                return "merge"
            if node.target is torch.cat:  # along channels a merge, along rows or columns not local
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                return "merge" if dim in (1, -3) else "global"
            if node.target in _GLOBAL_FUNCTIONS:
                return "global"
            return None
        if node.op == "call_method":
            return "global" if node.target in _GLOBAL_METHODS else None
        return "global"  # output

    def _check(self) -> None:
        """Walk the graph once: every layer a region can reach must be one this module knows."""
        local: set = set()
        for node in self.nodes:
            if node.op == "placeholder":
                if local:
                    raise Unsupported("the model takes more than one input")
                local.add(node)
                continue
            inputs = [n for n in node.all_input_nodes if n in local]
            if not inputs:
                continue
            kind = self._kind(node)
            if kind is None:
                raise Unsupported(f"incremental occlusion does not know how to run {_describe(node, self.modules)} "
                                  "on a region")
            if kind != "global":
                local.add(node)
            inplace = getattr(self.modules.get(node.target), "inplace", False) if node.op == "call_module" else \
                node.kwargs.get("inplace", False)
            if inplace and any(len(n.users) > 1 for n in inputs):
                raise Unsupported(f"{_describe(node, self.modules)} works in place on a value used elsewhere")
        output = self.nodes[-1]
        if output.op != "output" or not isinstance(output.args[0], fx.Node):
            raise Unsupported("the model returns more than one tensor")
        if not any(self._kind(n) == "spatial" for n in self.nodes if n in local):
            raise Unsupported("no convolution or pooling sees a region before the first global layer: "
                              "nothing to gain")

    # ---- the clean image ------------------------------------------------------------------------------

    def prepare(self, x: torch.Tensor) -> None:
        """Run the clean image x (1, 3, H, W) and keep every node's value (in-place layers get a copy)."""
        self.clean, self._padded = {}, {}
        self.full_macs = 0
        for node in self.nodes:
            if node.op == "output":
                break
            args = fx.node.map_arg(node.args, lambda n: self.clean[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.clean[n])
            if node.op == "placeholder":
                value = x
            elif node.op == "get_attr":
                value = self.graph_module
                for name in node.target.split("."):
                    value = getattr(value, name)
            else:
                value = self._call(node, args, kwargs, copy=True)
            self.clean[node] = value
            self.full_macs += self._macs(node, value)

    def _call(self, node: fx.Node, args, kwargs, copy: bool = False):
        """The node's operation, as the model runs it (an in-place layer on a copy with ``copy``)."""
        if node.op == "call_module":
            module = self.modules[node.target]
            if copy and type(module) is nn.ReLU:
                return torch.relu(args[0])  # out of place: one pass, where a copy and relu_ take two
            if copy and getattr(module, "inplace", False) and isinstance(args[0], torch.Tensor):
                args = (args[0].clone(),) + tuple(args[1:])
            return module(*args, **kwargs)
        if node.op == "call_function":
            if copy and kwargs.get("inplace", False):
                args = (args[0].clone(),) + tuple(args[1:])
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise Unsupported(f"unexpected graph node {node.op}")

    def _macs(self, node: fx.Node, value: torch.Tensor, positions: int | None = None) -> int:
        """Multiply-adds of a convolution (per output position x C_out x C_in/groups x k0 k1) or linear layer."""
        if node.op != "call_module":
            return 0
        module = self.modules[node.target]
        if isinstance(module, nn.Conv2d):
            n = value[0, 0].numel() if positions is None else positions
            return n * module.out_channels * module.in_channels // module.groups * module.weight[0, 0].numel()
        if isinstance(module, nn.Linear):
            return module.in_features * module.out_features
        return 0

    # ---- the occluded copies --------------------------------------------------------------------------

    def scores(self, corners: list[tuple[int, int]], patch: tuple[int, int], baseline: torch.Tensor,
               record: bool = False) -> torch.Tensor:
        """Class scores (B, K) of the clean image with ``baseline`` (1, 3, H, W) pasted at each corner (y, x)."""
        x = self.clean[self.nodes[0]]
        ph, pw = patch
        lo = torch.tensor(corners, dtype=torch.long)  # (B, 2)
        hi = lo + torch.tensor([ph - 1, pw - 1])
        D = torch.stack([baseline[0, :, y:y + ph, x_:x_ + pw] for y, x_ in corners]).to(x.dtype)  # (B, 3, ph, pw)
        env: dict = {self.nodes[0]: _Local(D, lo, lo, hi, tuple(x.shape[2:]))}
        self.regions = [] if record else None
        for node in self.nodes[1:]:
            if node.op == "output":
                out = node.args[0]
                return self._full(out, env[out]).X if isinstance(env.get(out), _Local) else env[out].X
            if node.op == "get_attr" or not any(isinstance(env.get(n), (_Local, _Full)) for n in node.all_input_nodes):
                env[node] = self.clean[node]  # does not depend on the image
                continue
            env[node] = self._step(node, env)
            for n in self._done.get(node, ()):  # memory: one batch's windows and maps while they are needed
                env.pop(n, None)
            if record:
                state = env[node]
                size = tuple(self.clean[node].shape[2:]) if self.clean[node].dim() == 4 else None
                if isinstance(state, _Local):
                    self.regions.append((node, size, tuple(state.lo[0].tolist()), tuple(state.hi[0].tolist())))
                elif size is not None:
                    self.regions.append((node, size, (0, 0), (size[0] - 1, size[1] - 1)))
        raise Unsupported("the graph has no output")

    def _step(self, node: fx.Node, env: dict):
        kind = self._kind(node)
        states = [env[n] for n in node.all_input_nodes if isinstance(env.get(n), (_Local, _Full))]
        if kind == "spatial" and isinstance(states[0], _Local):
            out = self._spatial_step(node, node.all_input_nodes[0], states[0])
            if out is not None:
                return out
        elif kind == "elementwise" and isinstance(states[0], _Local):
            st = states[0]
            args = (st.D,) + tuple(fx.node.map_arg(node.args[1:], lambda n: self.clean[n]))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.clean[n])
            return _Local(self._call(node, args, kwargs, copy=True), st.at, st.lo, st.hi, st.size)
        elif kind == "merge" and all(isinstance(s, _Local) for s in states):
            out = self._merge_step(node, env)
            if out is not None:
                return out
        # everything else, and a region grown (nearly) to the whole map: full maps, run as usual
        def value(n):
            state = env[n]
            if isinstance(state, _Local):
                state = env[n] = self._full(n, state)
            return state.X if isinstance(state, _Full) else state

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        result = self._call(node, args, kwargs, copy=True)
        self.macs += len(result) * self._macs(node, result)
        return _Full(result)

    def _spatial_step(self, node: fx.Node, source: fx.Node, st: _Local) -> _Local | None:
        """A convolution or pooling on each patch's window: the output rows of the module docstring."""
        module = self.modules[node.target]
        g = _spatial(module)
        k, s, p, d = (torch.tensor(v) for v in (g.k, g.s, g.p, g.d))
        k_eff = d * (k - 1) + 1
        size = torch.tensor(self.clean[node].shape[2:])  # (Ho, Wo)
        lo = (-torch.div(-(st.lo + p - k_eff + 1), s, rounding_mode="floor")).clamp(min=0)  # ceil((lo+p-k'+1)/s)
        hi = torch.minimum(torch.div(st.hi + p, s, rounding_mode="floor"), size - 1)  # floor((hi+p)/s)
        L = (hi - lo + 1).amax(0).clamp(min=1)  # (2,) window size, the same for every patch
        if _too_big(L, size):
            return None
        at = torch.minimum(lo, size - L)  # window start, inside the map
        # Input rows o s - p .. o s - p + k' - 1 for the output rows at .. at + L - 1.
        X = self._assemble(source, st, at * s - p, (L - 1) * s + k_eff, g)  # (B, C, R0, R1)
        if isinstance(module, nn.Conv2d):
            D = F.conv2d(X, module.weight, module.bias, g.s, 0, g.d, module.groups)
        elif isinstance(module, nn.MaxPool2d):
            D = F.max_pool2d(X, g.k, g.s, 0, g.d)  # -inf padding: the same maxima as padding=p
        else:
            D = F.avg_pool2d(X, g.k, g.s, 0)  # zero padding counted, as count_include_pad=True does
        self.macs += self._macs(node, D, len(D) * int(L[0] * L[1]))
        return _Local(D, at, lo, hi, tuple(size.tolist()))

    def _merge_step(self, node: fx.Node, env: dict) -> _Local | None:
        """Concatenation along channels or elementwise arithmetic: the union of the branches' regions."""
        inputs = [n for n in node.all_input_nodes if isinstance(env.get(n), _Local)]
        states = [env[n] for n in inputs]
        size = states[0].size
        for n in node.all_input_nodes:  # a constant operand must not vary over the map
            if n not in inputs and isinstance(self.clean[n], torch.Tensor) and self.clean[n].dim() >= 2 \
                    and self.clean[n].shape[-2:] != (1, 1):
                return None
        lo = torch.stack([st.lo for st in states]).amin(0)
        hi = torch.stack([st.hi for st in states]).amax(0)
        sizes = torch.tensor(size)
        L = (hi - lo + 1).amax(0).clamp(min=1)
        if _too_big(L, sizes):
            return None
        at = torch.minimum(lo, sizes - L)
        window = {}
        for n, st in zip(inputs, states):
            same = st.D.shape[2:] == tuple(L.tolist()) and torch.equal(st.at, at)
            window[n] = st.D if same else self._assemble(n, st, at, L, None)

        def value(n):
            return window[n] if n in window else self.clean[n]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        return _Local(self._call(node, args, kwargs, copy=True), at, lo, hi, size)

    def _full(self, node: fx.Node, st: _Local) -> _Full:
        """Paste each patch's window into a copy of the clean map: (B, C, H, W)."""
        return _Full(self._assemble(node, st, torch.zeros(2, dtype=torch.long), torch.tensor(st.size), None))

    def _assemble(self, node: fx.Node, st: _Local, start: torch.Tensor, R: torch.Tensor,
                  g: _Spatial | None) -> torch.Tensor:
        """The input each patch needs: rows start .. start + R - 1 (and columns) of its occluded map.

        Inside the patch's window the values come from st.D, elsewhere from the clean map, and outside
        the map (padding) they are ``g.fill``. One gather from [clean padded map, all windows]:
        (B, C, R0, R1).
        """
        clean = self.clean[node][0]  # (C, H, W)
        C, H, W = clean.shape
        p = g.p if g is not None else (0, 0)
        fill = g.fill if g is not None else 0.0
        extra = g.s if g is not None else (0, 0)  # bottom/right: one stride more, for ceil_mode's last window
        key = (node, p, extra, fill)
        if key not in self._padded:  # positions as rows, channels as columns: (Hp Wp, C)
            padded = F.pad(clean, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=fill)
            self._padded[key] = padded.permute(1, 2, 0).reshape(-1, C)
        padded = self._padded[key]  # (Hp Wp, C)
        Wp = W + 2 * p[1] + extra[1]
        B, _, L0, L1 = st.D.shape
        start = start.expand(B, 2)
        rows = start[:, 0, None] + torch.arange(int(R[0]))  # (B, R0)
        cols = start[:, 1, None] + torch.arange(int(R[1]))  # (B, R1)
        in_r = (rows >= st.at[:, :1]) & (rows < st.at[:, :1] + L0)
        in_c = (cols >= st.at[:, 1:]) & (cols < st.at[:, 1:] + L1)
        window = (len(padded) + torch.arange(B)[:, None, None] * (L0 * L1)
                  + (rows - st.at[:, :1])[:, :, None] * L1 + (cols - st.at[:, 1:])[:, None, :])  # (B, R0, R1)
        outside = (rows + p[0])[:, :, None] * Wp + (cols + p[1])[:, None, :]
        index = torch.where(in_r[:, :, None] & in_c[:, None, :], window, outside).flatten().to(clean.device)
        # Channels last throughout (torch.channels_last): a window's positions are rows of (B L0 L1, C),
        # a view, not a copy, and the gathered input is channels last too, which oneDNN convolves fastest.
        rows_of_D = st.D.permute(0, 2, 3, 1).reshape(-1, C)  # (B L0 L1, C)
        source = torch.cat([padded, rows_of_D])  # (Hp Wp + B L0 L1, C)
        return source[index].view(B, int(R[0]), int(R[1]), C).permute(0, 3, 1, 2)  # (B, C, R0, R1)


@dataclass
class Region:
    """The changed region of one layer for one patch: its name, map size (h, w) and box (x0, y0, x1, y1), exclusive."""

    layer: str
    size: tuple[int, int]
    box: tuple[int, int, int, int]
    kind: str = field(default="")


def cone_of_influence(model: nn.Module, x: torch.Tensor, patch, position: tuple[int, int]) -> list[Region]:
    """The cone of influence of one patch: for every convolution and pooling, the units it changes.

    x: one image (1, 3, H, W); patch: its size (an int or (h, w)); position: its top-left (y, x).
    Returns, layer by layer, the map size and the box of units whose value differs from the clean
    image's (by the receptive-field arithmetic of the module docstring); the whole map once the
    region has grown (nearly) to it. Raises :class:`Unsupported` for a model this module cannot run.
    Notebook: 04_occlusion_saliency
    """
    from .hooks import preserved

    ph, pw = _two(patch)
    with preserved(model), torch.no_grad():
        engine = IncrementalModel(model)
        engine.prepare(x[:1])
        engine.scores([tuple(position)], (ph, pw), torch.zeros_like(x[:1]), record=True)
    out = [Region("input", tuple(x.shape[2:]), (position[1], position[0], position[1] + pw, position[0] + ph),
                  "input")]
    for node, size, lo, hi in engine.regions:
        if engine._kind(node) == "spatial":
            out.append(Region(str(node.target), size, (lo[1], lo[0], hi[1] + 1, hi[0] + 1),
                              type(engine.modules[node.target]).__name__))
    return out


def occlusion_cost(model: nn.Module, x: torch.Tensor, patch, stride, batch_size: int = 64) -> tuple[int, int]:
    """Multiply-adds of occlusion on one image x (1, 3, H, W): (incremental, plain), convolutions and linear layers.

    Plain: one full forward pass per patch position. Incremental: what :class:`IncrementalModel`
    computes for the same positions in batches of ``batch_size`` (the windows are as large as the
    largest changed region of their batch). Their ratio is the theoretical speed-up.
    Notebook: 04_occlusion_saliency
    """
    from .attribution import occlusion_positions
    from .hooks import preserved

    ph, pw = _two(patch)
    corners = occlusion_positions(tuple(x.shape[2:]), (ph, pw), stride)
    with preserved(model), torch.no_grad():
        engine = IncrementalModel(model)
        engine.prepare(x[:1])
        for start in range(0, len(corners), batch_size):
            engine.scores(corners[start:start + batch_size], (ph, pw), torch.zeros_like(x[:1]))
    return engine.macs, engine.full_macs * len(corners)
