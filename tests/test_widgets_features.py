"""The layer/channel explorer of notebook 03: moving a control calls the pure function and redraws."""
import pytest
import torch

from lecturekit import features, widgets
from lecturekit.models import course_model


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
