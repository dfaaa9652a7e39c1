"""Shared test set-up: one thread per test process, a float64 fixture, and the exact Gaussian
mixture that likelihood and sampler tests check against its closed-form log-density.

Test modules import the plain builders (``from conftest import exact_mixture``): pytest puts
``tests/`` on ``sys.path`` for this file (no ``__init__.py`` here, default import mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import pytest
import torch

if TYPE_CHECKING:
    from flowkit.gmm import GaussianMixture

# Tiny tensors: two threads stall each other on a loaded 2-core machine; one is faster.
torch.set_num_threads(1)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, restored after it (a test that trains may set more):
    on these tiny tensors the threads only add synchronisation, which stalls badly (10x) when
    other processes share the cores. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_loss_nan(monkeypatch: pytest.MonkeyPatch, objective: type) -> Callable:
    """Patch ``objective.loss`` so that every loss it returns is NaN (a run that diverges at its
    next step); returns the original ``loss``, to put back with ``monkeypatch.setattr``."""
    original = objective.loss

    def poisoned(self, x, cond=None):
        out = original(self, x, cond)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objective, "loss", poisoned)
    return original


def exact_mixture(dim: int, weights: Sequence[float], *, seed: int = 0, spread: float, cov_scale: float,
                  cov_floor: float) -> GaussianMixture:
    """A random float64 Gaussian mixture with full covariances, whose log-density, score and
    marginals along any Gaussian path are exact (:class:`flowkit.gmm.GaussianMixture`).

    ``K = len(weights)`` components, drawn in this order from one generator seeded with ``seed``:
    means ``μ_k = spread · m_k`` and covariances ``Σ_k = cov_scale · A_k A_kᵀ + cov_floor · I``,
    with ``m_k ~ N(0, I_D)`` and ``A_k`` of i.i.d. ``N(0, 1/D)`` entries (so ``E[A Aᵀ] = I``);
    ``cov_floor > 0`` keeps every ``Σ_k`` positive definite.

    Args:
        dim: the event dimension ``D``.
        weights: mixture weights (normalised by :class:`~flowkit.gmm.GaussianMixture`).
        seed: seed of the generator the parameters are drawn from.
        spread: scale of the means.
        cov_scale: scale of the random part of each covariance.
        cov_floor: multiple of the identity added to each covariance.

    Returns:
        The mixture, every parameter in float64.
    """
    from flowkit.gmm import GaussianMixture

    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    k = len(weights)
    means = spread * torch.randn(k, dim, generator=g, dtype=f64)
    a = torch.randn(k, dim, dim, generator=g, dtype=f64) / dim**0.5
    covs = cov_scale * a @ a.mT + cov_floor * torch.eye(dim, dtype=f64)
    return GaussianMixture(means, covs, torch.tensor(list(weights), dtype=f64))
