"""lecturekit.features against independent computations: numpy brute force, autograd, known values."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from conftest import model_state
from lecturekit import features
from lecturekit.models import course_model, imagenet_model


@pytest.fixture(scope="module")
def net():
    return course_model(pretrained=False, seed=3)


@pytest.fixture(scope="module")
def images():
    from lecturekit.data import shapes

    return shapes(40, seed=7).images


# ---- filters ----------------------------------------------------------------------------------------


def test_first_layer_filters_are_the_first_conv_weights(net):
    w = features.first_layer_filters(net)
    assert w.shape == (32, 3, 5, 5)
    assert torch.equal(w, net.features[0].weight)
    assert not w.requires_grad
    w += 1  # a copy: changing it leaves the model alone
    assert not torch.equal(w, net.features[0].weight)


def test_first_layer_filters_of_imagenet_models():
    assert features.first_layer_filters(imagenet_model("alexnet", standin=True)).shape == (64, 3, 11, 11)
    assert features.first_layer_filters(imagenet_model("resnet18", standin=True)).shape == (64, 3, 7, 7)


def test_show_filters_scales_each_filter_and_keeps_colours():
    import matplotlib.pyplot as plt

    w = torch.zeros(4, 3, 5, 5)
    w[0, 0] = 1.0  # pure red
    w[1, 2] = 1e-3  # pure blue, tiny: scaled on its own it is as bright as the red one
    w[2] = torch.linspace(-5, 5, 75).view(3, 5, 5)
    fig = features.show_filters(w, nrow=4)
    grid = fig.axes[0].images[0].get_array()  # (H, W, 3)
    red = grid[1 + 2, 1 + 2]  # padding 1, centre of tile 0
    blue = grid[1 + 2, 1 + 6 + 2]
    assert np.allclose(red, [1, 0, 0]) and np.allclose(blue, [0, 0, 1])
    plt.close(fig)
    fig = features.show_filters(torch.randn(8, 16, 3, 3), max_out=4, max_in=5)  # higher layer: grayscale tiles
    assert fig.axes[0].images[0].get_array().shape[:2] == (4 * 4 + 1, 5 * 4 + 1)
    plt.close(fig)
    with pytest.raises(ValueError, match="expected a Conv2d"):
        features.layer_weights(course_model(pretrained=False), "features.1")


# ---- activations ------------------------------------------------------------------------------------


def test_activations_match_a_manual_forward_and_leave_the_model_as_found(net, images):
    before = model_state(net)
    net.train()  # activations run in eval mode and restore the mode
    A = features.activations(net, images, "features.6", batch_size=7)
    net.eval()
    with torch.no_grad():
        f = net.features
        expected = f[6](f[5](f[4](f[3](f[2](f[1](f[0](net.normalize(images))))))))
    assert A.shape == (40, 64, 16, 16)
    assert torch.allclose(A, expected, atol=1e-5)
    assert not A.requires_grad
    assert model_state(net) == before
    pooled = features.activations(net, images, net.pool)  # a module object is accepted
    assert pooled.shape == (40, 128, 1, 1)
    assert torch.allclose(pooled.flatten(1), net.features(net.normalize(images)).mean((2, 3)).detach(), atol=1e-5)


def test_activations_are_batch_size_invariant(net, images):
    a = features.activations(net, images, "features.3", batch_size=3)
    b = features.activations(net, images, "features.3", batch_size=64)
    assert torch.allclose(a, b, atol=1e-5)


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_activations_hooks_removed_when_forward_raises():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), _Boom(), nn.ReLU())
    before = model_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        features.activations(net, torch.rand(2, 3, 8, 8), "2")
    assert model_state(net) == before and before["hooks"] == 0
    assert features.activations(net, torch.rand(2, 3, 8, 8), "0").shape == (2, 2, 6, 6), "stops before the error"


def test_bad_inputs_give_clear_errors(net, images):
    with pytest.raises(ValueError, match="unknown layer 'features.99'"):
        features.activations(net, images, "features.99")
    with pytest.raises(ValueError, match=r"pixel space \[0, 1\]"):
        features.activations(net, images * 3, "features.0")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        features.activations(net, images[0], "features.0")
    with pytest.raises(ValueError, match="unknown layer"):
        features.top_patches(net, images, "feature.3", 0, k=2)
    with pytest.raises(ValueError, match=r"channel index in \[0, 32\) for layer 'features.3' \(32 channels\), got 32"):
        features.top_patches(net, images, "features.3", 32, k=2)
    with pytest.raises(ValueError, match=r"k at most the number of images \(40\)"):
        features.top_patches(net, images, "features.3", 0, k=41)
    with pytest.raises(ValueError, match=r"k at most the number of images \(10\)"):
        features.top_patches(net, (images[i:i + 5] for i in (0, 5)), "features.3", 0, k=11)
    with pytest.raises(ValueError, match="whole image"):
        features.top_patches(net, images, "pool", 0, k=2)
    with pytest.raises(ValueError, match="k between 1 and 39"):
        features.nearest_neighbours(images, images, k=40, exclude_self=True)
    with pytest.raises(ValueError, match="unknown embedding method"):
        features.embed(torch.rand(10, 4), method="umap")


# ---- nearest neighbours, agreement, embeddings ------------------------------------------------------


def test_nearest_neighbours_match_numpy_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(13, 6, generator=g), torch.randn(50, 6, generator=g)
    idx, dist = features.nearest_neighbours(q, bank, k=4, chunk=5)
    Q, B = q.double().numpy(), bank.double().numpy()
    D = np.sqrt(((Q[:, None, :] - B[None, :, :]) ** 2).sum(-1))  # (13, 50) every pair, by hand
    expected = np.argsort(D, axis=1, kind="stable")[:, :4]
    assert idx.shape == dist.shape == (13, 4)
    assert np.array_equal(idx.numpy(), expected)
    assert np.allclose(dist.numpy(), np.take_along_axis(D, expected, 1), atol=1e-4)


def test_nearest_neighbours_exclude_self_and_pixel_space(images):
    idx, dist = features.nearest_neighbours(images, images, k=3, exclude_self=True)
    assert not (idx == torch.arange(40)[:, None]).any()
    with_self, d0 = features.nearest_neighbours(images, images, k=1)
    assert torch.equal(with_self[:, 0], torch.arange(40)) and torch.allclose(d0, torch.zeros(40, 1), atol=1e-2)
    flat = images.flatten(1).double().numpy()
    assert np.isclose(dist[0, 0].item(), np.sort(np.linalg.norm(flat[1:] - flat[0], axis=1))[0], rtol=1e-4)


def test_neighbour_agreement_by_hand():
    # two tight clusters far apart, labels by cluster: every neighbour agrees
    pts = torch.cat([torch.zeros(6, 2) + torch.rand(6, 2) * 0.1, torch.ones(6, 2) * 10 + torch.rand(6, 2) * 0.1])
    labels = torch.tensor([0] * 6 + [1] * 6)
    assert features.neighbour_agreement(pts, labels, k=5) == 1.0
    # points on a line, labels alternate 0 1 0 1: with k=2 the two neighbours have the other label
    line = torch.arange(10.0)[:, None]
    alternating = torch.arange(10) % 2
    inner = features.neighbour_agreement(line, alternating, k=2)
    # ends: neighbours at distance 1 and 2 (one disagrees, one agrees); inside: both disagree
    assert inner == pytest.approx((2 * 0.5 + 8 * 0.0) / 10)


def test_embed_pca_matches_an_svd_and_tsne_keeps_clusters():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 5, generator=g) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1])
    Y = features.embed(X, method="pca")
    Xc = X.double().numpy() - X.double().numpy().mean(0)
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    ref = Xc @ Vt[:2].T  # principal components, up to sign
    assert Y.shape == (60, 2)
    assert np.allclose(np.abs(Y.numpy()), np.abs(ref), atol=1e-4)
    centres = torch.randn(3, 20, generator=g) * 20
    labels = torch.arange(3).repeat_interleave(20)
    pts = centres[labels] + torch.randn(60, 20, generator=g)
    Z = features.embed(pts, method="tsne", seed=0)
    assert Z.shape == (60, 2)
    assert torch.equal(Z, features.embed(pts, method="tsne", seed=0)), "deterministic for a seed"
    assert features.neighbour_agreement(Z, labels, k=5) == 1.0, "t-SNE keeps the three clusters apart"


@pytest.mark.parametrize("keyword", ["max_iter", "n_iter"])
def test_embed_tsne_passes_the_iterations_under_either_scikit_learn_name(monkeypatch, keyword):
    """scikit-learn 1.2-1.4 call t-SNE's iteration count n_iter, 1.5+ max_iter; pyproject allows both."""
    import sklearn.manifold

    seen = {}

    def fake_tsne(n_components=2, perplexity=30.0, init="pca", random_state=None, **kw):
        assert set(kw) == {keyword}, kw  # only the name this version knows
        seen.update(kw)

        class Fitted:
            def fit_transform(self, X):
                return np.zeros((len(X), n_components))
        return Fitted()

    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in
              ["n_components", "perplexity", "init", "random_state", keyword]]
    fake_tsne.__signature__ = inspect.Signature(params)
    monkeypatch.setattr(sklearn.manifold, "TSNE", fake_tsne)
    assert features.embed(torch.randn(10, 3), method="tsne", steps=400).shape == (10, 2)
    assert seen == {keyword: 400}


def test_snap_to_grid_assigns_distinct_cells_and_keeps_order():
    xy = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    cells = features.snap_to_grid(xy, 3, 3)
    assert len({tuple(c) for c in cells.tolist()}) == 5
    # (x, y) with y up -> (row, col) with row 0 at the top
    assert cells[:4].tolist() == [[2, 0], [2, 2], [0, 0], [0, 2]] and cells[4].tolist() == [1, 1]
    with pytest.raises(ValueError, match="at most rows \\* cols = 4"):
        features.snap_to_grid(xy, 2, 2)


# ---- receptive fields -------------------------------------------------------------------------------


def _positive(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 0.1)  # every path carries a positive gradient: no cancellation
    return net


def _gradient_box(net: nn.Module, size: int, channel: int, y: int, x: int):
    """Brute force: the bounding box (x0, y0, x1, y1) of the input pixels where d unit / d input != 0."""
    inp = torch.ones(1, 3, size, size, requires_grad=True)
    net(inp)[0, channel, y, x].backward()
    rows, cols = inp.grad[0].abs().sum(0).nonzero(as_tuple=True)
    return cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1


CHAIN = lambda: nn.Sequential(  # noqa: E731 -- convs and poolings with stride, padding, dilation
    nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1),
    nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 2, 5, padding=1))


@pytest.mark.parametrize("layer, units", [("0", [(0, 0), (5, 7), (15, 15)]), ("2", [(0, 0), (3, 4), (7, 7)]),
                                          ("3", [(0, 0), (4, 4), (7, 2)]), ("6", [(0, 0), (1, 1), (0, 1)])])
def test_receptive_field_matches_the_gradient_of_a_chain(layer, units):
    torch.manual_seed(0)
    net = _positive(CHAIN())
    head = net[: int(layer) + 1]
    rf = features.receptive_field(net, layer)
    for y, x in units:
        assert _gradient_box(head, 32, 1, y, x) == rf.box(y, x, 32, 32), (layer, y, x, rf)
    c = head(torch.ones(1, 3, 96, 96)).shape[-1] // 2  # a unit far from the border of a larger image
    box = _gradient_box(head, 96, 1, c, c)
    assert box == rf.box(c, c) and box[2] - box[0] == rf.size, "the whole field, unclipped"


class _Branches(nn.Module):
    """A Fire-like concatenation of a 1x1 and a 5x5 branch, then a ResNet-like residual with a 1x1/2 shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 5, padding=2)
        self.main = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        self.shortcut = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        x = torch.cat([self.a(self.stem(x)), self.b(self.stem(x))], 1)
        return self.main(x) + self.shortcut(x)


def test_receptive_field_of_branches_is_the_union_and_matches_the_gradient():
    torch.manual_seed(0)
    net = _positive(_Branches())
    rf = features.receptive_field(net, "main")  # container: its last module (before the addition)
    assert (rf.size, rf.jump) == (3 + 4 + 2 + 4, 2)
    for y, x in [(0, 0), (6, 5), (15, 15)]:
        whole = features.ReceptiveField(*_union_rf(net))
        assert _gradient_box(net, 32, 0, y, x) == whole.box(y, x, 32, 32)


def _union_rf(net):
    # the whole net's output: trace it through a wrapper whose last module runs after the addition
    wrapped = nn.Sequential()
    wrapped.add_module("net", net)
    wrapped.add_module("out", nn.Identity())
    rf = features.receptive_field(wrapped, "out")
    return rf.size, rf.jump, rf.start


def test_receptive_field_known_values():
    # CourseNet by hand: 5 -> 6 -> 10 -> 12 -> 20 -> 24 -> 40, jump 8
    assert features.receptive_field(course_model(pretrained=False), "features.9") == features.ReceptiveField(40, 8, -16)
    alexnet = imagenet_model("alexnet", standin=True)
    assert features.receptive_field(alexnet, "features.0") == features.ReceptiveField(11, 4, -2)
    pool5 = features.receptive_field(alexnet, "features.12")
    assert (pool5.size, pool5.jump) == (195, 32)  # Araujo et al. 2019 (Distill), Table 1
    resnet = imagenet_model("resnet18", standin=True)
    layer4 = features.receptive_field(resnet, "layer4")
    assert (layer4.size, layer4.jump) == (435, 32)
    # layer1.0.relu runs twice (after bn1 and after the addition): its first call, like activations()
    assert features.receptive_field(resnet, "layer1.0.relu") == features.receptive_field(resnet, "layer1.0.bn1")
    x = torch.rand(1, 3, 64, 64)
    first = features.activations(resnet, x, "layer1.0.relu")
    assert torch.allclose(first, features.activations(resnet, x, "layer1.0.bn1").clamp(min=0))


# ---- top patches ------------------------------------------------------------------------------------


def test_top_patches_match_an_exhaustive_search(net, images):
    before = model_state(net)
    p = features.top_patches(net, images, "features.6", channel=5, k=6, batch_size=9)
    assert model_state(net) == before
    with torch.no_grad():
        A = features.activations(net, images, "features.6")[:, 5]  # (40, 16, 16)
    per_image = A.flatten(1).max(1).values
    order = torch.argsort(per_image, descending=True, stable=True)[:6]
    assert torch.equal(p.index, order)
    assert torch.allclose(p.values, per_image[order])
    for i, (y, x) in zip(p.index.tolist(), p.positions.tolist()):
        assert A[i, y, x] == A[i].max()
    rf = features.receptive_field(net, "features.6")
    assert p.crops.shape == (6, 3, rf.size, rf.size) and p.rf == rf
    for crop, i, (y, x), box in zip(p.crops, p.index.tolist(), p.positions.tolist(), p.boxes.tolist()):
        x0, y0, x1, y1 = box
        assert (x0, y0, x1, y1) == rf.box(y, x, 64, 64)
        ux0, uy0, _, _ = rf.box(y, x)  # unclipped: where the crop's (0, 0) lies in the image
        inside = crop[:, y0 - uy0: y1 - uy0, x0 - ux0: x1 - ux0]
        assert torch.equal(inside, images[i][:, y0:y1, x0:x1])
        assert (crop.sum() - inside.sum()).item() == pytest.approx(0.5 * (crop[0].numel() - inside[0].numel()) * 3, abs=1e-3)


def test_top_patches_stream_batches_and_do_not_depend_on_batch_size(net, images):
    a = features.top_patches(net, images, "features.3", 2, k=5, batch_size=4)
    b = features.top_patches(net, images, "features.3", 2, k=5, batch_size=40)
    c = features.top_patches(net, (images[i: i + 8] for i in range(0, 40, 8)), "features.3", 2, k=5)
    for other in (b, c):
        assert torch.equal(a.index, other.index) and torch.equal(a.crops, other.crops)
        assert torch.allclose(a.values, other.values)


def test_feature_view_is_maps_and_patches(net, images):
    view = features.feature_view(net, images, "features.3", channel=4, index=2, k=3)
    assert view.maps.shape == (32, 32, 32)
    assert torch.allclose(view.maps, features.activations(net, images[2:3], "features.3")[0])
    assert len(view.patches) == 3 and view.layer == "features.3" and view.channel == 4
    with pytest.raises(ValueError, match=r"channel index in \[0, 32\) for layer 'features.3'.*got 99"):
        features.feature_view(net, images, "features.3", channel=99)


def test_top_patches_of_several_channels_in_one_pass(net, images):
    many = features.top_patches(net, images, "features.6", [5, 0, 63], k=4, batch_size=16)
    assert isinstance(many, list) and len(many) == 3
    for c, p in zip([5, 0, 63], many):
        one = features.top_patches(net, images, "features.6", c, k=4)
        assert torch.equal(p.index, one.index) and torch.equal(p.crops, one.crops)
    with pytest.raises(ValueError, match=r"channel index in \[0, 64\) for layer 'features.6'.*got \[1, 64\]"):
        features.top_patches(net, images, "features.6", [1, 64], k=2)
    with pytest.raises(TypeError, match="expected an int channel"):
        features.top_patches(net, images, "features.6", 1.0, k=2)


def test_receptive_field_has_its_own_module_and_features_re_exports_it():
    from lecturekit import receptive_field as rf_module

    assert features.receptive_field is rf_module.receptive_field
    assert features.ReceptiveField is rf_module.ReceptiveField


# ---- empirical receptive field (Zhou et al. 2015) ---------------------------------------------------


def _small_chain(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2, padding=1)).eval()


def test_empirical_receptive_field_matches_a_brute_force_occlusion_loop():
    """Every occluder position run (none skipped), discrepancy spread and averaged by hand, then shifted."""
    net = _small_chain()
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    patch, stride, channel = 3, 2, 1
    before = model_state(net)
    e = features.empirical_receptive_field(net, x, "2", channel, k=2, patch=patch, stride=stride, fill=0.5)
    assert model_state(net) == before
    rf = features.receptive_field(net, "2")
    assert (rf.size, rf.jump, rf.start) == (5, 2, -2)
    with torch.no_grad():
        A = net(x)[:, channel]  # (5, 6, 6)
    best = A.flatten(1).max(1).values
    assert torch.equal(e.index, torch.argsort(best, descending=True, stable=True)[:2])
    ref = torch.zeros(2, 23, 23, dtype=torch.float64)
    for j, i in enumerate(e.index.tolist()):
        uy, ux = divmod(int(A[i].flatten().argmax()), 6)
        assert e.positions[j].tolist() == [uy, ux]
        total, count = torch.zeros(12, 12, dtype=torch.float64), torch.zeros(12, 12, dtype=torch.float64)
        for oy in range(0, 10, stride):
            for ox in range(0, 10, stride):
                occluded = x[i].clone()
                occluded[:, oy: oy + patch, ox: ox + patch] = 0.5
                with torch.no_grad():
                    d = abs(net(occluded[None])[0, channel, uy, ux] - A[i, uy, ux]).item()
                total[oy: oy + patch, ox: ox + patch] += d
                count[oy: oy + patch, ox: ox + patch] += 1
        cy, cx = -2 + 2 * uy + 2, -2 + 2 * ux + 2  # the field's centre (size 5: an integer)
        cy, cx = min(max(cy, 0), 11), min(max(cx, 0), 11)
        ref[j, 11 - cy: 23 - cy, 11 - cx: 23 - cx] = total / count.clamp(min=1)
    assert torch.allclose(e.maps.double(), ref, atol=1e-5)
    assert torch.allclose(e.map.double(), ref.mean(0), atol=1e-5)


def test_empirical_receptive_field_of_a_one_pixel_unit_is_the_occluder():
    """A 1x1 convolution sees one pixel: every occluder covering it spreads its discrepancy over its own
    3x3 square, so the map is the 5x5 square (2 patch - 1) around the centre."""
    net = nn.Sequential(nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    x = 0.1 * torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    x[:, :, 4, 4] = 0.9  # each image's strongest unit is (4, 4), away from the border
    e = features.empirical_receptive_field(net, x, "0", 0, k=3, patch=3, stride=1, mass=1.0)
    assert e.rf.size == 1 and e.size == 5
    support = (e.maps > 0).any(0).nonzero()
    assert support.min(0).values.tolist() == [6, 6] and support.max(0).values.tolist() == [10, 10]
    assert torch.allclose(e.map.sum(), e.maps.sum((1, 2)).mean())
    a = features.empirical_receptive_field(net, x, "0", 0, k=3, seed=1)  # random occluders: seeded
    assert torch.equal(a.map, features.empirical_receptive_field(net, x, "0", 0, k=3, seed=1).map)


def test_empirical_receptive_field_stays_inside_the_theoretical_one(net, images):
    e = features.empirical_receptive_field(net, images[:10], "features.6", 3, k=3, stride=2)
    r, H = e.rf.size, 64
    support = (e.map > 0).nonzero()
    c = H - 1  # the field's centre on the canvas (r even: between c and c + 1)
    lo, hi = c - (r - 1) // 2 - 4, c + r // 2 + 4  # the field widened twice by patch - 1 (patch 3)
    assert support.min() >= lo and support.max() <= hi
    assert 0 < e.size <= r + 4
    with pytest.raises(ValueError, match="expected patch at most the image size"):
        features.empirical_receptive_field(net, images[:4], "features.6", 3, k=2, patch=99)
    with pytest.raises(ValueError, match="expected fill"):
        features.empirical_receptive_field(net, images[:4], "features.6", 3, k=2, fill=2.0)
    with pytest.raises(ValueError, match="expected mass"):
        features.empirical_receptive_field(net, images[:4], "features.6", 3, k=2, mass=0)


# ---- facets (Nguyen et al. 2016) --------------------------------------------------------------------


def test_facets_find_planted_clusters_and_their_mean_images():
    """Three groups of images, each a different flat colour plus noise: the feature layer (the images
    themselves, pooled) separates them; means are the groups' mean images; clusters largest first."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    group = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    x = (colours[group][:, :, None, None] + 0.05 * torch.randn(15, 3, 8, 8, generator=g)).clamp(0, 1)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1))
    f = features.facets(net, x, "0", k=3, seed=0)
    assert f.labels.tolist() == group.tolist(), "the planted groups, numbered largest first"
    assert f.sizes.tolist() == [7, 5, 3]
    for c in range(3):
        assert torch.allclose(f.means[c], x[group == c].mean(0), atol=1e-6)
        assert torch.allclose(f.centres[c], x[group == c].mean((0, 2, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="expected k at most the number of images"):
        features.facets(net, x, "0", k=16)


def test_class_visualization_starts_from_given_images(net):
    from lecturekit import synthesis as S

    start = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = S.class_visualization(net, [1, 2], steps=2, lr=0.03, start=start, progress=False)
    x = start.clone()
    for _ in range(2):
        x = S.ascent_step(net, x, torch.tensor([1, 2]), lr=0.03)
    assert torch.allclose(out, x, atol=1e-6) and out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="expected one start image per target"):
        S.class_visualization(net, [1, 2, 3], steps=1, start=start, progress=False)
