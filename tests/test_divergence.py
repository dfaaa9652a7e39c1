"""The divergence function against autograd and its statistical properties."""

import math

import pytest
import torch

from flowkit.trace import divergence, sample_probe
from flowkit.dynamics import ConcatSquashMLP


def _jacobian_trace(fn, t, x):
    traces = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(t, v[None])[0], xi)
        traces.append(torch.trace(jac))
    return torch.stack(traces)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_exact_equals_autograd_trace(float64, dim):
    torch.manual_seed(0)
    net = ConcatSquashMLP(dim, hidden=(16, 16), activation="softplus")
    x, t = torch.randn(7, dim), torch.tensor(0.3)
    out = divergence(net, t, x, estimator="exact", frobenius=True)
    assert torch.allclose(out.div, _jacobian_trace(net, t, x), atol=1e-10)
    assert torch.allclose(out.dx, net(t, x), atol=1e-12)
    frob = torch.stack([torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], xi).pow(2).sum()
                        for xi in x])
    assert torch.allclose(out.jac_frobenius, frob, atol=1e-10)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_unbiased(float64, noise):
    torch.manual_seed(1)
    dim = 4
    net = ConcatSquashMLP(dim, hidden=(16,), activation="tanh")
    x, t = torch.randn(3, dim), torch.tensor(0.1)
    exact = divergence(net, t, x).div
    n = 4000
    probes = sample_probe(x, noise, n)
    out = divergence(net, t, x, estimator="hutchinson", probe=probes)
    # the mean over n probes lies within 5 standard errors of the exact trace
    single = torch.stack([divergence(net, t, x, estimator="hutchinson", probe=probes[i]).div
                          for i in range(200)])
    sem = single.std(0) / math.sqrt(n)
    assert ((out.div - exact).abs() <= 5 * sem + 1e-9).all()


def test_rademacher_probes_are_signs_and_gaussian_has_unit_variance():
    x = torch.zeros(1000, 3)
    r = sample_probe(x, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    g = sample_probe(x, "gaussian", 4)
    assert g.shape == (4, 1000, 3) and abs(g.var().item() - 1) < 0.05
    with pytest.raises(ValueError, match="rademacher"):
        sample_probe(x, "uniform")


def test_bottleneck_estimator_agrees(float64):
    torch.manual_seed(2)
    dim = 6
    net = ConcatSquashMLP(dim, hidden=(3, 16), activation="softplus", bottleneck=True)
    x, t = torch.randn(4, dim), torch.tensor(0.2)
    exact = divergence(net, t, x).div
    h, _ = net.split(t, x)
    probes = sample_probe(h.detach(), "gaussian", 20000)
    est = divergence(net, t, x, estimator="hutchinson", probe=probes,
                     split=lambda t_, x_: net.split(t_, x_)).div
    assert torch.allclose(est, exact, rtol=0.05, atol=0.05)
    # the probe lives in the bottleneck's space (width 3), not the data space (6)
    assert probes.shape[-1] == 3


def test_divergence_keeps_graph_for_training():
    net = ConcatSquashMLP(2, hidden=(8,))
    x = torch.randn(5, 2)
    out = divergence(net, torch.tensor(0.0), x, create_graph=True)
    (out.div.sum() + out.dx.sum()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="exact, hutchinson"):
        divergence(lambda t, x: x, torch.tensor(0.0), torch.zeros(1, 2), estimator="hutch")


@pytest.mark.parametrize("act", ["tanh", "softplus", "relu", "elu", "silu"])
def test_forward_mode_jacobian_matches_autograd(float64, act):
    torch.manual_seed(4)
    net = ConcatSquashMLP(3, hidden=(16, 16), activation=act, num_classes=4)
    x, t, c = torch.randn(5, 3), torch.tensor(0.4), torch.tensor([0, 1, 2, 3, -1])
    out, jac = net.forward_with_jacobian(t, x, c)
    assert torch.allclose(out, net(t, x, c), atol=1e-12)
    ref = divergence(lambda t_, x_: net(t_, x_, c.repeat(x_.shape[0] // 5)), t, x, frobenius=True)
    fast = divergence(None, t, x, frobenius=True, jacobian=lambda t_, x_: net.forward_with_jacobian(t_, x_, c))
    assert torch.allclose(fast.div, ref.div, atol=1e-10)
    assert torch.allclose(fast.jac_frobenius, ref.jac_frobenius, atol=1e-10)
