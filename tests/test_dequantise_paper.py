"""The truncated-normal dequantisation term by term (Zheng et al. 2023; conventions of their
``tn`` evaluation: 256 levels on ``[−1, 1]``, ``τ = α/(256 σ)``), against independent closed forms.

A VP diffusion whose data are ``N(μ, s² I)`` has ``p_{t0} = N(α μ, α² s² + σ²)``: with the
generator replayed, one draw of the bound is known exactly, so each term (the start point
``α c_k + σ ε̂``, ``log q`` of the truncated normal from scipy, the closed-form entropy) is
checked on its own rather than in expectation.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from flowkit.adapters import from_score
from flowkit.dequantise import Quantisation, discrete_log_likelihood, truncated_normal, truncated_normal_entropy
from flowkit.gmm import GaussianMixture
from flowkit.paths import VP

F64 = torch.float64
MU, S = 0.1, 0.4
T0 = 1e-3  # σ_{t0} ≈ 0.01, so τ = α/(256 σ) ≈ 0.37: the truncation is felt
QUANT = Quantisation.partition(256, -1.0, 1.0)
K = torch.tensor([[0, 127, 255], [64, 128, 200], [10, 250, 128]])  # 3 points, D = 3


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def vp_gaussian():
    path = VP(t0=T0)

    def score(x, t):
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        return -(x - a * MU) / (a * a * S * S + s * s)

    t0, t1 = torch.tensor(T0, dtype=F64), torch.tensor(path.t1, dtype=F64)
    a1, s1 = float(path.alpha(t1)), float(path.sigma(t1))
    exact_end = GaussianMixture(torch.full((1, 3), a1 * MU, dtype=F64),  # p_{t1} exactly, not N(0, I)
                                (a1**2 * S**2 + s1**2) * torch.eye(3, dtype=F64)[None], torch.ones(1, dtype=F64))
    return from_score(score, path, (3,), prior=exact_end), float(path.alpha(t0)), float(path.sigma(t0))


def log_p_t0(y: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    return torch.distributions.Normal(alpha * MU, math.sqrt(alpha**2 * S**2 + sigma**2)).log_prob(y).sum(1)


def test_idode_grid_and_offset():
    """256 levels on [−1, 1]: centres 2(k + ½)/256 − 1, bin width 2/256 (the uniform bound's + 7 bits)."""
    k = torch.arange(256)
    torch.testing.assert_close(QUANT.centres(k), 2 * (k.double() + 0.5) / 256 - 1, rtol=0, atol=1e-15)
    assert -math.log2(QUANT.width) == 7.0


@pytest.mark.parametrize("tau, sigma", [(0.39, 0.01), (1.5, 1.0), (4.0, 0.2)])
def test_truncated_normal_entropy_matches_quadrature(tau: float, sigma: float):
    """``½ log(2πeσ²) + log Z − τφ(τ)/Z`` against ``−∫ q log q`` of ``σ ε̂`` by adaptive quadrature."""
    dist = stats.truncnorm(-tau, tau, scale=sigma)
    h, _ = integrate.quad(lambda v: -dist.pdf(v) * dist.logpdf(v), -tau * sigma, tau * sigma, epsabs=1e-13)
    assert abs(truncated_normal_entropy(tau, sigma) - h) < 1e-10


@pytest.mark.parametrize("weighted", [True, False])
def test_one_draw_is_log_p_at_the_start_point_minus_log_q(weighted: bool):
    """One draw, replayed: the start point is ``α c_k + σ ε̂`` with ``τ = α/(256σ)``, and the value is
    ``log p_{t0}(x) − log q(x | k)`` (importance-weighted: ``q`` from scipy's truncated normal) or
    ``log p_{t0}(x) + D H`` (variational: the closed-form entropy)."""
    flow, alpha, sigma = vp_gaussian()
    tau = alpha / (256 * sigma)
    assert 0.3 < tau < 0.5
    out = discrete_log_likelihood(flow, K, QUANT, method="truncated_normal", importance_weighted=weighted,
                                  generator=torch.Generator().manual_seed(7), rtol=1e-8, atol=1e-8)
    eps = truncated_normal(tuple(K.shape), tau, generator=torch.Generator().manual_seed(7))
    x = alpha * (2 * (K.double() + 0.5) / 256 - 1) + sigma * eps
    assert bool(((x / alpha - QUANT.centres(K)).abs() <= QUANT.width / 2 + 1e-12).all())  # stays in its bin
    if weighted:
        log_q = torch.as_tensor(stats.truncnorm(-tau, tau, scale=sigma).logpdf((sigma * eps).numpy())).sum(1)
        expect = log_p_t0(x, alpha, sigma) - log_q
    else:
        expect = log_p_t0(x, alpha, sigma) + 3 * truncated_normal_entropy(tau, sigma)
    torch.testing.assert_close(out.values[0], expect, rtol=0, atol=1e-5)
