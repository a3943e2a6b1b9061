"""The widgets: each explorer's pure function is the lecturekit function it shows, and moving a
control calls it and redraws (ipywidgets headless). Notebooks 03 (layer/channel explorer),
04 (occlusion explorer) and 08 (prior explorer)."""
import pytest
import torch

from conftest import linear_model
from lecturekit import attribution as A
from lecturekit import features, widgets
from lecturekit import synthesis as S
from lecturekit.models import course_model


@pytest.fixture(scope="module")
def untrained():
    return course_model(pretrained=False, seed=0)


@pytest.fixture(scope="module")
def setup():
    from lecturekit.data import shapes

    return course_model(pretrained=False, seed=1), shapes(12, seed=2).images


def test_explorer_calls_the_pure_function_and_updates_the_picture(setup, monkeypatch):
    model, images = setup
    box = widgets.feature_explorer(model, images, layers=["features.0", "features.3", "features.6"], k=4)
    layer, channel, index = box.controls
    assert box.state["view"].layer == "features.0" and channel.max == 31
    calls = []
    real = features.feature_view

    def spy(*args, **kwargs):
        calls.append((args[2], args[3], kwargs["index"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "feature_view", spy)
    first_png = box.children[1].value
    assert first_png[:8] == b"\x89PNG\r\n\x1a\n"

    channel.value = 7
    assert calls == [("features.0", 7, 0)]
    assert box.state["view"].channel == 7
    assert torch.allclose(box.state["view"].patches.values,
                          real(model, images, "features.0", 7, k=4).patches.values)
    assert box.children[1].value != first_png, "the picture was redrawn"

    channel.value = 31
    layer.value = "features.6"  # 64 channels: the slider's range follows, one redraw
    assert calls[-1] == ("features.6", 31, 0) and len(calls) == 3 and channel.max == 63
    assert box.state["view"].maps.shape == (64, 16, 16)

    channel.value = 50
    layer.value = "features.3"  # 32 channels: the channel is clamped to 31, still one redraw
    assert calls[-1] == ("features.3", 31, 0) and len(calls) == 5 and channel.value == 31

    index.value = 5
    assert calls[-1] == ("features.3", 31, 5)
    assert torch.equal(box.state["view"].image, images[5])


def test_explorer_rejects_a_layer_not_offered(setup):
    model, images = setup
    with pytest.raises(ValueError, match="one of the layers offered"):
        widgets.feature_explorer(model, images, layers=["features.0"], layer="features.3")


# ---- the occlusion explorer (widgets) ----------------------------------------------------------------------

def test_occlusion_view_is_occlusion_of_one_image():
    from lecturekit.widgets import occlusion_view

    net = linear_model(H=8, W=8)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    expected = A.occlusion(net, x, 0, patch=3, stride=2, output="prob", progress=False)[0]
    assert torch.allclose(occlusion_view(net, x, 0, patch=3, stride=2), expected)
    with pytest.raises(ValueError, match="one image"):
        occlusion_view(net, torch.rand(2, 3, 8, 8, dtype=torch.float64), 0)


def test_moving_a_slider_recomputes_the_map():
    import matplotlib

    matplotlib.use("Agg")
    from lecturekit.widgets import occlusion_explorer

    net = linear_model(H=8, W=8)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    box = occlusion_explorer(net, x, 1, patch=2, stride=1)
    patch, stride = box.sliders
    first = box.state["map"]
    assert box.state["patch"] == 2
    patch.value = 4
    assert box.state["patch"] == 4 and not torch.allclose(box.state["map"], first)
    stride.value = 3
    assert box.state["stride"] == 3
    expected = A.occlusion(net, x, 1, patch=4, stride=3, output="prob", progress=False)[0]
    assert torch.allclose(box.state["map"], expected)


# ---- the widget -------------------------------------------------------------------------------------


def test_prior_explorer_redraws_when_a_slider_moves(untrained, monkeypatch):
    from lecturekit import widgets

    image = widgets.prior_view(untrained, 2, l2_weight=0.01, blur_sigma=0.5, steps=3)
    assert image.shape == (1, 3, 64, 64)
    assert torch.equal(image, S.class_visualization(untrained, 2, steps=3, lr=0.02, l2_weight=0.01, blur_every=4,
                                                    blur_sigma=0.5, progress=False))
    calls = []
    real = widgets.prior_view
    monkeypatch.setattr(widgets, "prior_view", lambda *a, **k: calls.append(k) or real(*a, **k))
    box = widgets.prior_explorer(untrained, target=1, steps=2)
    assert len(calls) == 1 and box.state["target"] == 1
    box.sliders["blur_sigma"].value = 1.0
    assert len(calls) == 2 and calls[-1]["blur_sigma"] == 1.0 and box.state["blur_sigma"] == 1.0
    box.sliders["l2_weight_on"].value = True
    assert calls[-1]["l2_weight"] == box.sliders["l2_weight"].value > 0
    assert 0 <= box.state["prob"] <= 1 and box.state["image"].shape == (1, 3, 64, 64)


def test_explorer_lays_the_maps_out_as_a_block_not_a_strip(setup, monkeypatch):
    model, images = setup
    seen = []
    real = features.show_feature_view

    def spy(view, **kwargs):
        fig = real(view, **kwargs)
        grid = fig.axes[1].images[0].get_array()  # the activation maps' panel, (height, width, 3)
        seen.append((len(view.maps), grid.shape[1] / grid.shape[0]))
        return fig

    monkeypatch.setattr(features, "show_feature_view", spy)
    box = widgets.feature_explorer(model, images, layers=["features.0", "features.6"], k=2)
    box.controls[0].value = "features.6"
    assert [n for n, _ in seen] == [32, 64]
    assert all(1 <= aspect <= 2.5 for _, aspect in seen), seen  # 16 columns of 32 maps made an 8:1 strip
