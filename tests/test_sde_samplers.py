"""Reverse-SDE samplers with the exact score of a Gaussian mixture (VP, float64).

With the exact score the only errors are the Euler–Maruyama discretisation and the prior
mismatch (both well below the sampling error here), so the samples' mean and covariance
must match the mixture's within a few standard errors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowkit.components import PATHS, SAMPLERS
from flowkit.diffusion import flow_from_score
from flowkit.flow import Flow
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.samplers.sde import euler_maruyama, predictor_corrector

F64 = torch.float64
N = 3000


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=F64)
    covs = torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.3, -0.1], [-0.1, 0.6]], [[0.2, 0.0], [0.0, 0.4]]],
                        dtype=F64)
    return GaussianMixture(means, covs, torch.tensor([0.3, 0.5, 0.2], dtype=F64))


@pytest.fixture(scope="module")
def flow(gmm) -> Flow:
    path = PATHS.build("vp")
    return flow_from_score(mixture_score_field(gmm, path), path, (2,))


def prior_samples(flow: Flow, n: int = N, seed: int = 0) -> torch.Tensor:
    return flow.prior.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def standard_errors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of the sample mean and of each sample-covariance entry."""
    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    n = x.shape[0]
    return x.std(0) / n**0.5, prods.std(0) / n**0.5


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, k: float = 4.0) -> None:
    se_mean, se_cov = standard_errors(x)
    d_mean, d_cov = (x.mean(0) - mean).abs(), (x.T.cov() - cov).abs()
    assert bool((d_mean < k * se_mean).all()), (d_mean, se_mean)
    assert bool((d_cov < k * se_cov + 0.02 * cov.abs().max()).all()), (d_cov, se_cov)


def test_registered():
    assert SAMPLERS.get("euler_maruyama") is euler_maruyama
    assert SAMPLERS.get("predictor_corrector") is predictor_corrector


def test_euler_maruyama_reproduces_mixture_moments(flow, gmm):
    out = euler_maruyama(flow, prior_samples(flow), steps=300, seed=1)
    assert out.nfe == 300 + 1  # steps + Tweedie
    assert_moments(out.x, gmm.mean(), gmm.covariance())


def test_predictor_corrector_reproduces_mixture_moments(flow, gmm):
    out = predictor_corrector(flow, prior_samples(flow), steps=200, corrector_steps=1, snr=0.16, seed=2)
    assert out.nfe == 200 * 2 + 1
    assert_moments(out.x, gmm.mean(), gmm.covariance())


def test_torchsde_backend_agrees_with_loop(flow, gmm):
    loop = euler_maruyama(flow, prior_samples(flow, seed=3), steps=200, seed=4).x
    sde = euler_maruyama(flow, prior_samples(flow, seed=5), steps=200, seed=6, backend="torchsde")
    assert sde.nfe == 200 + 1 + 1  # + torchsde's shape check of the drift
    assert_moments(sde.x, gmm.mean(), gmm.covariance())
    se_a, sc_a = standard_errors(loop)
    se_b, sc_b = standard_errors(sde.x)
    assert bool(((loop.mean(0) - sde.x.mean(0)).abs() < 4 * (se_a**2 + se_b**2).sqrt()).all())
    assert bool(((loop.T.cov() - sde.x.T.cov()).abs() < 4 * (sc_a**2 + sc_b**2).sqrt() + 0.02).all())


@pytest.mark.parametrize("sample", [
    lambda f, x, s: euler_maruyama(f, x, steps=20, seed=s),
    lambda f, x, s: euler_maruyama(f, x, steps=20, seed=s, backend="torchsde"),
    lambda f, x, s: predictor_corrector(f, x, steps=20, seed=s),
], ids=["em-loop", "em-torchsde", "pc"])
def test_fixed_seed_is_reproducible(flow, sample):
    x = prior_samples(flow, n=64)
    a, b, c = sample(flow, x, 7).x, sample(flow, x, 7).x, sample(flow, x, 8).x
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_denoise_fallback_is_the_noise_free_mean_step(flow):
    """Without ``flow.denoise`` the last step adds no noise: one step is deterministic."""
    plain = dataclasses.replace(flow, denoise=None)
    x = prior_samples(flow, n=16)
    a = euler_maruyama(plain, x, steps=1, seed=1)
    b = euler_maruyama(plain, x, steps=1, seed=2)
    assert a.nfe == 1 and torch.equal(a.x, b.x)
    t1, h = torch.tensor(flow.t1, dtype=F64), torch.tensor(flow.t0 - flow.t1, dtype=F64)
    mean = x + (flow.drift(t1, x) - flow.diffusion(t1) ** 2 * flow.score(t1, x)) * h
    torch.testing.assert_close(a.x, mean)
    # and it still samples the mixture
    assert euler_maruyama(plain, x, steps=5, denoise=False, seed=1).nfe == 5


def test_guidance_is_applied_to_the_score(flow):
    """``guidance=w`` samples exactly as an unguided flow with the score ``(1+w) s_c − w s_∅``."""
    def score(t, x, cond=None):
        # N(c, I) for label c; the null label −1 and "no condition" give N(0, I)
        shift = 0.0 if cond is None else cond.clamp_min(0).to(x.dtype)[:, None]
        return shift - x

    w = 1.5
    conditional = dataclasses.replace(flow, score=score, denoise=None)
    combined = dataclasses.replace(flow, denoise=None,
                                   score=lambda t, x, cond=None: (1 + w) * score(t, x, cond) - w * score(t, x))
    x = prior_samples(flow, n=8)
    cond = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    guided = euler_maruyama(conditional, x, cond=cond, steps=10, guidance=w, seed=3)
    manual = euler_maruyama(combined, x, cond=cond, steps=10, seed=3)
    torch.testing.assert_close(guided.x, manual.x)
    assert guided.nfe == 10


def test_errors(flow):
    with pytest.raises(ValueError, match="score"):
        euler_maruyama(dataclasses.replace(flow, score=None), prior_samples(flow, n=4))
    with pytest.raises(ValueError, match="backend"):
        euler_maruyama(flow, prior_samples(flow, n=4), backend="scipy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        predictor_corrector(flow, prior_samples(flow, n=4), steps=0)
