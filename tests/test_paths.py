"""Gaussian paths against closed forms: schedules, forward SDE, parameterisation maps (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

import flowkit
from flowkit.components import OBJECTIVES, PATHS
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.paths import EDGE, CondOT, Cosine, GaussianPath, PathCoefficients, Polynomial, VE, VP

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread

PATH_CASES = (
    [pytest.param(PATHS.build(n), id=f"path-{n}") for n in PATHS.names()]
    + [pytest.param(CondOT(sigma_min=0.01), id="cond_ot-smin"),
       pytest.param(Polynomial(exponent=3.0), id="polynomial-3"),
       pytest.param(VP(beta_min=0.5, beta_max=10.0, t1=2.0), id="vp-T2")]
)


def interior(path: GaussianPath, n: int = 9) -> torch.Tensor:
    """Times strictly inside the path's range, away from singular ends."""
    lo, hi = max(path.t0, 0.02 * path.t1), 0.95 * path.t1
    return torch.linspace(lo, hi, n, dtype=F64)


def test_registered_names():
    assert {"vp", "subvp", "ve", "cond_ot", "cosine", "polynomial"} <= set(PATHS.names())
    assert isinstance(PATHS.build("polynomial", exponent=1.5), Polynomial)


def test_one_registry_holds_every_gaussian_path():
    """SDEs and flow-matching paths are one type, so one registry: no ``sde`` twin holding
    ``vp`` a second time, and score matching's ``sde`` draws from ``PATHS``."""
    assert "sde" not in flowkit.all_registries() and not hasattr(flowkit, "SDES")
    assert OBJECTIVES.get("score_matching").nested["sde"] is PATHS
    assert OBJECTIVES.get("cfm").nested["path"] is PATHS


@pytest.mark.parametrize("section, spec", [
    ("sde", {"name": "cosine", "t1": 0.999}), ("sde", {"name": "cond_ot", "sigma_min": 0.01}),
    ("path", {"name": "ve", "sigma_max": 5.0}), ("path", {"name": "subvp"})])
def test_every_path_serves_both_objectives(section, spec):
    """Every Gaussian path is a forward SDE (``f = α̇/α``, ``g² = 2σD/α``), so score matching
    takes an interpolant and flow matching a diffusion; both build and give a finite loss."""
    objective = {"sde": "score_matching", "path": "cfm"}[section]
    recipe = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp", "hidden": [8]},
              "objective": {"name": objective, section: spec}}
    flowkit.validate(recipe, "recipe")
    built = flowkit.build(recipe)
    assert type(getattr(built.objective, section)) is PATHS.get(spec["name"])
    torch.manual_seed(0)
    assert bool(torch.isfinite(built.objective.loss(torch.randn(8, 2)).loss))


def test_unknown_sde_lists_every_path():
    recipe = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp"},
              "objective": {"name": "score_matching", "sde": {"name": "cosin"}}}
    with pytest.raises(flowkit.RecipeError) as err:
        flowkit.validate(recipe, "recipe")
    text = str(err.value)
    assert "objective.sde.name" in text and "did you mean cosine?" in text
    assert all(name in text for name in PATHS.names())


@pytest.mark.parametrize("path", PATH_CASES)
def test_data_end(path: GaussianPath):
    c = path.schedule(torch.tensor(path.t0, dtype=F64))
    assert abs(float(c.alpha) - 1) < 1e-5
    assert 0 <= float(c.sigma) <= 0.011
    end = path.schedule(torch.tensor(path.t1, dtype=F64))
    assert float(end.sigma / end.alpha) > 40  # the noise end is (nearly) pure noise


@pytest.mark.parametrize("path", PATH_CASES)
def test_derivatives_match_autograd(path: GaussianPath):
    t = interior(path).requires_grad_(True)
    for value, derivative in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        out = value(t)
        grad = torch.autograd.grad(out.sum(), t)[0] if out.requires_grad else torch.zeros_like(t)  # constant
        torch.testing.assert_close(derivative(t.detach()), grad, rtol=1e-10, atol=1e-12)
    c = path.schedule(t.detach())
    assert isinstance(c, PathCoefficients) and c.alpha.shape == t.shape
    assert bool((c.det > 0).all())  # signal-to-noise ratio decreases


@pytest.mark.parametrize("path", PATH_CASES)
def test_forward_sde_reproduces_marginal_variance(path: GaussianPath):
    """``dΣ/dt = 2 f Σ + g²`` (with ``f Σ = drift(t, Σ)``) integrates to ``α² Σ0 + σ²``."""
    sigma0 = torch.tensor([0.0, 0.25, 1.0, 4.0], dtype=F64)
    start = path.t0 if path.safe_range[0] <= path.t0 else path.safe_range[0]
    times = torch.cat([torch.tensor([start], dtype=F64), interior(path)[1:]])

    def rhs(t, var):
        return 2 * path.drift(t, var) + path.diffusion(t) ** 2

    c0 = path.schedule(times[0])
    var0 = c0.alpha**2 * sigma0 + c0.sigma**2
    sol = torchdiffeq.odeint(rhs, var0, times, rtol=1e-11, atol=1e-12, method="dopri5")
    c = path.schedule(times)
    exact = c.alpha[:, None] ** 2 * sigma0 + c.sigma[:, None] ** 2
    torch.testing.assert_close(sol, exact, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("path", PATH_CASES)
def test_diffusion_squared_closed_forms_agree_with_definition(path: GaussianPath):
    t = interior(path)
    c = path.schedule(t)
    f = c.d_alpha / c.alpha
    generic = 2 * c.sigma * c.d_sigma - 2 * f * c.sigma**2  # dσ²/dt − 2 f σ²
    torch.testing.assert_close(path.diffusion(t) ** 2, generic, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(path.drift(t, torch.ones_like(t)), f, rtol=1e-12, atol=1e-12)


def _random_state(path: GaussianPath, b: int = 16, shape=(3,), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(path.t0, 0.02 * path.t1), 0.95 * path.t1
    t = lo + (hi - lo) * torch.rand(b, generator=g, dtype=F64)
    x0, eps, pred = (torch.randn(b, *shape, generator=g, dtype=F64) for _ in range(3))
    return t, x0, eps, path.sample(x0, t, eps), pred


@pytest.mark.parametrize("path", PATH_CASES)
def test_conversions_round_trip(path: GaussianPath):
    t, _, _, xt, pred = _random_state(path, shape=(2, 3))
    pairs = [("score", "eps"), ("x0", "eps"), ("score", "x0"), ("velocity", "score"),
             ("velocity", "eps"), ("velocity", "x0")]
    for a, b in pairs:
        a_from_b, b_from_a = getattr(path, f"{a}_from_{b}"), getattr(path, f"{b}_from_{a}")
        torch.testing.assert_close(a_from_b(b_from_a(pred, t, xt), t, xt), pred, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b_from_a(a_from_b(pred, t, xt), t, xt), pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", PATH_CASES)
def test_conversions_of_the_true_noise(path: GaussianPath):
    """With the actual (x0, ε) every map lands on the actual target ``v = α̇ x0 + σ̇ ε``."""
    t, x0, eps, xt, _ = _random_state(path)
    c = path.schedule(t)
    d_alpha, d_sigma, sigma = c.d_alpha[:, None], c.d_sigma[:, None], c.sigma[:, None]
    v = d_alpha * x0 + d_sigma * eps
    score = -eps / sigma  # the conditional score −(x_t − α x0)/σ²
    torch.testing.assert_close(path.velocity_from_eps(eps, t, xt), v)
    torch.testing.assert_close(path.velocity_from_x0(x0, t, xt), v)
    torch.testing.assert_close(path.velocity_from_score(score, t, xt), v)
    torch.testing.assert_close(path.x0_from_eps(eps, t, xt), x0)
    torch.testing.assert_close(path.x0_from_score(score, t, xt), x0)
    torch.testing.assert_close(path.eps_from_velocity(v, t, xt), eps)
    torch.testing.assert_close(path.x0_from_velocity(v, t, xt), x0)
    # and the probability-flow form f x − ½ g² s of the same velocity
    pf = path.drift(t, xt) - 0.5 * path.diffusion(t)[:, None] ** 2 * score
    torch.testing.assert_close(pf, v)


def test_sample_broadcasts_time_over_event_dims():
    path = Cosine()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 3, generator=g, dtype=F64), torch.randn(4, 2, 3, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=F64)
    xt = path.sample(x0, t, eps)
    for i in range(4):
        ti = float(t[i])
        expected = math.cos(math.pi * ti / 2) * x0[i] + math.sin(math.pi * ti / 2) * eps[i]
        torch.testing.assert_close(xt[i], expected)
    torch.testing.assert_close(path.sample(x0, 0.3, eps), path.sample(x0, torch.full((4,), 0.3, dtype=F64), eps))


def test_cond_ot_is_lipman_path_in_flowkit_time():
    """Lipman et al. (2023, eq. 20) with data x1 at s = 1: μ = s x1, σ = 1 − (1 − σ_min) s; s = 1 − t."""
    path = CondOT(sigma_min=0.05)
    s = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(path.alpha(1 - s), s)
    torch.testing.assert_close(path.sigma(1 - s), 1 - (1 - 0.05) * s)


@pytest.mark.parametrize("path", PATH_CASES)
def test_velocity_from_exact_score_single_gaussian(path: GaussianPath):
    """For data ``N(μ, Σ0)`` the PF velocity is ``α̇ μ + ½ Σ̇ Σ_t⁻¹ (x − α μ)``."""
    g = torch.Generator().manual_seed(2)
    d = 3
    mu = torch.randn(1, d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov0 = (a @ a.T + 0.3 * torch.eye(d, dtype=F64))[None]
    gmm = GaussianMixture(mu, cov0, torch.ones(1, dtype=F64))
    score = mixture_score_field(gmm, path)
    x = 2 * torch.randn(7, d, generator=g, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    for t in interior(path, 5):
        c = path.schedule(t)
        cov_t = c.alpha**2 * cov0[0] + c.sigma**2 * eye
        d_cov = 2 * c.alpha * c.d_alpha * cov0[0] + 2 * c.sigma * c.d_sigma * eye
        expected = c.d_alpha * mu + 0.5 * (x - c.alpha * mu) @ torch.linalg.solve(cov_t, d_cov)
        torch.testing.assert_close(path.velocity_from_score(score(t, x), t, x), expected,
                                   rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("path", PATH_CASES)
def test_velocity_from_exact_score_matches_posterior_mean(path: GaussianPath):
    """PF velocity of a mixture = ``E[α̇ x0 + σ̇ ε | x_t]``, via the exact Gaussian posterior."""
    g = torch.Generator().manual_seed(3)
    k, d = 3, 2
    means = 2 * torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64)
    covs = a @ a.mT + 0.2 * torch.eye(d, dtype=F64)
    gmm = GaussianMixture(means, covs, torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    score = mixture_score_field(gmm, path)
    x = 2 * torch.randn(11, d, generator=g, dtype=F64)
    for t in interior(path, 4):
        c = path.schedule(t)
        marg = gmm.marginal(path, t)
        # responsibilities r_k(x) and per-component posterior means μ_k + α Σ_k C_k⁻¹ (x − α μ_k)
        comp = torch.stack([torch.distributions.MultivariateNormal(marg.means[j], marg.covs[j]).log_prob(x)
                            for j in range(k)], -1)
        resp = torch.softmax(comp + gmm.weights.log(), -1)
        white = torch.linalg.solve(marg.covs, (x[:, None] - marg.means).unsqueeze(-1)).squeeze(-1)
        post = means + c.alpha * torch.einsum("kij,nkj->nki", covs, white)
        x0_hat = (resp[..., None] * post).sum(1)
        eps_hat = (x - c.alpha * x0_hat) / c.sigma
        expected = c.d_alpha * x0_hat + c.d_sigma * eps_hat
        s = score(t, x)
        torch.testing.assert_close(path.x0_from_score(s, t, x), x0_hat, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(path.velocity_from_score(s, t, x), expected, rtol=1e-8, atol=1e-9)


def test_priors():
    assert VE(sigma_max=50.0).prior((2,)).std == 50.0
    for path in (VP(), PATHS.build("subvp"), CondOT(), Cosine(), Polynomial()):
        prior = path.prior([3, 4])
        assert prior.std == 1.0 and prior.shape == (3, 4)


@pytest.mark.parametrize("path", [CondOT(), Cosine(), Polynomial()], ids=["cond_ot", "cosine", "polynomial"])
def test_singular_ends_are_clamped_not_nan(path: GaussianPath):
    x = torch.randn(5, 2, dtype=F64)
    for t in (0.0, 1.0):
        tt = torch.tensor(t, dtype=F64)
        outs = [path.drift(tt, x), path.diffusion(tt), path.velocity_from_score(-x, tt, x),
                path.score_from_velocity(x, tt, x), path.velocity_from_x0(x, tt, x), path.x0_from_eps(x, tt, x)]
        assert all(bool(torch.isfinite(o).all()) for o in outs)
    assert EDGE == path.safe_range[0] and path.safe_range[1] == 1 - EDGE


@pytest.mark.parametrize("path", [CondOT(), Cosine(), Polynomial()], ids=["cond_ot", "cosine", "polynomial"])
def test_conversions_near_alpha_zero_use_the_models_own_time(path: GaussianPath):
    """Within EDGE of ``α = 0`` the maps that divide by ``α`` must take their coefficients at the
    time the score was evaluated at. Data ``N(μ, s² I)``: ``p_t = N(α μ, (α² s² + σ²) I)``, so
    ``s_t(x) = −(x − α μ)/V_t``, ``x̂₀ = μ + α s² (x − α μ)/V_t`` and ``v = α̇ x̂₀ + σ̇ ε̂``
    with ``ε̂ = σ (x − α μ)/V_t``. (Coefficients at ``1 − EDGE`` with the score at ``t`` were
    wrong by O(1) here: on cond_ot at ``t = 1`` they gave ``v = −x`` for ``x − μ``.)"""
    mu, s2 = torch.tensor([1.5, -0.5], dtype=F64), 0.3
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)

    def closed_form(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = path.schedule(t)
        var = c.alpha**2 * s2 + c.sigma**2
        white = (x - c.alpha * mu) / var
        x0 = mu + c.alpha * s2 * white
        return -white, x0, c.d_alpha * x0 + c.d_sigma * c.sigma * white  # score, x̂₀, v

    for t in (1 - EDGE / 4, 1 - EDGE / 2, 1 - 0.9 * EDGE):
        tt = torch.tensor(t, dtype=F64)
        score, x0, v = closed_form(tt)
        # the numerator is O(α) out of O(1) terms: float64 rounding / α (α ≈ 6e-12 on polynomial)
        tol = 1e-6 + 1e-14 / float(path.alpha(tt))
        torch.testing.assert_close(path.velocity_from_score(score, tt, x), v, rtol=tol, atol=tol)
        torch.testing.assert_close(path.x0_from_score(score, tt, x), x0, rtol=tol, atol=tol)
        eps = -path.sigma(tt) * score
        torch.testing.assert_close(path.velocity_from_eps(eps, tt, x), v, rtol=tol, atol=tol)
        torch.testing.assert_close(path.x0_from_eps(eps, tt, x), x0, rtol=tol, atol=tol)
    # at α = 0 itself the score is −x/σ² whatever μ: the model is evaluated at conversion_time,
    # and the velocity is the one there, within O(EDGE) of the limit at t1
    one = torch.tensor(1.0, dtype=F64)
    tc = path.conversion_time(one)
    assert float(path.alpha(one)) < 1e-15 and float(tc) < 1
    score_c, _, v_c = closed_form(tc)
    torch.testing.assert_close(path.velocity_from_score(score_c, one, x), v_c, rtol=1e-6, atol=1e-6)
    _, x0_1, _ = closed_form(one)
    v_1 = path.d_alpha(one) * mu + path.d_sigma(one) * x  # α = 0, σ = 1: x̂₀ = μ, ε̂ = x
    assert torch.allclose(x0_1, mu.expand_as(x)) and float((v_c - v_1).abs().max()) < 1e-3


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        VP(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError):
        VE(sigma_min=0.0)
    with pytest.raises(ValueError):
        CondOT(t1=1.5)
    with pytest.raises(ValueError):
        Polynomial(exponent=0.0)


def test_probability_flow_velocity_of_a_score_model_is_right_where_alpha_vanishes():
    """On cond_ot at t = 1 (α = 0) the score is −x/σ² for any data; the PF-ODE velocity must come
    from the score at the path's conversion time, not the coefficients of one time and the score
    of another (that gave −x instead of x − μ)."""
    from flowkit.diffusion import probability_flow_field
    from flowkit.paths import CondOT

    path = CondOT()
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)

    def score(t, x, cond=None):  # data N(μ, 0): x_t = α μ + σ ε, so the exact score is −(x − α μ)/σ²
        t = torch.as_tensor(t, dtype=x.dtype)
        return -(x - path.alpha(t) * mu) / path.sigma(t) ** 2

    x = torch.randn(5, 2, dtype=torch.float64)
    v = probability_flow_field(score, path)(torch.tensor(1.0, dtype=torch.float64), x)
    assert torch.allclose(v, x - mu, atol=1e-4), (v, x - mu)
