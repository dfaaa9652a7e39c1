"""Several Hutchinson probes go through the fast paths in one pass and give what the probes one
by one give (forward mode ``jvp`` of concat_conv, the bottleneck of concatsquash), with the
gradients of training."""

import pytest
import torch

from flowkit.dynamics.conv import ConcatConvNet
from flowkit.dynamics.mlp import ConcatSquashMLP
from flowkit.fast_divergence import bind
from flowkit.trace import divergence


def _per_probe(net, t, x, probes, **options):
    outs = [divergence(net, t, x, estimator="hutchinson", probe=p, paths=bind(net), **options) for p in probes]
    return outs[0].dx, torch.stack([o.div for o in outs]).mean(0), outs


@pytest.mark.parametrize("kind", ["jvp", "bottleneck"])
def test_several_probes_in_one_pass_equal_the_probes_one_by_one(kind):
    torch.manual_seed(0)
    if kind == "jvp":
        net = ConcatConvNet(16, shape=(1, 4, 4), hidden=(6, 6)).double()
        x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
        probes = torch.randn(5, *x.shape, dtype=torch.float64)
    else:
        net = ConcatSquashMLP(3, (4, 8), bottleneck=True).double()
        x = torch.randn(6, 3, dtype=torch.float64)
        probes = torch.randn(5, 6, 4, dtype=torch.float64)  # the bottleneck's width
    t = torch.tensor(0.4, dtype=torch.float64)
    method = "forward_with_jvp" if kind == "jvp" else "split"
    calls = []
    original = getattr(net, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(net, method, counted)
    batched = divergence(net, t, x, estimator="hutchinson", probe=probes, paths=bind(net), create_graph=True)
    assert len(calls) == 1  # one pass for the five probes
    assert batched.div.shape == (x.shape[0],)
    dx, div, _ = _per_probe(net, t, x, probes, create_graph=True)
    assert torch.allclose(batched.dx, dx, atol=1e-12)
    assert torch.allclose(batched.div, div, atol=1e-10)
    # training: the gradient of the batched estimate is the gradient of the per-probe mean
    params = [p for p in net.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(batched.div.sum() + batched.dx.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(div.sum() + dx.sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-10)


def test_many_probes_converge_to_the_exact_trace_through_the_jvp_path():
    torch.manual_seed(1)
    net = ConcatConvNet(16, shape=(1, 4, 4), hidden=(6,)).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor(0.2, dtype=torch.float64)
    exact = divergence(net, t, x, estimator="exact").div
    probes = torch.randint(0, 2, (4000, *x.shape)).double().mul_(2).sub_(1)  # Rademacher
    est = divergence(net, t, x, estimator="hutchinson", probe=probes, paths=bind(net)).div
    assert torch.allclose(est, exact, atol=0.1 * exact.abs().max().item() + 0.05)
