"""Dequantisation bounds and bits/dim against closed forms on a Gaussian model of quantised data.

The model is a diffusion whose data are ``N(μ, s² I)``: its score is exact and ``p_{t0}`` is
Gaussian, so the discrete probabilities ``P(k) = Π_d [Φ(b) − Φ(a)]`` of the bins, and the
expected uniform and truncated-normal bounds, are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowkit.adapters import from_edm, from_score
from flowkit.dequantise import (Quantisation, bpd_summary, discrete_log_likelihood, save_points, truncated_normal,
                                truncated_normal_entropy)
from flowkit.flow import FieldError
from flowkit.paths import VP

F64 = torch.float64
MU, S = 0.3, 0.7          # data N(μ, s²) in each dimension
QUANT = Quantisation.partition(8, -2.0, 2.0)  # 8 bins of width 0.5
K = torch.tensor([[3, 4], [0, 6], [5, 5], [2, 7]])  # 4 points, D = 2 (bins 0 and 7 are the open tails' neighbours)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def edm_flow(sigma_min: float):
    denoise = lambda x, sigma: MU + S**2 / (S**2 + sigma[:, None] ** 2) * (x - MU)  # E[y | y + σ n]
    return from_edm(denoise, (2,), sigma_min=sigma_min, sigma_max=80.0)


def vp_flow(t0: float):
    path = VP(t0=t0)

    def score(x, t):
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        return -(x - a * MU) / (a * a * S * S + s * s)

    return from_score(score, path, (2,)), path


def edges(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = QUANT.offset + k.to(F64) * QUANT.width
    return lo, lo + QUANT.width


def true_log_prob(k: torch.Tensor, std: float) -> torch.Tensor:
    """log P(k) = Σ_d log [Φ((b − μ)/std) − Φ((a − μ)/std)] of the model's data density N(μ, std²)."""
    a, b = edges(k)
    cdf = lambda v: torch.special.ndtr((v - MU) / std)
    return (cdf(b) - cdf(a)).log().sum(1)


def uniform_bound(k: torch.Tensor, std: float) -> torch.Tensor:
    """E_u[log N(x; μ, std²)] + D log w, x uniform on the bin: E(x − μ)² = ((b−μ)³ − (a−μ)³)/(3w)."""
    a, b = edges(k)
    second = ((b - MU) ** 3 - (a - MU) ** 3) / (3 * QUANT.width)
    per = -0.5 * math.log(2 * math.pi * std**2) - second / (2 * std**2) + math.log(QUANT.width)
    return per.sum(1)


def test_uniform_bound_matches_closed_form_and_bounds_the_discrete_likelihood():
    sigma_min = 0.05
    std = math.sqrt(S**2 + sigma_min**2)  # p_{t0} of VE/EDM: the data blurred by σ_min
    out = discrete_log_likelihood(edm_flow(sigma_min), K, QUANT, draws=64, generator=torch.Generator().manual_seed(0),
                                  rtol=1e-6, atol=1e-6)
    expect = uniform_bound(K, std)
    se = out.values.std(0) / math.sqrt(out.values.shape[0])
    assert bool(((out.log_prob - expect).abs() < 4 * se + 1e-4).all()), (out.log_prob - expect, se)
    assert bool((expect < true_log_prob(K, std)).all())  # Jensen: a lower bound of log P(k)
    s = out.summary()
    closed_bpd = float(-expect.mean() / (2 * math.log(2)))
    assert abs(s.bpd - closed_bpd) < 4 * s.se_noise + 1e-4
    assert s.points == 4 and s.draws == 64


def test_uniform_bound_on_a_vp_flow_accounts_for_the_signal_scale():
    """At ``t0 = 0.2`` VP keeps α = 0.81 of the signal: the data model is α^D p_{t0}(α x), a
    Gaussian of variance ``s² + σ²/α²``; forgetting ``D log α`` would be off by 0.42 nats."""
    flow, path = vp_flow(0.2)
    t0 = torch.tensor(0.2, dtype=F64)
    a, s = float(path.alpha(t0)), float(path.sigma(t0))
    std = math.sqrt(S**2 + (s / a) ** 2)
    out = discrete_log_likelihood(flow, K, QUANT, draws=48, generator=torch.Generator().manual_seed(1),
                                  rtol=1e-6, atol=1e-6)
    expect = uniform_bound(K, std)
    se = out.values.std(0) / math.sqrt(out.values.shape[0])
    assert abs(2 * math.log(a)) > 0.4
    assert bool(((out.log_prob - expect).abs() < 4 * se + 1e-4).all()), (out.log_prob - expect, se)


def tn_bound(k: torch.Tensor, alpha: float, sigma: float, std_t0: float) -> torch.Tensor:
    """E[log N(αc + σε̂; αμ, std_t0²)] + D H(σε̂), ε̂ ~ N(0,1) on [−τ, τ], τ = αw/(2σ)."""
    tau = alpha * QUANT.width / (2 * sigma)
    z = math.erf(tau / math.sqrt(2))
    var = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z  # of the truncated normal
    c = QUANT.centres(k)
    per = -0.5 * math.log(2 * math.pi * std_t0**2) - ((alpha * (c - MU)) ** 2 + sigma**2 * var) / (2 * std_t0**2)
    return per.sum(1) + 2 * truncated_normal_entropy(tau, sigma)


@pytest.mark.parametrize("model", ["edm", "vp"])
def test_truncated_normal_bound_is_valid_and_matches_closed_form(model: str):
    if model == "edm":
        sigma_min = 0.5 / 3  # τ = w / (2σ) = 1.5
        flow, alpha, sigma = edm_flow(sigma_min), 1.0, sigma_min
        std_t0 = math.sqrt(S**2 + sigma**2)
    else:
        flow, path = vp_flow(0.01)
        t0 = torch.tensor(0.01, dtype=F64)
        alpha, sigma = float(path.alpha(t0)), float(path.sigma(t0))
        std_t0 = math.sqrt(alpha**2 * S**2 + sigma**2)
    truth = true_log_prob(K, std_t0 / alpha)  # the data model α^D p_{t0}(α x) = N(μ, std_t0²/α²)
    expect = tn_bound(K, alpha, sigma, std_t0)
    assert bool((expect < truth).all())
    out = discrete_log_likelihood(flow, K, QUANT, method="truncated_normal", draws=48,
                                  generator=torch.Generator().manual_seed(2), rtol=1e-6, atol=1e-6)
    se = out.values.std(0) / math.sqrt(out.values.shape[0])
    assert bool(((out.log_prob - expect).abs() < 4 * se + 1e-4).all()), (out.log_prob - expect, se)
    # a valid bound: −log P(k) ≤ the estimate of the NLL, in expectation
    assert bool((-out.log_prob >= -truth - 4 * se - 1e-4).all())
    # importance weighting over the 48 draws: tighter, still a bound
    iw = discrete_log_likelihood(flow, K, QUANT, method="truncated_normal", draws=48, importance_weighted=True,
                                 generator=torch.Generator().manual_seed(3), rtol=1e-6, atol=1e-6)
    summary = iw.summary()
    se_iw = summary.se_noise * 2 * math.log(2)  # nats per point, averaged over the 4 points
    gap_iw, gap_var = float((truth - iw.log_prob).mean()), float((truth - out.log_prob).mean())
    assert gap_iw > -4 * se_iw - 1e-4, (gap_iw, se_iw)  # still a bound (in expectation)
    assert gap_iw < gap_var  # and tighter than the average of the same number of draws


def test_truncated_normal_sampler_moments():
    tau = 1.2
    e = truncated_normal((200000,), tau, generator=torch.Generator().manual_seed(0))
    z = math.erf(tau / math.sqrt(2))
    var = 1 - 2 * tau * math.exp(-tau * tau / 2) / math.sqrt(2 * math.pi) / z
    assert float(e.abs().max()) <= tau
    assert abs(float(e.mean())) < 4 * math.sqrt(var / 2e5)
    assert abs(float(e.var()) - var) < 0.01
    # entropy: H = E[−log q] by Monte Carlo
    logq = -0.5 * e**2 - 0.5 * math.log(2 * math.pi) - math.log(z)
    assert abs(float(-logq.mean()) - truncated_normal_entropy(tau)) < 0.01


def test_bpd_summary_splits_the_variance():
    g = torch.Generator().manual_seed(0)
    b, r, sd_point, sd_noise = 400, 5, 2.0, 0.7
    f = torch.randn(b, generator=g, dtype=F64) * sd_point
    values = f + sd_noise * torch.randn(r, b, generator=g, dtype=F64)
    s = bpd_summary(values, dim=1)
    ln2 = math.log(2)
    assert abs(s.se_noise - sd_noise / math.sqrt(r * b) / ln2) < 0.15 * s.se_noise
    assert abs(s.se_data - sd_point / math.sqrt(b) / ln2) < 0.15 * s.se_data
    assert abs(s.se**2 - s.se_data**2 - s.se_noise**2) < 1e-12
    assert bpd_summary(values[:1], dim=1).se_noise is None
    with pytest.raises(ValueError, match="draws, points"):
        bpd_summary(values[0], dim=1)


def test_save_points_round_trip_and_errors(tmp_path):
    out = discrete_log_likelihood(edm_flow(0.05), K, QUANT, draws=2, generator=torch.Generator().manual_seed(0))
    npz = np.load(save_points(tmp_path / "p.npz", out))
    assert npz["log_prob"].shape == (4,) and npz["latent"].shape == (4, 2) and npz["values"].shape == (2, 4)
    np.testing.assert_allclose(npz["bpd"], -npz["log_prob"] / (2 * math.log(2)))
    assert bool((npz["nfe"] > 0).all()) and str(npz["method"]) == "uniform"
    pt = torch.load(save_points(tmp_path / "p.pt", out))
    torch.testing.assert_close(pt["log_prob"], out.log_prob)
    with pytest.raises(ValueError, match=".npz or .pt"):
        save_points(tmp_path / "p.csv", out)


def test_bad_inputs_are_named():
    flow = edm_flow(0.05)
    with pytest.raises(FieldError, match="integers in"):
        discrete_log_likelihood(flow, K + 10, QUANT)
    with pytest.raises(FieldError, match="method"):
        discrete_log_likelihood(flow, K, QUANT, method="variational")
    with pytest.raises(FieldError, match="draws"):
        discrete_log_likelihood(flow, K, QUANT, draws=0)
    from flowkit.flow import Flow, StandardNormal
    plain = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
    with pytest.raises(FieldError, match="truncated_normal"):
        discrete_log_likelihood(plain, K, QUANT, method="truncated_normal")
    with pytest.raises(ValueError, match="levels"):
        Quantisation(1, 0.0, 1.0)
