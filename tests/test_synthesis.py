"""lecturekit.synthesis: objectives against finite differences, TV against a loop, the optimisations
improve their objective, are reproducible, leave the model as found, and refuse bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import model_state, tiny_net
from lecturekit import synthesis as S
from lecturekit.hooks import preserved
from lecturekit.models import course_model


@pytest.fixture(scope="module")
def untrained():
    return course_model(pretrained=False, seed=0)


def _values(net, objective, x):
    with preserved(net), S.evaluator(net, objective) as evaluate:
        return evaluate(x)


# ---- objectives: gradients against finite differences (double precision) -------------------------

OBJECTIVES = {
    "class_score": lambda: S.class_score(1),
    "class_score per image": lambda: S.class_score([0, 2]),
    "class_logprob": lambda: S.class_logprob(2),
    "channel": lambda: S.channel("3", 2),
    "neuron": lambda: S.neuron("3", 1, position=(1, 2)),
    "layer_norm after in-place ReLU": lambda: S.layer_norm("1"),
    "total_variation beta 2": lambda: S.total_variation(),
    "total_variation beta 1.5": lambda: S.total_variation(beta=1.5),
    "l2": lambda: S.l2(),
    "alpha_norm": lambda: S.alpha_norm(6),
    "composite": lambda: 2 * S.channel("3", 0) - 1e-2 * S.total_variation() + S.class_score(0) / 3 - 0.1 * S.l2(),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_gradient_matches_finite_differences(name):
    net = tiny_net().double()
    objective = OBJECTIVES[name]()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with preserved(net), S.evaluator(net, objective) as evaluate:
        values = evaluate(x)
        assert values.shape == (2,)
        assert torch.autograd.gradcheck(evaluate, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    assert model_state(net)["hooks"] == 0


def test_objectives_compute_what_they_say():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        logits = net(x)
        a3 = net[3](net[2](net[1](net[0](x))))
    assert torch.allclose(_values(net, S.class_score(2), x), logits[:, 2])
    assert torch.allclose(_values(net, S.class_score([2, 0]), x), logits[[0, 1], [2, 0]])
    assert torch.allclose(_values(net, S.class_logprob(1), x), logits.log_softmax(1)[:, 1])
    assert torch.allclose(_values(net, S.channel("3", 4), x), a3[:, 4].mean((1, 2)))
    assert torch.allclose(_values(net, S.neuron("3", 4), x), a3[:, 4, 2, 2])
    assert torch.allclose(_values(net, S.layer_norm("3"), x), 0.5 * (a3 ** 2).sum((1, 2, 3)))
    combo = S.channel("3", 4) - 0.5 * S.l2() + 3
    assert torch.allclose(_values(net, combo, x), a3[:, 4].mean((1, 2)) - 0.5 * ((x - 0.5) ** 2).sum((1, 2, 3)) + 3)


# ---- total variation against a loop --------------------------------------------------------------


def _tv_loop(x, beta):
    n, c, h, w = x.shape
    total = torch.zeros(n, dtype=x.dtype)
    for b in range(n):
        for k in range(c):
            for i in range(h - 1):
                for j in range(w - 1):
                    d = (x[b, k, i, j + 1] - x[b, k, i, j]) ** 2 + (x[b, k, i + 1, j] - x[b, k, i, j]) ** 2
                    total[b] += d ** (beta / 2)
    return total


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_total_variation_matches_loop(beta):
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    expected = _tv_loop(x, beta)
    assert torch.allclose(S.total_variation(x, beta=beta, reduction="none"), expected, atol=1e-5)
    assert torch.allclose(S.total_variation(x, beta=beta), expected.sum(), atol=1e-5)
    assert S.total_variation(torch.full((1, 3, 4, 4), 0.3)).item() == 0  # flat: exactly zero
    blurred = F.avg_pool2d(x, 3, 1, 1)
    assert (S.total_variation(blurred, beta=beta, reduction="none") < expected).all()


def test_total_variation_beta_below_two_has_finite_gradient_on_flat_images():
    x = torch.full((1, 3, 6, 6), 0.5, requires_grad=True)
    S.total_variation(x, beta=1.0).backward()
    assert torch.isfinite(x.grad).all()


# ---- the steps against their formulas --------------------------------------------------------------


def test_ascent_step_is_the_normalised_l2_step_then_blur(untrained):
    from torchvision.transforms.functional import gaussian_blur

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = S.ascent_step(untrained, x, 3, lr=0.02, l2_weight=0.01, blur_sigma=0.5)
    xr = x.clone().requires_grad_(True)
    objective = untrained(xr)[:, 3] - 0.01 * ((xr - 0.5) ** 2).sum((1, 2, 3))
    (g,) = torch.autograd.grad(objective.sum(), xr)
    expected = (x + 0.02 * g / g.abs().mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    expected = gaussian_blur(expected, [5, 5], [0.5, 0.5])
    assert torch.allclose(y, expected, atol=1e-5)
    assert not y.requires_grad and y.min() >= 0 and y.max() <= 1


def test_dream_step_sets_the_layer_gradient_to_its_activation():
    net = tiny_net(inplace=False)
    x = torch.rand(1, 3, 8, 8)
    y = S.dream_step(net, x, "3", lr=0.01)
    xr = x.clone().requires_grad_(True)
    A = net[3](net[2](net[1](net[0](xr))))
    (g,) = torch.autograd.grad(A, xr, grad_outputs=A.detach())  # backward from the layer with gradient A
    assert torch.allclose(y, (x + 0.01 * g / g.abs().mean()).clamp(0, 1), atol=1e-6)


def test_inversion_loss_formula():
    phi, phi0 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x = torch.rand(2, 3, 5, 5)
    loss = S.inversion_loss(phi, phi0, x, tv_weight=0.3, alpha_weight=0.2, alpha=6, beta=2)
    rel = ((phi - phi0) ** 2).sum((1, 2, 3)) / (phi0 ** 2).sum((1, 2, 3))
    expected = rel + 0.2 * ((x - 0.5).abs() ** 6).sum((1, 2, 3)) / 25 + 0.3 * _tv_loop(x, 2) / 25
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(S.inversion_loss(phi0, phi0, x), torch.zeros(2))


# ---- the optimisations improve their objective on an untrained network ---------------------------


def test_class_visualization_improves_the_score(untrained):
    kw = dict(start="noise", seed=1, lr=0.05, progress=False)
    x1 = S.class_visualization(untrained, [2, 5], steps=1, size=32, **kw)
    x20 = S.class_visualization(untrained, [2, 5], steps=10, size=32, **kw)
    with torch.no_grad():
        s1, s20 = untrained(x1)[[0, 1], [2, 5]], untrained(x20)[[0, 1], [2, 5]]
    assert (s20 > s1 + 0.1).all(), (s1, s20)
    assert x20.shape == (2, 3, 32, 32) and x20.min() >= 0 and x20.max() <= 1


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_channel_visualization_improves_the_channel(untrained, param):
    objective = S.channel("features.6", [3, 7])
    first = S.class_visualization(untrained, objective=objective, steps=1, param=param, size=32, progress=False)
    later = S.class_visualization(untrained, objective=objective, steps=15, param=param, size=32, progress=False)
    assert (_values(untrained, objective, later) > _values(untrained, objective, first)).all()
    assert later.shape == (2, 3, 32, 32) and 0 <= later.min() and later.max() <= 1


def test_fourier_leaves_its_start_for_every_channel(course):
    # Issue 16: with Lucent's start spread (0.01) channels 1, 4 and 7 of features.9 came back as flat grey
    # squares (every ReLU below them off at the start, a zero gradient, Adam never moved). A blank result
    # has a pixel std of about 0.002; every image must now have visible contrast and a higher objective
    # than the flat grey image.
    objective = S.channel("features.9", [1, 4, 7])
    x = S.class_visualization(course, objective=objective, steps=20, lr=0.05, param="fourier", size=32,
                              progress=False)
    assert (x.flatten(1).std(1) > 0.02).all(), x.flatten(1).std(1)
    grey = torch.full((3, 3, 32, 32), 0.5)
    assert (_values(course, objective, x) > _values(course, objective, grey) + 0.1).all()
    # ... and the old start (same seed, Lucent's spread) really was dead: no gradient reaches channel 4's spectrum
    spectrum, render = S._fourier(3, 32, torch.Generator().manual_seed(0), "cpu", sd=0.01)
    with preserved(course), S.evaluator(course, objective) as evaluate:
        (grad,) = torch.autograd.grad(evaluate(render()).sum(), spectrum)  # not .backward(): no .grad on course
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0


def test_each_prior_runs_and_lowers_total_variation(untrained):
    kw = dict(steps=20, lr=0.05, start="noise", seed=0, size=32, progress=False)
    plain = S.total_variation(S.class_visualization(untrained, 1, **kw)).item()
    for prior in [dict(l2_weight=0.05), dict(jitter=3), dict(blur_every=2, blur_sigma=1.0), dict(clip_value=50),
                  dict(clip_contribution=50)]:
        tv = S.total_variation(S.class_visualization(untrained, 1, **kw, **prior)).item()
        assert tv < plain, (prior, tv, plain)


def test_deep_dream_amplifies_the_layer(untrained):
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    y = S.deep_dream(untrained, x, "features.6", steps=5, octaves=2, progress=False)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert _values(untrained, S.layer_norm("features.6"), y) > _values(untrained, S.layer_norm("features.6"), x)


def test_invert_first_layer_reaches_small_feature_error(course, shapes_batch):
    result = S.invert(course, shapes_batch.images[:1], "features.0", steps=100, tv_weight=0.01, progress=False)
    image, error = result
    assert image.shape == (1, 3, 64, 64) and error.shape == (1,)
    assert (error < 0.1).all(), error  # the quality bar at the first layer
    short = S.invert(course, shapes_batch.images[:1], "features.0", steps=5, progress=False)
    assert (error < short.feature_error).all()


# ---- reproducibility -----------------------------------------------------------------------------


def test_seed_makes_results_reproducible(untrained):
    kw = dict(steps=5, start="noise", jitter=3, progress=False)
    a = S.class_visualization(untrained, 0, seed=3, **kw)
    assert torch.equal(a, S.class_visualization(untrained, 0, seed=3, **kw))
    assert not torch.equal(a, S.class_visualization(untrained, 0, seed=4, **kw))
    f = dict(steps=3, param="fourier", size=32, progress=False)
    assert torch.equal(S.class_visualization(untrained, 0, seed=1, **f), S.class_visualization(untrained, 0, seed=1, **f))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    d = dict(steps=2, octaves=2, jitter=4, progress=False)
    assert torch.equal(S.deep_dream(untrained, x, "features.3", seed=2, **d), S.deep_dream(untrained, x, "features.3", seed=2, **d))
    i = dict(steps=3, progress=False)
    assert torch.equal(S.invert(untrained, x, "features.3", seed=5, **i).image, S.invert(untrained, x, "features.3", seed=5, **i).image)
    assert not torch.equal(S.invert(untrained, x, "features.3", seed=5, **i).image, S.invert(untrained, x, "features.3", seed=6, **i).image)


# ---- contract 5: the model is left as found, also when the call raises ---------------------------


def _odd_state_model():
    model = course_model(pretrained=False, seed=1)
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    return model


CALLS = {
    "class_visualization": lambda m: S.class_visualization(m, 1, steps=2, jitter=2, blur_every=1, clip_value=10,
                                                           clip_contribution=10, l2_weight=0.01, size=32, progress=False),
    "fourier": lambda m: S.class_visualization(m, objective=S.neuron("features.3", 2), steps=2, param="fourier",
                                               size=32, progress=False),
    "deep_dream": lambda m: S.deep_dream(m, torch.rand(1, 3, 32, 32), "features.4", steps=2, octaves=2, progress=False),
    "invert": lambda m: S.invert(m, torch.rand(1, 3, 32, 32), "features.6", steps=2, progress=False),
    "ascent_step": lambda m: S.ascent_step(m, torch.rand(1, 3, 32, 32), 0, l2_weight=0.1, blur_sigma=0.5),
    "dream_step": lambda m: S.dream_step(m, torch.rand(1, 3, 32, 32), "features.1", jitter=2),
    "raises: class out of range": lambda m: S.class_visualization(m, 8, steps=2, size=32, progress=False),
    "raises: channel out of range": lambda m: S.class_visualization(m, objective=S.channel("features.3", 99),
                                                                    steps=2, size=32, progress=False),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_model_left_as_found(name):
    model = _odd_state_model()
    before = model_state(model)
    params_before = [p.detach().clone() for p in model.parameters()]
    if name.startswith("raises"):
        with pytest.raises(ValueError, match=r"class indices in \[0, 8\)|channel index in \[0, \d+\) for layer 'features.3'"):
            CALLS[name](model)
    else:
        CALLS[name](model)
    after = model_state(model)
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(after["grads"], before["grads"]))  # no .grad added or replaced
    assert after["hooks"] == 0 and after["forwards"] == before["forwards"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))


# ---- bad input gets a clear error ---------------------------------------------------------------


@pytest.mark.parametrize("call, error, match", [
    (lambda m: S.class_visualization(m, 8, steps=1, progress=False), ValueError, r"class indices in \[0, 8\)"),
    (lambda m: S.class_visualization(m, -1, steps=1, progress=False), ValueError, r"class indices"),
    (lambda m: S.class_visualization(m, 0, steps=0), ValueError, "steps to be a positive integer"),
    (lambda m: S.class_visualization(m, 0, steps=2.5), ValueError, "steps to be a positive integer"),
    (lambda m: S.class_visualization(m), ValueError, "either a class target or an objective"),
    (lambda m: S.class_visualization(m, 0, start="ones"), ValueError, "start="),
    (lambda m: S.class_visualization(m, 0, param="fourier", blur_every=2), ValueError, "act on pixels"),
    (lambda m: S.class_visualization(m, 0, clip_value=120), ValueError, "percentile"),
    (lambda m: S.class_visualization(m, 0, l2_weight=-1), ValueError, "l2_weight to be a number >= 0"),
    (lambda m: S.class_visualization(m, 0.5), TypeError, "integer class index"),
    (lambda m: S.class_visualization(m, objective=S.channel("features.66", 0), steps=1), ValueError, "unknown layer"),
    (lambda m: S.deep_dream(m, torch.rand(3, 32, 32), "features.3"), ValueError, r"\(N, 3, H, W\)"),
    (lambda m: S.deep_dream(m, torch.rand(1, 3, 32, 32) * 255, "features.3"), ValueError, r"pixel space \[0, 1\]"),
    (lambda m: S.deep_dream(m, torch.rand(1, 3, 32, 32), "features.99"), ValueError, "unknown layer"),
    (lambda m: S.deep_dream(m, torch.rand(1, 3, 32, 32), "features.3", octaves=0), ValueError, "octaves"),
    (lambda m: S.deep_dream(m, torch.rand(1, 3, 32, 32), "features.3", steps=0), ValueError, "steps"),
    (lambda m: S.invert(m, torch.rand(1, 1, 32, 32), "features.3"), ValueError, r"\(N, 3, H, W\)"),
    (lambda m: S.invert(m, torch.full((1, 3, 8, 8), float("nan")), "features.3"), ValueError, "finite"),
    (lambda m: S.invert(m, torch.rand(1, 3, 32, 32), "feature.3"), ValueError, "closest valid names"),
    (lambda m: S.invert(m, torch.rand(1, 3, 32, 32), "features.3", steps=-3), ValueError, "steps"),
    (lambda m: S.invert(m, torch.rand(1, 3, 32, 32), "features.3", tv_weight=-1), ValueError, "tv_weight"),
    (lambda m: S.ascent_step(m, torch.rand(2, 3, 32, 32), torch.tensor([0, 9])), ValueError, "class indices"),
    (lambda m: S.total_variation(2), TypeError, "beta=... by name"),
    (lambda m: S.total_variation(torch.rand(3, 8, 8)), ValueError, r"\(N, C, H, W\)"),
    (lambda m: S.total_variation(beta=0), ValueError, "beta > 0"),
    (lambda m: S.channel("features.3", [0, 1]) + S.channel("features.3", [0, 1, 2]), ValueError, "batches of 2 and 3"),
])
def test_bad_input_raises_clearly(untrained, call, error, match):
    with pytest.raises(error, match=match):
        call(untrained)
    assert model_state(untrained)["hooks"] == 0


# ---- quality bar on the trained course model ------------------------------------------------------


def test_every_class_visualization_reaches_its_class(course):
    # Needs an accurate course model (the final weights); the bar: p(target) >= 0.99.
    x = S.class_visualization(course, objective=S.class_logprob(list(range(8))), steps=100, lr=0.02, progress=False)
    with torch.no_grad():
        p = course(x).softmax(1).diagonal()
    assert (p >= 0.99).all(), p


def test_class_visualization_is_ascent_step_repeated(untrained):
    """The pixel parameterisation is ascent_step in a loop (jitter and clipping off): same images."""
    x = torch.full((1, 3, 64, 64), S.GREY)
    for step in range(4):
        x = S.ascent_step(untrained, x, 5, lr=0.03, l2_weight=0.02, blur_sigma=0.7 if (step + 1) % 2 == 0 else 0.0)
    looped = S.class_visualization(untrained, 5, steps=4, lr=0.03, l2_weight=0.02, blur_every=2, blur_sigma=0.7,
                                   progress=False)
    assert torch.allclose(looped, x, atol=1e-6)


def test_renamed_keywords_warn_and_still_work(untrained):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match=r"ascent_step\(l2=\.\.\.\) is deprecated; use l2_weight="):
        old = S.ascent_step(untrained, x, 1, l2=0.1)
    assert torch.equal(old, S.ascent_step(untrained, x, 1, l2_weight=0.1))
    with pytest.warns(DeprecationWarning, match="use channel="):
        assert S.channel("features.3", k=2).name == S.channel("features.3", 2).name
    with pytest.warns(DeprecationWarning, match="use target="):
        S.class_score(c=1)
    with pytest.raises(TypeError, match="got both l2= .* and l2_weight="):
        S.ascent_step(untrained, x, 1, l2=0.1, l2_weight=0.1)


def test_clip_by_contribution_reads_the_objective_gradient_without_the_l2_term(untrained):
    """One step by hand: g = dS/dx - 2 lambda (x - 0.5) moves the image; the contribution
    |sum_c (x_new - 0.5) dS/dx| (Yosinski et al. 2015) uses dS/dx alone; pixels below its median -> grey."""
    lam, lr, target = 5.0, 0.05, 3
    got = S.class_visualization(untrained, target, steps=1, lr=lr, l2_weight=lam, clip_contribution=50,
                                start="noise", seed=0, progress=False)
    x0 = (S.GREY + 0.1 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    x0.requires_grad_(True)
    with preserved(untrained):
        untrained.eval()
        (g_score,) = torch.autograd.grad(untrained(x0)[0, target], x0)
    x0 = x0.detach()
    g = g_score - 2 * lam * (x0 - S.GREY)
    x1 = (x0 + lr * g / g.abs().mean()).clamp(0, 1)

    def clipped(grad):
        contribution = ((x1 - S.GREY) * grad).sum(1).abs()  # (1, H, W)
        keep = contribution >= torch.quantile(contribution.flatten(), 0.5)
        return torch.where(keep[:, None], x1, torch.full_like(x1, S.GREY))

    assert torch.allclose(got, clipped(g_score), atol=1e-6)
    assert not torch.allclose(got, clipped(g), atol=1e-6), "the L2 term would change which pixels are clipped"


def test_high_frequency_share_of_sinusoids_and_invariance_to_contrast():
    """A grating of f cycles per pixel has all its energy at f: share 1 above the cutoff, 0 below;
    contrast (scaling about the mean) changes total variation but not the share."""
    j = torch.arange(32, dtype=torch.float64)
    for f, expected in [(2 / 32, 0.0), (6 / 32, 0.0), (12 / 32, 1.0)]:
        grating = (0.5 + 0.3 * torch.cos(2 * torch.pi * f * j)).expand(1, 3, 32, 32).float()
        assert S.high_frequency_share(grating, cutoff=0.25).item() == pytest.approx(expected, abs=1e-6)
    mix = 0.5 + 0.2 * torch.cos(2 * torch.pi * 2 / 32 * j) + 0.1 * torch.cos(2 * torch.pi * 12 / 32 * j)
    x = mix[None, None, None, :].expand(1, 3, 32, 32).float()
    # energy ratio of two cosines: amplitudes^2, 0.1^2 / (0.2^2 + 0.1^2) = 0.2
    assert S.high_frequency_share(x).item() == pytest.approx(0.2, abs=1e-5)
    low_contrast = 0.5 + 0.25 * (x - 0.5)
    assert S.high_frequency_share(low_contrast).item() == pytest.approx(0.2, abs=1e-5)
    assert S.total_variation(low_contrast) < 0.1 * S.total_variation(x)
    assert S.high_frequency_share(torch.full((2, 3, 8, 8), 0.3)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="expected cutoff"):
        S.high_frequency_share(x, cutoff=0.9)
