"""``mixture_score_field`` with one time per sample (the per-sample solver's call).

The exact marginal score ``∇ log p_t`` of a full-covariance mixture along a Gaussian path,
``p_t = Σ_k w_k N(α_t μ_k, α_t² Σ_k + σ_t² I)``, evaluated at a ``[B]`` tensor of distinct
times must equal the single-time field row by row (float64, to rounding) and the autograd
gradient of the marginal's log-density, and must not factorise ``B × K`` covariances per call.
"""

from __future__ import annotations

import pytest
import torch

import flowkit
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.paths import VE, VP, CondOT, SubVP

F64 = torch.float64
PATHS = {"vp": VP(), "subvp": SubVP(), "ve": VE(), "cond_ot": CondOT()}


def mixture(dim: int = 8, components: int = 4, dtype: torch.dtype = F64) -> GaussianMixture:
    data = flowkit.DATASETS.build("gmm", dim=dim, components=components, seed=0)
    return GaussianMixture(data.means.to(dtype), data.covs.to(dtype), data.weights.to(dtype))


def points(gmm: GaussianMixture, path, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct times spread over the path's interval, and points near the data and noise scales."""
    g = torch.Generator().manual_seed(1)
    t = path.t0 + (path.t1 - path.t0) * torch.rand(n, generator=g, dtype=gmm.means.dtype)
    scale = torch.linspace(0.2, 3.0, n, dtype=gmm.means.dtype)[:, None]
    return t, gmm.sample(n, generator=g) + scale * torch.randn(n, gmm.dim, generator=g, dtype=gmm.means.dtype)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_distinct_times_equal_the_single_time_field_row_by_row(name: str):
    gmm, path = mixture(), PATHS[name]
    t, x = points(gmm, path)
    score = mixture_score_field(gmm, path)
    together = score(t, x)
    by_row = torch.cat([score(t[i], x[i:i + 1]) for i in range(len(t))])
    assert together.dtype == F64 and together.shape == x.shape
    err = (together - by_row).abs().max() / by_row.abs().max()
    assert float(err) < 1e-12, float(err)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_distinct_times_score_is_the_gradient_of_the_marginal_log_density(name: str):
    gmm, path = mixture(), PATHS[name]
    t, x = points(gmm, path, n=16)
    y = x.clone().requires_grad_(True)
    log_p = torch.stack([gmm.marginal(path, t[i]).log_prob(y[i:i + 1])[0] for i in range(len(t))])
    (grad,) = torch.autograd.grad(log_p.sum(), y)
    err = (mixture_score_field(gmm, path)(t, x) - grad).abs().max() / grad.abs().max()
    assert float(err) < 1e-12, float(err)


def test_distinct_times_factorise_nothing_per_call(monkeypatch):
    """The old path built ``[B, K, D, D]`` covariances and ran ``B·K`` Cholesky factorisations
    and triangular solves on every call; the eigenbasis needs neither."""
    gmm, path = mixture(), VP()
    t, x = points(gmm, path)
    score = mixture_score_field(gmm, path)
    calls = []
    for name in ("cholesky", "cholesky_ex", "solve_triangular", "eigh", "inv"):
        original = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    out = score(t, x)
    assert calls == [], calls
    assert out.shape == x.shape


def test_float32_mixture_at_distinct_times_is_correctly_rounded():
    path = VP()
    exact = mixture(dtype=F64)
    t, x = points(exact, path)
    ref = mixture_score_field(exact, path)(t, x)
    out = mixture_score_field(mixture(dtype=torch.float32), path)(t.float(), x.float())
    assert out.dtype == torch.float32
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_times_that_match_neither_one_nor_every_row_are_named():
    gmm, path = mixture(), VP()
    x = gmm.sample(5, generator=torch.Generator().manual_seed(0))
    for t in (torch.tensor([0.1, 0.2, 0.3], dtype=F64), torch.full((3,), 0.2, dtype=F64)):  # distinct, equal
        with pytest.raises(ValueError, match="one per row of x"):
            mixture_score_field(gmm, path)(t, x)
