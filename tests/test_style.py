"""Texture and style (issue 10): the losses against independent computations, the optimisations, the
feature networks, the quality statistics, fast style transfer, train-style and the explorer widget."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import model_state
from lecturekit import cli, style as S
from lecturekit.models import course_model

pytestmark = pytest.mark.filterwarnings("ignore:this model has STAND-IN")


@pytest.fixture(scope="module")
def net():
    return S.random_feature_net(seed=0)


@pytest.fixture(scope="module")
def texture():
    from lecturekit.data import sample_image

    return sample_image("brick", size=48)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- the losses ----------------------------------------------------------------------------------

def test_gram_matches_an_explicit_loop_for_maps_and_flat_features():
    F = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    loop = torch.zeros(2, 4, 4)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                loop[n, i, j] = sum(F[n, i, y, x] * F[n, j, y, x] for y in range(3) for x in range(5)) / 15
    assert torch.allclose(S.gram(F), loop, atol=1e-6)
    assert torch.allclose(S.gram(F.flatten(2)), loop, atol=1e-6)
    G = S.gram(F)
    assert torch.allclose(G, G.transpose(1, 2)) and (torch.linalg.eigvalsh(G) > -1e-6).all()  # symmetric, PSD


def test_gram_does_not_depend_on_where_things_are():
    F = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    shuffled = F.flatten(2)[:, :, torch.randperm(36)]
    assert torch.allclose(S.gram(F), S.gram(shuffled), atol=1e-6)
    tiled = F.repeat(1, 1, 2, 3)  # the same statistics over a larger area: same Gram matrix
    assert torch.allclose(S.gram(F), S.gram(tiled), atol=1e-6)


def test_losses_match_the_equations_on_hand_sized_inputs():
    F, P = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]]), torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
    assert torch.allclose(S.content_loss(F, P), torch.tensor([2 / 4]))  # (1 + 0 + 1 + 0) / (C h w)
    G_hat = torch.zeros(1, 2, 2)
    G = torch.tensor([[[5 / 2, 2 / 2], [2 / 2, 1 / 2]]])  # F F^T / M
    assert torch.allclose(S.gram(F), G)
    assert torch.allclose(S.layer_style_loss(F, G_hat), G.pow(2).sum() / (4 * 4))
    feats = {"a": F, "b": P}
    targets = {"a": G_hat, "b": S.gram(P)}
    assert torch.allclose(S.style_loss(feats, targets, {"a": 3.0, "b": 1.0}), 3 * S.layer_style_loss(F, G_hat))
    assert torch.allclose(S.style_loss(feats, targets), 0.5 * S.layer_style_loss(F, G_hat))  # equal weights 1/L
    x = torch.tensor([[[[0.0, 1.0], [1.0, 3.0]]]])  # horizontal 1, 2; vertical 1, 2 -> (1 + 4 + 1 + 4) / 4
    assert torch.allclose(S.tv_loss(x), torch.tensor([10 / 4]))


def test_tv_loss_matches_a_loop_and_is_zero_on_a_constant_image():
    x = _rand(2, 3, 5, 7)
    loop = torch.zeros(2)
    for n in range(2):
        for c in range(3):
            for i in range(5):
                for j in range(7):
                    if j + 1 < 7:
                        loop[n] += (x[n, c, i, j + 1] - x[n, c, i, j]) ** 2
                    if i + 1 < 5:
                        loop[n] += (x[n, c, i + 1, j] - x[n, c, i, j]) ** 2
    assert torch.allclose(S.tv_loss(x), loop / 35, atol=1e-6)
    assert S.tv_loss(torch.full((1, 3, 4, 4), 0.3)).item() == 0


@pytest.mark.parametrize("name", ["gram", "content", "layer_style", "style", "tv"])
def test_gradients_match_finite_differences_in_double_precision(name):
    F = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    P = torch.randn(1, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G_hat = S.gram(torch.randn(1, 3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    F2 = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    G2 = S.gram(torch.randn(2, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    cases = {
        "gram": (S.gram, (F,)),
        "content": (lambda f: S.content_loss(f, P), (F,)),
        "layer_style": (lambda f: S.layer_style_loss(f, G_hat), (F,)),
        "style": (lambda a, b: S.style_loss({"a": a, "b": b}, {"a": G_hat, "b": G2}, [0.3, 2.0]), (F, F2)),
        "tv": (S.tv_loss, (_rand(2, 3, 5, 6, dtype=torch.float64).requires_grad_(True),)),
    }
    fn, inputs = cases[name]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_texture_loss_through_the_feature_network_matches_finite_differences():
    small = S.random_feature_net(seed=0, channels=3, scales=((1, 3), (2, 3))).double()
    x = _rand(1, 3, 6, 6, dtype=torch.float64).requires_grad_(True)
    target = {n: S.gram(A) for n, A in zip(small.names, small(_rand(1, 3, 6, 6, seed=1, dtype=torch.float64)))}

    def loss(img):
        return S.style_loss(dict(zip(small.names, small(img))), target)

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-6)


def test_loss_inputs_are_validated():
    with pytest.raises(ValueError, match=r"\(N, C, h, w\) or \(N, C, M\), got \(3, 4\)"):
        S.gram(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        S.gram([[1.0]])
    with pytest.raises(ValueError, match="content features of shape"):
        S.content_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match="target Gram matrix of shape"):
        S.layer_style_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="at least one style layer"):
        S.style_loss({}, {})
    with pytest.raises(ValueError, match="no features given"):
        S.style_loss({"a": torch.zeros(1, 2, 3, 3)}, {"b": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="2 layer weights"):
        S.style_loss({"a": torch.zeros(1, 2, 3, 3), "b": torch.zeros(1, 2, 3, 3)},
                     {"a": torch.zeros(1, 2, 2), "b": torch.zeros(1, 2, 2)}, [1.0])
    with pytest.raises(ValueError, match="shape \\(N, C, H, W\\)"):
        S.tv_loss(torch.zeros(3, 4, 4))


# ---- the feature networks ----------------------------------------------------------------------------

def test_random_feature_net_is_seeded_frozen_and_multi_scale(net):
    again, other = S.random_feature_net(seed=0), S.random_feature_net(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(net.scale1.conv.weight, other.scale1.conv.weight)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training and net.standin is False
    maps = net(_rand(2, 3, 64, 48))
    assert [tuple(A.shape) for A in maps] == [(2, 64, 64, 48), (2, 64, 32, 24), (2, 64, 16, 12), (2, 64, 8, 6),
                                              (2, 64, 4, 3)]
    assert net.style_layers == ["scale1", "scale2", "scale3", "scale4", "scale5"] and net.content_layer == "scale2"
    with pytest.raises(ValueError, match="odd kernel size"):
        S.random_feature_net(scales=((1, 4),))


def test_feature_net_never_uses_stand_in_vgg_weights(monkeypatch, tmp_path):
    import lecturekit.models as models

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("LECTUREKIT_STANDIN", "1")
    with pytest.warns(UserWarning, match="not in torch's cache"):
        model = S.feature_net("vgg19")
    assert isinstance(model, S.RandomFeatureNet) and model.standin is False
    assert isinstance(S.feature_net("auto"), S.RandomFeatureNet)
    # With the checkpoint in the cache, the real weights are asked for (never stand-ins).
    from torchvision import models as tvm

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / tvm.VGG16_Weights.DEFAULT.url.rsplit("/", 1)[1]).write_bytes(b"")
    calls = []
    monkeypatch.setattr(models, "imagenet_model", lambda name, standin=None, device=None: calls.append((name, standin))
                        or nn.Sequential())
    vgg = S.feature_net("vgg16")
    assert calls == [("vgg16", False)] and vgg.style_layers == S.VGG_LAYERS["vgg16"][0]
    with pytest.raises(ValueError, match="expected a feature network"):
        S.feature_net("alexnet")
    course = S.feature_net("course")
    assert course.style_layers == S.COURSE_LAYERS[0]


def test_a_stand_in_model_is_named_loudly(net, texture):
    model = course_model(pretrained=False)
    model.standin = True
    with pytest.warns(UserWarning, match="STAND-IN"):
        S.texture_synthesis(model, texture, ["features.1"], steps=1, progress=False)


# ---- the optimisations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_texture_synthesis_lowers_its_loss_and_beats_both_baselines(net, texture, optimizer):
    result = S.texture_synthesis(net, texture, steps=40, optimizer=optimizer, seed=3, progress=False)
    L = result.losses["total"]
    assert result.image.shape == texture.shape and 0 <= result.image.min() and result.image.max() <= 1
    assert len(L) == 40 and L[-1] < 0.05 * L[0], L
    assert not result.image.requires_grad
    if optimizer == "adam":
        return  # Adam needs more steps than L-BFGS for the comparison below
    quality = S.texture_distance(result.image, texture)
    assert quality < S.texture_distance(S.noise_like(texture), texture)
    assert quality < S.texture_distance(S.shuffle_pixels(texture), texture)
    assert S.spectrum_distance(result.image, texture) < S.spectrum_distance(S.shuffle_pixels(texture), texture)


def test_texture_synthesis_is_seeded_and_takes_any_output_size(net, texture):
    a = S.texture_synthesis(net, texture, steps=3, seed=1, progress=False).image
    b = S.texture_synthesis(net, texture, steps=3, seed=1, progress=False).image
    c = S.texture_synthesis(net, texture, steps=3, seed=2, progress=False).image
    assert torch.equal(a, b) and not torch.equal(a, c)
    big = S.texture_synthesis(net, texture, size=(40, 72), steps=2, progress=False, layer_weights=[1, 0, 0, 0, 1])
    assert big.image.shape == (1, 3, 40, 72)


def test_style_transfer_lowers_the_style_loss_and_keeps_the_content(net):
    content, style = _rand(1, 3, 40, 40, seed=4), _rand(1, 3, 32, 32, seed=5) ** 3  # a dark, contrasted style
    result = S.style_transfer(net, content, style, style_weight=100.0, tv_weight=0.1, steps=30, progress=False)
    L = result.losses
    assert set(L) == {"total", "content", "style", "tv"} and L["content"][0] == 0  # starts from the content
    assert L["total"][-1] < 0.5 * L["total"][0] and L["style"][-1] < 0.5 * L["style"][0]
    from_noise = S.style_transfer(net, content, style, start="noise", steps=30, progress=False)
    assert from_noise.losses["content"][0] > 0 and from_noise.losses["total"][-1] < from_noise.losses["total"][0]
    assert result.image.shape == content.shape


def test_style_transfer_balances_content_and_style(net):
    content, style = _rand(1, 3, 32, 32, seed=6), _rand(1, 3, 32, 32, seed=7) ** 3
    weak = S.style_transfer(net, content, style, style_weight=1.0, steps=20, progress=False).image
    strong = S.style_transfer(net, content, style, style_weight=1e4, steps=20, progress=False).image
    with torch.no_grad():
        maps = dict(zip(net.names, net(torch.cat([weak, strong, content]))))
        Gs = {n: S.gram(A) for n, A in zip(net.names, net(style))}
    style_of = S.style_loss(maps, Gs)  # (3,)
    content_of = S.content_loss(maps["scale2"][:2], maps["scale2"][2:])  # (2,)
    assert style_of[1] < style_of[0] and content_of[0] < content_of[1]


@pytest.mark.parametrize("call", ["texture", "style", "raises"])
def test_model_left_as_found_also_when_the_call_raises(call, texture):
    model = course_model(pretrained=False, seed=1).train()
    model.features[0].weight.grad = torch.ones_like(model.features[0].weight)
    model.classifier.requires_grad_(False)
    before = model_state(model)
    layers = ["features.1", "features.4"]
    if call == "texture":
        S.texture_synthesis(model, texture, layers, steps=2, progress=False)
    elif call == "style":
        S.style_transfer(model, texture, texture, "features.4", layers, steps=2, progress=False)
    else:
        with pytest.raises(ValueError, match="layer weights"):
            S.texture_synthesis(model, texture, layers, layer_weights=[1.0], steps=2, progress=False)
    after = model_state(model)
    assert before["modes"] == after["modes"] and before["requires_grad"] == after["requires_grad"]
    assert all(a is b for a, b in zip(before["grads"], after["grads"])) and after["hooks"] == 0


def test_bad_inputs_raise_clear_errors(net, texture):
    with pytest.raises(ValueError, match=r"texture of shape \(N, 3, H, W\), got \(3, 48, 48\)"):
        S.texture_synthesis(net, texture[0], steps=1, progress=False)
    with pytest.raises(ValueError, match=r"pixel space \[0, 1\]"):
        S.texture_synthesis(net, texture * 255, steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown layer 'scale9'.*scale"):
        S.texture_synthesis(net, texture, ["scale9"], steps=1, progress=False)
    with pytest.raises(ValueError, match="at least one style layer, got an empty list"):
        S.texture_synthesis(net, texture, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="one style image or one per content image"):
        S.style_transfer(net, texture.repeat(3, 1, 1, 1), texture.repeat(2, 1, 1, 1), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"content of shape"):
        S.style_transfer(net, texture[:, :2], texture, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        S.texture_synthesis(net, texture, steps=0, progress=False)
    with pytest.raises(ValueError, match="optimizer 'lbfgs' or 'adam'"):
        S.texture_synthesis(net, texture, steps=1, optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="style_weight"):
        S.style_transfer(net, texture, texture, style_weight=-1.0, steps=1, progress=False)
    with pytest.raises(ValueError, match="no default style layers"):
        S.texture_synthesis(nn.Sequential(nn.Conv2d(3, 2, 3)), texture, steps=1, progress=False)


# ---- quality statistics ------------------------------------------------------------------------------------

def test_quality_statistics_are_zero_for_the_texture_and_see_what_they_claim(texture):
    shuffled = S.shuffle_pixels(texture, seed=1)
    assert torch.equal(shuffled.flatten(2).sort(2).values, texture.flatten(2).sort(2).values)  # same pixels
    assert S.histogram_distance(shuffled, texture).item() < 1e-6  # same histogram ...
    assert S.spectrum_distance(shuffled, texture) > 0.2  # ... a white spectrum
    assert S.spectrum_distance(texture, texture).item() == 0 and S.texture_distance(texture, texture).item() == 0
    assert S.histogram_distance(S.noise_like(texture), texture) > 0.1
    # A different crop of the same texture is much closer than noise, under an unoptimised network.
    from lecturekit.data import sample_image

    crop = sample_image("brick", size=96)[..., :48, :48]
    assert S.texture_distance(crop, texture) < 0.1 * S.texture_distance(S.noise_like(texture), texture)


# ---- fast style transfer -------------------------------------------------------------------------------

def test_transformer_net_keeps_the_size_and_stays_in_pixel_space():
    net = S.fast_style_model(pretrained=False)
    y = S.stylize(net, _rand(2, 3, 30, 45))
    assert y.shape == (2, 3, 30, 45) and 0 <= y.min() and y.max() <= 1 and not y.requires_grad
    with pytest.raises(ValueError, match=r"pixel space"):
        S.stylize(net, _rand(1, 3, 8, 8) + 1)


def test_bundled_fast_style_network_is_small_loads_safely_and_is_left_as_found():
    assert S.FAST_STYLE_PATH.stat().st_size < 2e6
    state = torch.load(S.FAST_STYLE_PATH, weights_only=True)
    assert state["meta"]["style"] == S.FAST_STYLE_RECIPE["style"]
    net = S.fast_style_model().train()
    before = model_state(net)
    photo = _rand(1, 3, 64, 64)
    y = S.stylize(net, photo)
    after = model_state(net)
    assert before["modes"] == after["modes"] and before["requires_grad"] == after["requires_grad"]
    assert (y - photo).abs().mean() > 0.02  # it does something to the image


def test_train_style_is_deterministic_from_a_seed(tmp_path):
    crops = S.training_crops(3, size=32, seed=5)
    assert crops.shape == (3, 3, 32, 32) and torch.equal(crops, S.training_crops(3, size=32, seed=5))
    small = dict(size=32, batch_size=2, style_size=64)
    a, history = S.train_fast_style(steps=3, seed=7, out=tmp_path / "a.pt", progress=False, **small)
    b, _ = S.train_fast_style(steps=3, seed=7, progress=False, **small)
    c, _ = S.train_fast_style(steps=3, seed=8, progress=False, **small)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert len(history["loss"]) == 3 and history["seconds"] > 0
    loaded = S.fast_style_model(path=tmp_path / "a.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="unknown recipe entries"):
        S.train_fast_style(steps=1, colour="red")


def test_cli_train_style_writes_the_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(S.FAST_STYLE_RECIPE, "size", 32)
    monkeypatch.setitem(S.FAST_STYLE_RECIPE, "batch_size", 1)
    monkeypatch.setitem(S.FAST_STYLE_RECIPE, "style_size", 64)
    out = tmp_path / "w" / "fast.pt"
    assert cli.main(["train-style", "--steps", "2", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    assert torch.load(out, weights_only=True)["meta"]["seed"] == 3


# ---- the explorer widget -----------------------------------------------------------------------------------

def test_style_explorer_calls_the_pure_function_when_a_control_moves(net, monkeypatch):
    from lecturekit import widgets

    content, style = _rand(1, 3, 24, 24, seed=1), _rand(1, 3, 24, 24, seed=2)
    calls = []
    real = widgets.style_view

    def spy(model, c, s, weight, layers, **kwargs):
        calls.append((weight, list(layers)))
        return real(model, c, s, weight, layers, **kwargs)

    monkeypatch.setattr(widgets, "style_view", spy)
    box = widgets.style_explorer(net, content, style, steps=2)
    weight, chosen = box.controls
    assert calls == [(100.0, net.style_layers)] and box.state["image"].shape == (1, 3, 24, 24)
    weight.value = 1000.0
    assert calls[-1] == (1000.0, net.style_layers) and box.state["style_weight"] == 1000.0
    chosen.value = ("scale1", "scale3")
    assert calls[-1] == (1000.0, ["scale1", "scale3"]) and box.state["layers"] == ["scale1", "scale3"]
    chosen.value = ()
    assert len(calls) == 3 and box.state["image"] is None  # nothing to compute without a layer
    with pytest.raises(ValueError, match="at least one style layer"):
        widgets.style_explorer(nn.Conv2d(3, 3, 1), content, style)
