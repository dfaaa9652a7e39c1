r"""The assignment LP by a primal-dual interior-point method, in torch: the warm start of the
torch auction on an accelerator.

The linear relaxation of the assignment problem,

.. math::  \min_X\ \langle C, X\rangle \quad\text{s.t.}\quad X\mathbf 1 = \mathbf 1,\ 
           X^\top \mathbf 1 = \mathbf 1,\ X \ge 0,

has a permutation matrix among its optima (Birkhoff). Mehrotra's predictor–corrector method
solves it to a small duality gap in about a dozen Newton steps, each one ``n × n`` Cholesky
factorisation, all on the cost's device; :func:`round_plan` turns the nearly integral plan
into a permutation, and the duals become the auction's starting prices
(:func:`flowkit.ot.optimal_assignment`, ``method="ipm"``).

References:
    Mehrotra (1992). On the implementation of a primal-dual interior point method.
    SIAM Journal on Optimization 2(4), 575–601.
    Wright (1997). Primal-Dual Interior-Point Methods. SIAM, ch. 10.

Example:
    >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]], dtype=torch.float64)
    >>> plan, u, v = interior_point_assignment(cost, gap=1e-9)
    >>> round_plan(plan).tolist(), round(float(u.sum() + v.sum()), 4)  # permutation, optimal cost
    ([1, 0, 2], 5.0)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["interior_point_assignment", "round_plan"]


def round_plan(plan: Tensor, rounds: int = 8) -> Tensor:
    """A permutation close to a (near-)doubly-stochastic ``plan``.

    Each row takes its largest entry when those form a permutation (the usual case near
    an LP optimum); otherwise free rows propose their largest free entry (ties broken at
    random, fixed seed), each column keeps its best proposal, and rows still free after
    ``rounds`` take the remaining columns in order.

    Args:
        plan: ``[n, n]`` non-negative.
        rounds: proposal rounds before the remaining rows are filled in order.

    Returns:
        ``perm`` ``[n]`` (long): row ``i`` takes column ``perm[i]``.
    """
    n, device = plan.shape[0], plan.device
    first = plan.argmax(1)
    if bool(torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, first, True).all()):
        return first  # already a permutation (the usual case)
    gen = torch.Generator(device=device).manual_seed(0)
    score = plan * (1 + 1e-6 * torch.rand(plan.shape, generator=gen, device=device, dtype=plan.dtype))
    row_col = torch.full((n,), -1, dtype=torch.long, device=device)
    col_taken = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(rounds):
        free = (row_col < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return row_col
        offer = score.index_select(0, free).masked_fill_(col_taken, -math.inf)
        value, col = offer.max(1)
        best = torch.full((n,), -math.inf, dtype=plan.dtype, device=device).scatter_reduce_(0, col, value, "amax")
        won = value == best.index_select(0, col)
        winner = torch.full((n,), -1, dtype=torch.long, device=device).scatter_reduce_(0, col[won], free[won], "amax")
        cols = (winner >= 0).nonzero().squeeze(1)
        row_col.index_copy_(0, winner.index_select(0, cols), cols)
        col_taken.index_fill_(0, cols, True)
    free = (row_col < 0).nonzero().squeeze(1)
    row_col.index_copy_(0, free, (~col_taken).nonzero().squeeze(1))
    return row_col


def interior_point_assignment(
    cost: Tensor, *, gap: float = 1e-5, max_iter: int = 60, scale: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    r"""The assignment LP ``min ⟨C, X⟩`` s.t. ``X 1 = 1``, ``Xᵀ 1 = 1``, ``X ≥ 0``, by
    Mehrotra's predictor–corrector primal-dual interior-point method (Mehrotra 1992;
    Wright 1997, ch. 10).

    The dual is ``max Σ u + Σ v`` with slacks ``S = C − u 1ᵀ − 1 vᵀ ≥ 0``. Each Newton step
    eliminates ``ΔX`` and ``ΔS`` and solves for ``Δv`` with the ``n × n`` Schur complement

    .. math::  M = \operatorname{diag}(D^\top 1) - D^\top \operatorname{diag}(D 1)^{-1} D,
               \qquad D = X / S,

    (made definite by adding ``(tr M / n²) 1 1ᵀ``, since ``M 1 = 0`` is the free shift
    ``u + c, v − c``), factorised once and reused by the corrector. The start ``X = 1/n``,
    ``u_i = min_j C_ij − 1``, ``v = 0`` is strictly feasible. Stops when
    ``⟨X, S⟩ ≤ gap · n`` in units of ``scale`` (default ``max |C|``); near that point the
    normal equations lose precision, which is why the auction finishes the job.

    Args:
        cost: ``[n, n]`` finite costs.
        gap: target duality gap per pair, relative to ``scale``.
        max_iter: iteration cap.
        scale: cost unit for the stopping rule.
        dtype: precision of the iterates and of the factorisation (default: that of
            ``cost``; float64 is tried if a float32 factorisation fails). float32 suffices
            for the auction's warm start.

    Returns:
        ``(X, u, v)`` in the units of ``cost``, or ``None`` when the linear algebra broke
        down (non-finite values or an unfactorisable Schur complement).
    """
    n = cost.shape[0]
    dtype = cost.dtype if dtype is None else dtype
    scale = float(cost.abs().max()) if scale is None else float(scale)
    scale = scale if scale > 0 else 1.0
    c = cost.to(dtype) / scale
    x = torch.full_like(c, 1.0 / n)
    u = c.amin(1) - 1.0
    v = torch.zeros_like(u)
    s = c - u[:, None]  # dual feasible, and stays so: every step moves (u, v, S) along it
    d, d_scaled, dx, ds, g, tmp, schur = (torch.empty_like(c) for _ in range(7))
    for _ in range(max_iter):
        xs = float(torch.dot(x.view(-1), s.view(-1)))
        if not math.isfinite(xs):
            return None
        if xs <= gap * n:
            return x, u * scale, v * scale
        mu = xs / (n * n)
        row_sum, col_sum = x.sum(1), x.sum(0)
        torch.div(x, s, out=d)
        d_row = d.sum(1)
        torch.div(d, d_row[:, None], out=d_scaled)
        factor = _cholesky(_schur_laplacian(d, d_scaled, out=schur))
        if factor is None:
            return None

        def direction(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            # (Δu, Δv) with ΔS = −Δu 1ᵀ − 1 Δvᵀ, ΔX = G − D∘ΔS, (G 1, Gᵀ 1) fixed by a and b;
            # fills ``ds`` (ΔS) and returns (Δu, Δv).
            rhs = b - d_scaled.T @ a
            dv = torch.cholesky_solve(rhs[:, None].to(factor.dtype), factor).squeeze(1).to(x.dtype)
            du = (a - d @ dv) / d_row
            torch.sub(du.neg()[:, None], dv[None, :], out=ds)
            return du, dv

        # affine-scaling predictor: G = −X, so a = 1 − X1 + X1 = 1 and b = 1
        ones = torch.ones_like(row_sum)
        direction(ones, ones)
        torch.addcmul(x, d, ds, out=dx).neg_()
        a_p, a_d = _step_to_boundary(x, dx, tmp), _step_to_boundary(s, ds, tmp)
        torch.add(x, dx, alpha=a_p, out=tmp)
        torch.add(s, ds, alpha=a_d, out=g)
        mu_aff = float(torch.dot(tmp.view(-1), g.view(-1))) / (n * n)
        sigma = (mu_aff / mu) ** 3
        # Mehrotra corrector: G = (σμ − ΔX_aff ∘ ΔS_aff) / S − X
        torch.mul(dx, ds, out=tmp).sub_(sigma * mu)
        torch.addcdiv(x, tmp, s, out=g).neg_()
        du, dv = direction(1.0 - row_sum - g.sum(1), 1.0 - col_sum - g.sum(0))
        torch.addcmul(g, d, ds, value=-1.0, out=dx)
        a_p, a_d = 0.995 * _step_to_boundary(x, dx, tmp), 0.995 * _step_to_boundary(s, ds, tmp)
        x.add_(dx, alpha=a_p)
        s.add_(ds, alpha=a_d)
        u, v = u + a_d * du, v + a_d * dv
    return x, u * scale, v * scale


def _schur_laplacian(d: Tensor, d_scaled: Tensor, out: Tensor) -> Tensor:
    """``M = diag(Dᵀ1) − Dᵀ diag(D1)⁻¹ D + (tr M / n²) 1 1ᵀ`` without cancellation.

    ``M`` is the Laplacian of the weights ``W = Dᵀ diag(D1)⁻¹ D`` (``M 1 = 0``), so its
    diagonal is the sum of the off-diagonal weights; forming it as ``diag(Dᵀ1) − diag(W)``
    would subtract numbers of order ``1/μ`` from each other, while the off-diagonal
    weights, sums of positive terms, are all of order ``μ``: assembled this way ``M`` is
    accurate, and well scaled, even in float32.
    """
    n = d.shape[0]
    weights = torch.mm(d.T, d_scaled, out=out)
    weights.diagonal().zero_()
    degree = weights.sum(1)
    schur = weights.neg_()
    schur.diagonal().copy_(degree)
    return schur.add_(float(degree.mean()) / n)


def _cholesky(matrix: Tensor) -> Optional[Tensor]:
    """Cholesky factor of a symmetric positive (semi)definite ``matrix`` (diagonal jitter,
    then float64, if needed), or ``None``."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    matrix = matrix.to(torch.float64) if matrix.device.type != "mps" else matrix
    jitter = 0.0
    for _ in range(4):
        bump = 1e-10 * float(matrix.diagonal().abs().max()) if jitter == 0.0 else 99 * jitter
        matrix.diagonal().add_(bump)
        jitter += bump
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return factor
    return None


def _step_to_boundary(z: Tensor, dz: Tensor, out: Tensor) -> float:
    """Largest ``a ≤ 1`` with ``z + a dz ≥ 0`` (``z > 0``)."""
    worst = float(torch.div(dz, z, out=out).amin())
    return 1.0 if worst >= -1.0 else -1.0 / worst
