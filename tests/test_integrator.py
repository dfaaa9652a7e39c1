"""The one integrator of the augmented ODE (:func:`flowkit.likelihood.integrate_augmented`).

Closed forms: for ``v(t, x) = a ⊙ x`` (``a`` constant) the state is ``x(t) = e^{a t} x₀``,
the log-determinant ``Δ = t Σ aᵢ``, RNODE's kinetic energy
``∫₀ᵗ ‖v‖² = Σᵢ aᵢ x₀ᵢ² (e^{2aᵢt} − 1) / 2`` and Jacobian norm ``∫₀ᵗ ‖diag(a)‖²_F = t Σ aᵢ²``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flowkit
from flowkit.flow import FieldError, StandardNormal
from flowkit.likelihood import flow_log_likelihood, integrate_augmented
from flowkit.solvers import SolverSpec

TIGHT = SolverSpec("dopri5", rtol=1e-10, atol=1e-10)


def diagonal(*a):
    a = torch.tensor(a, dtype=torch.float64)
    return a, (lambda t, x: x * a)


def test_segments_chain_with_the_closed_form(float64):
    """Two segments of different lengths: the second starts where the first ended, Δ adds up."""
    a1, f1 = diagonal(-0.5, 0.2)
    a2, f2 = diagonal(0.4, -1.0)
    x = torch.randn(4, 2)
    sol = integrate_augmented([(f1, 0.0, 1.0), (f2, 0.0, 0.5)], x, solver=TIGHT)
    torch.testing.assert_close(sol.z, x * torch.exp(a1 + 0.5 * a2), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(sol.delta, torch.full((4,), float(a1.sum() + 0.5 * a2.sum())), atol=1e-8, rtol=0)
    assert sol.kinetic is None and sol.jacobian_norm is None and sol.nfe > 0


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_rnode_integrals_have_their_closed_form(float64, estimator):
    a, f = diagonal(-0.7, 0.3, 0.1)
    x = torch.randn(5, 3)
    sol = integrate_augmented([(f, 0.0, 1.0)], x, solver=TIGHT, regularise=True, estimator=estimator,
                              generator=torch.Generator().manual_seed(0))
    kinetic = (a * x.pow(2) * torch.expm1(2 * a) / 2).sum(1)
    torch.testing.assert_close(sol.kinetic, kinetic, atol=1e-8, rtol=1e-8)
    # Hutchinson's ‖εᵀJ‖² with Rademacher ε is exact for a diagonal J
    torch.testing.assert_close(sol.jacobian_norm, torch.full((5,), float(a.pow(2).sum())), atol=1e-8, rtol=0)


def test_ffjord_loss_is_the_likelihood_of_its_flow():
    """Training and evaluation integrate the same ODE: FFJORD's NLL (two stacked blocks, exact
    trace) is minus the mean of :func:`flow_log_likelihood` of its flow under the same solver."""
    torch.manual_seed(0)
    built = flowkit.build({"data": {"name": "8gaussians"}, "dynamics": {"name": "concatsquash", "hidden": [16]},
                           "objective": {"name": "ffjord", "blocks": 2, "method": "rk4", "steps": 4}})
    obj = built.objective.double().eval()
    x = torch.randn(16, 2, dtype=torch.float64)
    out = obj.loss(x)
    ll = flow_log_likelihood(obj.flow(), x, method="rk4", steps=4)
    assert out.metrics["nfe"] == ll.nfe == 2 * 4 * 4
    torch.testing.assert_close(out.loss.detach(), -ll.log_prob.mean(), atol=1e-12, rtol=1e-12)


class LinearField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()

    def forward(self, t, x):
        return self.lin(x)


def test_evaluations_count_the_adjoint_backward():
    torch.manual_seed(0)
    field = LinearField()
    x = torch.randn(3, 2, dtype=torch.float64)
    solver = SolverSpec("dopri5", rtol=1e-6, atol=1e-6, adjoint=True)
    sol = integrate_augmented([(field, 0.0, 1.0)], x, solver=solver, create_graph=True)
    forward = sol.evaluations()
    assert forward == sol.nfe > 0
    sol.delta.sum().backward()
    assert sol.evaluations() > forward
    # Δ = t tr W for every sample: d(Σ Δ)/dW = 3 I
    torch.testing.assert_close(field.lin.weight.grad, 3 * torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_trust_checks_run_only_when_asked(float64):
    """``trust=True`` (evaluation) refuses a field that mixes samples; training does not pay for the check."""
    mixing = lambda t, x: x - x.mean(0, keepdim=True)  # noqa: E731
    x = torch.randn(6, 2)
    with pytest.raises(FieldError, match="mixes samples"):
        integrate_augmented([(mixing, 0.0, 1.0)], x, solver=TIGHT, trust=True, names=["mixing"])
    integrate_augmented([(mixing, 0.0, 1.0)], x, solver=SolverSpec("rk4", steps=2))  # no check, no error


def test_trust_clamps_time_into_each_segment(float64):
    """The adaptive solver's first-step probe may ask for ``t`` beyond ``t1``: with ``trust`` the
    field sees the nearest time inside its segment only."""
    seen = []

    def field(t, x):
        seen.append(float(t))
        return -x

    integrate_augmented([(field, 0.0, 0.01)], torch.randn(3, 2), solver=TIGHT, trust=True)
    assert max(seen) <= 0.01 and min(seen) >= 0.0
    assert math.isclose(max(seen), 0.01)


def test_prior_of_the_flow_is_not_the_integrators_business(float64):
    """The integrator returns ``z`` and ``Δ``; ``log p = log p(z) + Δ`` is the caller's sum."""
    a, f = diagonal(-1.0, -1.0)
    x = torch.randn(4, 2)
    sol = integrate_augmented([(f, 0.0, 1.0)], x, solver=TIGHT)
    flow = flowkit.Flow(velocity=f, prior=StandardNormal((2,)))
    ll = flow_log_likelihood(flow, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ll.log_prob, StandardNormal((2,)).log_prob(sol.z) + sol.delta, atol=1e-9, rtol=0)
