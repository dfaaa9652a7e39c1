"""CNF mathematics against closed forms: likelihood, inversion, solver orders, adjoint."""

import math

import pytest
import torch

from flowkit.dynamics import ConcatSquashMLP
from flowkit.flow import Flow, StandardNormal
from flowkit.likelihood import log_likelihood
from flowkit.solvers import odeint
from flowkit.samplers.ode_samplers import integrate_flow

A = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]])


@pytest.mark.parametrize("method,steps", [("dopri5", None), ("rk4", 10), ("euler", 3)])
def test_linear_field_log_density_change(float64, method, steps):
    a = A.double()
    t1 = 0.7
    x = torch.randn(16, 2)
    out = log_likelihood(lambda t, x: x @ a.T, x, StandardNormal((2,)), times=(0.0, t1),
                         method=method, steps=steps, rtol=1e-10, atol=1e-10)
    # d log p / dt = −tr A along trajectories, so Δ = ∫ tr A dt = t1 · tr A
    assert torch.allclose(out.delta, torch.full((16,), t1 * torch.trace(a).item()), atol=1e-9)
    if method == "dopri5":
        # x(t1) = exp(A t1) x, so x ~ N(0, M⁻¹M⁻ᵀ) with M = exp(A t1) when x(t1) ~ N(0, I)
        m = torch.matrix_exp(a * t1)
        cov = torch.linalg.inv(m) @ torch.linalg.inv(m).T
        true = torch.distributions.MultivariateNormal(torch.zeros(2), cov).log_prob(x)
        assert torch.allclose(out.log_prob, true, atol=1e-8)
        assert torch.allclose(out.z, x @ m.T, atol=1e-8)


def test_hutchinson_likelihood_on_linear_field(float64):
    a = A.double()
    x = torch.randn(4, 2)
    out = log_likelihood(lambda t, x: x @ a.T, x, StandardNormal((2,)), estimator="hutchinson",
                         noise="gaussian", n_probes=20000, rtol=1e-8, atol=1e-8)
    assert torch.allclose(out.delta, torch.full((4,), torch.trace(a).item()), atol=0.03)


def test_forward_then_reverse_reconstructs(float64):
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, hidden=(32, 32), activation="tanh")
    flow = Flow(velocity=net, prior=StandardNormal((2,)), t0=0.0, t1=1.0, blocks=[net, net])
    x = torch.randn(64, 2)
    z = integrate_flow(flow, x, reverse=False, rtol=1e-9, atol=1e-9).x
    back = integrate_flow(flow, z, reverse=True, rtol=1e-9, atol=1e-9).x
    assert torch.allclose(back, x, atol=1e-6)
    assert not torch.allclose(z, x, atol=1e-2)


def _time_dependent(t, x):
    return torch.cos(3 * t) * x + t ** 2


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.5), (1.5, 0.0)])
def test_fixed_step_convergence_order_on_time_dependent_field(float64, method, order, t0, t1):
    x0 = torch.tensor([[1.0], [-0.5]])
    ref = odeint(_time_dependent, x0, [t0, t1], method="dopri5", rtol=1e-13, atol=1e-13).ys[-1]
    errors = []
    for steps in (40, 80, 160):
        sol = odeint(_time_dependent, x0, [t0, t1], method=method, steps=steps)
        assert sol.nfe == steps * {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[method]
        errors.append((sol.ys[-1] - ref).abs().max().item())
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert abs(rates[-1] - order) < 0.3 and rates[0] > order - 0.6, rates


def test_fixed_step_needs_steps():
    with pytest.raises(ValueError, match="steps"):
        odeint(_time_dependent, torch.zeros(1, 1), [0.0, 1.0], method="rk4")
    with pytest.raises(ValueError, match="did you mean dopri"):
        odeint(_time_dependent, torch.zeros(1, 1), [0.0, 1.0], method="dopri4")


@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 0.0)])
def test_adjoint_gradients_match_autograd_both_directions(float64, t0, t1):
    torch.manual_seed(3)
    net = ConcatSquashMLP(2, hidden=(16,), activation="tanh").double()
    x = torch.randn(8, 2)
    field = lambda t, y: net(t, y)  # noqa: E731
    grads = []
    for adjoint in (False, True):
        net.zero_grad()
        xs = x.clone().requires_grad_(True)
        sol = odeint(field, xs, [t0, t1], rtol=1e-10, atol=1e-10, adjoint=adjoint,
                     adjoint_params=tuple(net.parameters()))
        sol.ys[-1].pow(2).sum().backward()
        grads.append([xs.grad.clone()] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_per_sample_error_norm_protects_outliers(float64):
    # 255 easy samples and one fast one: a batch-RMS norm lets the outlier's error hide.
    rates = torch.ones(256, 1)
    rates[0] = 40.0
    field = lambda t, x: -rates * x * torch.cos(t)  # noqa: E731
    x0 = torch.ones(256, 1)
    exact = torch.exp(-rates * math.sin(1.0))
    errs = {}
    for per_sample in (False, True):
        sol = odeint(field, x0, [0.0, 1.0], rtol=1e-5, atol=1e-5, per_sample_norm=per_sample)
        errs[per_sample] = ((sol.ys[-1] - exact).abs() / (1e-5 + 1e-5 * exact.abs())).max().item()
    assert errs[True] < errs[False]
    assert errs[True] < 5.0
