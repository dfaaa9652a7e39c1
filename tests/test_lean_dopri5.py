"""flowkit's lean shared-step dopri5 (flowkit/dopri5.py): closed forms, torchdiffeq's step control, autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from flowkit.dopri5 import StepSizeUnderflow, dopri5
from flowkit.solvers import SolverSpec, odeint, per_sample_rms_norm

D = torch.float64  # the closed-form checks run in double precision (set per tensor: no global default)


def _linear_problem():
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=D)  # a damped rotation: y(t) = exp(tA) y0
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7], [2.0, 1.0]], dtype=D)
    return a, y0


def test_linear_system_matches_the_matrix_exponential_in_both_directions():
    a, y0 = _linear_problem()
    sol = dopri5(lambda t, y: y @ a.T, y0, [0.0, 0.5, 1.5], rtol=1e-9, atol=1e-9)
    for i, t in enumerate((0.0, 0.5, 1.5)):
        exact = y0 @ torch.linalg.matrix_exp(t * a).T
        assert torch.allclose(sol.ys[i], exact, atol=1e-7), (t, (sol.ys[i] - exact).abs().max())
    back = dopri5(lambda t, y: y @ a.T, sol.ys[-1], [1.5, 0.0], rtol=1e-9, atol=1e-9)
    assert torch.allclose(back.ys[-1], y0, atol=1e-6)


def test_same_steps_and_result_as_torchdiffeq():
    """The same step-size control as torchdiffeq's dopri5: the same NFE, results within the tolerance."""
    a, y0 = _linear_problem()

    def field(t, y):
        return torch.tanh(y @ a.T) * (1 + t)

    for rtol, norm in ((1e-5, None), (1e-7, None), (1e-5, per_sample_rms_norm())):
        calls = [0]

        def counted(t, y):
            calls[0] += 1
            return field(t, y)

        times = torch.tensor([0.0, 2.0], dtype=D)
        ref = torchdiffeq.odeint(counted, y0, times, rtol=rtol, atol=rtol, method="dopri5",
                                 options={"step_t": times[1:], **({"norm": norm} if norm else {})})
        ours = dopri5(field, y0, [0.0, 2.0], rtol=rtol, atol=rtol, norm=norm)
        assert ours.nfe == calls[0], (rtol, ours.nfe, calls[0])
        assert torch.allclose(ours.ys[-1], ref[-1], atol=10 * rtol)


def test_gradient_through_the_solve_is_the_closed_form():
    """y' = −k y: y(1) = exp(−k), dy(1)/dk = −exp(−k), by autograd through the accepted steps."""
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    sol = dopri5(lambda t, y: -k * y, torch.ones(4, 1, dtype=D), [0.0, 1.0], rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(sol.ys[-1].sum(), k)
    assert abs(sol.ys[-1, 0, 0].item() - math.exp(-0.7)) < 1e-8
    assert abs(grad.item() + 4 * math.exp(-0.7)) < 1e-7


def test_odeint_runs_the_lean_solver_for_shared_step_dopri5():
    calls = [0]

    def field(t, y):
        calls[0] += 1
        return -y

    sol = odeint(field, torch.ones(2, 1, dtype=D), [0.0, 1.0], SolverSpec("dopri5", rtol=1e-6, atol=1e-6))
    lean = dopri5(lambda t, y: -y, torch.ones(2, 1, dtype=D), [0.0, 1.0], rtol=1e-6, atol=1e-6)
    assert sol.nfe == lean.nfe == calls[0] and torch.equal(sol.ys, lean.ys)


def test_a_nan_field_is_an_underflow_and_max_steps_is_honoured():
    with pytest.raises(StepSizeUnderflow, match="underflow in dt|non-finite"):
        dopri5(lambda t, y: y * torch.where(t > 0.5, math.nan, 1.0), torch.ones(2, 1, dtype=D), [0.0, 1.0])
    with pytest.raises(AssertionError, match="max_num_steps"):
        dopri5(lambda t, y: -50 * y, torch.ones(1, 1, dtype=D), [0.0, 10.0], rtol=1e-10, atol=1e-10, max_steps=3)


def test_per_sample_norm_takes_the_hardest_samples_steps():
    """One fast sample among slow ones: the batch RMS lets it hide, the per-sample norm does not."""
    rate = torch.tensor([[1.0]] * 99 + [[30.0]], dtype=D)
    rms = dopri5(lambda t, y: -rate * y, torch.ones(100, 1, dtype=D), [0.0, 1.0], rtol=1e-6, atol=1e-6)
    worst = dopri5(lambda t, y: -rate * y, torch.ones(100, 1, dtype=D), [0.0, 1.0], rtol=1e-6, atol=1e-6,
                   norm=per_sample_rms_norm())
    assert worst.nfe > rms.nfe
    assert abs(worst.ys[-1, -1, 0].item() - math.exp(-30)) < abs(rms.ys[-1, -1, 0].item() - math.exp(-30))
