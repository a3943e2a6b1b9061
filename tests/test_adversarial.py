"""Adversarial attacks: closed forms on hand-sized linear models, properties, bad inputs, the widget.

Linear models f(x) = W x + b (no normalisation, in double precision) have input gradients that can be
written down: the loss gradient of cross-entropy is W^T (softmax(f) - onehot(y)), the DeepFool step
reaches the nearest boundary exactly. These are the independent oracles for FGSM, PGD and DeepFool.
"""
import math

import pytest
import torch
from torch import nn

from conftest import model_state, tiny_net
from lecturekit import adversarial as A
from lecturekit import widgets

# ---- hand-sized linear models -----------------------------------------------------------------------


def linear_model(k: int = 3, size: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, k)).double()
    return model.eval()


def ce_grad(model, x, y):
    """d CE(Wx + b, y) / dx = W^T (softmax(Wx + b) - onehot(y)), per image, written out."""
    W, b = model[1].weight, model[1].bias
    p = (x.flatten(1) @ W.T + b).softmax(1)  # (N, K)
    p[torch.arange(len(y)), y] -= 1
    return (p @ W).view_as(x)


@pytest.fixture
def lin():
    model = linear_model()
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    y = torch.tensor([0, 1, 2, 0])
    return model, x, y


def test_fgsm_is_one_signed_step_of_the_loss_gradient(lin):
    model, x, y = lin
    eps = 3 / 255
    expected = (x + eps * ce_grad(model, x, y).sign()).clamp(0, 1)
    assert torch.allclose(A.fgsm(model, x, y, eps), expected)
    targeted = (x - eps * ce_grad(model, x, (y + 1) % 3).sign()).clamp(0, 1)
    assert torch.allclose(A.fgsm(model, x, (y + 1) % 3, eps, targeted=True), targeted)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_with_projection_matches_the_closed_form(lin, norm):
    model, x, y = lin
    eps, alpha = 0.05, 0.04
    x_adv = (x + 0.04 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    g = ce_grad(model, x_adv, y)
    if norm == "linf":
        delta = (x_adv + alpha * g.sign() - x).clamp(-eps, eps)
    else:
        step = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = x_adv + alpha * step - x
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.where(n > eps, eps / n, torch.ones_like(n))
    expected = (x + delta).clamp(0, 1)
    ours = A.pgd_step(model, x_adv, x, y, eps, alpha, norm=norm)
    assert torch.allclose(ours, expected)
    # Projection was active: a step from a point already at the edge stays on the ball.
    size = (ours - x).abs().amax() if norm == "linf" else (ours - x).flatten(1).norm(dim=1).max()
    assert size <= eps + 1e-12


def test_project_onto_linf_and_l2_balls():
    delta = torch.tensor([3.0, -4.0, 0.5, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2).clone()
    assert torch.equal(A.project(delta, 1.0, "linf").unique(), torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    norm = delta.norm()
    assert torch.allclose(A.project(delta, 2.0, "l2"), delta * 2.0 / norm)
    assert torch.equal(A.project(delta * 0.01, 2.0, "l2"), delta * 0.01)  # inside the ball: unchanged


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_step_reaches_the_nearest_boundary_of_a_linear_model(norm):
    model = linear_model(k=4, size=3, seed=3)
    x = torch.rand(1, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    W, b = model[1].weight, model[1].bias
    f = (x.flatten(1) @ W.T + b)[0]
    label = int(f.argmax())
    # By hand: the distance to each boundary |f_k - f_label| / ||w_k - w_label||_q, the nearest one.
    q = 1 if norm == "linf" else 2
    dist = [(abs(f[k] - f[label]) / (W[k] - W[label]).norm(p=q)).item() if k != label else math.inf for k in range(4)]
    nearest = int(torch.tensor(dist).argmin())
    r = A.deepfool_step(model, x, label, norm=norm)
    f_new = (x + r).flatten(1) @ W.T + b
    assert torch.allclose(f_new[0, nearest], f_new[0, label])  # exactly on the boundary
    size = r.abs().max() if norm == "linf" else r.norm()
    assert math.isclose(size.item(), dist[nearest], rel_tol=1e-9)
    # One step of a linear model's DeepFool flips the class once overshot a little.
    r_total = A.deepfool(model, x, norm=norm, overshoot=0.02)
    assert int(model(x + r_total).argmax()) != label


# ---- properties on the course model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    from lecturekit.data import shapes

    b = shapes(12, seed=31)
    return b.images, b.labels


@pytest.mark.parametrize("attack", ["fgsm", "pgd_linf", "pgd_l2"])
@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_attacks_stay_in_the_ball_and_in_pixel_range_and_raise_the_loss(course, batch, attack, eps):
    x, y = batch
    if attack == "fgsm":
        x_adv = A.fgsm(course, x, y, eps)
    else:
        norm = attack.split("_")[1]
        eps = eps if norm == "linf" else eps * 20  # an L2 ball about as strong
        x_adv = A.pgd(course, x, y, eps, steps=5, norm=norm)
    delta = x_adv - x
    size = delta.abs().amax((1, 2, 3)) if attack != "pgd_l2" else delta.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        before = loss(course(x), y, reduction="none")
        after = loss(course(x_adv), y, reduction="none")
    assert (after > before).float().mean() >= 0.9 and after.mean() > before.mean()


def test_targeted_pgd_lowers_the_target_loss_and_reaches_it(course, batch):
    x, y = batch
    t = (y + 3) % 8
    x_adv = A.pgd(course, x, t, 16 / 255, steps=10, targeted=True, labels=y)
    with torch.no_grad():
        assert (course(x_adv).argmax(1) == t).float().mean() >= 0.9


def test_seeds_reproduce_and_differ(course, batch):
    x, y = batch
    a = A.pgd(course, x[:3], y[:3], 4 / 255, steps=2, seed=5)
    assert torch.equal(a, A.pgd(course, x[:3], y[:3], 4 / 255, steps=2, seed=5))
    assert not torch.equal(a, A.pgd(course, x[:3], y[:3], 4 / 255, steps=2, seed=6))
    no_start = A.pgd(course, x[:3], y[:3], 4 / 255, steps=2, random_start=False)
    assert torch.equal(no_start, A.pgd(course, x[:3], y[:3], 4 / 255, steps=2, random_start=False, seed=9))


def test_fooling_image_stops_at_the_threshold_for_every_class(course, batch):
    x, _ = batch
    x = x[:8]
    target = torch.arange(8)  # every class once (some images already are their target: 0 steps)
    r = A.fooling_image(course, x, target, threshold=0.9, steps=100)
    assert r.fooled.all() and (r.p_target >= 0.9).all()
    with torch.no_grad():
        p = course(r.images).softmax(1)[torch.arange(8), target]
    assert torch.allclose(p, r.p_target, atol=1e-5)
    # The stopping rule: one step fewer would not have been enough (p was below the threshold).
    shorter = A.fooling_image(course, x, target, threshold=0.9, steps=int(r.steps.max()) - 1)
    assert not shorter.fooled.all()
    assert torch.allclose(r.linf, (r.images - x).abs().amax((1, 2, 3)))
    assert (r.linf <= r.steps * 0.5 / 255 + 1e-6).all()


def test_fooling_rate_counts_changed_predictions_and_reuses_given_clean_ones(course, batch):
    x, _ = batch  # (12, 3, 64, 64)
    v = 0.2 * torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # by hand: k(x) against k(clamp(x + v))
        clean, moved = course(x).argmax(1), course((x + v).clamp(0, 1)).argmax(1)
    expected = (clean != moved).float().mean().item()
    assert 0 < expected < 1  # some images change, some do not: the count is informative
    assert A.fooling_rate(course, x, v) == pytest.approx(expected)
    assert A.fooling_rate(course, x, v, clean=clean) == pytest.approx(expected)
    assert A.fooling_rate(course, x, v, clean=moved) == 0.0  # the given k(x) is the one used
    assert A.fooling_rate(course, x, torch.zeros_like(v)) == 0.0


def test_patch_is_pasted_where_asked_and_gradients_reach_it():
    x = torch.zeros(2, 3, 8, 8)
    patch = torch.ones(3, 3, 3, requires_grad=True)
    out = A.paste_patch(x, patch, torch.tensor([[0, 0], [5, 2]]))
    assert out[0, :, :3, :3].eq(1).all() and out[1, :, 5:8, 2:5].eq(1).all() and out.sum() == 2 * 27
    out.sum().backward()
    assert torch.equal(patch.grad, torch.full((3, 3, 3), 2.0)) and x.eq(0).all()
    with pytest.raises(ValueError, match="inside the 8x8 image"):
        A.paste_patch(x, patch.detach(), (6, 0))


def test_universal_patch_and_evolution_run_small_and_keep_their_contracts(course, batch):
    x, y = batch
    u = A.universal_perturbation(course, x, 10 / 255, epochs=1, progress=False)
    assert u.v.shape == (1, 3, 64, 64) and u.v.abs().max() <= 10 / 255 + 1e-6 and 0 <= u.rates[0] <= 1
    p = A.adversarial_patch(course, x, target=3, patch=12, steps=3, batch_size=4, progress=False)
    assert p.patch.shape == (3, 12, 12) and 0 <= p.patch.min() and p.patch.max() <= 1
    assert 0 <= A.patch_success_rate(course, x, p.patch, 3, labels=y) <= 1
    for encoding in ("direct", "cppn"):
        e = A.evolve_fooling_images(course, encoding=encoding, generations=3, size=32, progress=False)
        assert e.images.shape == (8, 3, 32, 32) and e.queries == 1 + 8 * 4 + 3 * 8 * 4 + 8
        assert e.history == sorted(e.history)  # elites only get better
        assert e.images.min() >= 0 and e.images.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batched_universal_step_is_the_mean_loss_gradient_of_a_linear_model(lin, norm):
    """method="sgd", one pass, one batch: v = P_eps(eps/4 * d) with d the normalised mean CE gradient
    at the model's own labels k(x_i) (the clip at 10 is inactive: these losses are small)."""
    model, x, _ = lin
    eps = 8 / 255
    k = model(x).argmax(1)
    g = ce_grad(model, x, k).mean(0, keepdim=True)  # d mean_i CE / dv, (1, 3, 2, 2)
    d = g.sign() if norm == "linf" else g / g.norm()
    expected = A.project(eps / 4 * d, eps, norm)
    u = A.universal_perturbation(model, x, eps, norm=norm, epochs=1, method="sgd", batch_size=len(x),
                                 delta=0.0, progress=False)
    assert torch.allclose(u.v, expected) and len(u.rates) == 1
    many = A.universal_perturbation(model, x, eps, norm=norm, epochs=6, method="sgd", batch_size=2, delta=0.0,
                                    progress=False)
    size = many.v.abs().max() if norm == "linf" else many.v.norm()
    assert size <= eps + 1e-9 and len(many.rates) == 6


def test_evolution_is_seeded():
    model = tiny_net(inplace=False)
    a = A.evolve_fooling_images(model, generations=2, size=16, seed=3, progress=False)
    b = A.evolve_fooling_images(model, generations=2, size=16, seed=3, progress=False)
    assert torch.equal(a.images, b.images)


def test_cppn_render_matches_a_pixel_by_pixel_evaluation():
    """Each pixel (x, y, r = sqrt(x^2 + y^2), 1) through the layers by hand, every node with its own activation."""
    gen = torch.Generator().manual_seed(4)
    genome = A._random_cppn(2, gen, hidden=4, layers=2)
    genome["act"][0] = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])  # all four activations in the first genome
    funcs = [math.sin, math.tanh, lambda t: math.exp(-t * t), abs]
    size = 3
    out = A.cppn_render(genome, size)
    assert out.shape == (2, 3, size, size)
    for p in range(2):
        for row, yv in enumerate([-1.0, 0.0, 1.0]):
            for col, xv in enumerate([-1.0, 0.0, 1.0]):
                h = [xv, yv, math.sqrt(xv * xv + yv * yv), 1.0]
                for layer, w in enumerate(genome["weights"][:-1]):
                    h = [funcs[genome["act"][p, layer, j]](sum(h[i] * w[p, i, j].item() for i in range(len(h))))
                         for j in range(w.shape[2])]
                w = genome["weights"][-1]
                rgb = [1 / (1 + math.exp(-sum(h[i] * w[p, i, c].item() for i in range(len(h))))) for c in range(3)]
                assert out[p, :, row, col].tolist() == pytest.approx(rgb, abs=1e-6)


@pytest.mark.parametrize("encoding", ["direct", "cppn"])
def test_evolution_stops_once_every_class_reaches_the_threshold(encoding):
    """A linear model that an even colour fools: the run stops early with every elite at the threshold,
    one generation's queries per generation run; a threshold already met by the first population runs none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    with torch.no_grad():
        model[1].weight.mul_(20)
    e = A.evolve_fooling_images(model, encoding=encoding, generations=2000, children=4, size=8, threshold=0.999,
                                seed=1, progress=False)
    assert 0 < e.generations < 2000 and len(e.history) == e.generations
    assert (e.confidence >= 0.999 - 1e-6).all(), e.confidence
    assert e.queries == 1 + 3 * 4 + e.generations * 3 * 4 + 3
    easy = A.evolve_fooling_images(model, encoding=encoding, generations=50, size=8, threshold=0.01, progress=False)
    assert easy.generations == 0 and easy.history == [] and easy.queries == 1 + 3 * 4 + 3


class _Ridge(nn.Module):
    """Three classes scored on one number, w = 10 (mean pixel - 0.5): logits (10 w, exp(12 (w - 0.58)), -10 w).
    Random images start at w ~ 0, where class 1's best move is back towards w = 0 (p_1 <= 1/3 there: a local
    optimum), while its high ground lies beyond class 0's: class 0's lineage stops at p_0 >= 0.99 near
    w = 0.55, where the exponential is already steeper than 10 w, so a lineage started there climbs to p_1 ~ 1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(10.0))

    def forward(self, x):
        w = (x.mean((1, 2, 3)) - 0.5) * self.scale  # (N,)
        return torch.stack([10 * w, torch.exp(12 * (w - 0.58)), -10 * w], 1)


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_cross_niche_seeding_frees_a_class_stuck_on_a_local_optimum(seed):
    """Without restarts class 1 never leaves p_1 ~ 1/3 (300 generations); with them, its lineage is restarted
    from class 0's elite and every class reaches the threshold. Both runs are seeded and reproduce."""
    model = _Ridge().eval()
    run = dict(encoding="direct", generations=300, children=4, size=4, threshold=0.99, seed=seed, progress=False)
    stuck = A.evolve_fooling_images(model, patience=None, **run)
    assert stuck.generations == 300 and stuck.restarts == 0 and stuck.confidence[1] < 0.34, stuck.confidence
    freed = A.evolve_fooling_images(model, patience=20, **run)
    assert freed.restarts >= 1 and freed.generations < 300, freed
    assert (freed.confidence >= 0.99 - 1e-6).all(), freed.confidence
    assert freed.queries == 1 + 3 * 4 + freed.generations * 3 * 4 + 3
    again = A.evolve_fooling_images(model, patience=20, **run)
    assert torch.equal(again.images, freed.images) and again.restarts == freed.restarts


def test_accuracy_under_attack_plain_and_nested_against_attacking_every_image(course, batch):
    """Plain: the accuracy on pgd(x) for each eps. Nested: an image counts as correct at eps only if the
    clean image and every attack at eps' <= eps leave it correct; computed by hand by attacking every image
    at every eps (no random start, so an image's attack does not depend on which others share its batch)."""
    x, y = batch
    eps_values = [4 / 255, 0.0, 1 / 255]  # any order; 0 is the clean accuracy
    kwargs = dict(steps=3, random_start=False)
    correct = {e: (course(A.pgd(course, x, y, e, **kwargs) if e else x).argmax(1) == y) for e in eps_values}
    plain = A.accuracy_under_attack(course, x, y, eps_values, attack="pgd", **kwargs)
    assert plain == {e: pytest.approx(correct[e].float().mean().item()) for e in eps_values}
    nested = A.accuracy_under_attack(course, x, y, eps_values, attack="pgd", nested=True, **kwargs)
    standing = torch.ones(len(x), dtype=torch.bool)
    for e in sorted(eps_values):
        standing &= correct[e]
        assert nested[e] == pytest.approx(standing.float().mean().item()), (e, nested)
    assert list(nested) == sorted(eps_values) and all(nested[e] <= plain[e] + 1e-9 for e in eps_values)


def test_transfer_matrix_diagonal_is_white_box(course, batch):
    x, y = batch
    m = A.transfer_matrix({"a": course, "b": course}, x, y, attack=lambda mm, xs, ys: A.fgsm(mm, xs, ys, 8 / 255))
    assert m.shape == (2, 2) and torch.allclose(m, m[0, 0].expand(2, 2))  # same model: every entry equal


# ---- the model is left as found; bad inputs --------------------------------------------------------------

CALLS = {
    "fgsm": lambda m, x, y: A.fgsm(m, x, y, 2 / 255),
    "pgd": lambda m, x, y: A.pgd(m, x, y, 2 / 255, steps=2),
    "fooling_image": lambda m, x, y: A.fooling_image(m, x, (y + 1) % 3, steps=2),
    "universal": lambda m, x, y: A.universal_perturbation(m, x, 0.05, epochs=1, progress=False),
    "universal_sgd": lambda m, x, y: A.universal_perturbation(m, x, 0.05, epochs=2, method="sgd", batch_size=2,
                                                              progress=False),
    "patch": lambda m, x, y: A.adversarial_patch(m, x, 1, patch=4, steps=2, batch_size=2, progress=False),
    "evolve": lambda m, x, y: A.evolve_fooling_images(m, generations=1, size=16, progress=False),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_model_left_as_found_also_when_raising(name):
    model = tiny_net()
    model.train()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    before = model_state(model)
    x = torch.rand(3, 3, 16, 16)
    y = torch.tensor([0, 1, 2])
    CALLS[name](model, x, y)
    with pytest.raises(ValueError):
        A.pgd(model, x, torch.tensor([0, 1, 7]), 2 / 255)  # class 7 of a 3-class model: raises inside
    after = model_state(model)
    for key in ("modes", "requires_grad", "hooks", "forwards"):
        assert after[key] == before[key], key
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))
    assert model.training and model[3].weight.grad.eq(1).all()


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: A.fgsm(m, x, y, -1 / 255), "eps"),
    (lambda m, x, y: A.fgsm(m, x, y, float("nan")), "eps"),
    (lambda m, x, y: A.pgd(m, x, y, 2 / 255, steps=0), "steps"),
    (lambda m, x, y: A.pgd(m, x, y, 2 / 255, norm="l1"), "unknown norm"),
    (lambda m, x, y: A.project(torch.zeros(1, 3, 2, 2), 0.1, "L2"), "unknown norm"),
    (lambda m, x, y: A.fgsm(m, x, y, 2 / 255, targeted=True, labels=y), "target other than the true class"),
    (lambda m, x, y: A.pgd(m, x, y, 2 / 255, targeted=True, labels=y), "target other than the true class"),
    (lambda m, x, y: A.fgsm(m, x * 255, y, 2 / 255), r"pixel space \[0, 1\]"),
    (lambda m, x, y: A.fgsm(m, x[0], y, 2 / 255), r"\(N, 3, H, W\)"),
    (lambda m, x, y: A.fooling_image(m, x, y, threshold=1.5), "threshold"),
    (lambda m, x, y: A.evolve_fooling_images(m, encoding="pixels"), "encoding"),
    (lambda m, x, y: A.evolve_fooling_images(m, patience=0), "patience"),
    (lambda m, x, y: A.adversarial_patch(m, x, 1, patch=40), "patch no larger"),
    (lambda m, x, y: A.universal_perturbation(m, x, 0.05, method="adam"), "method"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    model = tiny_net()
    x = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match=match):
        call(model, x, torch.tensor([0, 1, 2]))


# ---- the widget ---------------------------------------------------------------------------------------------


def test_attack_explorer_calls_the_pure_function_and_updates(course, batch, monkeypatch):
    x, y = batch
    box = widgets.attack_explorer(course, x[:4], labels=y[:4], steps=2)
    image, target, eps, attack = box.controls
    first = box.state["view"]
    assert first.adversarial.shape == (1, 3, 64, 64) and first.probs.shape == (2, 8)
    calls = []
    real = widgets.attack_view

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(widgets, "attack_view", spy)
    eps.value = 8
    assert calls[-1]["eps"] == pytest.approx(8 / 255) and box.state["view"].eps == pytest.approx(8 / 255)
    assert (box.state["view"].perturbation.abs().max() <= 8 / 255 + 1e-6)
    target.value = 5
    assert calls[-1]["target"] == 5
    with torch.no_grad():
        p = course(box.state["view"].adversarial).softmax(1)[0]
    assert torch.allclose(p, box.state["view"].probs[1])
    image.value = 2
    assert torch.equal(box.state["view"].image, x[2:3])
    attack.value = "fgsm"
    assert calls[-1]["attack"] == "fgsm" and len(calls) == 4


# ---- the bundled second-seed and robust models ----------------------------------------------------------


@pytest.mark.parametrize("weights, seed, eps", [("seed1", 1, 0.0), ("robust", 0, 8 / 255)])
def test_bundled_models_load_offline_and_record_their_recipe(weights, seed, eps):
    from lecturekit import models

    path = models.weights_path(weights)
    assert path.stat().st_size <= 2 * 1024 * 1024
    recipe = torch.load(path, weights_only=True)["recipe"]
    assert recipe["seed"] == seed and recipe.get("adversarial_eps", 0.0) == pytest.approx(eps)
    model = models.course_model(weights=weights)
    assert not model.training and not torch.equal(model.classifier.weight,
                                                   models.course_model().classifier.weight)
    with pytest.raises(ValueError, match="unknown course-model weights"):
        models.course_model(weights="robustest")


def test_fast_adversarial_training_runs_and_rejects_a_bad_eps():
    from lecturekit import training

    model = training.trainable_model(seed=0)
    history = training.train(model, steps=2, lr=0.01, batch_size=8, adversarial_eps=8 / 255, progress=False)
    assert len(history.loss) == 2 and all(math.isfinite(v) for v in history.loss)
    with pytest.raises(ValueError, match="adversarial_eps"):
        training.train(model, steps=1, lr=0.01, adversarial_eps=8.0, progress=False)
