"""lecturekit.evaluation against hand-made maps and boxes, a linear model's deletion curve written down,
and the randomisation check on a method that ignores the weights."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import model_state, tiny_net
from lecturekit import attribution as A
from lecturekit import evaluation as E
from lecturekit.models import course_model


# ---- pointing game ------------------------------------------------------------------------------------

def test_pointing_game_hits_misses_and_tolerance():
    maps = torch.zeros(3, 10, 10)
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    maps[0, 3, 3] = 1.0  # on the object
    maps[1, 8, 8] = 1.0  # far away: distance from (8, 8) to (4, 4) is sqrt(32) = 5.66
    maps[2, 4, 6] = 1.0  # two pixels right of the object
    assert E.pointing_game(maps, masks).tolist() == [True, False, False]
    assert E.pointing_game(maps, masks, tolerance=2).tolist() == [True, False, True]
    assert E.pointing_game(maps, masks, tolerance=5.6).tolist() == [True, False, True]
    assert E.pointing_game(maps, masks, tolerance=5.7).tolist() == [True, True, True]


def test_pointing_game_checks_shapes():
    with pytest.raises(ValueError, match="masks of shape"):
        E.pointing_game(torch.zeros(2, 8, 8), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        E.pointing_game(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite"):
        E.pointing_game(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4, dtype=torch.bool))


# ---- boxes and localisation error -----------------------------------------------------------------------

def test_map_to_box_takes_the_largest_component_above_the_fraction():
    m = torch.zeros(2, 20, 20)
    m[0, 2:6, 3:9] = 1.0  # 24 pixels, the strongest
    m[0, 10:18, 10:16] = 0.5  # 48 pixels at half the max: the largest component
    m[0, 0, 19] = 0.1  # below 20% of the max
    boxes = E.map_to_box(m, fraction=0.2)
    assert boxes[0].tolist() == [10, 10, 16, 18]
    assert E.map_to_box(m, fraction=0.6)[0].tolist() == [3, 2, 9, 6]  # only the strong blob survives
    assert boxes[1].tolist() == [0, 0, 0, 0]  # no positive value, no box


def test_box_iou_by_hand():
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]], dtype=torch.float)
    b = torch.tensor([[5, 0, 15, 10], [0, 0, 10, 10], [10, 10, 12, 12]], dtype=torch.float)
    assert torch.allclose(E.box_iou(a, b), torch.tensor([50 / 150, 1.0, 0.0]))


def test_localisation_error_on_shapesworld_masks(shapes_batch):
    masks, boxes = shapes_batch.masks[:6], shapes_batch.boxes[:6]
    assert not E.localisation_error(masks.float(), boxes).any(), "the mask itself localises perfectly"
    moved = torch.roll(masks.float(), shifts=(32, 32), dims=(1, 2))
    errors = E.localisation_error(moved, boxes)
    ious = E.box_iou(E.map_to_box(moved), boxes)
    assert torch.equal(errors, ious < 0.5) and errors.any()


# ---- deletion and insertion ------------------------------------------------------------------------------

def test_deletion_curve_of_a_linear_model_by_hand():
    torch.manual_seed(0)
    H = W = 4
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 2)).double()
    x = torch.rand(1, 3, H, W, dtype=torch.float64)
    maps = torch.rand(1, H, W, dtype=torch.float64)
    curve = E.deletion_curve(net, x, 1, maps, steps=4, output="score", progress=False)
    w = net[1].weight.detach()[1].view(3, H * W)
    b = net[1].bias.detach()[1]
    order = maps.flatten().argsort(descending=True)
    expected = []
    for k in range(5):  # 0, 4, 8, 12, 16 pixels removed
        keep = torch.ones(H * W, dtype=torch.bool)
        keep[order[: 4 * k]] = False
        expected.append((w * x.view(3, H * W) * keep).sum() + b)
    assert torch.allclose(curve.fractions, torch.linspace(0, 1, 5).float())
    assert torch.allclose(curve.scores[0], torch.stack(expected).to(curve.scores.dtype))
    assert curve.auc[0].item() == pytest.approx(np.trapezoid(np.array([e.item() for e in expected]), dx=0.25), rel=1e-5)


def test_the_exact_contributions_delete_fastest_and_insert_fastest():
    """For a linear score, ranking pixels by their contribution w.x is the best possible order."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    x = torch.rand(2, 3, 8, 8)
    contribution = (net[1].weight.detach()[0].view(3, 8, 8) * x).sum(1)  # (2, 8, 8)
    others = [-contribution, torch.rand(2, 8, 8), A.saliency(net, x, 0)]
    curve = lambda f, m: f(net, x, 0, m, steps=16, baseline=0.0, output="score", progress=False).auc  # noqa: E731
    for other in others:
        assert (curve(E.deletion_curve, contribution) <= curve(E.deletion_curve, other) + 1e-6).all()
        assert (curve(E.insertion_curve, contribution) >= curve(E.insertion_curve, other) - 1e-6).all()
    assert (curve(E.deletion_curve, contribution) < curve(E.deletion_curve, -contribution)).all()


def test_curves_endpoints_and_batching(shapes_batch):
    net = course_model(pretrained=False, seed=2)
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    maps = torch.rand(2, 64, 64)
    a = E.deletion_curve(net, x, y, maps, steps=5, batch_size=4, progress=False)
    b = E.deletion_curve(net, x, y, maps, steps=5, batch_size=100, progress=False)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    with torch.no_grad():
        p = net(x).softmax(1).gather(1, y[:, None])[:, 0]
        p0 = net(torch.zeros_like(x)).softmax(1).gather(1, y[:, None])[:, 0]
    assert torch.allclose(a.scores[:, 0], p, atol=1e-6) and torch.allclose(a.scores[:, -1], p0, atol=1e-6)
    ins = E.insertion_curve(net, x, y, maps, steps=5, progress=False)
    assert torch.allclose(ins.scores[:, -1], p, atol=1e-6)
    with pytest.raises(ValueError, match=r"maps of shape \(2, 64, 64\)"):
        E.deletion_curve(net, x, y, maps[:, :32], progress=False)
    with pytest.raises(ValueError, match="steps"):
        E.deletion_curve(net, x, y, maps, steps=0, progress=False)


# ---- randomisation sanity check ----------------------------------------------------------------------------

def test_randomisation_check_separates_model_dependent_methods(shapes_batch):
    model = course_model(pretrained=False, seed=5)
    x, y = shapes_batch.images[:2], shapes_batch.labels[:2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model_state(model)
    edge = lambda m, x, t: (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().amax(1)  # ignores the model  # noqa: E731
    r_edge = E.randomisation_check(edge, model, x, y)
    r_grad = E.randomisation_check(A.saliency, model, x, y)
    r_guided = E.randomisation_check(A.guided_backprop, model, x, y)
    assert r_edge.layers == ["classifier", "features.9", "features.6", "features.3", "features.0"]
    assert r_edge.correlation.shape == (5, 2) and torch.allclose(r_edge.correlation, torch.ones(5, 2))
    assert r_grad.correlation[-1].abs().max() < 0.5, "fully randomised: the gradient must change"
    # Adebayo et al.'s finding: guided backprop barely notices a randomised top layer; the gradient does
    assert (r_guided.correlation[0] > r_grad.correlation[0] + 0.2).all()
    assert len(r_grad.maps) == 5 and r_grad.original.shape == (2, 64, 64)
    assert r_guided.original.shape == (2, 3, 64, 64)
    # the model handed in is untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    after = model_state(model)
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]


def test_randomisation_check_on_chosen_layers_and_bad_method():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    r = E.randomisation_check(A.saliency, net, x, 0, layers=["7", "3"])
    assert r.layers == ["7", "3"] and r.correlation.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown layer"):
        E.randomisation_check(A.saliency, net, x, 0, layers=["99"])
    with pytest.raises(TypeError, match="function"):
        E.randomisation_check("saliency", net, x, 0)
