"""Per-sample step control (issue 15, "Speed, at the defaults"): a batched Dormand–Prince 5(4) in
which every sample has its own time, step size and error test, and finished samples retire."""

from __future__ import annotations

import math

import pytest
import torch

from flowkit.flow import NonFiniteFieldError
from flowkit.solvers import PerSampleTimeField, SolverError, SolverSpec, odeint
from flowkit.solvers_per_sample import DOPRI5, StepLimitError, odeint_per_sample

PER_SAMPLE = SolverSpec(per_sample_norm=True, step_control="per_sample")
# dx/dt = λ_b (1 + cos t) M x: a damped rotation, each sample at its own rate λ_b (stiffness)
M = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]])
RATES = torch.tensor([0.5, 2.0, 8.0, 30.0, 1.0, 0.2])


def linear_field(rates: torch.Tensor, calls: list | None = None) -> PerSampleTimeField:
    def fn(t, x, rows):
        if calls is not None:
            calls.append((t.clone(), rows.clone()))
        lam = rates.to(x.dtype)[rows] * (1 + torch.cos(t))
        return lam[:, None] * (x @ M.to(x.dtype).T)

    return PerSampleTimeField(fn)


def linear_exact(rates: torch.Tensor, x0: torch.Tensor, t0: float, t: float) -> torch.Tensor:
    """x(t) = exp(Λ_b M) x0 with Λ_b = λ_b ∫_{t0}^{t} (1 + cos s) ds (M commutes with itself)."""
    big = rates.double() * ((t - t0) + math.sin(t) - math.sin(t0))
    expm = torch.linalg.matrix_exp(big[:, None, None] * M.double())
    return (expm @ x0.double()[:, :, None])[:, :, 0]


def test_tableau_is_consistent():
    """Row sums of a equal the nodes c; b (the last row) sums to 1 and the error weights to 0."""
    for c, row in zip(DOPRI5["c"][1:], DOPRI5["a"][1:]):
        assert abs(sum(row) - c) < 1e-14
    assert abs(sum(DOPRI5["a"][6]) - 1) < 1e-14 and abs(sum(DOPRI5["e"])) < 1e-15


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_linear_ode_each_sample_within_tolerance_of_the_closed_form(dtype, tol):
    x0 = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0], [-1.0, 1.0], [0.0, 3.0], [1.0, 1.0]], dtype=dtype)
    times = [0.0, 0.4, 1.0]
    spec = SolverSpec(rtol=tol, atol=tol, per_sample_norm=True, step_control="per_sample")
    sol = odeint(linear_field(RATES), x0, times, spec)
    assert sol.step_control == "per_sample" and sol.ys.shape == (3, 6, 2) and sol.ys.dtype == dtype
    errors = torch.stack([(sol.ys[i].double() - linear_exact(RATES, x0, 0.0, t)).abs().amax(1)
                          for i, t in enumerate(times)])
    scale = tol * (1 + torch.stack([linear_exact(RATES, x0, 0.0, t).abs().amax(1) for t in times]))
    assert bool((errors <= 10 * scale).all()), errors / scale
    # as accurate as torchdiffeq's dopri5 with shared steps and the per-sample norm, sample by sample
    shared = odeint(lambda t, x: (RATES.to(dtype) * (1 + torch.cos(t)))[:, None] * (x @ M.to(dtype).T), x0, times,
                    SolverSpec(rtol=tol, atol=tol, per_sample_norm=True))
    ref = torch.stack([(shared.ys[i].double() - linear_exact(RATES, x0, 0.0, t)).abs().amax(1)
                       for i, t in enumerate(times)])
    assert float(errors.max()) <= 5 * float(ref.max()) + 2 * float(scale.max())


def test_easy_samples_take_fewer_steps_and_retire(float64):
    """One hard sample among easy ones: with shared steps every sample pays the hard one's steps."""
    rates = torch.tensor([40.0] + [0.3] * 15)
    x0 = torch.ones(16, 2)
    calls: list = []
    sol = odeint(linear_field(rates, calls), x0, [0.0, 2.0], PER_SAMPLE)
    steps = sol.accepted + sol.rejected
    assert int(steps[0]) > 3 * int(steps[1:].max()), steps
    assert len(set(steps.tolist())) > 1
    # counts are exact: one call per stage, the rows of each call summed
    assert sol.nfe == len(calls) and sol.sample_evals == sum(len(rows) for _, rows in calls)
    assert sol.sample_evals < 16 * 6 * int(steps.max())  # far below B x (max steps) x stages
    assert sol.sample_evals == 2 * 16 + 6 * int(steps.sum())  # f(t0), the initial-step probe, 6 per trial
    # the finished samples left the batch: later calls get only the hard sample
    assert calls[-1][1].tolist() == [0] and len(calls[0][1]) == 16
    shared = odeint(linear_field(rates), x0, [0.0, 2.0], SolverSpec(per_sample_norm=True, step_control="batch"))
    assert shared.step_control == "batch" and sol.sample_evals < shared.sample_evals / 4
    err = (sol.ys[-1] - linear_exact(rates, x0, 0.0, 2.0)).abs().max()
    assert float(err) < 1e-4


def test_each_sample_lands_exactly_on_the_times_and_never_leaves_the_interval(float64):
    """Decreasing time, several output times: every evaluation lies in [t_end, t_start]."""
    calls: list = []
    x0 = torch.randn(6, 2)
    times = [1.0, 0.7, 0.25, 0.0]
    rates = RATES.clamp(max=3.0)  # backwards in time the damping becomes growth
    sol = odeint(linear_field(rates, calls), x0, times, PER_SAMPLE)
    all_t = torch.cat([t for t, _ in calls])
    assert float(all_t.min()) >= 0.0 and float(all_t.max()) <= 1.0
    for i, t in enumerate(times):
        assert torch.allclose(sol.ys[i], linear_exact(rates, x0, 1.0, t), rtol=1e-4, atol=1e-4)
    assert torch.equal(sol.ys[0], x0)


def test_a_sample_result_does_not_depend_on_its_batch(float64):
    """Per-sample steps: a sample solved alone or beside others gets the same steps and result."""
    x0 = torch.randn(6, 2)
    together = odeint(linear_field(RATES), x0, [0.0, 1.0], PER_SAMPLE)
    for b in (0, 3):
        alone = odeint(linear_field(RATES[b:b + 1]), x0[b:b + 1], [0.0, 1.0], PER_SAMPLE)
        assert torch.equal(alone.ys[-1, 0], together.ys[-1, b])
        assert int(alone.accepted[0]) == int(together.accepted[b])


def test_nan_in_one_sample_is_reported_by_sample(float64):
    def fn(t, x, rows):
        out = -x.clone()
        out[(rows == 3) & (t > 0.5)] = float("nan")
        return out

    with pytest.raises(NonFiniteFieldError, match=r"^model returned NaN or inf for 1 of 5 samples at t=0\.5 during "
                                                  r"the solve.*\(first bad samples: 3\)"):
        odeint(PerSampleTimeField(fn, name="model"), torch.ones(5, 2), [0.0, 1.0], PER_SAMPLE)

    def at_start(t, x, rows):
        return torch.where((rows == 1)[:, None], torch.full_like(x, float("inf")), -x)

    with pytest.raises(NonFiniteFieldError, match="initial state for 1 of 5 samples .*samples 1\\)"):
        odeint(PerSampleTimeField(at_start), torch.ones(5, 2), [0.0, 1.0], PER_SAMPLE)


def test_a_nan_that_a_smaller_step_avoids_is_not_an_error(float64):
    """A trial step that meets NaN is rejected and retried smaller, for that sample only."""
    def fn(t, x, rows):  # finite on the trajectory x = exp(-t) > 0.3, NaN below 0.2
        return torch.where(x < 0.2, torch.full_like(x, float("nan")), -x)

    sol = odeint(PerSampleTimeField(fn), torch.ones(3, 1), [0.0, 1.0],
                 SolverSpec(rtol=1e-3, atol=1e-3, per_sample_norm=True, step_control="per_sample"))
    assert torch.allclose(sol.ys[-1], torch.full((3, 1), math.exp(-1)), atol=1e-3)


def test_max_steps_is_honoured_per_sample(float64):
    rates = torch.tensor([0.1, 300.0])
    spec = SolverSpec(rtol=1e-8, atol=1e-8, per_sample_norm=True, step_control="per_sample", max_steps=20)
    with pytest.raises(StepLimitError,
                       match=r"1 of 2 samples did not reach the end within max_steps=20 trial steps \(samples 1, at t="):
        odeint(linear_field(rates), torch.ones(2, 2), [0.0, 1.0], spec)
    ok = odeint(linear_field(rates[:1]), torch.ones(1, 2), [0.0, 1.0], spec)
    assert int(ok.accepted[0] + ok.rejected[0]) <= 20


def test_backward_is_refused_clearly_and_no_grad_works():
    class Net(torch.nn.Module):  # a field module: its parameters are the field's
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, t, x, rows):
            return self.lin(x)

    field = PerSampleTimeField(Net())
    net = field.fn.lin
    x = torch.randn(3, 2)
    with pytest.raises(SolverError, match="not differentiable .*torch.no_grad\\(\\), or use step_control='batch'"):
        odeint(field, x, [0.0, 1.0], PER_SAMPLE)
    with pytest.raises(SolverError, match="not differentiable"):
        odeint(PerSampleTimeField(lambda t, x, rows: -x), x.requires_grad_(True), [0.0, 1.0], PER_SAMPLE)
    with torch.no_grad():
        sol = odeint(field, x.detach(), [0.0, 1.0], PER_SAMPLE)
    assert not sol.ys.requires_grad and sol.step_control == "per_sample"
    # auto: the same field under grad mode takes shared steps, which backpropagate
    shared = odeint(field, x.detach(), [0.0, 1.0], SolverSpec(per_sample_norm=True, step_control="batch"))
    shared.ys[-1].sum().backward()
    assert net.weight.grad is not None


# ----------------------------------------------------------------------------- selection through the spec

@pytest.mark.parametrize("settings,message", [
    (dict(step_control="fast"), "step_control: 'fast' is not one of: auto, batch, per_sample"),
    (dict(step_control="per_sample"), "step_control: 'per_sample' tests each sample's own error: it needs "
                                      "per_sample_norm: true"),
    (dict(step_control="per_sample", per_sample_norm=True, method="bosh3"), "implemented for dopri5 only"),
    (dict(step_control="per_sample", per_sample_norm=True, adjoint=True), "excludes adjoint: true"),
])
def test_step_control_settings_are_validated(settings, message):
    with pytest.raises(SolverError, match=message):
        SolverSpec(**settings)


def test_auto_uses_per_sample_steps_only_for_declared_fields(float64):
    x0 = torch.ones(4, 2)
    plain = odeint(lambda t, x: -x, x0, [0.0, 1.0], SolverSpec(per_sample_norm=True))
    assert plain.step_control == "batch" and plain.accepted is None and plain.sample_evals == plain.nfe * 4
    declared = odeint(PerSampleTimeField(lambda t, x, rows: -x), x0, [0.0, 1.0], SolverSpec(per_sample_norm=True))
    assert declared.step_control == "per_sample"
    # a spec that cannot step per sample (batch norm, another method) shares steps, also for a declared field
    for spec in (SolverSpec(), SolverSpec(method="bosh3", per_sample_norm=True), SolverSpec("rk4", steps=4)):
        sol = odeint(PerSampleTimeField(lambda t, x, rows: -x * (1 + 0 * rows[:, None])), x0, [0.0, 1.0], spec)
        assert sol.step_control == "batch"
        assert torch.allclose(sol.ys[-1], torch.full_like(x0, math.exp(-1)), atol=1e-4)
    with pytest.raises(SolverError, match="needs a field that takes per-sample times"):
        odeint(lambda t, x: -x, x0, [0.0, 1.0], PER_SAMPLE)
