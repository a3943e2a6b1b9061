"""Hooks as context managers: capture activations (and their gradients), swap ReLU backward rules.

Every context manager here removes what it added when the block ends, also when the block raises,
and restores the model's train/eval mode and ``requires_grad`` flags (DESIGN.md, contract 5).
In-place ReLUs are handled: gradients are read with a tensor hook on the layer's output, not with a
module backward hook, which breaks on in-place operations (pytorch#61519), and the output handed
downstream is a copy, so a later in-place op cannot overwrite what was captured.

Notebooks: 03_activations (capture), 05_guided_backprop (ReLU rules), 06_cam_gradcam (gradients)
"""
from __future__ import annotations

import difflib
import functools
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar, Union

import torch
from torch import nn

__all__ = ["Layer", "resolve_layer", "layer_names", "Captured", "capture", "forward_to", "OUTPUT",
           "relu_backward", "ReluRule", "preserved", "model_device", "iterate_batches", "progress_bar",
           "target_score", "renamed"]

Layer = Union[str, nn.Module]
"""A layer: a name from ``model.named_modules()`` (``"features.7"``) or the module itself (contract 3)."""


def layer_names(model: nn.Module) -> list[str]:
    """Names of all submodules, as in ``model.named_modules()`` (the root, named "", left out)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, layer: Layer) -> tuple[str, nn.Module]:
    """A layer given by name (``"features.7"``) or as a module object -> ``(name, module)``.

    An unknown name raises ``ValueError`` listing the valid names closest to it (contract 3).
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(f"the module {type(layer).__name__} given as layer is not part of the model")
    if not isinstance(layer, str):
        raise TypeError(f"expected a layer name (str) or an nn.Module, got {type(layer).__name__}")
    if layer not in modules or layer == "":
        names = layer_names(model)
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.0)
        raise ValueError(f"unknown layer {layer!r}; closest valid names: {close} "
                         f"(all names: lecturekit.hooks.layer_names(model))")
    return layer, modules[layer]


class Captured(dict):
    """Activations by layer name, ``acts["features.3"]`` (N, C, h, w); gradients in ``acts.grads``."""

    def __init__(self):
        super().__init__()
        self.grads: dict[str, torch.Tensor] = {}


@contextmanager
def capture(model: nn.Module, layers, grads: bool = False, detach: bool | None = None) -> Iterator[Captured]:
    """Record the outputs of ``layers`` (names or modules) during the forward passes inside the block.

    ``acts[name]`` is the layer's output of the last forward pass. With ``grads=True`` the outputs stay
    attached to the graph (so ``torch.autograd.grad(score, acts[name])`` works), and after a backward
    pass ``acts.grads[name]`` holds d(output of the backward)/d(activation). ``detach`` defaults to
    ``not grads``. Hooks are removed when the block ends, also when it raises.

        with capture(model, ["features.3"]) as acts:
            model(x)
        A = acts["features.3"]  # (N, C, h, w)
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    resolved = [resolve_layer(model, layer) for layer in layers]
    detach = (not grads) if detach is None else detach
    acts = Captured()
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                acts[name] = output
                return None
            acts[name] = output.detach() if detach else output
            if grads and output.requires_grad:
                def save_grad(grad, name=name):
                    if grad is not None:  # None when the output does not reach this activation
                        acts.grads[name] = grad.detach()
                output.register_hook(save_grad)
            # Hand a copy downstream: an in-place op after this layer (ReLU(inplace=True)) then
            # changes the copy, never the tensor we captured.
            return output.clone()
        return hook

    try:
        for name, module in resolved:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


OUTPUT = "<output>"
"""The key under which :func:`forward_to` stores the model's output, when asked to."""


class _StopForward(Exception):
    """Raised by a forward hook once every layer asked for has run: the rest is not computed."""


@contextmanager
def forward_to(model: nn.Module, layers, output: bool = False, detach: bool = True) -> Iterator:
    """Hooks set once for many forward passes: yields ``run(x) -> acts``, the activations of ``layers``.

    Unless ``output=True``, each forward pass stops as soon as every layer in ``layers`` has run (a
    forward hook raises and ``run`` catches it), like Caffe's ``net.forward(end=layer)``: the layers
    after them cost nothing. With ``output=True`` the whole model runs and its output is stored under
    ``acts[OUTPUT]``. ``detach=False`` keeps the activations attached to the graph (for gradient
    ascent through them). Hooks are removed when the block ends, also when it raises.

        with forward_to(model, ["features.6"]) as run:
            for batch in batches:
                A = run(batch)["features.6"]  # (B, C, h, w), nothing after features.6 computed
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    resolved = dict(resolve_layer(model, layer) for layer in layers)
    modules = set(resolved.values())
    seen: set = set()

    def stop(module, inputs, out):
        seen.add(module)
        if seen >= modules:
            raise _StopForward

    with capture(model, list(resolved), detach=detach) as acts:
        # Registered after capture's hooks, so on each layer the activation is stored before the stop.
        handles = [] if output else [m.register_forward_hook(stop) for m in modules]
        try:
            def run(x: torch.Tensor) -> Captured:
                seen.clear()
                acts.clear()
                try:
                    result = model(x)
                    if output:
                        acts[OUTPUT] = result
                except _StopForward:
                    pass
                missing = [name for name in resolved if name not in acts]
                if missing:
                    raise ValueError(f"layers {missing} did not run in the model's forward pass")
                return acts

            yield run
        finally:
            for handle in handles:
                handle.remove()


ReluRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A ReLU backward rule ``rule(f_positive, R) -> R_l``: ``f_positive`` (f > 0) is the forward mask of
the ReLU's input f, ``R`` the gradient arriving from above. The rules of the lecture (guided
backpropagation, deconvnet) are written next to the techniques, in ``lecturekit.attribution``."""


class _RuleReLU(torch.autograd.Function):
    """ReLU forward, a chosen rule backward."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.rule = rule
        ctx.save_for_backward(x > 0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (f_positive,) = ctx.saved_tensors
        return ctx.rule(f_positive, grad), None


@contextmanager
def relu_backward(model: nn.Module, rule: ReluRule) -> Iterator[nn.Module]:
    """Inside the block, every ``nn.ReLU`` of ``model`` computes its backward pass with ``rule``.

    rule: a function ``(f_positive, R) -> R_l`` (:data:`ReluRule`), e.g.
    ``lecturekit.attribution.guided_relu`` (guided backpropagation) or ``deconvnet_relu`` (Zeiler and
    Fergus 2014). The ReLU modules' forward is swapped for the block (not hooked), so in-place ReLUs
    work and the forward values are unchanged; the originals return when the block ends.
    ReLUs called as functions (``F.relu``) inside a model's forward are not nn.ReLU modules and are
    not swapped: a warning says so when a model has no nn.ReLU at all.
    """
    if not callable(rule):
        raise TypeError(f"expected rule to be a function (f_positive, R) -> R_l, such as "
                        f"lecturekit.attribution.guided_relu, got {rule!r}")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        warnings.warn(f"{type(model).__name__} has no nn.ReLU modules; the ReLU rule changes nothing")
    swapped = []
    try:
        for module in relus:
            previous = module.__dict__.get("forward")  # an instance-level forward, if any
            module.forward = lambda x, rule=rule: _RuleReLU.apply(x, rule)
            swapped.append((module, previous))
        yield model
    finally:
        for module, previous in swapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def preserved(model: nn.Module, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Leave the model as found (contract 5): mode, ``requires_grad`` flags and ``.grad`` of parameters.

    Inside the block the model is in eval mode (``eval_mode``) and its parameters do not require
    gradients (``freeze``): gradients with respect to the *input* then cost no weight gradients.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p, _, _ in params:
                p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def model_device(model: nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """The device of the model's parameters (or buffers); ``fallback`` for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device(fallback)


def iterate_batches(n: int, batch_size: int) -> Iterable[slice]:
    """Slices of ``range(n)`` in steps of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"expected a positive batch_size, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


T = TypeVar("T")


def progress_bar(iterable: Iterable[T], progress: bool = True, total: int | None = None,
                 desc: str | None = None) -> Iterable[T]:
    """``iterable`` with a tqdm.auto progress bar (contract 8), or unchanged with ``progress=False``.

    The one progress bar of the package: a notebook bar under Jupyter, a text bar elsewhere, removed
    when the loop ends (``leave=False``). ``total`` for iterables without a length. A loop that stops
    early (``break``: a target reached, a loss that diverged) ends its bar where it is, so that it
    disappears too: tqdm would otherwise keep it on the page, unfinished and red.
    """
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return _advance(iterable, tqdm(total=total, desc=desc, leave=False))


def _advance(iterable: Iterable[T], bar) -> Iterator[T]:
    """Yield the items of ``iterable``, one step of ``bar`` after each; close it however the loop ends."""
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:  # also on break (GeneratorExit): an early end is the bar's end, not an error to show in red
        if bar.total is not None and bar.n < bar.total:
            bar.total = bar.n
        bar.close()


def target_score(scores: torch.Tensor, target: torch.Tensor, output: str = "score") -> torch.Tensor:
    """(B, K) model outputs, (B,) classes -> (B,) each image's ``S_target``.

    ``output``: ``"score"`` (the raw class score, before the softmax) or ``"prob"`` (the softmax
    probability, as in the figures of Zeiler and Fergus 2014 and Petsiuk et al. 2018).
    """
    if output == "prob":
        scores = scores.softmax(1)
    elif output != "score":
        raise ValueError(f"expected output='score' (raw class score) or 'prob' (softmax), got {output!r}")
    return scores.gather(1, target[:, None].to(scores.device))[:, 0]  # (B,)


def renamed(**old_to_new: str) -> Callable[[Callable], Callable]:
    """Decorator: keyword arguments renamed to the DESIGN.md vocabulary keep working, with a warning.

        @renamed(images="x")
        def top_patches(model, x, layer, channel, k=9): ...

    ``top_patches(model, images=x, ...)`` then warns (DeprecationWarning) and passes ``x=``. The
    signature shown by ``help`` and ``inspect.signature`` is the new one.
    """
    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__name__}() got both {old}= (the old name) and {new}=; pass {new}=")
                    warnings.warn(f"{func.__name__}({old}=...) is deprecated; use {new}=",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.renamed = dict(old_to_new)
        return wrapper

    return decorate
