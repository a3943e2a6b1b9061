"""Exact incremental occlusion (lecturekit.incremental): the same numbers as running every occluded copy.

The reference is the plain computation: the model run on each occluded copy. Layer by layer on a
network that has every supported kind of layer (in float64, so that a wrong window, offset or padding
cannot hide in round-off), and on the course model, SqueezeNet 1.1 and ResNet-18 (stand-in weights:
exactness does not depend on them), for several patch sizes, strides, border patches and batch sizes.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import model_state
from lecturekit import attribution as A
from lecturekit import incremental as inc
from lecturekit.models import Normalize, course_model, imagenet_model
from lecturekit.receptive_field import receptive_field


class Zoo(nn.Module):
    """Every layer kind incremental inference runs on a region, in awkward settings."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.pool1 = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.down = nn.Conv2d(16, 12, 1, stride=2)  # 1x1 stride 2: some patches change no output at all
        self.res = nn.Conv2d(12, 12, (3, 1), padding=(1, 0))
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)  # zero padding counted (count_include_pad)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = self.pool1(self.act(self.bn1(self.conv1(self.normalize(x)))))
        h = torch.cat([torch.relu(self.left(h)), self.right(h)], 1)  # a Fire module's concatenation
        h = self.down(h)
        h = h + F.relu(self.res(h))  # a residual block
        h = self.drop(self.avg(h)) * 0.5
        return self.head(h.mean((2, 3)))


def zoo(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = Zoo()
    with torch.no_grad():  # batch norm with statistics that are not the identity
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
    return net.double().eval()


def occluded_copies(x, corners, patch, baseline=0.0):
    (ph, pw), copies = patch, x.repeat(len(corners), 1, 1, 1)
    for b, (y0, x0) in enumerate(corners):
        copies[b, :, y0:y0 + ph, x0:x0 + pw] = baseline
    return copies


def corners_with_borders(H, W, ph, pw):
    """The four corners, the edges' middles, the centre and a few odd alignments."""
    ys, xs = [0, 1, (H - ph) // 2, H - ph - 1, H - ph], [0, 3, (W - pw) // 2, W - pw - 2, W - pw]
    return [(y, x) for y in ys for x in xs]


@pytest.mark.parametrize("fraction", [0.6, 1.0, "never"])  # never: windows until the global pooling,
@pytest.mark.parametrize("patch", [(5, 7), (1, 1), (12, 9)])  # also windows that cover the whole map
def test_every_layer_matches_the_plain_forward_pass(patch, fraction, monkeypatch):
    if fraction == "never":
        monkeypatch.setattr(inc, "_too_big", lambda L, size: False)
    else:
        monkeypatch.setattr(inc, "FULL_FRACTION", fraction)
    net = zoo()
    x = torch.rand(1, 3, 40, 36, dtype=torch.float64)
    corners = corners_with_borders(40, 36, *patch)
    engine = inc.IncrementalModel(net)
    copies = occluded_copies(x, corners, patch)
    with torch.no_grad():
        reference = []
        for copy in copies:  # the clean pass of each copy: every layer's value, the plain way
            engine.prepare(copy[None])
            reference.append({n.name: v for n, v in engine.clean.items()})
        engine.prepare(x)
        step, checked = engine._step, []

        def checking_step(node, env):
            state = step(node, env)
            full = engine._full(node, state).X if isinstance(state, inc._Local) else state.X
            want = torch.cat([r[node.name] for r in reference])
            assert full.shape == want.shape and torch.allclose(full, want, rtol=0, atol=1e-12), node.name
            checked.append(isinstance(state, inc._Local))
            return state

        engine._step = checking_step
        scores = engine.scores(corners, patch, torch.zeros_like(x))
        assert torch.allclose(scores, net(copies), rtol=0, atol=1e-12)
    assert len(checked) >= 15 and sum(checked) >= 5  # windows were used, not only full maps


def test_a_patch_covering_the_whole_image_and_a_grey_image_baseline():
    net = zoo()
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    baseline = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    for patch, stride in ((24, 1), (7, 5)):
        plain = A.occlusion(net, x, 1, patch=patch, stride=stride, baseline=baseline, progress=False, incremental=False)
        fast = A.occlusion(net, x, 1, patch=patch, stride=stride, baseline=baseline, progress=False, incremental=True)
        assert torch.allclose(fast, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("patch,stride,batch_size", [(8, 4, 64), (12, 7, 5), (16, 16, 3)])
def test_course_model_maps_identical_to_the_plain_method(course, shapes_batch, patch, stride, batch_size):
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    plain = A.occlusion(course, x, y, patch=patch, stride=stride, batch_size=batch_size, progress=False,
                        incremental=False)
    fast = A.occlusion(course, x, y, patch=patch, stride=stride, batch_size=batch_size, progress=False,
                       incremental=True)
    assert fast.shape == plain.shape == (2, 64, 64)
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max().clamp(min=1)  # float32 round-off


@pytest.fixture(scope="module", params=["squeezenet1_1", "resnet18"])
def imagenet_net(request):
    return imagenet_model(request.param, standin=True)


@pytest.mark.parametrize("patch", [(16, 16), (8, 24)])
def test_imagenet_models_scores_identical_at_border_and_inner_patches(imagenet_net, patch):
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    corners = corners_with_borders(112, 112, *patch)
    with torch.no_grad():
        plain = imagenet_net(occluded_copies(x, corners, patch))  # (B, 1000)
        engine = inc.IncrementalModel(imagenet_net)
        engine.prepare(x)
        fast = engine.scores(corners, patch, torch.zeros_like(x))
    assert (fast - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert engine.macs < 0.8 * engine.full_macs * len(corners)  # and it did less work


def test_imagenet_models_occlusion_maps_identical(imagenet_net):
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    kwargs = dict(patch=24, stride=20, batch_size=5, progress=False)
    plain = A.occlusion(imagenet_net, x, 3, incremental=False, **kwargs)
    fast = A.occlusion(imagenet_net, x, 3, incremental=True, **kwargs)
    with torch.no_grad():
        scale = imagenet_net(x).abs().max()  # drops are differences of scores: round-off relative to these
    assert (fast - plain).abs().max() <= 1e-5 * scale


# ---- what it cannot run: a clear fallback, never a wrong answer ------------------------------------

class WithUnknownLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LocalResponseNorm(3)  # not a layer incremental inference knows
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x))).mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        h = self.conv(x)
        return (h if h.sum() > 0 else -h).mean((2, 3))  # control flow on the data: torch.fx cannot trace it


@pytest.mark.parametrize("net,reason", [(WithUnknownLayer(), "'norm' (LocalResponseNorm)"),
                                        (DataDependent(), "torch.fx cannot trace")])
def test_unknown_layers_fall_back_to_the_plain_method_or_raise(net, reason):
    x = torch.rand(2, 3, 20, 20)
    net.train()
    net.conv.weight.requires_grad_(False)
    before = model_state(net)
    with pytest.raises(ValueError, match="incremental occlusion cannot run this model") as err:
        A.occlusion(net, x, 1, patch=6, stride=5, progress=False, incremental=True)
    assert reason in str(err.value)
    assert model_state(net) == before  # also when it raises
    with pytest.warns(UserWarning, match="plain method, not incremental") as record:
        auto = A.occlusion(net, x, 1, patch=6, stride=5, progress=False)
    assert reason in str(record[0].message) and len(str(record[0].message).splitlines()) == 1
    plain = A.occlusion(net, x, 1, patch=6, stride=5, progress=False, incremental=False)
    assert torch.equal(auto, plain)
    assert model_state(net) == before


def test_a_model_with_nothing_to_recompute_falls_back_silently():
    from conftest import linear_model

    net = linear_model(H=7, W=7)  # flatten first: every output sees every pixel
    x = torch.rand(1, 3, 7, 7, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.occlusion(net, x, 1, patch=3, stride=2, progress=False)
    with pytest.raises(ValueError, match="nothing to gain"):
        A.occlusion(net, x, 1, patch=3, stride=2, progress=False, incremental=True)
    with pytest.raises(TypeError, match="incremental"):
        A.occlusion(net, x, 1, patch=3, progress=False, incremental="yes")


def test_model_left_as_found(shapes_batch):
    model = course_model(pretrained=False, seed=1)
    model.train()
    model.features[0].weight.requires_grad_(False)
    before = model_state(model)
    out = A.occlusion(model, shapes_batch.images[:1], 0, patch=16, stride=16, progress=False, incremental=True)
    assert model_state(model) == before and not out.requires_grad


def test_memory_stays_bounded_as_positions_grow_tenfold(course, shapes_batch, monkeypatch):
    """The engine gets at most batch_size positions at a time, and its windows do not grow with P."""
    seen, largest = [], []
    scores = inc.IncrementalModel.scores

    def spy(self, corners, patch, baseline, record=False):
        seen.append(len(corners))
        out = scores(self, corners, patch, baseline, record)
        largest.append(self.macs)
        return out

    monkeypatch.setattr(inc.IncrementalModel, "scores", spy)
    x, y = shapes_batch.images[:1], shapes_batch.labels[:1]
    per_batch = {}
    for stride in (16, 4):  # 16 and 169 positions
        seen.clear(), largest.clear()
        A.occlusion(course, x, y, patch=16, stride=stride, batch_size=16, progress=False, incremental=True)
        assert max(seen) <= 16 and sum(seen) == len(A.occlusion_positions((64, 64), 16, stride))
        per_batch[stride] = max(b - a for a, b in zip([0] + largest, largest))  # multiply-adds of one batch
    # ten times the positions, not ten times the work per batch (windows differ by alignment: < 2x)
    assert per_batch[4] <= 2 * per_batch[16]


# ---- the cone of influence ------------------------------------------------------------------------

def test_cone_of_influence_is_the_receptive_field_arithmetic(course, shapes_batch):
    x = shapes_batch.images[:1]
    patch, (py, px) = 10, (21, 37)
    cone = inc.cone_of_influence(course, x, patch, (py, px))
    assert cone[0].box == (px, py, px + patch, py + patch) and cone[0].size == (64, 64)
    layers = [r.layer for r in cone[1:]]
    assert layers == ["features.0", "features.2", "features.3", "features.5", "features.6", "features.8",
                      "features.9"]
    for region in cone[1:]:
        # Independent: the units whose receptive field (Araujo et al. 2019) overlaps the patch.
        rf = receptive_field(course, region.layer)
        h, w = region.size
        ys = [u for u in range(h) if rf.start + u * rf.jump < py + patch and rf.start + u * rf.jump + rf.size > py]
        xs = [u for u in range(w) if rf.start + u * rf.jump < px + patch and rf.start + u * rf.jump + rf.size > px]
        whole = region.box == (0, 0, w, h)
        assert whole or region.box == (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1), region
    shares = [(r.box[2] - r.box[0]) * (r.box[3] - r.box[1]) / (r.size[0] * r.size[1]) for r in cone]
    assert shares[-1] > 10 * shares[0]  # the cone widens: a tenth of a percent of the pixels, most of the last map


def test_the_default_keeps_the_plain_method_where_nothing_is_gained(course, shapes_batch, monkeypatch):
    """A 16 px image and a 12 px patch: every cone covers the whole map; the probe sees it, the plain method runs."""
    calls = []
    scores = inc.IncrementalModel.scores
    monkeypatch.setattr(inc.IncrementalModel, "scores", lambda self, *a, **k: calls.append(1) or scores(self, *a, **k))
    x = shapes_batch.images[:1, :, 24:40, 24:40]
    auto = A.occlusion(course, x, 0, patch=12, stride=2, progress=False)
    assert len(calls) == 1  # the probe only
    assert torch.equal(auto, A.occlusion(course, x, 0, patch=12, stride=2, progress=False, incremental=False))
    calls.clear()
    A.occlusion(course, shapes_batch.images[:1], 0, patch=8, stride=8, progress=False)
    assert len(calls) > 1  # on the 64 px image it gains, and runs incrementally
