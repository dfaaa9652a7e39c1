"""What a likelihood solve reports doing: per-sample evaluations and steps, and the
warm-started step plans of the lean dopri5 (flowkit.dopri5.StepPlan)."""

import math

import torch

import flowkit
from flowkit.dopri5 import StepPlan, dopri5
from flowkit.flow import StandardNormal


def test_per_sample_solve_reports_each_samples_steps_and_fewer_sample_evaluations():
    # dx/dt = -x³: x(t) = x₀ / sqrt(1 + 2x₀²t), tr ∂v/∂x = -3x², ∫₀¹ -3x² dt = -(3/2) log(1 + 2x₀²)
    x = torch.tensor([[0.01], [3.0]], dtype=torch.float64)  # an easy sample and a hard one
    prior = StandardNormal((1,))
    out = flowkit.log_likelihood(lambda t, y: -y ** 3, x, prior, time_per_sample=True, rtol=1e-7, atol=1e-7)
    z = x / torch.sqrt(1 + 2 * x ** 2)
    exact = prior.log_prob(z) - 1.5 * torch.log1p(2 * x[:, 0] ** 2)
    assert torch.allclose(out.log_prob, exact, atol=1e-5)
    assert out.steps is not None and out.steps[0] < out.steps[1]  # each sample stepped on its own
    assert out.sample_evals < out.nfe * x.shape[0]  # the easy sample retired early
    shared = flowkit.log_likelihood(lambda t, y: -y ** 3, x, prior, rtol=1e-7, atol=1e-7)
    assert shared.steps is None and shared.sample_evals == shared.nfe * x.shape[0]


def test_step_plan_warm_start_saves_evaluations_and_keeps_the_tolerance():
    f = lambda t, x: -3.0 * x * (1 + torch.sin(6 * t))  # noqa: E731  an error that varies along t
    y0 = torch.ones(4, 2, dtype=torch.float64)
    exact = math.exp(-3.0 * (1 + (1 - math.cos(6.0)) / 6))
    cold = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7)
    warm = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7, plan=cold.plan)
    assert warm.nfe < cold.nfe  # no starting-step probe, no small first step, fewer rejections
    assert warm.rejected <= cold.rejected
    for sol in (cold, warm):
        assert abs(sol.ys[-1, 0, 0].item() - exact) < 1e-6
    # a plan made over other times is not used: the solve is the cold one
    other = dopri5(f, y0, [0.0, 1.0], rtol=1e-7, atol=1e-7, plan=StepPlan((0.0, 2.0), cold.plan.steps))
    assert other.nfe == cold.nfe and torch.equal(other.ys, cold.ys)


def test_step_plan_survives_a_checkpoint_round_trip_with_a_landing_step():
    plan = dopri5(lambda t, x: -x, torch.ones(1, 1), [0.0, 0.5, 1.0]).plan
    assert any(math.isinf(p) for _, _, p in plan.steps)  # the steps cut short to land carry no cap
    assert StepPlan.from_tensor(plan.to_tensor()) == plan


def test_per_sample_steps_use_the_networks_declared_jacobian():
    # a per-sample solve hands the rows' own times to the fast path, as the shared-step solve does
    from flowkit.dynamics.mlp import ConcatSquashMLP

    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16)).double()
    calls = []
    original = net.forward_with_jacobian

    def counted(t, x, cond=None):
        calls.append(t.shape)
        return original(t, x, cond)

    net.forward_with_jacobian = counted
    x = torch.randn(6, 2, dtype=torch.float64)
    prior = StandardNormal((2,))
    per_sample = flowkit.log_likelihood(net, x, prior, time_per_sample=True, rtol=1e-9, atol=1e-9)
    assert len(calls) > 10 and sum(len(shape) == 1 for shape in calls) > 10  # the solve itself, one time per row
    net.forward_with_jacobian = original
    shared = flowkit.log_likelihood(net, x, prior, rtol=1e-9, atol=1e-9)
    assert per_sample.steps is not None
    assert torch.allclose(per_sample.log_prob, shared.log_prob, atol=1e-6)
