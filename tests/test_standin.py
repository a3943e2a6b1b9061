"""ImageNet weights offline, as a user meets it in JupyterLab or Colab: no LECTUREKIT_STANDIN, no network.

The network is simulated: ``torch.hub.urlopen`` (what torchvision's download goes through) raises
URLError, or serves a checkpoint made here. The hub cache is a temporary TORCH_HOME.
"""
import email.message
import io
import os
import urllib.error
import urllib.response

import matplotlib.pyplot as plt
import pytest
import torch
import torchvision

from lecturekit import models, plotting

WEIGHTS = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
FILENAME = os.path.basename(WEIGHTS.url)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache in tmp_path, LECTUREKIT_STANDIN and LECTUREKIT_OFFLINE unset."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.delenv("LECTUREKIT_STANDIN", raising=False)
    monkeypatch.delenv("LECTUREKIT_OFFLINE", raising=False)
    return tmp_path / "hub" / "checkpoints"


def no_network(monkeypatch):
    calls = []

    def urlopen(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", urlopen)
    return calls


def serve(monkeypatch, payload: bytes):
    """torch.hub.urlopen answers every request with ``payload``; returns the URLs asked for."""
    calls = []

    def urlopen(request, *args, **kwargs):
        calls.append(request.full_url)
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        return urllib.response.addinfourl(io.BytesIO(payload), headers, request.full_url)

    monkeypatch.setattr(torch.hub, "urlopen", urlopen)
    return calls


def test_no_network_falls_back_to_standin_with_one_clear_line(hub, monkeypatch, capsys, recwarn):
    calls = no_network(monkeypatch)
    model = models.imagenet_model("squeezenet1_1")  # the default: no standin argument, no variable
    assert calls == [WEIGHTS.url]  # it did try the network
    assert model.standin is True and not model.training
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line: no "Downloading: ..." before it, no banner around it
    assert "STAND-IN WEIGHTS" in err[0] and "squeezenet1_1" in err[0] and "no network" in err[0]
    assert FILENAME in err[0] and str(hub) in err[0]  # says which file would have helped, and where
    assert "Downloading" not in err[0]
    assert not [w for w in recwarn if "STAND-IN" in str(w.message)]  # no second copy as a UserWarning
    assert list(hub.iterdir()) == []  # the failed download left no partial file
    reference = models.imagenet_model("squeezenet1_1", standin=True)
    assert torch.equal(model.features[0].weight, reference.features[0].weight)  # the seeded stand-ins


def test_no_network_with_standin_false_raises_naming_file_and_folder(hub, monkeypatch, capsys):
    no_network(monkeypatch)
    with pytest.raises(models.WeightsUnavailable) as err:
        models.imagenet_model("squeezenet1_1", standin=False)
    assert isinstance(err.value, RuntimeError)
    assert FILENAME in str(err.value) and str(hub) in str(err.value) and "standin=True" in str(err.value)
    assert "STAND-IN" not in capsys.readouterr().err
    monkeypatch.setenv("LECTUREKIT_STANDIN", "0")  # the variable says the same
    with pytest.raises(models.WeightsUnavailable):
        models.imagenet_model("squeezenet1_1")


def test_standin_env_variable_skips_the_network(hub, monkeypatch):
    calls = no_network(monkeypatch)
    monkeypatch.setenv("LECTUREKIT_STANDIN", "1")
    assert models.imagenet_model("squeezenet1_1").standin and calls == []


def test_download_goes_into_the_hub_cache_once_and_loads_the_real_weights(hub, monkeypatch, capsys):
    torch.manual_seed(7)
    trained = torchvision.models.squeezenet1_1(weights=None)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    calls = serve(monkeypatch, buffer.getvalue())
    model = models.imagenet_model("squeezenet1_1")
    assert calls == [WEIGHTS.url] and (hub / FILENAME).is_file()
    assert model.standin is False and "STAND-IN" not in capsys.readouterr().err
    assert torch.equal(model.features[0].weight, trained.features[0].weight)
    again = models.imagenet_model("squeezenet1_1")  # from the cache: no second request
    assert calls == [WEIGHTS.url] and torch.equal(again.features[0].weight, trained.features[0].weight)


def test_real_loading_path_from_a_checkpoint_in_the_hub_cache(hub, monkeypatch):
    calls = no_network(monkeypatch)
    torch.manual_seed(5)
    source = torchvision.models.squeezenet1_1(weights=None)
    hub.mkdir(parents=True)
    torch.save(source.state_dict(), hub / FILENAME)
    model = models.imagenet_model("squeezenet1_1")
    assert model.standin is False and calls == []
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    x = torch.rand(1, 3, 64, 64)
    mean = torch.tensor(WEIGHTS.transforms().mean).view(1, 3, 1, 1)
    std = torch.tensor(WEIGHTS.transforms().std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), source.eval()((x - mean) / std), atol=1e-5)


# ---- figures made with stand-in weights say so --------------------------------------------------

class _Model(torch.nn.Module):
    def __init__(self, standin):
        super().__init__()
        self.standin = standin


def test_title_for_marks_only_standin_models():
    assert plotting.title_for(_Model(True), "Grad-CAM") == "Grad-CAM (stand-in weights)"
    assert plotting.title_for(_Model(True), "Grad-CAM (stand-in weights)") == "Grad-CAM (stand-in weights)"
    assert plotting.title_for(_Model(False), "Grad-CAM") == "Grad-CAM"
    assert plotting.title_for(torch.nn.Linear(1, 1), "CourseNet") == "CourseNet"  # no flag: real weights


def test_mark_standin_adds_to_the_suptitle_or_makes_one():
    fig = plt.figure()
    fig.suptitle("DeepDream on SqueezeNet")
    assert plotting.mark_standin(fig, _Model(True)) is fig
    assert fig._suptitle.get_text() == "DeepDream on SqueezeNet (stand-in weights)"
    plain = plt.figure()
    plotting.mark_standin(plain, _Model(True))
    assert plain._suptitle.get_text() == "stand-in weights"
    real = plt.figure()
    plotting.mark_standin(real, _Model(False))
    assert real._suptitle is None
    plt.close("all")


def test_explorers_mark_standin_models_in_their_titles(capsys):
    """The occlusion explorer's figure title says stand-in when the model has stand-in weights."""
    from lecturekit import widgets

    model = models.imagenet_model("squeezenet1_1", standin=True)
    x = torch.rand(1, 3, 64, 64)
    titles = []
    original = plt.Axes.set_title
    try:
        plt.Axes.set_title = lambda self, label, *a, **k: titles.append(label) or original(self, label, *a, **k)
        widgets.occlusion_explorer(model, x, 0, patch=16, stride=16)
    finally:
        plt.Axes.set_title = original
    assert any(t.endswith("(stand-in weights)") for t in titles) and "image" in titles
    plt.close("all")
