"""Few-step samplers and schedules against closed forms (flowkit.samplers.semilinear / schedules).

The problem: a 2-D Gaussian mixture whose data prediction ``E[x_data | x_t]`` and score are exact
at every ``t`` (posterior mean of each component, weighted by the responsibilities), under the VP
and VE diffusions and the straight flow-matching path ``cond_ot``. The flow's velocity is
``v = α̇ x̂₀ + σ̇ ε̂`` with ``ε̂ = −σ s``, finite at both ends of every path (``α = 0`` at
``cond_ot``'s ``t1``, ``σ = 0`` at its ``t0``), and the flow carries only ``velocity`` and
``path`` — what the samplers declare they need.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import exact_mixture
from torch import Tensor

import flowkit
from flowkit.flow import Flow
from flowkit.gmm import GaussianMixture
from flowkit.paths import VE, VP, CondOT, GaussianPath
from flowkit.recipe import RecipeError
from flowkit.samplers.ode_samplers import dopri5
from flowkit.samplers.schedules import SCHEDULES, log_snr, sampling_grid, schedule_times

F64 = torch.float64
DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "edm_heun")
PATHS = {"vp": (VP, "logsnr"), "ve": (VE, "logsnr"), "cond_ot": (CondOT, "uniform")}


def mixture() -> GaussianMixture:
    return exact_mixture(2, (0.25, 0.45, 0.3), spread=0.8, cov_scale=0.3, cov_floor=0.4)


def exact_flow(path: GaussianPath, gmm: GaussianMixture) -> Flow:
    """The mixture's probability-flow ODE on ``path``, exact at every ``t`` in ``[t0, t1]``."""

    def velocity(t: Tensor, x: Tensor, cond=None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype)
        alpha, sigma, d_alpha, d_sigma = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
        covs = alpha**2 * gmm.covs + sigma**2 * torch.eye(2, dtype=x.dtype)  # [K, D, D]
        diff = x[:, None, :] - alpha * gmm.means  # [N, K, D]
        solved = torch.linalg.solve(covs, diff.unsqueeze(-1)).squeeze(-1)  # C_k⁻¹ (x − α μ_k)
        resp = torch.softmax(gmm.weights.log() - 0.5 * (diff * solved).sum(-1) - 0.5 * torch.logdet(covs), -1)
        post = gmm.means + alpha * torch.einsum("kij,nkj->nki", gmm.covs, solved)  # E[x_data | x, k]
        x0 = (resp[..., None] * post).sum(1)
        eps = sigma * (resp[..., None] * solved).sum(1)  # −σ s
        return d_alpha * x0 + d_sigma * eps

    return Flow(velocity=velocity, prior=path.prior((2,)), t0=path.t0, t1=path.t1, path=path)


@functools.lru_cache(maxsize=None)
def reference(path_name: str) -> tuple[Flow, Tensor, Tensor]:
    """``(flow, x1, dopri5 endpoint at rtol = atol = 1e-8)`` for 8 prior samples (float64)."""
    flow = exact_flow(PATHS[path_name][0](), mixture())
    x1 = flow.prior.sample(8, generator=torch.Generator().manual_seed(1), dtype=F64)
    return flow, x1, dopri5(flow, x1, rtol=1e-8, atol=1e-8).x


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solver_converges_to_dopri5_at_its_declared_order(name, path_name):
    """Halving the step divides the endpoint error by ≈ 2^order (32 → 64 → 128 steps).

    On ``cond_ot`` the first step leaves ``α = 0`` and the last lands on ``σ = 0``: those steps are
    the closed-form constant-x̂₀ steps (error ``O(Δt²)`` each), so UniPC's order 3 becomes 2 there.
    """
    flow, x1, exact = reference(path_name)
    sampler = flowkit.SAMPLERS.get(name)
    order = sampler.order if path_name != "cond_ot" else min(sampler.order, 2)
    steps = (32, 64, 128)
    errors = []
    for n in steps:
        res = sampler(flow, x1, steps=n, schedule=PATHS[path_name][1], final="t0")
        assert res.nfe == (n if name != "edm_heun" else 2 * n - (path_name == "cond_ot") * 2)
        errors.append(float((res.x - exact).abs().max()))
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(m > order - 1 for m in measured), f"{name} on {path_name}: errors {errors}, orders {measured}"
    # about the declared order (dpmpp_3m as published: second-order steps, declared 2)
    assert order - 0.5 <= measured[-1] <= order + 1, \
        f"{name} on {path_name}: errors {errors}, orders {measured}, declared {order}"


def test_dpmpp_2m_is_ddim_plus_the_published_correction():
    """Lu et al. 2022b, Alg. 2, written out by hand for two steps on VP."""
    flow, x1, _ = reference("vp")
    grid = sampling_grid(flow.path, 2, "logsnr", final="t0")
    (t0_, t1_, t2_), (a0, a1, a2), (s0, s1, s2), (l0, l1, l2) = grid.t, grid.alpha, grid.sigma, grid.log_snr

    def x0(t, x):
        c = flow.path.schedule(torch.tensor(t, dtype=F64))
        return (c.d_sigma * x - c.sigma * flow.velocity(torch.tensor(t, dtype=F64), x)) / c.det

    m0 = x0(t0_, x1)
    x_1 = s1 / s0 * x1 - a1 * math.expm1(-(l1 - l0)) * m0
    m1 = x0(t1_, x_1)
    h, r = l2 - l1, (l1 - l0) / (l2 - l1)
    d = (1 + 1 / (2 * r)) * m1 - 1 / (2 * r) * m0
    x_2 = s2 / s1 * x_1 - a2 * math.expm1(-h) * d
    res = flowkit.SAMPLERS.get("dpmpp_2m")(flow, x1, steps=2, schedule="logsnr", final="t0")
    assert torch.allclose(res.x, x_2, rtol=1e-12, atol=1e-12) and res.nfe == 2


def test_dpmpp_3m_is_the_published_formula():
    """Lu et al. 2022b, App. B (the φ-form of the reference code), written out by hand for three
    steps on VP: a DDIM step, the 2M step, then ``−α φ1 m0 + α φ2 D1 − α φ3 D2``."""
    flow, x1, _ = reference("vp")
    grid = sampling_grid(flow.path, 3, "logsnr", final="t0")
    t, a, s, lam = grid.t, grid.alpha, grid.sigma, grid.log_snr

    def x0(tt, x):
        c = flow.path.schedule(torch.tensor(tt, dtype=F64))
        return (c.d_sigma * x - c.sigma * flow.velocity(torch.tensor(tt, dtype=F64), x)) / c.det

    m0 = x0(t[0], x1)
    x = s[1] / s[0] * x1 - a[1] * math.expm1(-(lam[1] - lam[0])) * m0
    m1 = x0(t[1], x)
    h, r = lam[2] - lam[1], (lam[1] - lam[0]) / (lam[2] - lam[1])
    x = s[2] / s[1] * x - a[2] * math.expm1(-h) * ((1 + 1 / (2 * r)) * m1 - 1 / (2 * r) * m0)
    m2 = x0(t[2], x)
    h = lam[3] - lam[2]
    r0, r1 = (lam[2] - lam[1]) / h, (lam[1] - lam[0]) / h
    d10, d11 = (m2 - m1) / r0, (m1 - m0) / r1
    d1, d2 = d10 + r0 / (r0 + r1) * (d10 - d11), (d10 - d11) / (r0 + r1)
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    x = s[3] / s[2] * x - a[3] * phi1 * m2 + a[3] * phi2 * d1 - a[3] * phi3 * d2
    res = flowkit.SAMPLERS.get("dpmpp_3m")(flow, x1, steps=3, schedule="logsnr", final="t0")
    assert torch.allclose(res.x, x, rtol=1e-12, atol=1e-12) and res.nfe == 3


@pytest.mark.parametrize("path_name", ["vp", "ve"])
def test_dpmpp_3m_exact_quadratic_converges_faster_than_published(path_name):
    """The exact-quadratic step is third order (measured ≳ 2.5 from 64 to 128 steps on VP and VE,
    where the second-order start-up steps cost little); the published one is second order."""
    flow, x1, exact = reference(path_name)
    sampler = flowkit.SAMPLERS.get("dpmpp_3m")
    orders = {}
    for variant in ("published", "exact"):
        errors = [float((sampler(flow, x1, steps=n, schedule="logsnr", final="t0", third_order=variant).x - exact)
                        .abs().max())
                  for n in (64, 128)]
        orders[variant] = math.log2(errors[0] / errors[1])
    assert orders["exact"] > 2.5 and 1.7 < orders["published"] < 2.3, orders


def test_ddim_on_the_straight_path_with_uniform_steps_is_euler():
    flow, x1, _ = reference("cond_ot")
    ddim = flowkit.SAMPLERS.get("ddim")(flow, x1, steps=7, schedule="uniform", final="t0").x
    euler = flowkit.SAMPLERS.get("euler")(flow, x1, steps=7).x
    assert torch.allclose(ddim, euler, rtol=1e-10, atol=1e-10)


def test_auto_schedule_is_uniform_where_log_snr_is_unbounded():
    from flowkit.samplers.schedules import resolve_schedule

    assert resolve_schedule(VE(), "auto", "logsnr") == "logsnr" and resolve_schedule(VE(), "auto", "karras") == "karras"
    assert resolve_schedule(VP(), "auto", "logsnr") == "power"  # σ = 0 at t = 0 (tests/test_vp_few_step.py)
    assert resolve_schedule(CondOT(), "auto", "logsnr") == "uniform"
    assert resolve_schedule(CondOT(sigma_min=0.01), "auto", "karras") == "uniform"  # α_t1 = 0 still
    assert resolve_schedule(VP(), "karras", "logsnr") == "karras"  # a named one is kept


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_on_the_straight_path_the_defaults_do_not_fall_behind_euler(name):
    """The exact mixture flow on ``cond_ot``, 8 NFE each: every solver with its default schedule
    ends at least as close to the dopri5 endpoint as Euler (with ``logsnr`` / ``karras`` knots,
    which waste steps at the singular ends, EDM Heun was 25x and DPM-Solver++(2M) 1.3x worse)."""
    flow, x1, exact = reference("cond_ot")
    euler = float((flowkit.SAMPLERS.get("euler")(flow, x1, steps=8).x - exact).norm(dim=1).max())
    steps = 5 if name == "edm_heun" else 8  # 1 + 2·3 + 1 = 8 NFE
    res = flowkit.SAMPLERS.get(name)(flow, x1, steps=steps)
    assert res.nfe == 8
    assert float((res.x - exact).norm(dim=1).max()) <= euler, name


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_solvers_are_deterministic(name):
    flow, x1, _ = reference("vp")
    sampler = flowkit.SAMPLERS.get(name)
    torch.manual_seed(0)
    a = sampler(flow, x1, steps=6)
    torch.manual_seed(1)
    b = sampler(flow, x1, steps=6)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_edm_heun_nfe_counts_two_per_heun_step():
    flow, x1, _ = reference("vp")
    heun = flowkit.SAMPLERS.get("edm_heun")
    assert heun(flow, x1, steps=5, final="t0").nfe == 10  # σ_t0 > 0: five Heun steps
    assert heun(flow, x1, steps=5, final="denoise").nfe == 9  # the step to σ = 0 is Euler
    ot, x_ot, _ = reference("cond_ot")
    assert heun(ot, x_ot, steps=5).nfe == 8  # out of α = 0 and into σ = 0: Euler


# ---------------------------------------------------------------------------- stochastic
STOCHASTIC = [("sde_dpmpp_2m", {"steps": 50}), ("edm_heun", {"steps": 40, "schedule": "logsnr", "s_churn": 10.0})]


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=[s for s, _ in STOCHASTIC])
def test_stochastic_samplers_reproduce_the_mixture_moments(name, options):
    gmm = mixture()
    flow = exact_flow(VP(), gmm)
    n = 3000
    x1 = flow.prior.sample(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    sampler = flowkit.SAMPLERS.get(name)
    few = sampler(flow, x1[:64], seed=3, **options).x
    assert torch.equal(few, sampler(flow, x1[:64], seed=3, **options).x)  # seeded
    assert not torch.equal(few, sampler(flow, x1[:64], seed=4, **options).x)  # and stochastic
    x = sampler(flow, x1, seed=3, **options).x
    mean, cov = gmm.mean(), gmm.covariance()
    se_mean = (torch.diagonal(cov) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean + 0.01).all(), f"mean {x.mean(0)} vs {mean}"
    # var of a sample covariance entry ≈ (C_ii C_jj + C_ij²)/n for near-Gaussian data; a mixture's tails
    # are heavier, hence 4 standard errors
    se_cov = ((torch.outer(torch.diagonal(cov), torch.diagonal(cov)) + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 4 * se_cov + 0.01).all(), f"cov {torch.cov(x.T)} vs {cov}"


# ------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("path", [VP(), VE(), CondOT(), CondOT(sigma_min=0.01)], ids=repr)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_are_monotone_and_hit_the_end_points(path, schedule):
    times = schedule_times(path, 12, schedule)
    assert times[0] == path.t1 and times[-1] == path.t0 and len(times) == 13
    assert bool((times[1:] < times[:-1]).all())
    lam = log_snr(path, times)
    assert bool((lam[1:] > lam[:-1]).all())


def test_schedules_space_as_named():
    path = VP()
    lam = log_snr(path, schedule_times(path, 8, "logsnr"))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(8), rtol=1e-9)
    t = schedule_times(path, 8, "uniform")
    assert torch.allclose(t.diff(), t.diff()[0].expand(8), rtol=1e-12)
    root = torch.exp(-log_snr(path, schedule_times(path, 8, "karras", rho=7.0)) / 7)  # (σ/α)^{1/ρ}
    assert torch.allclose(root.diff(), root.diff()[0].expand(8), rtol=1e-9)


def test_final_step_conventions():
    vp = VP()
    stop, denoise = sampling_grid(vp, 4, final="t0"), sampling_grid(vp, 4, final="denoise")
    assert stop.t[-1] == vp.t0 and len(stop.t) == 5 and stop.sigma[-1] > 0
    assert denoise.t[-2] == vp.t0 and math.isnan(denoise.t[-1]) and denoise.sigma[-1] == 0 and len(denoise.t) == 5
    ot = CondOT()  # σ_t0 = 0 already: the two coincide
    assert sampling_grid(ot, 4, final="t0") == sampling_grid(ot, 4, final="denoise")
    # "denoise" returns Tweedie's x̂₀ at t0
    flow, x1, _ = reference("vp")
    res = flowkit.SAMPLERS.get("ddim")(flow, x1, steps=3, schedule="logsnr", final="denoise")
    before = flowkit.SAMPLERS.get("ddim")(flow, x1, steps=2, schedule="logsnr", final="t0").x
    c = vp.schedule(torch.tensor(vp.t0, dtype=F64))
    tweedie = (c.d_sigma * before - c.sigma * flow.velocity(torch.tensor(vp.t0, dtype=F64), before)) / c.det
    assert torch.allclose(res.x, tweedie, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- bad options
RECIPE = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
          "objective": {"name": "cfm"}}


@pytest.mark.parametrize("options, key", [
    ({"steps": 0}, "sampler.steps"),
    ({"schedule": "cosine"}, "sampler.schedule"),
    ({"rho": 0.0}, "sampler.rho"),
    ({"rho": -7.0}, "sampler.rho"),
    ({"final": "eps"}, "sampler.final"),
    ({"name": "dpmpp_3m", "third_order": "quadratic"}, "sampler.third_order"),
])
def test_bad_options_are_refused_by_check(options, key, tmp_path, capsys):
    recipe = {**RECIPE, "sampler": {"name": "dpmpp_2m"} | options}
    with pytest.raises(RecipeError, match=key):
        flowkit.validate(recipe)
    import yaml

    from flowkit.cli import main

    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(recipe))
    assert main(["check", str(file)]) == 2
    assert key in capsys.readouterr().err


def test_bad_options_are_refused_when_called():
    flow, x1, _ = reference("vp")
    sampler = flowkit.SAMPLERS.get("dpmpp_2m")
    for options, message in (({"steps": 0}, "steps"), ({"schedule": "cosine"}, "unknown schedule"),
                             ({"rho": 0.0}, "rho"), ({"final": "eps"}, "unknown final")):
        with pytest.raises(ValueError, match=message):
            sampler(flow, x1, **options)
    with pytest.raises(ValueError, match="unknown third_order 'quadratic'"):
        flowkit.SAMPLERS.get("dpmpp_3m")(flow, x1, third_order="quadratic")


def test_samplers_need_a_path():
    recipe = {**RECIPE, "objective": {"name": "sbcfm"}, "sampler": {"name": "unipc"}}
    with pytest.raises(RecipeError, match="sampler.name: unipc needs a flow with path, velocity"):
        flowkit.validate(recipe)


# ----------------------------------------------------------------------- trained-shaped models
@pytest.mark.parametrize("objective", [{"name": "score_matching"}, {"name": "cfm"},
                                       {"name": "cfm", "path": {"name": "vp"}}], ids=["sm", "cfm", "cfm-vp"])
def test_sampler_block_validates_and_samples_on_built_models(objective):
    recipe = {**RECIPE, "objective": objective, "sampler": {"name": "dpmpp_2m", "steps": 10, "schedule": "logsnr"}}
    flowkit.validate(recipe)
    built = flowkit.build(recipe)
    flow = built.objective.eval().flow()
    x = flow.prior.sample(16, generator=torch.Generator().manual_seed(0))
    res = built.sampler(flow, x)
    assert res.x.shape == x.shape and res.nfe == 10 and bool(torch.isfinite(res.x).all())
    for name in ("ddim", "dpmpp_3m", "unipc", "edm_heun", "sde_dpmpp_2m"):
        out = flowkit.SAMPLERS.get(name)(flow, x, steps=4)
        assert out.x.shape == x.shape and bool(torch.isfinite(out.x).all()), name


def test_guidance_guides_the_data_prediction():
    """Classifier-free guidance: the guided x̂₀ is (1 + w) x̂₀(c) − w x̂₀(∅) (affine in v)."""
    path = VP()
    shift = torch.tensor([1.0, -2.0], dtype=F64)

    def velocity(t, x, cond=None):  # a toy conditional field: label c shifts the velocity by c·shift
        c = torch.zeros(x.shape[0], dtype=F64) if cond is None else torch.where(cond < 0, 0, cond).to(F64)
        return -x + c[:, None] * shift

    flow = Flow(velocity=velocity, prior=path.prior((2,)), t0=path.t0, t1=path.t1, path=path)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    labels = torch.ones(4, dtype=torch.long)
    sampler = flowkit.SAMPLERS.get("ddim")
    guided = sampler(flow, x, cond=labels, steps=1, guidance=2.0, final="t0")
    manual = Flow(velocity=lambda t, x, cond=None: -x + 3.0 * shift, prior=flow.prior, t0=flow.t0, t1=flow.t1,
                  path=path)
    assert torch.allclose(guided.x, sampler(manual, x, steps=1, final="t0").x) and guided.nfe == 1
