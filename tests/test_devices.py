"""Contract 4 on every device: each technique runs where its model and input are, and its results come
back detached on that device, with the values it gives on the CPU.

The ``device`` fixture (conftest.py) is cpu and cuda; on a machine without a GPU the cuda variants are
skipped with a message, on one with a GPU the same tests run there unchanged. GPU convolutions may
use TF32, hence the loose tolerance of the comparison with the CPU.
"""
import copy
import dataclasses

import pytest
import torch

from lecturekit import attribution, evaluation, features, models, synthesis
from lecturekit.data import shapes


@pytest.fixture(scope="module")
def batch():
    return shapes(4, seed=11)


def tensors(result):
    """Every tensor in a result (a tensor, a dataclass, a NamedTuple, a list or dict of them)."""
    if isinstance(result, torch.Tensor):
        yield result
    elif dataclasses.is_dataclass(result):
        for field in dataclasses.fields(result):
            yield from tensors(getattr(result, field.name))
    elif isinstance(result, (list, tuple)):
        for item in result:
            yield from tensors(item)
    elif isinstance(result, dict):
        for item in result.values():
            yield from tensors(item)


def on(device, course, batch):
    model = copy.deepcopy(course).to(device)
    return model, batch.images.to(device), batch.labels.to(device)


def assert_on(result, device, what):
    found = list(tensors(result))
    assert found, f"{what} returned no tensor"
    for t in found:
        assert t.device.type == device.type, f"{what}: a result is on {t.device}, expected {device}"
        assert not t.requires_grad, f"{what}: a result is still attached to the graph"


def close_to_cpu(result, reference, what, rtol=2e-2):
    for a, b in zip(tensors(result), tensors(reference), strict=True):
        a = a.cpu()
        if a.dtype == torch.bool or not a.is_floating_point():
            assert torch.equal(a, b), what
        else:
            scale = b.abs().max().clamp(min=1e-8)
            assert (a - b).abs().max() <= rtol * scale, f"{what}: differs from the CPU by {(a - b).abs().max():.3g}"


TECHNIQUES = {
    # features (notebooks 01-03)
    "first_layer_filters": lambda m, x, y: features.first_layer_filters(m),
    "activations": lambda m, x, y: features.activations(m, x, "features.6"),
    "top_patches": lambda m, x, y: features.top_patches(m, x, "features.6", 3, k=2),
    "feature_view": lambda m, x, y: features.feature_view(m, x, "features.3", 1, index=1, k=2),
    # attribution (notebooks 04-06)
    "occlusion": lambda m, x, y: attribution.occlusion(m, x, y, patch=16, stride=16, progress=False),
    "saliency": lambda m, x, y: attribution.saliency(m, x, y),
    "guided_backprop": lambda m, x, y: attribution.guided_backprop(m, x, y),
    "deconvnet": lambda m, x, y: attribution.deconvnet(m, x, y),
    "cam": lambda m, x, y: attribution.cam(m, x, y),
    "grad_cam": lambda m, x, y: attribution.grad_cam(m, x, y, "features.10"),
    "guided_grad_cam": lambda m, x, y: attribution.guided_grad_cam(m, x, y, "features.10"),
    "shapley": lambda m, x, y: attribution.shapley(m, x, y, patch=32, samples=4, progress=False),
    # evaluation (notebook 07)
    "deletion_curve": lambda m, x, y: evaluation.deletion_curve(m, x, y, attribution.saliency(m, x, y), steps=4,
                                                                progress=False),
    "insertion_curve": lambda m, x, y: evaluation.insertion_curve(m, x, y, attribution.saliency(m, x, y), steps=4,
                                                                  progress=False),
    "randomisation_check": lambda m, x, y: evaluation.randomisation_check(
        attribution.saliency, m, x, y, layers=["classifier", "features.9"]),
    # synthesis (notebooks 08-10)
    "class_visualization": lambda m, x, y: synthesis.class_visualization(m, y[:2], steps=3, jitter=2, blur_every=2,
                                                                         size=32, progress=False),
    "deep_dream": lambda m, x, y: synthesis.deep_dream(m, x[:2], "features.6", steps=2, octaves=2, progress=False),
    "invert": lambda m, x, y: synthesis.invert(m, x[:2], "features.6", steps=3, progress=False),
}
# Optimisations through many steps (and random jitter) amplify rounding: only device and range there.
NOT_COMPARED = {"class_visualization", "deep_dream", "invert", "randomisation_check"}


@pytest.fixture(scope="module")
def on_cpu(course, batch):
    """Each technique's result on the CPU, computed once."""
    return {name: run(course, batch.images, batch.labels) for name, run in TECHNIQUES.items()}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_technique_runs_on_the_device_of_model_and_input(name, device, course, batch, on_cpu):
    model, x, y = on(device, course, batch)
    result = TECHNIQUES[name](model, x, y)
    assert_on(result, device, name)
    assert all(p.device.type == device.type for p in model.parameters()), "the model moved"
    if name not in NOT_COMPARED:
        close_to_cpu(result, on_cpu[name], name)
    for t in tensors(result):
        assert torch.isfinite(t.float()).all(), name


def test_evaluation_of_maps_stays_on_their_device(device, batch):
    maps = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    masks, boxes = batch.masks.to(device), batch.boxes.to(device)
    hits = evaluation.pointing_game(maps, masks)
    errors = evaluation.localisation_error(maps, boxes)
    assert_on([hits, errors], device, "pointing_game / localisation_error")
    assert torch.equal(hits.cpu(), evaluation.pointing_game(maps.cpu(), batch.masks))
    assert torch.equal(errors.cpu(), evaluation.localisation_error(maps.cpu(), batch.boxes))


def test_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.delenv("LECTUREKIT_DEVICE", raising=False)
    assert models.default_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.default_device() == torch.device("cpu")
    monkeypatch.setenv("LECTUREKIT_DEVICE", "cuda:1")
    assert models.default_device() == torch.device("cuda", 1)  # the variable wins, GPU or not
    monkeypatch.setenv("LECTUREKIT_DEVICE", "gpu please")
    with pytest.raises(ValueError, match="LECTUREKIT_DEVICE"):
        models.default_device()


def test_course_model_goes_to_the_default_device(monkeypatch):
    monkeypatch.setenv("LECTUREKIT_DEVICE", "cpu")
    model = models.course_model(device=models.default_device())
    assert next(model.parameters()).device.type == "cpu"
