"""lecturekit.attribution against independent computations: hand-sized networks, finite differences,
known identities (CAM and Grad-CAM), Shapley axioms, batching invariance, and the contracts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import linear_model, model_state, tiny_net
from lecturekit import attribution as A
from lecturekit.models import course_model


@pytest.fixture(scope="module")
def random_course():
    return course_model(pretrained=False, seed=3)


# ---- saliency ---------------------------------------------------------------------------------------

def test_saliency_of_a_linear_model_is_abs_weight_max_over_channels():
    net = linear_model()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    m = A.saliency(net, x, torch.tensor([0, 2]))
    w = net[1].weight.detach().view(3, 3, 6, 6)  # (K, 3, H, W)
    expected = torch.stack([w[0].abs().amax(0), w[2].abs().amax(0)])
    assert m.shape == (2, 6, 6)
    assert torch.allclose(m, expected)


def test_saliency_matches_finite_differences_on_a_conv_net():
    net = tiny_net(inplace=True).double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    m = A.saliency(net, x, 1)
    eps = 1e-6
    for (i, j) in [(0, 0), (3, 5), (7, 2)]:
        fd = []
        for c in range(3):
            xp, xm = x.clone(), x.clone()
            xp[0, c, i, j] += eps
            xm[0, c, i, j] -= eps
            with torch.no_grad():
                fd.append(((net(xp)[0, 1] - net(xm)[0, 1]) / (2 * eps)).abs().item())
        assert m[0, i, j].item() == pytest.approx(max(fd), rel=1e-4, abs=1e-9)


def test_saliency_uses_the_raw_score_not_the_softmax(random_course, shapes_batch):
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    xg = x.clone().requires_grad_(True)
    random_course(xg).gather(1, y[:, None]).sum().backward()
    assert torch.allclose(A.saliency(random_course, x, y), xg.grad.abs().amax(1), atol=1e-6)
    random_course.zero_grad(set_to_none=True)


# ---- guided backprop and deconvnet: the three ReLU rules ------------------------------------------------

def two_layer(seed=0):
    """x (12 pixels) -> Linear -> ReLU -> Linear, with every (f > 0, R > 0) sign combination present."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[1].weight.mul_(0.3)  # |W1 x| < 2, so the bias fixes the sign of f
        net[1].bias.copy_(torch.tensor([2.0, 2.0, -2.0, -2.0, 2.0]))
        net[3].weight[2] = torch.tensor([0.5, -0.7, 0.3, -0.2, 0.9])  # sign of R for score 2
    return net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relu_rules_by_hand_on_a_two_layer_net(seed):
    net = two_layer(seed)
    x = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    W1, b1, W2 = net[1].weight.detach(), net[1].bias.detach(), net[3].weight.detach()
    f = W1 @ x.flatten() + b1  # (5,) the ReLU's input
    R = W2[2]  # gradient of score 2 arriving at the ReLU's output
    by_hand = {
        "backprop": W1.T @ ((f > 0) * R),
        "guided": W1.T @ ((f > 0) * (R > 0) * R),
        "deconvnet": W1.T @ ((R > 0) * R),
    }
    assert not torch.allclose(by_hand["guided"], by_hand["backprop"])
    assert not torch.allclose(by_hand["guided"], by_hand["deconvnet"])
    got = {
        "backprop": A.gradient(net, x, 2),
        "guided": A.guided_backprop(net, x, 2),
        "deconvnet": A.deconvnet(net, x, 2),
    }
    for rule in by_hand:
        assert got[rule].shape == (1, 3, 2, 2)
        assert torch.allclose(got[rule].flatten(), by_hand[rule]), rule


def test_guided_backprop_of_a_first_layer_neuron_is_its_gradient():
    """Only one ReLU lies between the input and a neuron of the first ReLU: guided = plain gradient."""
    net = tiny_net(inplace=True).double()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    conv = net[0](x)[0, 2]  # (8, 8)
    y, x_ = divmod(int(conv.argmax()), 8)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net[0](xg)[0, 2, y, x_], xg)
    got = A.guided_backprop(net, x, layer="1", channel=2)  # default position: the channel's max
    assert torch.allclose(got, grad)
    assert torch.allclose(A.guided_backprop(net, x, layer="1", channel=2, position=(y, x_)), grad)
    # the receptive field of a 3x3 conv neuron: nothing outside it
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[max(0, y - 1): y + 2, max(0, x_ - 1): x_ + 2] = False
    assert got[0][:, outside].abs().max() == 0


def test_guided_backprop_and_deconvnet_on_course_net(random_course, shapes_batch):
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    g, d = A.guided_backprop(random_course, x, y), A.deconvnet(random_course, x, y)
    plain = A.gradient(random_course, x, y)
    assert g.shape == d.shape == (2, 3, 64, 64)
    assert not torch.allclose(g, plain) and not torch.allclose(d, plain) and not torch.allclose(g, d)
    # The forward pass is unchanged by the rules, and the model's ReLUs are back to normal after.
    with torch.no_grad():
        before = random_course(x)
    A.guided_backprop(random_course, x, y)
    assert torch.equal(random_course(x).detach(), before)


# ---- CAM and Grad-CAM -------------------------------------------------------------------------------

def test_cam_mean_is_the_class_score_minus_bias(random_course, shapes_batch):
    x, y = shapes_batch.images[:4], shapes_batch.labels[:4]
    M = A.cam(random_course, x, y, upsample=False)  # (N, 8, 8)
    with torch.no_grad():
        scores = random_course(x).gather(1, y[:, None])[:, 0]
    bias = random_course.classifier.bias.detach()[y]
    assert M.shape == (4, 8, 8)
    assert torch.allclose(M.mean((1, 2)), scores - bias, atol=1e-5)
    up = A.cam(random_course, x, y)
    assert up.shape == (4, 64, 64)
    assert torch.allclose(up, F.interpolate(M[:, None], size=(64, 64), mode="bilinear")[:, 0])


def test_cam_by_hand_on_tiny_net():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    feats = net[4](net[3](net[2](net[1](net[0](x.clone())))))  # (2, 6, 4, 4)
    M = A.cam(net, x, 1, layer="4", fc="7", upsample=False)
    expected = torch.einsum("c,nchw->nhw", net[7].weight.detach()[1], feats.detach())
    assert torch.allclose(M, expected, atol=1e-6)


def test_cam_refuses_a_model_that_is_not_gap_linear():
    torch.manual_seed(0)
    # a softmax after the linear layer: the scores are neither GAP nor GMP + linear
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
                        nn.Softmax(1))
    with pytest.raises(ValueError, match="not global pooling"):
        A.cam(net, torch.rand(1, 3, 8, 8), 0, layer="1", fc="4")
    with pytest.raises(ValueError, match="layer="):
        A.cam(net, torch.rand(1, 3, 8, 8), 0)


def test_grad_cam_equals_relu_cam_over_area_at_the_last_layer(random_course, shapes_batch):
    x, y = shapes_batch.images[:4], shapes_batch.labels[:4]
    M = A.cam(random_course, x, y, upsample=False)
    G = A.grad_cam(random_course, x, y, "features.10", upsample=False)
    assert torch.allclose(G * 64, M.clamp(min=0), atol=1e-6)
    G_signed = A.grad_cam(random_course, x, y, "features.10", relu=False, upsample=False)
    assert torch.allclose(G_signed * 64, M, atol=1e-6)


def test_grad_cam_at_an_inner_layer_by_hand(random_course, shapes_batch):
    x, y = shapes_batch.images[:3], shapes_batch.labels[:3]
    net = random_course
    f = net.features
    Ain = f[:7](net.normalize(x)).detach().requires_grad_(True)  # features.6 output (conv), (N, 64, 16, 16)
    score = net.classifier(net.pool(f[7:](Ain.clone())).flatten(1)).gather(1, y[:, None]).sum()
    (dA,) = torch.autograd.grad(score, Ain)
    expected = (dA.mean((2, 3), keepdim=True) * Ain).sum(1).clamp(min=0).detach()
    G = A.grad_cam(net, x, y, "features.6", upsample=False)
    assert G.shape == (3, 16, 16)
    assert torch.allclose(G, expected, atol=1e-6)
    assert A.grad_cam(net, x, y, "features.6").shape == (3, 64, 64)
    gg = A.guided_grad_cam(net, x, y, "features.6")
    assert gg.shape == (3, 3, 64, 64)
    assert torch.allclose(gg, A.guided_backprop(net, x, y) * A.grad_cam(net, x, y, "features.6")[:, None])


# ---- occlusion ----------------------------------------------------------------------------------------

def occlusion_by_hand(net, x, c, patch, stride, baseline):
    """Slide the patch with plain loops; a linear model's drop is W_c . (x - baseline) inside the patch."""
    _, _, H, W = x.shape
    w = net[1].weight.detach()[c].view(3, H, W).numpy()
    xn = x[0].numpy()
    total, count = np.zeros((H, W)), np.zeros((H, W))
    ys = sorted(set(list(range(0, H - patch + 1, stride)) + [H - patch]))
    xs = sorted(set(list(range(0, W - patch + 1, stride)) + [W - patch]))
    for y0 in ys:
        for x0 in xs:
            sl = (slice(None), slice(y0, y0 + patch), slice(x0, x0 + patch))
            drop = (w[sl] * (xn[sl] - baseline)).sum()
            total[sl[1:]] += drop
            count[sl[1:]] += 1
    return total / count


@pytest.mark.parametrize("patch,stride,baseline", [(2, 1, 0.0), (3, 2, 0.5), (4, 4, 1.0), (6, 1, 0.0)])
def test_occlusion_of_a_linear_model_by_hand(patch, stride, baseline):
    net = linear_model(H=7, W=7)
    x = torch.rand(1, 3, 7, 7, dtype=torch.float64)
    got = A.occlusion(net, x, 1, patch=patch, stride=stride, baseline=baseline, progress=False)
    assert got.shape == (1, 7, 7)
    assert np.allclose(got[0].numpy(), occlusion_by_hand(net, x, 1, patch, stride, baseline))


def test_occlusion_does_not_depend_on_the_batch_size(random_course, shapes_batch):
    x, y = shapes_batch.images[:3, :, :32, :32], shapes_batch.labels[:3]  # CourseNet takes any size >= 16
    maps = [A.occlusion(random_course, x, y, patch=8, stride=6, batch_size=b, progress=False) for b in (2, 7, 500)]
    assert torch.allclose(maps[0], maps[1], atol=1e-5) and torch.allclose(maps[0], maps[2], atol=1e-5)
    # images are independent: one at a time gives the same
    alone = A.occlusion(random_course, x[1:2], y[1:2], patch=8, stride=6, progress=False)
    assert torch.allclose(alone[0], maps[0][1], atol=1e-5)


def test_occlusion_prob_output_and_every_pixel_covered(random_course, shapes_batch):
    x, y = shapes_batch.images[:1], shapes_batch.labels[:1]
    m = A.occlusion(random_course, x, y, patch=10, stride=7, output="prob", progress=False)
    assert torch.isfinite(m).all() and m.abs().max() <= 1
    assert A.occlusion_positions((64, 64), 10, 7)[-1] == (54, 54)  # flush with the edge


def test_occlusion_batches_stay_bounded_as_positions_grow_tenfold(random_course, shapes_batch):
    """Memory: the model never sees more than batch_size copies, however many positions there are."""
    seen = []
    handle = random_course.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
        for stride in (16, 5):  # 16 and 144 positions per image
            seen.clear()
            # the plain method (the incremental one has its own test in tests/test_incremental.py)
            A.occlusion(random_course, x, y, patch=16, stride=stride, batch_size=32, progress=False, incremental=False)
            assert max(seen) <= 32
            assert sum(seen) == 2 + 2 * len(A.occlusion_positions((64, 64), 16, stride))
    finally:
        handle.remove()


# ---- Shapley values ---------------------------------------------------------------------------------

class PatchGame(nn.Module):
    """f(x) = 2 m0 + 2 m1 + 0 m2 + 3 m0 m3, with m_i the mean of 2x2 patch i of a 4x4 image."""

    def forward(self, x):
        m = F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)  # (N, 4) patches in row-major order
        s = 2 * m[:, 0] + 2 * m[:, 1] + 0 * m[:, 2] + 3 * m[:, 0] * m[:, 3]
        return torch.stack([s, -s], 1)


def test_shapley_efficiency_for_every_sample_set(random_course, shapes_batch):
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    with torch.no_grad():
        diff = (random_course(x) - random_course(torch.zeros_like(x))).gather(1, y[:, None])[:, 0]
    for samples, seed in [(1, 0), (3, 5)]:
        v = A.shapley(random_course, x, y, patch=16, samples=samples, seed=seed, per_patch=True, progress=False)
        assert v.shape == (2, 4, 4)
        assert torch.allclose(v.flatten(1).sum(1), diff, atol=1e-4)


def test_shapley_dummy_symmetry_and_interaction_by_hand():
    game = PatchGame()
    x = torch.zeros(1, 3, 4, 4)
    x[..., :2, :2], x[..., :2, 2:], x[..., 2:, :2], x[..., 2:, 2:] = 0.5, 0.5, 0.9, 0.4  # m = .5 .5 .9 .4
    v = A.shapley(game, x, 0, patch=2, samples=400, seed=1, per_patch=True, progress=False).flatten()
    assert v[2] == 0, "dummy: a patch the model ignores gets exactly 0"
    # exact Shapley values: additive terms go to their player, the product 3*m0*m3 is split in half
    inter = 3 * 0.5 * 0.4
    assert v[1].item() == pytest.approx(1.0, abs=1e-6)
    assert v[0].item() == pytest.approx(1.0 + inter / 2, abs=0.1 * inter)
    assert v[3].item() == pytest.approx(inter / 2, abs=0.1 * inter)
    assert v.sum().item() == pytest.approx(2 * 0.5 + 2 * 0.5 + inter, abs=1e-6)
    # symmetry: patches 0 and 1 are interchangeable once the interaction is gone
    x[..., 2:, 2:] = 0
    v = A.shapley(game, x, 0, patch=2, samples=50, seed=2, per_patch=True, progress=False).flatten()
    assert v[0].item() == pytest.approx(v[1].item(), abs=1e-6)


def test_shapley_is_seeded_and_maps_to_pixels():
    game = PatchGame()
    x = torch.rand(2, 3, 4, 4)
    a = A.shapley(game, x, 0, patch=2, samples=5, seed=3, progress=False)
    b = A.shapley(game, x, 0, patch=2, samples=5, seed=3, batch_size=3, progress=False)
    c = A.shapley(game, x, 0, patch=2, samples=5, seed=4, progress=False)
    assert a.shape == (2, 4, 4) and torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)
    patches = A.shapley(game, x, 0, patch=2, samples=5, seed=3, per_patch=True, progress=False)
    assert torch.allclose(a[:, ::2, ::2], patches)


# ---- saliency to segmentation ------------------------------------------------------------------------

def test_saliency_to_mask_and_iou():
    maps = torch.arange(16.0).view(1, 4, 4)
    mask = A.saliency_to_mask(maps, quantile=0.75)
    assert mask.sum() == 4 and mask[0, 3].all()  # the top quarter: 12..15
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, 2:] = True  # 8 pixels, 4 of them predicted
    assert A.mask_iou(mask, truth).item() == pytest.approx(4 / 8)
    assert A.mask_iou(truth, truth).item() == 1
    assert A.mask_iou(torch.zeros_like(truth), torch.zeros_like(truth)).item() == 0


# ---- the contracts ------------------------------------------------------------------------------------

METHODS = {
    "occlusion": lambda m, x, t: A.occlusion(m, x, t, patch=16, stride=16, progress=False),
    "saliency": A.saliency,
    "guided_backprop": A.guided_backprop,
    "deconvnet": A.deconvnet,
    "neuron": lambda m, x, t: A.guided_backprop(m, x, layer="features.7", channel=t if isinstance(t, int) else 1),
    "cam": A.cam,
    "grad_cam": lambda m, x, t: A.grad_cam(m, x, t, "features.6"),
    "guided_grad_cam": lambda m, x, t: A.guided_grad_cam(m, x, t, "features.10"),
    "shapley": lambda m, x, t: A.shapley(m, x, t, patch=32, samples=1, progress=False),
}


@pytest.mark.parametrize("name", METHODS)
def test_model_left_as_found_and_results_detached(name, shapes_batch):
    model = course_model(pretrained=False, seed=1)
    model.train()  # unusual state on purpose: must come back as found
    model.features[0].weight.requires_grad_(False)
    marker = torch.ones_like(model.classifier.weight)
    model.classifier.weight.grad = marker
    before = model_state(model)
    x = shapes_batch.images[:2]
    out = METHODS[name](model, x, shapes_batch.labels[:2])
    after = model_state(model)
    for key in ("modes", "requires_grad", "hooks", "forwards"):
        assert after[key] == before[key], key
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))
    assert model.classifier.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert not out.requires_grad and out.device == x.device
    assert out.shape[0] == 2 and out.shape[-2:] == (64, 64)
    # also when the call raises (a class out of range): mode, requires_grad, .grad, hooks, forwards
    with pytest.raises(ValueError, match=r"class indices in \[0, 8\)|channel index in \[0, 64\)"):
        METHODS[name](model, x, 99)
    raised = model_state(model)
    for key in ("modes", "requires_grad", "hooks", "forwards"):
        assert raised[key] == before[key], key
    assert model.classifier.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")


BAD_X = {
    "rank": (torch.rand(3, 64, 64), "shape"),
    "channels": (torch.rand(1, 1, 64, 64), "shape"),
    "range": (torch.rand(1, 3, 64, 64) * 255, r"\[0, 1\]"),
    "nan": (torch.full((1, 3, 64, 64), float("nan")), "finite"),
    "empty": (torch.rand(0, 3, 64, 64), "non-empty"),
}


@pytest.mark.parametrize("name", ["occlusion", "saliency", "guided_backprop", "cam", "grad_cam", "shapley"])
@pytest.mark.parametrize("bad", BAD_X)
def test_bad_images_are_refused(name, bad, random_course):
    x, message = BAD_X[bad]
    with pytest.raises(ValueError, match=message):
        METHODS[name](random_course, x, 0)


def test_bad_targets_layers_patches_and_strides(random_course, shapes_batch):
    x = shapes_batch.images[:2]
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        A.saliency(random_course, x, 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        A.occlusion(random_course, x, torch.tensor([0, -1]), progress=False)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        A.grad_cam(random_course, x, torch.tensor([0, 1, 2]), "features.10")
    with pytest.raises(TypeError, match="integer"):
        A.saliency(random_course, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown layer 'features.99'.*closest"):
        A.grad_cam(random_course, x, 0, "features.99")
    with pytest.raises(ValueError, match="unknown layer"):
        A.guided_backprop(random_course, x, layer="featuers.3", channel=0)
    with pytest.raises(ValueError, match=r"channel index in \[0, 64\)"):
        A.guided_backprop(random_course, x, layer="features.7", channel=64)
    with pytest.raises(ValueError, match="patch between"):
        A.occlusion(random_course, x, 0, patch=65, progress=False)
    with pytest.raises(ValueError, match="patch between"):
        A.shapley(random_course, x, 0, patch=100, progress=False)
    with pytest.raises(ValueError, match="positive stride"):
        A.occlusion(random_course, x, 0, stride=0, progress=False)
    with pytest.raises(ValueError, match="baseline"):
        A.occlusion(random_course, x, 0, baseline=2.0, progress=False)
    with pytest.raises(ValueError, match="output="):
        A.occlusion(random_course, x, 0, output="logit", progress=False)


def test_inplace_and_out_of_place_relus_give_the_same_maps():
    x = torch.rand(2, 3, 8, 8)
    a, b = tiny_net(inplace=True, seed=4), tiny_net(inplace=False, seed=4)
    for method in (A.saliency, A.guided_backprop, A.deconvnet):
        assert torch.allclose(method(a, x, 1), method(b, x, 1))
    assert torch.allclose(A.grad_cam(a, x, 1, "3"), A.grad_cam(b, x, 1, "3"))
    assert torch.allclose(A.grad_cam(a, x, 1, "1"), A.grad_cam(b, x, 1, "1"))
