r"""Gaussian mixtures in closed form, and their marginals along a Gaussian path.

If ``x_data ~ Σ_k w_k N(μ_k, Σ_k)`` and ``x_t = α_t x_data + σ_t ε`` (:mod:`flowkit.paths`),
then ``x_t`` is again a mixture with the same weights,

.. math::  p_t(x) = \sum_k w_k\, \mathcal N(x;\ \alpha_t \mu_k,\ \alpha_t^2 \Sigma_k + \sigma_t^2 I),

so its density and its score are exact at every ``t``. This makes mixtures the reference
problem for samplers and likelihoods: plugging the exact score into a reverse SDE or the
probability-flow ODE must reproduce ``p_{t0}`` up to discretisation error only.

Example:
    >>> from flowkit.paths import VP
    >>> gmm = GaussianMixture(torch.zeros(1, 2), torch.eye(2)[None] * 4, torch.ones(1))
    >>> p1 = gmm.marginal(VP(), 1.0)  # ≈ N(0, I)
    >>> bool((p1.covs - torch.eye(2)).abs().max() < 1e-3)
    True
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .paths import GaussianPath

__all__ = ["GaussianMixture", "mixture_score_field"]


class GaussianMixture:
    """``p(x) = Σ_k w_k N(x; μ_k, Σ_k)`` with full covariances.

    Args:
        means: ``[K, D]``.
        covs: ``[K, D, D]`` symmetric positive definite.
        weights: ``[K]`` positive; normalised to sum to one.

    Raises:
        ValueError: on inconsistent shapes or non-positive weights.
    """

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor) -> None:
        if means.dim() != 2 or covs.shape != (*means.shape, means.shape[1]) or weights.shape != means.shape[:1]:
            raise ValueError(f"need means [K, D], covs [K, D, D], weights [K]; got "
                             f"{tuple(means.shape)}, {tuple(covs.shape)}, {tuple(weights.shape)}")
        if not bool((weights > 0).all()):
            raise ValueError("mixture weights must be positive")
        self.means = means
        self.covs = covs
        self.weights = weights / weights.sum()
        # factorised in float64 whatever the parameters' dtype, then cast: a float32 mixture
        # gets the correctly rounded factor of its own covariances
        chol = torch.linalg.cholesky(covs.to(torch.float64))
        self._chol = chol.to(covs.dtype)
        self._chol_inv = _tril_inverse(chol).to(covs.dtype)

    def to(self, dtype: Optional[torch.dtype] = None,
           device: Optional[torch.device | str] = None) -> "GaussianMixture":
        """The same mixture with its parameters cast to ``dtype`` and moved to ``device``
        (refactorised there, so a float64 copy of a float32 mixture is exact in float64)."""
        if (dtype is None or dtype == self.means.dtype) and (device is None or
                                                              torch.device(device) == self.means.device):
            return self
        return GaussianMixture(self.means.to(dtype=dtype, device=device), self.covs.to(dtype=dtype, device=device),
                               self.weights.to(dtype=dtype, device=device))

    @property
    def shape(self) -> tuple[int]:
        """Event shape ``(dim,)``, as the :class:`~flowkit.flow.Prior` protocol declares."""
        return (self.dim,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` for ``x`` of shape ``[N, D]``; returns ``[N]``."""
        log_joint, _ = _components(x, self.means, self._chol_inv, self.weights.log())
        return torch.logsumexp(log_joint, -1)

    def score(self, x: Tensor) -> Tensor:
        r"""``∇ log p(x) = −Σ_k r_k(x) Σ_k⁻¹ (x − μ_k)``, ``r_k`` the responsibilities."""
        return _score(x, self.means, self._chol_inv, self.weights.log())

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` independent samples ``[n, D]`` (component by ancestral sampling)."""
        return self.sample_components(n, generator)[0]

    def sample_components(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        r"""``n`` samples ``[n, D]`` and the component ``k`` ``[n]`` (long) each came from.

        Ancestral sampling: ``k ~ Categorical(w)``, then ``x = μ_k + L_k z`` with
        ``Σ_k = L_k L_kᵀ`` and ``z ~ N(0, I)``; both draws use only ``generator``.
        """
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, device=self.means.device, generator=generator)
        return self.means[k] + (self._chol[k] @ z.unsqueeze(-1)).squeeze(-1), k

    def mean(self) -> Tensor:
        """``E[x] = Σ_k w_k μ_k``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``Cov[x] = Σ_k w_k (Σ_k + μ_k μ_kᵀ) − E[x] E[x]ᵀ`` (law of total covariance)."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights,
                              self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    def marginal(self, path: GaussianPath, t: float | Tensor) -> "GaussianMixture":
        """The law of ``x_t = α_t x + σ_t ε``: means ``α_t μ_k``, covariances ``α_t² Σ_k + σ_t² I``."""
        alpha, sigma = _alpha_sigma(path, t, self.means)
        eye = torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)
        return GaussianMixture(alpha * self.means, alpha**2 * self.covs + sigma**2 * eye, self.weights)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.means.shape[0]}, D={self.dim}, dtype={self.means.dtype})"


def mixture_score_field(gmm: GaussianMixture, path: GaussianPath) -> Callable[..., Tensor]:
    r"""The exact score ``∇_x log p_t(x)`` of ``gmm``'s marginal under ``path``, as a flowkit
    field ``score(t, x, cond=None)``.

    ``t`` is a scalar (tensor or float) or a ``[B]`` tensor, one time per row of ``x``
    ``[B, D]``. A scalar, or a ``[B]`` tensor of equal times, uses the marginal's Cholesky
    factors (:meth:`GaussianMixture.marginal`). Distinct times use the eigendecomposition
    ``Σ_k = U_k diag(λ_k) U_kᵀ``, made once here (in float64, then cast), since the marginal
    covariances share its eigenvectors:

    .. math::  \alpha_t^2 \Sigma_k + \sigma_t^2 I = U_k\, \mathrm{diag}(\alpha_t^2 \lambda_k + \sigma_t^2)\, U_k^\top .

    With ``z_k = U_kᵀ (x − α_t μ_k)`` and ``v_k = α_t² λ_k + σ_t²`` (elementwise),
    ``log N(x; α_t μ_k, ·) = −½ Σ z_k²/v_k − ½ Σ log v_k − (D/2) log 2π`` and
    ``∇ log p_t(x) = −Σ_k r_k(x) U_k (z_k / v_k)``, ``r_k`` the responsibilities. A call
    costs two ``[B, D] × [D, K·D]`` products and ``O(B K D)`` elementwise work; nothing is
    factorised per sample.

    ``cond`` is ignored.

    Raises:
        ValueError: ``t`` holds neither one time nor one time per row of ``x``.

    Example:
        >>> from flowkit.paths import VP
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
        >>> gmm = GaussianMixture(torch.randn(2, 3, generator=g, dtype=torch.float64),
        ...                       a @ a.transpose(1, 2) + torch.eye(3), torch.ones(2))
        >>> score = mixture_score_field(gmm, VP())
        >>> x, t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
        >>> by_row = torch.cat([score(t[i], x[i:i + 1]) for i in range(4)])  # one time at a time
        >>> bool((score(t, x) - by_row).abs().max() < 1e-12)
        True
    """
    lam64, vecs64 = torch.linalg.eigh(gmm.covs.to(torch.float64))
    factors: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def eigen(like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``λ [K, D]``, ``V [D, K·D]`` (column ``k·D + i`` is ``U_k``'s ``i``-th eigenvector),
        ``U_kᵀ μ_k [K, D]`` and ``log w [K]`` in ``like``'s dtype and device (made once each)."""
        key = (like.dtype, like.device)
        if key not in factors:
            k, d = lam64.shape
            proj_means = torch.einsum("kji,kj->ki", vecs64, gmm.means.to(torch.float64))
            stacked = vecs64.permute(1, 0, 2).reshape(d, k * d)
            factors[key] = tuple(v.to(dtype=like.dtype, device=like.device)
                                 for v in (lam64, stacked, proj_means, gmm.weights.to(torch.float64).log()))
        return factors[key]

    def score(t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.numel() > 1 and t.numel() != x.shape[0]:
            raise ValueError(f"mixture_score_field: t has {t.numel()} times for x of shape {tuple(x.shape)}; "
                             f"pass one time, or one per row of x")
        if t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all()):
            return _distinct_times_score(x, t.reshape(-1), path, *eigen(x))
        return gmm.marginal(path, t.reshape(-1)[0]).score(x)

    return score


def _distinct_times_score(x: Tensor, t: Tensor, path: GaussianPath, lam: Tensor, stacked: Tensor,
                          proj_means: Tensor, log_w: Tensor) -> Tensor:
    """The marginal score at one time per row, in the eigenbasis (see :func:`mixture_score_field`)."""
    b, d = x.shape
    k = lam.shape[0]
    alpha, sigma = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]  # [B, 1, 1]
    z = (x @ stacked).reshape(b, k, d) - alpha * proj_means  # U_kᵀ (x − α μ_k)  [B, K, D]
    var = alpha**2 * lam + sigma**2  # [B, K, D]
    white = z / var
    log_n = -0.5 * (z * white).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * d * math.log(2 * math.pi)
    resp = torch.softmax(log_w + log_n, -1)  # [B, K]
    return -((resp.unsqueeze(-1) * white).reshape(b, k * d) @ stacked.T)


def _alpha_sigma(path: GaussianPath, t: float | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return path.alpha(t), path.sigma(t)


def _tril_inverse(chol: Tensor) -> Tensor:
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def _components(x: Tensor, means: Tensor, chol_inv: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """``log w_k + log N(x; μ_k, Σ_k)`` ``[N, K]`` and the whitened ``z = L_k⁻¹ (x − μ_k)``
    ``[N, K, D]``, for ``Σ_k = L_k L_kᵀ``.

    ``means``/``chol_inv`` may carry a leading per-sample batch dimension. Products with the
    precomputed ``L_k⁻¹`` (einsum) are much faster than batched triangular solves.
    """
    z = torch.einsum("...kij,...kj->...ki", chol_inv, x.unsqueeze(-2) - means)
    half_logdet = -torch.diagonal(chol_inv, dim1=-2, dim2=-1).log().sum(-1)
    d = x.shape[-1]
    log_n = -0.5 * z.pow(2).sum(-1) - half_logdet - 0.5 * d * math.log(2 * math.pi)
    return log_w + log_n, z


def _score(x: Tensor, means: Tensor, chol_inv: Tensor, log_w: Tensor) -> Tensor:
    log_joint, z = _components(x, means, chol_inv, log_w)
    resp = torch.softmax(log_joint, -1)  # [N, K]
    prec_diff = torch.einsum("...kji,...kj->...ki", chol_inv, z)  # Σ_k⁻¹ (x − μ_k) = L⁻ᵀ L⁻¹ (x − μ_k)
    return -(resp.unsqueeze(-1) * prec_diff).sum(-2)
