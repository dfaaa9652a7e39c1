"""Likelihood of a diffusion model through its probability-flow ODE, against exact mixtures.

With the *exact* marginal score of a Gaussian mixture and the *exact* marginal ``p_{t1}`` as
the prior, the PF-ODE likelihood is exact up to the ODE solver: it equals
``log p_{t0}(x)``, the density of the mixture carried to ``t0`` (``α_{t0} x + σ_{t0} ε``).
That — not the raw data density — is the exact reference. Under VP (σ(1e-5) ≈ 1e-3) the
two differ by ~1e-6 nats, but under VE the data end carries σ_min = 0.01 of noise and
``log p_data`` would be off by ~1e-3, so every test compares with ``log p_{t0}``.
"""

from __future__ import annotations

import pytest
import torch

from flowkit.components import PATHS
from flowkit.diffusion import flow_from_score, probability_flow_field, score_log_likelihood, xt_score_to_field
from flowkit.flow import StandardNormal
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.likelihood import flow_log_likelihood
from flowkit.paths import GaussianPath
from conftest import exact_mixture

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def make_mixture(dim: int, seed: int = 0) -> GaussianMixture:
    """Three well-separated components with full (correlated) covariances."""
    return exact_mixture(dim, (0.25, 0.45, 0.3), seed=seed, spread=2.5, cov_scale=0.6, cov_floor=0.15)


def xt_score(gmm: GaussianMixture, path: GaussianPath):
    """The exact score in the diffusion-codebase order ``s(x, t)``, ``t`` of shape ``[B]``."""
    field = mixture_score_field(gmm, path)

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        return field(t, x)

    return score


def run(path: GaussianPath, gmm: GaussianMixture, n: int, seed: int = 1, **options):
    x = gmm.marginal(path, path.t0).sample(n, torch.Generator().manual_seed(seed))
    options.setdefault("prior", gmm.marginal(path, path.t1))
    out = score_log_likelihood(xt_score(gmm, path), x, path, **options)
    return out, gmm.marginal(path, path.t0).log_prob(x)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_exact_score_gives_exact_likelihood_2d(name: str):
    path = PATHS.build(name)
    out, ref = run(path, make_mixture(2), 48, rtol=1e-6, atol=1e-6, estimator="exact", per_sample_norm=True)
    err = (out.log_prob - ref).abs().max().item()
    assert err < 1e-3, err
    assert out.nfe > 0 and out.z.shape == (48, 2)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_exact_score_gives_exact_likelihood_8d(name: str):
    path = PATHS.build(name)
    out, ref = run(path, make_mixture(8, seed=5), 12, rtol=1e-5, atol=1e-5)
    err = (out.log_prob - ref).abs().max().item()
    assert err < 1e-2, err


def test_hutchinson_is_unbiased():
    """Fixed Rademacher probes per solve: per-point errors scatter around zero."""
    path = PATHS.build("vp")
    gmm = make_mixture(2)
    out, ref = run(path, gmm, 200, estimator="hutchinson", n_probes=4, rtol=1e-5, atol=1e-5,
                   generator=torch.Generator().manual_seed(0))
    err = out.log_prob - ref
    stderr = err.std() / len(err) ** 0.5
    assert err.std() > 1e-3  # genuinely stochastic
    assert err.mean().abs() < 4 * stderr + 1e-3, (err.mean().item(), stderr.item())


def test_standard_normal_prior_bias_is_small_but_nonzero():
    """``N(0, I)`` is not exactly ``p_1`` (VP keeps ``α_1 ≈ 0.0066`` of the signal): a bias of
    ~1e-2 nats per point, far above the solver error and far below the likelihood itself."""
    path = PATHS.build("vp")
    gmm = make_mixture(2)
    exact, ref = run(path, gmm, 48, rtol=1e-6, atol=1e-6)
    approx, _ = run(path, gmm, 48, rtol=1e-6, atol=1e-6, prior=None)
    assert isinstance(path.prior((2,)), StandardNormal)
    bias = approx.log_prob - ref
    # same ODE, same z: the whole difference is the prior's
    torch.testing.assert_close(approx.log_prob - exact.log_prob,
                               path.prior((2,)).log_prob(exact.z) - exact.prior_log_prob)
    assert 1e-4 < bias.abs().max().item() < 0.1, bias.abs().max().item()


def test_flow_from_score_and_public_api_agree():
    path = PATHS.build("subvp")
    gmm = make_mixture(2)
    field_score = mixture_score_field(gmm, path)
    x = gmm.sample(8, torch.Generator().manual_seed(3))
    prior = gmm.marginal(path, path.t1)
    flow = flow_from_score(field_score, path, (2,), prior=prior)
    a = flow_log_likelihood(flow, x, rtol=1e-7, atol=1e-7, per_sample_norm=True)
    b = score_log_likelihood(xt_score(gmm, path), x, path, prior=prior, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=1e-6)
    # the adapter passes t as [B]; the field form of the same score agrees pointwise
    t = torch.tensor(0.4, dtype=F64)
    torch.testing.assert_close(xt_score_to_field(xt_score(gmm, path))(t, x), field_score(t, x))
    torch.testing.assert_close(probability_flow_field(field_score, path)(t, x), flow.velocity(t, x))
    torch.testing.assert_close(flow.denoise(t, x), path.x0_from_score(field_score(t, x), t, x))


def test_custom_interval():
    """``t0``/``t1`` override the path's: integrating from 0.2 gives the density at 0.2."""
    path = PATHS.build("vp")
    gmm = make_mixture(2)
    x = gmm.marginal(path, 0.2).sample(16, torch.Generator().manual_seed(4))
    out = score_log_likelihood(xt_score(gmm, path), x, path, t0=0.2, t1=0.8,
                               prior=gmm.marginal(path, 0.8), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.log_prob, gmm.marginal(path, 0.2).log_prob(x), rtol=0, atol=1e-4)
