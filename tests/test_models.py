import math
import os

import pytest
import torch
import torchvision

from lecturekit import data, models
from lecturekit.hooks import layer_names


def test_course_model_architecture(course):
    convs = [m for m in course.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels >= 32 and min(convs[0].kernel_size) >= 5
    assert isinstance(course.pool, torch.nn.AdaptiveAvgPool2d)
    assert isinstance(course.classifier, torch.nn.Linear)
    assert not course.training
    # plain conv/ReLU/max-pool features: nothing else
    kinds = {type(m) for m in course.features}
    assert kinds == {torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d}


def test_bundled_weights_small_and_safe():
    assert models.WEIGHTS_PATH.stat().st_size <= 2 * 1024 * 1024
    state = torch.load(models.WEIGHTS_PATH, weights_only=True)
    assert "model" in state and "recipe" in state


def test_course_model_is_accurate_on_fresh_images(course):
    """A quick check; the full 2,000-image held-out number is in benchmarks/RESULTS.md."""
    b = data.shapes(500, seed=31337)  # a seed training never uses (training seeds start at 10^7)
    with torch.no_grad():
        acc = (course(b.images).argmax(1) == b.labels).float().mean().item()
    assert acc >= 0.95


def test_normalisation_is_inside(course):
    x = data.shapes(4, seed=0).images
    normalised = (x - torch.tensor(models.SHAPES_MEAN).view(1, 3, 1, 1)) / torch.tensor(models.SHAPES_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = course.classifier(course.pool(course.features(normalised)).flatten(1))
        assert torch.allclose(course(x), expected, atol=1e-5)


def test_random_course_model_is_seeded():
    a, b = models.course_model(pretrained=False, seed=1), models.course_model(pretrained=False, seed=1)
    c = models.course_model(pretrained=False, seed=2)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert models.class_names(a) == data.CLASSES


def test_normalisation_roughly_standardises_shapesworld():
    x = data.shapes(2000, seed=99).images
    z = models.Normalize(models.SHAPES_MEAN, models.SHAPES_STD)(x)
    assert z.mean((0, 2, 3)).abs().max() < 0.35 and (z.std((0, 2, 3)) - 1).abs().max() < 0.35


@pytest.mark.parametrize("name, first_layer", [("squeezenet1_1", "features.0"), ("resnet18", "conv1"),
                                               ("alexnet", "features.0")])
def test_imagenet_standin_keeps_torchvision_names(name, first_layer, capsys):
    model = models.imagenet_model(name, standin=True)
    assert "STAND-IN" in capsys.readouterr().err
    assert model.standin and not model.training
    names = layer_names(model)
    assert first_layer in names and "normalize" in names
    assert len(models.class_names(model)) == 1000 and models.class_names(model)[281] == "tabby"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = torchvision.models.get_model(name, weights=None)
        reference.load_state_dict(model.state_dict())  # same keys: normalisation is not in the state
        reference.eval()
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-5)


def test_standin_is_seeded_and_env_variable(monkeypatch):
    monkeypatch.setenv("LECTUREKIT_STANDIN", "1")
    a = models.imagenet_model("squeezenet1_1")
    b = models.imagenet_model("squeezenet1_1", seed=0)
    assert torch.equal(a.features[0].weight, b.features[0].weight)


def test_offline_fails_fast_naming_file_and_folder(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("LECTUREKIT_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        models.imagenet_model("squeezenet1_1", standin=False)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "squeezenet1_1-b8a52dc0.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "standin=True" in message


def test_auto_falls_back_to_standin_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setenv("LECTUREKIT_OFFLINE", "1")
    model = models.imagenet_model("squeezenet1_1", standin="auto")
    assert model.standin


def test_real_loading_path_uses_the_hub_cache_without_network(tmp_path, monkeypatch):
    """Put a checkpoint where torchvision looks for it; the real path must load it, offline."""
    import urllib.request

    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    torch.manual_seed(5)
    source = torchvision.models.squeezenet1_1(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / os.path.basename(weights.url))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    model = models.imagenet_model("squeezenet1_1", standin=False)
    assert model.standin is False
    assert torch.equal(model.features[0].weight, source.features[0].weight)


def test_unknown_imagenet_model():
    with pytest.raises(ValueError, match="resnet18"):
        models.imagenet_model("resnet81", standin=True)


def test_with_normalization_refuses_twice():
    model = models.course_model(pretrained=False)
    with pytest.raises(ValueError, match="already"):
        models.with_normalization(model, (0.5,) * 3, (0.5,) * 3)


def test_class_names_needs_lecturekit_model():
    with pytest.raises(ValueError, match="class names"):
        models.class_names(torch.nn.Linear(2, 2))


def test_initial_loss_near_log_c():
    from lecturekit.training import initial_loss

    loss = initial_loss(models.course_model(pretrained=False), data.shapes(256, seed=4))
    assert abs(loss - math.log(len(data.CLASSES))) < 0.15
