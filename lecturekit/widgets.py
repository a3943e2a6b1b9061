"""ipywidgets explorers for live-coding, each a thin layer over a pure function of lecturekit.

The pattern (STYLE.md): a pure function computes what is shown (tested on its own); the widget only
wires sliders to it and redraws. Works with ipywidgets 7.7 (Colab) and 8.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .hooks import renamed

if TYPE_CHECKING:  # type aliases only: the widgets import their lecture modules on first use
    import torch
    from torch import nn

    from .data import Target
    from .hooks import Layer

# ---- A static picture of each explorer, for pages without a kernel -----------------------------------
# An explorer's display data carries, beside the widget view, an image/png of its current figure (and
# lecturekit.plotting.FIGURE_MIME, the stand-in check). JupyterLab shows the live widget; the course
# build (lecturekit.course) keeps the picture, so the HTML shows the explorer as it was left.


def _png_of(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


class _Picture:
    """The explorer's current figure: a PNG (and its stand-in check), or a figure rendered on display."""

    def __init__(self):
        self.figure, self.png, self.check = None, None, None

    def set_figure(self, fig, model) -> None:
        """Remember ``fig`` (rendered only when the explorer is displayed; plt.show closes it, saving works)."""
        from .plotting import figure_check

        self.figure, self.png = fig, None
        self.check = figure_check(fig, standin=getattr(model, "standin", False))

    def show(self, fig, model) -> None:
        """Remember ``fig`` as the explorer's picture, show it in the output area, and close it."""
        import matplotlib.pyplot as plt

        self.set_figure(fig, model)
        plt.show()
        plt.close(fig)

    def set_png(self, fig, model) -> bytes:
        """Render ``fig`` to PNG now (the Image-widget explorers show it) and remember it."""
        from .plotting import figure_check

        self.check = figure_check(fig, standin=getattr(model, "standin", False))
        self.figure, self.png = None, _png_of(fig)
        return self.png

    def clear(self) -> None:
        self.figure, self.png, self.check = None, None, None

    def bundle(self) -> dict:
        import base64

        from .plotting import FIGURE_MIME

        if self.png is None and self.figure is not None:
            self.png = _png_of(self.figure)
            self.figure = None
        if self.png is None:
            return {}
        return {"image/png": base64.b64encode(self.png).decode("ascii"), FIGURE_MIME: dict(self.check)}


def _with_picture(box, picture: _Picture):
    """Make ``box`` display its current picture too (ipywidgets 8: ``_repr_mimebundle_``; 7: ``_ipython_display_``)."""
    import ipywidgets as widgets

    box.picture_data = picture.bundle  # for tests: the static data the next display carries
    if hasattr(widgets.Widget, "_repr_mimebundle_"):  # ipywidgets 8
        plain = box._repr_mimebundle_

        def _repr_mimebundle_(**kwargs):
            data = plain(**kwargs)
            return {**data, **picture.bundle()} if data else data

        box._repr_mimebundle_ = _repr_mimebundle_
    else:  # ipywidgets 7 displays itself with _ipython_display_ (its own code, plus the picture)
        def _ipython_display_(**kwargs):
            from IPython.display import display

            data = {"text/plain": repr(box)[:110],
                    "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                                 "model_id": box._model_id}}
            display({**data, **picture.bundle()}, raw=True)
            handle = getattr(box, "_handle_displayed", None)  # 7's on_displayed callbacks
            if handle is not None:
                handle(**kwargs)

        box._ipython_display_ = _ipython_display_
    return box


# ---- What the network learned (notebook 03): layer/channel explorer -----------------------------

@renamed(images="x")
def feature_explorer(model: nn.Module, x: torch.Tensor, layers: list[Layer] | None = None, layer: Layer | None = None,
                     channel: int = 0, index: int = 0, k: int = 8, batch_size: int = 256):
    """Layer dropdown, channel and image sliders over :func:`lecturekit.features.feature_view`.

    Shows one image's activation maps at the chosen layer and the channel's top-``k`` patches over
    ``x`` (N, 3, H, W); everything is recomputed when a control changes. ``layers``: the names
    offered (default: every Conv2d and ReLU with a local receptive field). The picture is a PNG in an
    ``ipywidgets.Image`` (works headless and in ipywidgets 7.7 and 8). Returns a VBox; ``box.controls``
    holds (layer, channel, index) and ``box.state["view"]`` the last FeatureView, for tests and live-coding.
    Notebook: 03_activations
    """
    import math

    import ipywidgets as widgets
    from torch import nn

    from . import features as _features
    from .plotting import mark_standin

    if layers is None:
        layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ReLU))]
    layers = list(layers)
    if not layers:
        raise ValueError("expected at least one layer to explore")
    layer = layer or layers[0]
    if layer not in layers:
        raise ValueError(f"expected layer to be one of the layers offered {layers}, got {layer!r}")

    def n_channels(name):
        return _features.activations(model, x[:1], name).shape[1]

    layer_box = widgets.Dropdown(options=layers, value=layer, description="layer")
    channel_slider = widgets.IntSlider(value=channel, min=0, max=n_channels(layer) - 1, description="channel",
                                       continuous_update=False)
    index_slider = widgets.IntSlider(value=index, min=0, max=len(x) - 1, description="image",
                                     continuous_update=False)
    picture = widgets.Image(format="png")
    state: dict = {}
    static = _Picture()

    def redraw(_change=None):
        view = _features.feature_view(model, x, layer_box.value, channel_slider.value,
                                      index=index_slider.value, k=k, batch_size=batch_size)
        columns = max(1, math.ceil(math.sqrt(2 * len(view.maps))))  # 32 maps: 8 x 4, 128: 16 x 8
        # a block about twice as wide as high, the shape of the maps' panel, not a thin strip
        fig = mark_standin(_features.show_feature_view(view, ncols=columns), model)
        picture.value = static.set_png(fig, model)
        state["view"] = view

    quiet = [False]  # while the layer changes, the channel slider's clamping must not redraw as well

    def changed(_change=None):
        if not quiet[0]:
            redraw()

    def layer_changed(change):
        quiet[0] = True
        try:
            channel_slider.max = n_channels(change["new"]) - 1  # clamps the value if it is larger
        finally:
            quiet[0] = False
        redraw()

    layer_box.observe(layer_changed, names="value")
    channel_slider.observe(changed, names="value")
    index_slider.observe(changed, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([layer_box, channel_slider, index_slider]), picture])
    box.controls, box.state = (layer_box, channel_slider, index_slider), state
    return _with_picture(box, static)


# ---- Which pixels matter (notebook 04): occlusion explorer --------------------------------------

def occlusion_view(model: nn.Module, x: torch.Tensor, target: Target, patch: int = 8, stride: int = 4, output: str = "prob"):
    """Pure function behind :func:`occlusion_explorer`: the occlusion map of one image, (H, W).

    x: (1, 3, H, W) in [0, 1]. Notebook: 04_occlusion_saliency
    """
    from .attribution import occlusion

    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got {tuple(x.shape)}")
    return occlusion(model, x, target, patch=patch, stride=stride, output=output, progress=False)[0]


def occlusion_explorer(model: nn.Module, x: torch.Tensor, target: Target, patch: int = 8, stride: int = 4, output: str = "prob",
                       max_patch: int | None = None):
    """Patch and stride sliders over :func:`occlusion_view`; the map is redrawn when a slider moves.

    Returns an ``ipywidgets.VBox``; ``box.sliders`` holds the two sliders and ``box.state`` the last
    parameters and map (``{"patch": .., "stride": .., "map": (H, W)}``), for tests and live-coding.
    Notebook: 04_occlusion_saliency
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .plotting import overlay, title_for

    H = x.shape[-2]
    max_patch = max_patch or H // 2
    patch_slider = widgets.IntSlider(value=patch, min=2, max=max_patch, step=1, description="patch",
                                     continuous_update=False)
    stride_slider = widgets.IntSlider(value=stride, min=1, max=max_patch, step=1, description="stride",
                                      continuous_update=False)
    out = widgets.Output()
    state: dict = {}
    static = _Picture()

    def redraw(_change=None):
        heat = occlusion_view(model, x, target, patch_slider.value, stride_slider.value, output)
        state.update(patch=patch_slider.value, stride=stride_slider.value, map=heat)
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
            axes[0].imshow(x[0].detach().cpu().permute(1, 2, 0).numpy())
            axes[0].set_title("image")
            axes[1].imshow(overlay(x[0], heat.clamp(min=0)))  # where hiding lowers the score
            axes[1].set_title(title_for(model, f"occlusion, patch {patch_slider.value}, stride {stride_slider.value}"))
            for ax in axes:
                ax.axis("off")
            static.show(fig, model)

    patch_slider.observe(redraw, names="value")
    stride_slider.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([patch_slider, stride_slider]), out])
    box.sliders, box.state = (patch_slider, stride_slider), state
    return _with_picture(box, static)


# ---- Synthesizing images (notebooks 08-10): prior-strength explorer ------------------------------

@renamed(l2="l2_weight")
def prior_view(model: nn.Module, target: Target, l2_weight: float = 0.0, jitter: int = 0, blur_sigma: float = 0.0,
               blur_every: int = 4, clip_value: float = 0.0, clip_contribution: float = 0.0,
               steps: int = 100, lr: float = 0.02, seed: int = 0):
    """Pure function behind :func:`prior_explorer`: one class visualisation (1, 3, S, S) in [0, 1] with
    the given prior strengths (0 switches a prior off). Notebook: 08_gradient_ascent
    """
    from .synthesis import class_visualization

    return class_visualization(model, int(target), steps=steps, lr=lr, l2_weight=l2_weight, jitter=int(jitter),
                               blur_every=blur_every if blur_sigma > 0 else 0, blur_sigma=blur_sigma,
                               clip_value=clip_value, clip_contribution=clip_contribution, seed=seed,
                               progress=False)


def prior_explorer(model: nn.Module, target: Target = 0, steps: int = 100, lr: float = 0.02, seed: int = 0):
    """Sliders for the strengths of the priors of Yosinski et al. 2015 over :func:`prior_view`; the class
    visualisation is recomputed when a slider is released. Returns an ``ipywidgets.VBox``;
    ``box.sliders`` maps prior names to sliders, ``box.state`` holds the last settings and image.
    Notebook: 08_gradient_ascent
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    import torch

    from .models import class_names
    from .plotting import title_for
    from .synthesis import total_variation

    names = getattr(model, "class_names", None)
    make = dict(continuous_update=False, style={"description_width": "110px"})
    sliders = {
        "target": widgets.Dropdown(options=[(n, i) for i, n in enumerate(class_names(model))] if names
                                   else list(range(10)), value=target, description="class"),
        "l2_weight": widgets.FloatLogSlider(value=1e-4, base=10, min=-5, max=-1, description="L2 (log)", **make),
        "l2_weight_on": widgets.Checkbox(value=False, description="L2 on"),
        "jitter": widgets.IntSlider(value=0, min=0, max=8, description="jitter (px)", **make),
        "blur_sigma": widgets.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.1, description="blur sigma", **make),
        "clip_value": widgets.FloatSlider(value=0.0, min=0.0, max=60, step=5, description="clip norm %", **make),
        "clip_contribution": widgets.FloatSlider(value=0.0, min=0.0, max=60, step=5, description="clip contrib. %", **make),
    }
    out = widgets.Output()
    state: dict = {}
    static = _Picture()

    def redraw(_change=None):
        settings = dict(l2_weight=sliders["l2_weight"].value if sliders["l2_weight_on"].value else 0.0, jitter=sliders["jitter"].value,
                        blur_sigma=sliders["blur_sigma"].value, clip_value=sliders["clip_value"].value,
                        clip_contribution=sliders["clip_contribution"].value)
        image = prior_view(model, sliders["target"].value, steps=steps, lr=lr, seed=seed, **settings)
        with torch.no_grad():
            prob = model(image).softmax(1)[0, sliders["target"].value].item()
        state.update(settings, target=sliders["target"].value, image=image, prob=prob,
                     tv=total_variation(image).item())
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(3.2, 3.4))
            ax.imshow(image[0].permute(1, 2, 0).cpu().numpy())
            ax.set_title(title_for(model, f"p = {prob:.3f}, TV = {state['tv']:.1f}"), fontsize=9)
            ax.axis("off")
            static.show(fig, model)

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([widgets.VBox(list(sliders.values())[:4]),
                                      widgets.VBox(list(sliders.values())[4:])]), out])
    box.sliders, box.state = sliders, state
    return _with_picture(box, static)


# ---- Texture and style (notebook 12): style-weight and layer explorer ---------------------------

def style_view(model, content, style, style_weight: float = 1e2, layers: list[Layer] | None = None, content_layer=None,
               steps: int = 30, seed: int = 0):
    """Pure function behind :func:`style_explorer`: one style transfer with the given style weight and
    style layers; returns the :class:`lecturekit.style.Synthesis` (image (1, 3, H, W) and losses).
    Notebook: 12_style_transfer
    """
    from .style import style_transfer

    return style_transfer(model, content, style, content_layer, list(layers) if layers is not None else None,
                          style_weight=style_weight, steps=steps, seed=seed, progress=False)


def style_explorer(model, content, style, layers: list[Layer] | None = None, style_weight: float = 1e2, steps: int = 30,
                   seed: int = 0):
    """A log slider for the style weight and a multiple selection of style layers over :func:`style_view`;
    the stylised image is recomputed when a control is released. ``layers``: the layers offered
    (default ``model.style_layers``, all selected). With no layer selected, nothing is computed and
    the picture says so. Returns an ``ipywidgets.VBox``; ``box.controls`` holds (weight slider, layer
    selection) and ``box.state`` the last settings, image and losses. Notebook: 12_style_transfer
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    layers = list(layers if layers is not None else getattr(model, "style_layers", []))
    if not layers:
        raise ValueError("expected at least one style layer to offer (pass layers=[...])")
    weight = widgets.FloatLogSlider(value=style_weight, base=10, min=-1, max=5, step=0.25,
                                    description="style weight", continuous_update=False,
                                    style={"description_width": "90px"})
    chosen = widgets.SelectMultiple(options=layers, value=tuple(layers), rows=min(6, len(layers)),
                                    description="style layers", style={"description_width": "90px"})
    out = widgets.Output()
    state: dict = {}
    static = _Picture()

    def redraw(_change=None):
        selected = list(chosen.value)
        state.update(style_weight=weight.value, layers=selected)
        with out:
            out.clear_output(wait=True)
            if not selected:
                state.update(image=None, losses=None)
                static.clear()
                print("select at least one style layer")
                return
            result = style_view(model, content, style, weight.value, selected, steps=steps, seed=seed)
            state.update(image=result.image, losses={k: float(v[-1]) for k, v in result.losses.items()})
            fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
            for ax, img, title in zip(axes, (content, style, result.image),
                                      ("content", "style", f"weight {weight.value:.3g}, {len(selected)} layer(s)")):
                ax.imshow(img[0].permute(1, 2, 0).cpu().clamp(0, 1).numpy())
                ax.set_title(title, fontsize=9)
                ax.axis("off")
            fig.suptitle(f"content loss {state['losses']['content']:.3g}, style loss {state['losses']['style']:.3g}",
                         fontsize=9)
            fig.tight_layout()
            static.show(fig, model)

    weight.observe(redraw, names="value")
    chosen.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([weight, chosen]), out])
    box.controls, box.state = (weight, chosen), state
    return _with_picture(box, static)


# ---- Adversarial examples (notebook 14): attack explorer -------------------------------------------

def attack_view(model: nn.Module, x: torch.Tensor, target: Target | None = None, eps: float = 4 / 255, attack: str = "pgd",
                steps: int = 10, true_class: int | None = None):
    """Pure function behind :func:`attack_explorer`: attack one image x (1, 3, H, W) and measure it.

    ``target`` None (or equal to ``true_class``): untargeted, away from ``true_class`` (default: the model's
    prediction); otherwise a targeted attack towards ``target``. ``attack``: ``"fgsm"`` or ``"pgd"``
    (L-inf, ``steps`` steps, no random start). Returns a ``SimpleNamespace`` with image, adversarial
    (1, 3, H, W), perturbation (1, 3, H, W), probs (2, K) (clean, adversarial), eps, target, label.
    Notebook: 14_adversarial_examples
    """
    from types import SimpleNamespace

    import torch

    from . import adversarial as adv

    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got {tuple(x.shape)}")
    with torch.no_grad():
        clean = model(x).softmax(1)  # (1, K)
    label = int(clean.argmax(1)) if true_class is None else int(true_class)
    targeted = target is not None and int(target) != label
    goal = int(target) if targeted else label
    if attack == "fgsm":
        x_adv = adv.fgsm(model, x, goal, eps, targeted=targeted)
    elif attack == "pgd":
        x_adv = adv.pgd(model, x, goal, eps, steps=steps, random_start=False, targeted=targeted)
    else:
        raise ValueError(f"unknown attack {attack!r}; expected 'fgsm' or 'pgd'")
    with torch.no_grad():
        probs = torch.cat([clean, model(x_adv).softmax(1)])  # (2, K)
    return SimpleNamespace(image=x, adversarial=x_adv, perturbation=x_adv - x, probs=probs, eps=eps,
                           target=goal if targeted else None, label=label, attack=attack)


def show_attack_view(view, class_names=None):
    """Image, perturbation (magnified to the full grey range), adversarial image, class probabilities."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = class_names or [str(k) for k in range(view.probs.shape[1])]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3), gridspec_kw=dict(width_ratios=[1, 1, 1, 1.6]))
    scale = max(view.eps, 1e-8)
    pictures = [view.image[0], (view.perturbation[0] / (2 * scale) + 0.5).clamp(0, 1), view.adversarial[0]]
    p_clean, p_adv = view.probs[0], view.probs[1]
    titles = [f"clean: {names[int(p_clean.argmax())]} ({p_clean.max():.2f})",
              f"perturbation x{0.5 / scale:.0f}, eps {view.eps * 255:.0f}/255",
              f"{view.attack}: {names[int(p_adv.argmax())]} ({p_adv.max():.2f})"]
    for ax, picture, title in zip(axes, pictures, titles):
        ax.imshow(picture.permute(1, 2, 0).cpu().numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    k = np.arange(len(names))
    axes[3].bar(k - 0.2, p_clean.cpu().numpy(), 0.4, label="clean")
    axes[3].bar(k + 0.2, p_adv.cpu().numpy(), 0.4, label="adversarial")
    axes[3].set_xticks(k, names, rotation=45, fontsize=8)
    axes[3].set_ylim(0, 1)
    axes[3].set_title("class probabilities" + (f", target {names[view.target]}" if view.target is not None
                                              else ", untargeted"), fontsize=9)
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    return fig


def attack_explorer(model: nn.Module, x: torch.Tensor, labels=None, eps: int = 4, steps: int = 10):
    """Pick an image, a target class (or untargeted) and eps (in grey levels, 0-16) and an attack;
    see the perturbation, the adversarial image and the class probabilities update (:func:`attack_view`).

    Returns a VBox; ``box.controls`` holds (image, target, eps, attack) and ``box.state["view"]`` the
    last view, for tests and live-coding. Notebook: 14_adversarial_examples
    """
    import ipywidgets as widgets

    from .models import class_names
    from .plotting import mark_standin

    names = class_names(model)
    image = widgets.IntSlider(value=0, min=0, max=len(x) - 1, description="image", continuous_update=False)
    target = widgets.Dropdown(options=[("untargeted", -1)] + [(n, i) for i, n in enumerate(names)], value=-1,
                              description="target")
    eps_slider = widgets.IntSlider(value=eps, min=0, max=16, description="eps (/255)", continuous_update=False)
    attack = widgets.Dropdown(options=["pgd", "fgsm"], value="pgd", description="attack")
    picture = widgets.Image(format="png")
    state: dict = {}
    static = _Picture()

    def redraw(_change=None):
        i = image.value
        view = attack_view(model, x[i:i + 1], target=None if target.value < 0 else target.value,
                           eps=eps_slider.value / 255, attack=attack.value, steps=steps,
                           true_class=None if labels is None else int(labels[i]))
        fig = mark_standin(show_attack_view(view, names), model)
        picture.value = static.set_png(fig, model)
        state["view"] = view

    for control in (image, target, eps_slider, attack):
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([image, target]), widgets.HBox([eps_slider, attack]), picture])
    box.controls, box.state = (image, target, eps_slider, attack), state
    return _with_picture(box, static)
