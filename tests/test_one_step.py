"""One-step and few-step models: consistency training / distillation, MeanFlow, the flow-map sampler.

Closed forms: data ``N(0, s² I)``. On the ``cond_ot`` path the marginal is ``N(0, V_t I)``,
``V_t = (1 − t)² s² + t²``, the probability-flow ODE is ``x_τ = x_t sqrt(V_τ / V_t)``, so the
average velocity is ``u(x, r, t) = x (1 − sqrt(V_r / V_t)) / (t − r)``. On the VE path
``V_t = s² + σ_t²`` and the exact consistency function is ``f*(x, t) = x sqrt(V_{t0} / V_t)``.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import Tensor, nn

import flowkit
from flowkit.dynamics.mlp import MLP
from flowkit.flow import Flow, StandardNormal
from flowkit.metrics import energy_distance
from flowkit.objectives import NoDensityError, require_density
from flowkit.objectives.consistency import (ConsistencyDistillation, ConsistencyTraining, karras_levels,
                                            lognormal_index_probabilities, scales_at)
from flowkit.objectives.meanflow import MeanFlow
from flowkit.paths import VE, VP, CondOT
from flowkit.samplers.flow_map import flow_map

S = 0.7  # data standard deviation


def _mlp(**kw) -> nn.Module:
    return MLP(dim=2, hidden=[16], **kw)


# ------------------------------------------------------------------------------ MeanFlow
def _var_ot(t: Tensor) -> Tensor:
    return (1 - t) ** 2 * S**2 + t**2


def _exact_velocity(t: Tensor, x: Tensor) -> Tensor:
    dv = -2 * (1 - t) * S**2 + 2 * t
    return (dv / (2 * _var_ot(t))).reshape(-1, 1) * x


class ExactAverageVelocity(nn.Module):
    """``u(x, r, t)`` of Gaussian data on ``cond_ot`` in MeanFlow's network convention:
    ``forward(t, x, cond)`` with ``cond = t − r`` (NaN, or no condition, for ``r = t``)."""

    def forward(self, t: Tensor, x: Tensor, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        h = torch.zeros_like(t) if cond is None else torch.nan_to_num(cond[:, 0], nan=0.0)
        r = t - h
        safe = torch.where(h > 0, h, torch.ones_like(h))
        average = (1 - torch.sqrt(_var_ot(r) / _var_ot(t))) / safe
        dv = -2 * (1 - t) * S**2 + 2 * t
        return torch.where(h > 0, average, dv / (2 * _var_ot(t))).reshape(-1, 1) * x


def _exact_meanflow() -> MeanFlow:
    return MeanFlow(lambda **kw: ExactAverageVelocity(), (2,), path=CondOT())


def test_meanflow_closed_form_average_velocity_is_the_mean_of_the_velocity(float64):
    # the closed form used below: (1/(t − r)) ∫_r^t v(x_τ, τ) dτ along the exact trajectory
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    r, t = 0.2, 0.9
    taus = torch.linspace(r, t, 4001)
    traj = x * torch.sqrt(_var_ot(taus) / _var_ot(torch.tensor(t))).reshape(-1, 1, 1)  # [τ, batch, 2]
    rate = (-2 * (1 - taus) * S**2 + 2 * taus) / (2 * _var_ot(taus))
    quad = torch.trapezoid(rate.reshape(-1, 1, 1) * traj, taus, dim=0) / (t - r)
    u = ExactAverageVelocity()(torch.tensor(t), x, torch.full((4, 1), t - r))
    assert torch.allclose(quad, u, atol=1e-7)


def test_meanflow_jvp_target_equals_the_exact_average_velocity(float64):
    # at the fixed point u_θ = u, the MeanFlow identity's target v − (t − r) du/dt (one JVP, tangent
    # (v, 1)) is u itself; a wrong sign, tangent or time convention moves it by O(t − r)
    obj = _exact_meanflow()
    g = torch.Generator().manual_seed(1)
    n = 64
    t = 0.05 + 0.9 * torch.rand(n, generator=g)
    r = t * torch.rand(n, generator=g)
    r[:8] = t[:8]  # r = t: the target is the velocity
    z = torch.randn(n, 2, generator=g)
    v = _exact_velocity(t, z)
    u, target = obj.target(z, v, r, t)
    exact = ExactAverageVelocity()(t, z, (t - r).unsqueeze(-1))
    assert torch.allclose(u, exact, atol=1e-12)
    assert torch.allclose(target, exact, atol=1e-10), (target - exact).abs().max()
    assert torch.allclose(target[:8], v[:8], atol=1e-12)
    assert not torch.allclose(u[8:], v[8:], atol=1e-3)  # the interval terms are really there
    assert not target.requires_grad


def test_meanflow_flow_map_and_velocity_of_the_exact_model(float64):
    flow = _exact_meanflow().flow()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    t, s = torch.full((5,), 0.8), torch.full((5,), 0.3)
    exact = x * torch.sqrt(_var_ot(s) / _var_ot(t)).unsqueeze(-1)  # the ODE's own map
    assert torch.allclose(flow.flow_map(x, t, s), exact, atol=1e-12)
    assert torch.allclose(flow.velocity(t, x), _exact_velocity(t, x), atol=1e-12)
    assert type(_exact_meanflow()).defines_density  # u(z, t, t) is a CNF's field


# ------------------------------------------------------------------------------ consistency
def _var_ve(path: VE, t: Tensor) -> Tensor:
    return S**2 + path.sigma(t) ** 2


class ExactConsistencyNet(nn.Module):
    """The ``F`` for which ``f_θ = f*`` (Gaussian data, VE path), solved from the parameterisation."""

    def __init__(self, obj: ConsistencyTraining) -> None:
        super().__init__()
        self.obj = [obj]  # not a submodule

    def forward(self, t: Tensor, inp: Tensor, cond: Tensor | None = None) -> Tensor:
        obj = self.obj[0]
        path, sd = obj.path, obj.sigma_data
        s = path.sigma(t).reshape(-1, 1)
        x = inp * torch.sqrt(s**2 + sd**2)  # α = 1
        t0 = torch.tensor(path.t0, dtype=inp.dtype)
        f = x * torch.sqrt(_var_ve(path, t0) / _var_ve(path, t)).reshape(-1, 1)
        gap = s - path.sigma(t0)
        skip = sd**2 / (gap**2 + sd**2)
        out = sd * gap / torch.sqrt(sd**2 + s**2)
        return torch.where(out > 0, (f - skip * x) / torch.where(out > 0, out, torch.ones_like(out)), 0 * x)


class _GivenTeacher:
    """A :class:`~flowkit.objectives.consistency.TeacherFlow` holding a flow."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def teacher_flow(self, device: torch.device) -> tuple[Flow, bool]:
        return self.flow, False


def _exact_ve_flow(path: VE) -> Flow:
    def velocity(t, x, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return (path.sigma(t) * path.d_sigma(t) / _var_ve(path, t)).reshape(-1, 1) * x

    return Flow(velocity=velocity, prior=StandardNormal((2,), path.sigma_max), path=path)


@pytest.mark.parametrize("path", [VE(), VP(), CondOT(sigma_min=0.01, t1=0.99)], ids=["ve", "vp", "cond_ot"])
def test_consistency_boundary_condition_holds_exactly(path, float64):
    torch.manual_seed(0)
    obj = ConsistencyTraining(_mlp, (2,), path=path, sigma_data=0.5)
    x = torch.randn(6, 2)
    f = obj.consistency(x, torch.full((6,), path.t0))
    if isinstance(path, VE):
        assert torch.equal(f, x)  # c_skip = 1 and c_out = 0 in floating point too
    assert torch.allclose(f, x, atol=1e-12, rtol=0)
    assert torch.allclose(obj.flow_map(x, torch.full((6,), 0.7), path.t0), obj.consistency(x, 0.7), atol=1e-12)
    # the flow map is the identity at s = t and the model is not trivially the identity elsewhere
    assert torch.allclose(obj.flow_map(x, 0.7, 0.7), x, atol=1e-10)
    assert not torch.allclose(obj.consistency(x, 0.7), x, atol=1e-3)


def test_consistency_distillation_target_of_the_exact_consistency_function_is_itself(float64):
    path = VE(sigma_min=0.002, sigma_max=5.0)

    def residual(method: str, h: float) -> float:
        obj = ConsistencyDistillation(_mlp, (2,), teacher="exact", path=path, method=method, sigma_data=0.5)
        obj.net = ExactConsistencyNet(obj)
        obj.attach_teacher(_GivenTeacher(_exact_ve_flow(path)))
        x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
        t_hi = torch.full((32,), 0.6)
        x_hi = path.sample(x, t_hi, torch.randn(32, 2, generator=torch.Generator().manual_seed(4)))
        x_lo = obj.teacher_step(x_hi, t_hi, t_hi - h, None)
        return float((obj.consistency(x_hi, t_hi) - obj.consistency(x_lo, t_hi - h)).abs().max())

    assert residual("rk4", 0.01) < 1e-8
    ratios = [residual("euler", h) / residual("euler", h / 2) for h in (0.04, 0.02)]
    assert all(3.5 < q < 4.5 for q in ratios), ratios  # an Euler step's local error, O(h²)


def test_consistency_training_target_is_the_distillation_target_to_second_order(float64):
    # Song et al. 2023, Thm. 2: with one noise for x_{i+1} and x_i, E[f*(x_i) | x_{i+1}] is the exact
    # ODE step's f*(x̂_i) = f*(x_{i+1}) up to O(Δσ²); here the regression coefficient of f*(x_i) on x_{i+1}
    path = VE(sigma_min=0.002, sigma_max=5.0)
    obj = ConsistencyTraining(_mlp, (2,), path=path)
    g = torch.Generator().manual_seed(5)
    n = 400_000
    x = S * torch.randn(n, 2, generator=g)
    t_hi, t_lo = torch.full((n,), 0.55), torch.full((n,), 0.54)
    torch.manual_seed(6)
    x_hi, x_lo = obj.pair(x, torch.randn(n, 2, generator=g), t_hi, t_lo, None)
    t0 = torch.tensor(path.t0)
    k = lambda t: math.sqrt(float(_var_ve(path, t0) / _var_ve(path, torch.tensor(t))))  # noqa: E731
    beta = float((k(0.54) * x_lo * x_hi).sum() / (x_hi * x_hi).sum())
    assert abs(beta - k(0.55)) < 3e-3 * k(0.55), (beta, k(0.55))
    # with independent noise the target would regress to k(t_i) s²/V(t_{i+1}), far from it
    assert abs(k(0.54) * S**2 / float(_var_ve(path, torch.tensor(0.55))) - k(0.55)) > 0.03 * k(0.55)


def test_improved_training_choices_match_their_definitions(float64):
    # curriculum (Song & Dhariwal 2023, eq. 8): K = 400k, s0 = 10, s1 = 1280 → K' = 50k
    assert [scales_at(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)] == \
        [11, 11, 21, 41, 641, 1281, 1281]
    levels = karras_levels(0.002, 80.0, 11)
    assert levels[0] == 0.002 and abs(float(levels[-1]) - 80.0) < 1e-12
    rho = 7.0
    assert torch.allclose(levels ** (1 / rho), torch.linspace(0.002 ** (1 / rho), 80 ** (1 / rho), 11))
    p = lognormal_index_probabilities(levels)
    cdf = [0.5 * (1 + math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))) for s in levels.tolist()]
    expected = torch.tensor([b - a for a, b in zip(cdf[:-1], cdf[1:])])
    assert torch.allclose(p, expected / expected.sum(), atol=1e-12)
    # the grid's times are where σ_t / α_t takes the levels (VP: bisection, not a closed form)
    obj = ConsistencyTraining(_mlp, (2,), path=VP(), start_scales=5, end_scales=5)
    lv, times, _ = obj.grid(5)
    assert torch.allclose(VP().sigma(times) / VP().alpha(times), lv, rtol=1e-9)
    # pseudo-Huber: c = 0.00054 sqrt(d); ≈ ‖Δ‖ far away, ≈ ‖Δ‖²/(2c) near zero
    assert obj.huber_c == pytest.approx(0.00054 * math.sqrt(2))
    a, b = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    assert float(obj.distance(a, b)) == pytest.approx(math.sqrt(25 + obj.huber_c**2) - obj.huber_c)


def test_consistency_training_has_no_gradient_through_the_target(float64):
    torch.manual_seed(0)
    obj = ConsistencyTraining(_mlp, (2,), curriculum_steps=10)
    x = torch.randn(16, 2)
    torch.manual_seed(1)
    obj.loss(x).loss.backward()
    full = [p.grad.clone() for p in obj.parameters()]
    obj.zero_grad()
    # the same draws, the target computed apart and detached: the same gradient (stop-grad, iCT)
    torch.manual_seed(1)
    n = obj.scales()
    levels, times, p = obj.grid(n)
    i = torch.multinomial(p, 16, replacement=True)
    t_lo, t_hi = times[i], times[i + 1]
    x_hi, x_lo = obj.pair(x, torch.randn_like(x), t_hi, t_lo, None)
    target = obj.consistency(x_lo, t_lo).detach()
    loss = ((1 / (levels[i + 1] - levels[i])) * obj.distance(obj.consistency(x_hi, t_hi), target)).mean()
    loss.backward()
    for a, b in zip(full, (p.grad for p in obj.parameters())):
        assert torch.allclose(a, b, atol=1e-12)
    obj.after_step(7)
    assert int(obj.step) == 7 and obj.state_dict()["step"] == 7  # the curriculum resumes


# ------------------------------------------------------------------------------ sampler
def test_flow_map_sampler_on_exact_models_gives_the_data_law(float64):
    path = VE(sigma_min=0.002, sigma_max=5.0)
    obj = ConsistencyTraining(_mlp, (2,), path=path, sigma_data=0.5)
    obj.net = ExactConsistencyNet(obj)
    flow = obj.flow()
    z = flow.prior.sample(20_000, generator=torch.Generator().manual_seed(0))
    z = z * math.sqrt(float(_var_ve(path, torch.tensor(1.0)))) / path.sigma_max  # the exact marginal at t1
    std0 = math.sqrt(float(_var_ve(path, torch.tensor(0.0))))
    for options in ({"steps": 1}, {"steps": 3, "renoise": True, "seed": 7}):
        res = flow_map(flow, z, **options)
        assert res.nfe == options["steps"]
        assert (res.x.std(0) - std0).abs().max() < 0.02, (options, res.x.std(0))
    mf = _exact_meanflow().flow()
    z = mf.prior.sample(20_000, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2, 5):
        res = flow_map(mf, z, steps=steps)
        assert res.nfe == steps and torch.allclose(res.x, z * S, atol=1e-10)  # V_0 = s², V_1 = 1


def test_flow_map_sampler_refuses_renoise_without_a_path():
    flow = Flow(velocity=None, prior=StandardNormal((2,)), flow_map=lambda x, t, s, cond=None: x)
    with pytest.raises(ValueError, match="renoise"):
        flow_map(flow, torch.zeros(2, 2), steps=2, renoise=True)


# ------------------------------------------------------------------------------ density
def test_consistency_model_declares_no_density_and_nll_is_refused():
    obj = ConsistencyTraining(_mlp, (2,))
    assert type(obj).defines_density is False and ConsistencyDistillation.defines_density is False
    assert obj.flow().velocity is None  # nothing an NLL could integrate
    with pytest.raises(NoDensityError, match="flowkit nll: ConsistencyTraining defines no density"):
        require_density(obj, by="flowkit nll")
    require_density(MeanFlow(_mlp, (2,)), by="flowkit nll")  # MeanFlow's r = t field is a CNF


# ------------------------------------------------------------------------------ training
def _train_one_step_quality(obj: nn.Module, steps: int, lr: float = 2e-3) -> tuple[float, float, float]:
    ds = flowkit.DATASETS.build("8gaussians")
    ref, _ = ds.test_set(1000, seed=1)

    def quality() -> float:
        obj.eval()
        flow = obj.flow()
        z = flow.prior.sample(1000, generator=torch.Generator().manual_seed(0))
        obj.train()
        return energy_distance(flow_map(flow, z, steps=1).x, ref)

    before = quality()
    opt = torch.optim.Adam(obj.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for k in range(steps):
        x, _ = ds.train_batch(128, g)
        loss = obj.loss(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(k + 1)
    per_step = (time.perf_counter() - start) / steps
    return before, quality(), per_step


def test_consistency_training_one_step_samples_beat_the_untrained_model():
    torch.manual_seed(0)
    obj = ConsistencyTraining(lambda: MLP(dim=2, hidden=[32, 32]), (2,), path=VE(sigma_min=0.002, sigma_max=20.0),
                              sigma_data=2.0, start_scales=10, end_scales=40, curriculum_steps=300)
    before, after, _ = _train_one_step_quality(obj, 300, lr=3e-3)
    assert after < 0.2 * before, (before, after)


def test_meanflow_one_step_samples_beat_the_untrained_model():
    torch.manual_seed(0)
    obj = MeanFlow(lambda **kw: MLP(dim=2, hidden=[32, 32], **kw), (2,))
    before, after, _ = _train_one_step_quality(obj, 200)
    assert after < 0.5 * before, (before, after)
