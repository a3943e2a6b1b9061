import pytest
import torch
from torch import nn

from conftest import model_state, tiny_net
from lecturekit import attribution, hooks


def test_capture_matches_manual_forward():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad(), hooks.capture(net, ["0", "1", "4"]) as acts:
        out = net(x)
        conv = net[0](x)
        expected_relu2 = net[4](net[3](net[2](net[1](conv.clone()))))
    assert torch.allclose(acts["0"], conv), "the conv output is captured before the in-place ReLU ran"
    assert acts["0"].min() < 0
    assert torch.allclose(acts["1"], conv.clamp(min=0))
    assert torch.allclose(acts["4"], expected_relu2)
    assert out.shape == (2, 3)


def test_capture_does_not_change_the_output():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
        with hooks.capture(net, ["0", "1", "3", "4"]):
            during = net(x)
    assert torch.equal(before, during)


def test_capture_gradients_match_autograd_with_inplace_relu():
    net = tiny_net(inplace=True)
    reference = tiny_net(inplace=False)
    x = torch.rand(2, 3, 8, 8)
    with hooks.capture(net, ["3"], grads=True) as acts:
        net(x)[:, 1].sum().backward()
    # independent: the same network without in-place ops, gradient of the same activation
    a = reference[3](reference[2](reference[1](reference[0](x))))
    a.retain_grad()
    reference[7](reference[6](reference[5](reference[4](a))))[:, 1].sum().backward()
    assert torch.allclose(acts.grads["3"], a.grad, atol=1e-6)
    assert torch.allclose(acts["3"].detach(), a.detach())


def test_hooks_removed_also_when_block_raises():
    net = tiny_net()
    before = model_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.capture(net, ["0", "3"], grads=True):
            net(torch.rand(1, 3, 8, 8))
            raise RuntimeError("boom")
    assert model_state(net)["hooks"] == before["hooks"] == 0


def test_unknown_layer_lists_closest_names():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"unknown layer '9'.*closest"):
        with hooks.capture(net, ["9"]):
            pass
    with pytest.raises(ValueError, match="not part of the model"):
        hooks.resolve_layer(net, nn.ReLU())
    assert hooks.resolve_layer(net, net[3]) == ("3", net[3])
    with pytest.raises(TypeError):
        hooks.resolve_layer(net, 3)


def _grad_with_rule(net, x, rule):
    x = x.clone().requires_grad_(True)
    with hooks.relu_backward(net, rule):
        net(x)[:, 0].sum().backward()
    return x.grad


def test_relu_rules_by_hand():
    """One ReLU between two linear maps: every rule's input gradient written down by hand."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 7), nn.Linear(7, 1)
    net = nn.Sequential(lin1, nn.ReLU(inplace=True), lin2)
    x = torch.randn(4, 5)
    f = lin1(x).detach()  # (4, 7) ReLU input
    R = lin2.weight.detach().expand(4, 7)  # gradient arriving at the ReLU output
    by_hand = {
        "backprop": (f > 0) * R,
        "deconvnet": (R > 0) * R,
        "guided": (f > 0) * (R > 0) * R,
    }
    rules = {"backprop": lambda f_positive, R: f_positive * R, "deconvnet": attribution.deconvnet_relu,
             "guided": attribution.guided_relu}
    for rule, relu_grad in by_hand.items():
        got = _grad_with_rule(net, x, rules[rule])
        assert torch.allclose(got, relu_grad @ lin1.weight.detach(), atol=1e-6), rule


def test_backprop_rule_equals_autograd():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    plain = x.clone().requires_grad_(True)
    net(plain)[:, 0].sum().backward()
    assert torch.allclose(_grad_with_rule(net, x, lambda f_positive, R: f_positive * R), plain.grad, atol=1e-6)


def test_relu_rule_restored_and_forward_unchanged():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8)
    before = model_state(net)
    with torch.no_grad():
        y0 = net(x)
    with pytest.raises(RuntimeError):
        with hooks.relu_backward(net, attribution.guided_relu):
            with torch.no_grad():
                assert torch.equal(net(x), y0)
            raise RuntimeError
    assert model_state(net)["forwards"] == before["forwards"]
    assert all("forward" not in m.__dict__ for m in net.modules())
    with pytest.raises(TypeError, match="expected rule to be a function"):
        with hooks.relu_backward(net, "guided"):
            pass


def test_preserved_restores_mode_flags_and_grads():
    net = tiny_net()
    net.train()
    net[0].weight.requires_grad_(False)
    sentinel = torch.ones_like(net[3].weight)
    net[3].weight.grad = sentinel
    before = model_state(net)
    with pytest.raises(KeyError):
        with hooks.preserved(net):
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            net[3].weight.grad = None
            raise KeyError
    after = model_state(net)
    assert after["modes"] == before["modes"] and after["requires_grad"] == before["requires_grad"]
    assert net[3].weight.grad is sentinel


def test_forward_to_stops_after_the_layer_and_cleans_up():
    net = tiny_net()
    calls = []
    net[4].register_forward_hook(lambda m, i, o: calls.append("after"))  # a layer past the stop
    before = model_state(net)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = net[1](net[0](x).clone())
        with hooks.forward_to(net, ["1"]) as run:
            got = run(x)["1"]
            run(x)
        assert calls == [], "nothing after the last requested layer is computed"
        assert torch.allclose(got, expected)
        with hooks.forward_to(net, ["3"], output=True) as run:
            acts = run(x)
        assert torch.allclose(acts[hooks.OUTPUT], net(x)) and calls
    assert model_state(net)["hooks"] == before["hooks"] == 1, "only the test's own hook remains"


def test_forward_to_keeps_the_graph_when_asked():
    net = tiny_net()
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    with hooks.forward_to(net, ["3"], detach=False) as run:
        A = run(x)["3"]
        A.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown layer"):
        with hooks.forward_to(net, ["nope"]):
            pass
