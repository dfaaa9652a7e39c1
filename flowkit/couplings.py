r"""Couplings: how a batch of data is paired with a batch of noise before flow matching.

Conditional flow matching regresses a network on the velocity of a path between a data
point and a noise sample drawn *jointly* from a coupling ``q(x_data, ε)`` whose marginals
are the data and the prior (Tong et al. 2024, Sec. 3; Liu et al. 2023). The independent
coupling gives I-CFM (Lipman et al. 2023); a coupling close to optimal transport makes the
learned trajectories straighter and cheaper to integrate.

A coupling is a callable ``coupling(x_data, noise, cond=None) -> (x_data', noise')`` on one
minibatch. Every coupling here **keeps the data in place and reorders or resamples the
noise**, so labels (``cond``) stay aligned with ``x_data``. With integer class labels the
optimal-transport couplings pair only data and noise *of the same label*: noise slot ``j``
is given the label of data point ``j`` (a uniformly random partition of i.i.d. noise) and
pairs across labels are forbidden by a large cost. This keeps the noise paired with each
class distributed as the prior, which a class-conditional model (and classifier-free
guidance) needs; a global OT plan would hand each class the noise nearest to it. Vector
conditions cannot be grouped and are ignored by the couplings.

=================  ============================================================================
name               pairing
=================  ============================================================================
``independent``    as drawn (I-CFM)
``exact_ot``       minimum total squared distance over all permutations (OT-CFM), solved by
                   :func:`optimal_assignment` (a compiled auction on the CPU, torch on an
                   accelerator, so the batch stays on its device); no pair is repeated
``sinkhorn``       each data point draws its noise from its row of the entropic OT plan
                   (:func:`sinkhorn_potentials`); with ``reg = 2σ²`` the static Schrödinger
                   bridge of SB-CFM
=================  ============================================================================

:class:`Teacher` (used by the ``rectified_flow`` objective) pairs each noise with the sample
a trained flow maps it to (reflow).

References:
    Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf, Bengio (2024). Improving and
    Generalizing Flow-Based Generative Models with Minibatch Optimal Transport. TMLR.
    Pooladian, Ben-Hamu, Domingo-Enrich, Amos, Lipman, Chen (2023). Multisample Flow
    Matching: Straightening Flows with Minibatch Couplings. ICML.
    Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
    assignment problem. Annals of Operations Research 14.
    Bertsekas & Eckstein (1988). Dual coordinate step methods for linear network flow
    problems. Mathematical Programming 42 (ε-scaling).
    Cuturi (2013). Sinkhorn Distances: Lightspeed Computation of Optimal Transport. NeurIPS.
    Peyré & Cuturi (2019). Computational Optimal Transport, Sec. 4.4 (log-domain Sinkhorn).
    Liu, Gong, Liu (2023). Flow Straight and Fast: Learning to Generate and Transfer Data
    with Rectified Flow. ICLR.

Example:
    >>> x, z = torch.randn(64, 2), torch.randn(64, 2)
    >>> x2, z2 = ExactOT()(x, z)
    >>> bool((x2 == x).all()) and sorted(z2[:, 0].tolist()) == sorted(z[:, 0].tolist())
    True
    >>> bool(squared_distances(x2, z2).diagonal().sum() <= squared_distances(x, z).diagonal().sum())
    True
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor

from .components import COUPLINGS
from .constraints import PositiveFloat, PositiveInt

try:  # the C solver, built at install time where a compiler exists (setup.py)
    from . import _auction as _compiled
except ImportError:  # pragma: no cover - depends on the install
    _compiled = None

__all__ = ["Coupling", "Independent", "ExactOT", "Sinkhorn", "Teacher", "optimal_assignment",
           "compiled_auction", "compiled_auction_available", "interior_point_assignment",
           "auction_assignment", "sinkhorn_potentials", "sinkhorn_log_plan", "squared_distances"]


# ------------------------------------------------------------------------------ helpers
def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``C_ij = ‖x_i − y_j‖²`` over flattened events, in float64 (float32 on MPS).

    Args:
        x: ``[n, *event]``.
        y: ``[m, *event]``.

    Returns:
        ``[n, m]`` non-negative costs.
    """
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    a, b = x.detach().flatten(1).to(dtype), y.detach().flatten(1).to(dtype)
    cost = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * (a @ b.T)
    return cost.clamp_min_(0)


def _group_penalty(cost: Tensor, groups: Optional[Tensor], span: float) -> Tensor:
    """Forbid pairs across groups by adding more than any within-group plan can cost."""
    if groups is None:
        return cost
    other = groups[:, None] != groups[None, :]
    if not bool(other.any()):
        return cost
    return cost + ((cost.shape[0] + 1) * span + 1.0) * other.to(cost.dtype)


def _labels(cond: Optional[Tensor]) -> Optional[Tensor]:
    """Integer class labels to couple within, or ``None`` (no condition, or vectors)."""
    if cond is None or cond.is_floating_point() or cond.dim() != 1:
        return None
    return cond


# ----------------------------------------------------------------------- the assignment
def optimal_assignment(cost: Tensor, *, tol: float = 1e-7,
                       method: Literal["auto", "compiled", "ipm", "auction"] = "auto",
                       groups: Optional[Tensor] = None, gap: float = 1e-5) -> Tensor:
    r"""Minimum-cost perfect assignment ``π`` of a square cost matrix.

    Every method stops with a complete assignment in ε-complementary slackness at
    ``ε = tol · span / n``, which certifies

    .. math::  \sum_i C_{i\pi(i)} \le \min_\sigma \sum_i C_{i\sigma(i)} + \mathrm{tol}\cdot\mathrm{span},
               \qquad \mathrm{span} = \max C - \min C

    (Bertsekas 1988, Prop. 1); the methods differ only in speed and where they run.

    - ``compiled`` — a sequential ε-scaling auction in C (:func:`compiled_auction`), one bid
      at a time on the CPU: 2–3 ms for 256 × 256 flow-matching batches, ≈40 ms for
      1024 × 1024. A cost on another device is copied to the host and the permutation back.
    - ``ipm`` — on the cost's device, in torch: the assignment LP is solved to a small
      duality gap by a primal-dual interior-point method (:func:`interior_point_assignment`,
      about a dozen Newton steps, each one ``n × n`` Cholesky factorisation), then a
      vectorised auction (:func:`auction_assignment`) starts from its duals and rounded
      primal and usually completes in a handful of rounds; past ``2n`` rounds it falls back
      to full ε-scaling from the current prices.
    - ``auction`` — the vectorised (Jacobi) ε-scaling auction alone, on the cost's device.
      Correct, but for clustered 2-D batches it needs thousands of rounds of a dozen kernels.
    - ``auto`` — ``compiled`` for a CPU cost where the extension was built (see
      :func:`compiled_auction_available`), otherwise ``ipm`` (``auction`` where float64 is
      unavailable), so the batch never leaves its accelerator.

    Args:
        cost: ``[n, n]`` finite costs.
        tol: optimality tolerance relative to the cost span.
        method: ``auto``, ``compiled``, ``ipm`` or ``auction`` (above).
        groups: optional ``[n]`` labels: row ``i`` may only take a column ``j`` with
            ``groups[j] == groups[i]`` (each group must be a square block).
        gap: duality gap per pair, relative to ``max |C|``, at which the interior-point
            stage hands over to the auction.

    Returns:
        ``perm`` ``[n]`` (long, on the cost's device), a permutation: row ``i`` takes column
        ``perm[i]``.

    Raises:
        ValueError: for a non-square or non-finite cost, or bad options.
        RuntimeError: ``method="compiled"`` where the extension was not built.

    Example:
        >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        >>> optimal_assignment(cost).tolist()
        [1, 0, 2]
    """
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"need a square [n, n] cost matrix, got shape {tuple(cost.shape)}")
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(f"unknown method {method!r}; choose {', '.join(ASSIGNMENT_METHODS)}")
    n, device = cost.shape[0], cost.device
    if n <= 1:
        return torch.arange(n, device=device)
    if method == "auto" and device.type == "cpu" and _compiled is not None:
        method = "compiled"
    if method == "compiled":
        _require_compiled()
        cost = cost.detach().to(device="cpu", dtype=torch.float64).contiguous()  # the solver's input
    else:
        cost = cost.detach().to(torch.float32 if device.type == "mps" else torch.float64)
    lo, hi = cost.aminmax()
    span, top = float(hi - lo), float(max(abs(hi), abs(lo)))
    if not math.isfinite(span):
        raise ValueError("the cost matrix must be finite")
    if span == 0.0:
        return torch.arange(n, device=device)
    cost = _group_penalty(cost, groups, span)
    if method == "compiled":
        return _run_compiled(cost, tol=tol, span=span).to(device)
    potentials = None
    if method == "ipm" or (method == "auto" and cost.dtype == torch.float64):
        solved = interior_point_assignment(cost, gap=gap, scale=top, dtype=torch.float32)
        if solved is not None:
            plan, _, potentials = solved
            perm = auction_assignment(cost, tol=tol, span=span, potentials=potentials,
                                      assignment=_round_plan(plan), eps_start=tol * span / n,
                                      max_rounds=2 * n)
            if perm is not None:
                return perm
    return auction_assignment(cost, tol=tol, span=span, potentials=potentials)


ASSIGNMENT_METHODS = ("auto", "compiled", "ipm", "auction")


def compiled_auction_available() -> bool:
    """Whether the C assignment solver ``flowkit._auction`` was built at install time
    (it needs a C compiler then; without one flowkit falls back to its torch solvers)."""
    return _compiled is not None


def compiled_auction(cost: Tensor, *, tol: float = 1e-7, span: Optional[float] = None,
                     scaling: float = 5.0, eps_start: Optional[float] = None) -> Tensor:
    r"""Bertsekas' ε-scaling auction, one bid at a time (Gauss–Seidel), in C on the CPU.

    The same algorithm as :func:`auction_assignment` — each unassigned row bids for its
    cheapest column ``j* = argmin_j C_ij + p_j``, raising ``p_{j*}`` by the gap to its
    second-cheapest plus ``ε`` — but sequential: every bid sees the prices the previous one
    left, and costs one pass over a row. ``ε`` shrinks by ``scaling`` per phase from
    ``eps_start`` (default ``(max C − min C) / 4``) to ``tol · span / n``, prices kept
    between phases (Bertsekas & Eckstein 1988); the result costs at most
    ``optimum + tol · span`` (Bertsekas 1988, Prop. 1).

    Args:
        cost: ``[n, n]`` finite costs on any device (copied to a contiguous float64 CPU
            tensor; the permutation is returned on ``cost``'s device).
        tol: optimality tolerance relative to ``span``.
        span: the span the tolerance refers to (default ``max C − min C``).
        scaling: factor by which ``ε`` shrinks between phases (> 1).
        eps_start: the first phase's ``ε``.

    Returns:
        ``perm`` ``[n]`` (long): row ``i`` takes column ``perm[i]``.

    Raises:
        RuntimeError: the extension was not built (no C compiler at install time).

    Example:
        >>> if compiled_auction_available():
        ...     cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        ...     assert compiled_auction(cost).tolist() == [1, 0, 2]
    """
    _require_compiled()
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"need a square [n, n] cost matrix, got shape {tuple(cost.shape)}")
    host = cost.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if not bool(host.isfinite().all()):
        raise ValueError("the cost matrix must be finite")
    return _run_compiled(host, tol=tol, span=span, scaling=scaling, eps_start=eps_start).to(cost.device)


def _require_compiled() -> None:
    if _compiled is None:
        raise RuntimeError(
            "flowkit's compiled assignment solver (flowkit._auction) is not built: reinstall "
            "flowkit where a C compiler is available (`pip install -e .` builds it), or use "
            "method='ipm' / 'auction' (pure torch)")


def _run_compiled(host: Tensor, *, tol: float, span: Optional[float] = None, scaling: float = 5.0,
                  eps_start: Optional[float] = None) -> Tensor:
    """The C auction on a finite, contiguous float64 CPU cost ``[n, n]``; a CPU permutation."""
    if not (tol > 0 and scaling > 1):
        raise ValueError(f"need tol > 0 and scaling > 1, got tol={tol}, scaling={scaling}")
    n = host.shape[0]
    lo, hi = host.aminmax()
    full_span = float(hi - lo)  # with a group penalty, wider than the span tol refers to
    span = full_span if span is None else float(span)
    if n <= 1 or full_span == 0.0 or span <= 0.0:
        return torch.arange(n)
    perm = torch.empty(n, dtype=torch.int64)
    prices = torch.zeros(n, dtype=torch.float64)
    eps_final = tol * span / n
    start = full_span / 4 if eps_start is None else float(eps_start)
    _compiled.auction(n, host.data_ptr(), perm.data_ptr(), prices.data_ptr(), max(start, eps_final),
                      eps_final, float(scaling))
    return perm


def _round_plan(plan: Tensor, rounds: int = 8) -> Tensor:
    """A permutation close to a (near-)doubly-stochastic ``plan``: free rows propose their
    largest free entry (ties broken at random, fixed seed), each column keeps its best
    proposal; rows still free after ``rounds`` take the remaining columns in order."""
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


def auction_assignment(cost: Tensor, *, tol: float = 1e-7, scaling: float = 4.0,
                       span: Optional[float] = None, potentials: Optional[Tensor] = None,
                       assignment: Optional[Tensor] = None, eps_start: Optional[float] = None,
                       max_rounds: Optional[int] = None) -> Optional[Tensor]:
    r"""Bertsekas' auction algorithm with ε-scaling, all bids of a round at once (Jacobi).

    Each unassigned row ("person") ``i`` bids for its most profitable column ("object")
    ``j* = argmax_j (−C_ij − p_j)``, raising the price ``p_{j*}`` by the gap to its
    second-best profit plus ``ε``; each object goes to its highest bidder, whose
    predecessor becomes unassigned (Bertsekas 1988). A phase ends with a complete
    assignment in ε-complementary slackness, whose cost is within ``n ε`` of the optimum.
    Phases run with ``ε`` shrinking by ``scaling`` from ``eps_start`` (default
    ``span / scaling``) to ``tol · span / n``, keeping the prices (Bertsekas & Eckstein
    1988), so the result costs at most ``optimum + tol · span``.

    Args:
        cost: ``[n, n]`` finite costs (float64 recommended).
        tol: optimality tolerance relative to ``span``.
        scaling: factor by which ``ε`` shrinks between phases (> 1).
        span: the cost span (default ``max C − min C``).
        potentials: initial column potentials ``v`` (e.g. LP duals; the auction's prices
            are ``−v``), default 0.
        assignment: initial guess ``[n]``; pairs in ε-complementary slackness are kept.
        eps_start: the first phase's ``ε``.
        max_rounds: give up (return ``None``) after this many bidding rounds.

    Returns:
        ``perm`` ``[n]``: row ``i`` takes column ``perm[i]`` (or ``None``, see ``max_rounds``).

    Example:
        >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]], dtype=torch.float64)
        >>> auction_assignment(cost).tolist()
        [1, 0, 2]
    """
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"need a square [n, n] cost matrix, got shape {tuple(cost.shape)}")
    if not (tol > 0 and scaling > 1):
        raise ValueError(f"need tol > 0 and scaling > 1, got tol={tol}, scaling={scaling}")
    n, device = cost.shape[0], cost.device
    benefit = -cost
    if span is None:
        lo, hi = cost.aminmax()
        span = float(hi - lo)
    if n <= 1 or span == 0.0:
        return torch.arange(n, device=device)
    eps_final = tol * span / n
    eps = max(span / scaling if eps_start is None else eps_start, eps_final)
    prices = (torch.zeros(n, dtype=cost.dtype, device=device) if potentials is None
              else -potentials.to(cost.dtype).clone())
    person_object = torch.full((n,), -1, dtype=torch.long, device=device)
    object_person = torch.full((n,), -1, dtype=torch.long, device=device)
    no_bid = torch.full((n,), -math.inf, dtype=cost.dtype, device=device)
    nobody = torch.full((n,), -1, dtype=torch.long, device=device)
    guess = assignment
    rounds = [0]
    while True:
        _keep_slack(benefit, prices, guess, eps, person_object, object_person, nobody)
        if not _auction_phase(benefit, prices, person_object, object_person, eps, no_bid, nobody,
                              rounds, max_rounds):
            return None
        if eps <= eps_final:
            return person_object
        guess = person_object.clone()
        eps = max(eps / scaling, eps_final)


def _keep_slack(benefit: Tensor, prices: Tensor, guess: Optional[Tensor], eps: float,
                person_object: Tensor, object_person: Tensor, nobody: Tensor) -> None:
    """Start a phase from the pairs of ``guess`` in ε-complementary slackness (one per object)."""
    person_object.fill_(-1)
    object_person.fill_(-1)
    if guess is None:
        return
    profit = benefit - prices
    held = profit.gather(1, guess[:, None]).squeeze(1)
    keep = (held >= profit.amax(1) - eps).nonzero().squeeze(1)
    holder = nobody.clone().scatter_reduce_(0, guess[keep], keep, "amax")
    held_objects = (holder >= 0).nonzero().squeeze(1)
    holders = holder.index_select(0, held_objects)
    object_person.index_copy_(0, held_objects, holders)
    person_object.index_copy_(0, holders, held_objects)


def _auction_phase(benefit: Tensor, prices: Tensor, person_object: Tensor, object_person: Tensor,
                   eps: float, no_bid: Tensor, nobody: Tensor, rounds: list[int],
                   max_rounds: Optional[int]) -> bool:
    """Jacobi bidding rounds until every person holds an object (in place); False if capped."""
    free = (person_object < 0).nonzero().squeeze(1)
    while free.numel():
        rounds[0] += 1
        if max_rounds is not None and rounds[0] > max_rounds:
            return False
        profit = benefit.index_select(0, free) - prices
        top = profit.topk(2, dim=1)
        target = top.indices[:, 0]
        bids = prices.index_select(0, target) + (top.values[:, 0] - top.values[:, 1]) + eps
        high = no_bid.clone().scatter_reduce_(0, target, bids, "amax")
        won = bids == high.index_select(0, target)
        winner = nobody.clone().scatter_reduce_(0, target[won], free[won], "amax")
        sold = (winner >= 0).nonzero().squeeze(1)
        buyers = winner.index_select(0, sold)
        losers = object_person.index_select(0, sold)
        person_object.index_fill_(0, losers[losers >= 0], -1)
        object_person.index_copy_(0, sold, buyers)
        person_object.index_copy_(0, buyers, sold)
        prices.index_copy_(0, sold, high.index_select(0, sold))
        free = (person_object < 0).nonzero().squeeze(1)
    return True


# ----------------------------------------------------------------------------- Sinkhorn
def sinkhorn_potentials(cost: Tensor, reg: float, *, max_iter: int = 500,
                        tol: float = 1e-4) -> tuple[Tensor, Tensor, int]:
    r"""Entropic OT between two uniform empirical measures, log-domain Sinkhorn.

    Solves ``min_P ⟨P, C⟩ − reg · H(P)`` over couplings of ``1/n`` and ``1/m`` (Cuturi 2013)
    by alternating the exact marginal updates of the dual potentials (Peyré & Cuturi 2019,
    Sec. 4.4), which stay finite however small ``reg`` is:

    .. math::  f_i = -\mathrm{reg}\,\Big(\log n + \operatorname{LSE}_j \frac{g_j - C_{ij}}{\mathrm{reg}}\Big),\quad
               g_j = -\mathrm{reg}\,\Big(\log m + \operatorname{LSE}_i \frac{f_i - C_{ij}}{\mathrm{reg}}\Big),

    and ``P_ij = exp((f_i + g_j − C_ij)/reg)``. After each ``g`` update the column marginals
    are exact; the loop stops when the next ``f`` update would change a row sum by a factor
    within ``exp(±tol)``, or after ``max_iter`` iterations.

    Args:
        cost: ``[n, m]``.
        reg: entropic regularisation, in the units of ``cost`` (> 0).
        max_iter: iteration cap.
        tol: stopping tolerance on the log row marginals.

    Returns:
        ``(f, g, iterations)``.
    """
    if not reg > 0:
        raise ValueError(f"reg must be positive, got {reg}")
    n, m = cost.shape
    c = cost / reg
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    log_n, log_m = math.log(n), math.log(m)
    it = 0
    for it in range(1, max_iter + 1):
        f_new = -(torch.logsumexp(g[None, :] - c, dim=1) + log_n)
        if it > 1 and float((f_new - f).abs().max()) < tol:
            f = f_new
            break
        f = f_new
        g = -(torch.logsumexp(f[:, None] - c, dim=0) + log_m)
    return f * reg, g * reg, it


def sinkhorn_log_plan(cost: Tensor, reg: float, **options) -> Tensor:
    """``log P`` of the entropic plan (:func:`sinkhorn_potentials`; ``P`` sums to one)."""
    f, g, _ = sinkhorn_potentials(cost, reg, **options)
    return (f[:, None] + g[None, :] - cost) / reg


# ---------------------------------------------------------------------------- couplings
class Coupling:
    """Base class: ``coupling(x_data, noise, cond=None) -> (x_data', noise')``.

    ``cond`` is the batch's condition (aligned with ``x_data``) or ``None``; the returned
    data must stay aligned with it.
    """

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@COUPLINGS.register("independent")
class Independent(Coupling):
    """Data and noise as drawn: the independent coupling of I-CFM (Lipman et al. 2023)."""

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return x_data, noise


@COUPLINGS.register("exact_ot")
class ExactOT(Coupling):
    """Minibatch optimal transport (OT-CFM, Tong et al. 2024): noise permuted by an exact assignment.

    The permutation minimises ``Σ_i ‖x_i − ε_π(i)‖²`` exactly (:func:`optimal_assignment`:
    by default the compiled auction for a CPU batch, the torch solvers on an accelerator).

    Every noise sample is used exactly once (a permutation, not pairs drawn from the plan
    with replacement). With integer labels the permutation stays within each label.

    Args:
        tol: optimality tolerance relative to the cost span (see :func:`optimal_assignment`).
        method: assignment solver: ``auto``, ``compiled`` (sequential auction in C, on the
            CPU), ``ipm`` (interior point, then auction, in torch) or ``auction`` (vectorised
            ε-scaling auction in torch); see :func:`optimal_assignment`.
    """

    def __init__(self, tol: PositiveFloat = 1e-7,
                 method: Literal["auto", "compiled", "ipm", "auction"] = "auto") -> None:
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        if method not in ASSIGNMENT_METHODS:
            raise ValueError(f"unknown method {method!r}; choose {', '.join(ASSIGNMENT_METHODS)}")
        self.tol, self.method = float(tol), method

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        _check_batch(x_data, noise)
        perm = optimal_assignment(squared_distances(x_data, noise), tol=self.tol, method=self.method,
                                  groups=_labels(cond))
        return x_data, noise[perm]


@COUPLINGS.register("sinkhorn")
class Sinkhorn(Coupling):
    r"""Entropic OT coupling (Sinkhorn): each data point draws its noise from its row of the plan.

    Data point ``i`` takes noise ``j`` with probability ``P_ij / P_i·`` under the Sinkhorn plan
    of ``C_ij = ‖x_i − ε_j‖²`` (Gumbel-max sampling).

    Each data point is used once and the pairs follow the plan exactly on the data side; a
    noise sample may be drawn several times or not at all. With ``reg = 2σ²`` the plan is the
    static Schrödinger bridge for a Brownian reference of variance ``σ²`` per unit time,
    the coupling of SB-CFM (Tong et al. 2024, Prop. 3.4); small ``reg`` approaches OT-CFM.

    Args:
        reg: entropic regularisation ``ε``, in squared data units (> 0).
        max_iter, tol: Sinkhorn stopping rule (see :func:`sinkhorn_potentials`).
    """

    def __init__(self, reg: PositiveFloat = 0.5, max_iter: PositiveInt = 500, tol: PositiveFloat = 1e-4) -> None:
        if not reg > 0:
            raise ValueError(f"reg must be positive, got {reg}")
        if max_iter < 1 or not tol > 0:
            raise ValueError(f"need max_iter >= 1 and tol > 0, got {max_iter}, {tol}")
        self.reg, self.max_iter, self.tol = float(reg), int(max_iter), float(tol)

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        _check_batch(x_data, noise)
        cost = squared_distances(x_data, noise)
        cost = _group_penalty(cost, _labels(cond), float(cost.max() - cost.min()))
        _, g, _ = sinkhorn_potentials(cost, self.reg, max_iter=self.max_iter, tol=self.tol)
        u = torch.rand(cost.shape, dtype=cost.dtype, device=cost.device).clamp_(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(u))
        choice = ((g[None, :] - cost) / self.reg + gumbel).argmax(1)
        return x_data, noise[choice]


def _check_batch(x_data: Tensor, noise: Tensor) -> None:
    if x_data.shape != noise.shape:
        raise ValueError(f"data and noise batches differ in shape: {tuple(x_data.shape)} "
                         f"vs {tuple(noise.shape)}")


# ------------------------------------------------------------------------------- reflow
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                    "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")


class Teacher(Coupling):
    """Pairs each noise with the sample a trained flow maps it to (reflow; Liu et al. 2023).

    ``x_data`` is ignored except for its dtype: the returned data are the teacher's ODE
    solutions from ``noise`` (scaled by the teacher prior's standard deviation) at its
    prior time down to its data time, so ``(teacher(ε), ε)`` is a deterministic coupling
    whose straight interpolations cross less than independent ones. A conditional teacher
    receives the batch's condition.

    The teacher is loaded on first use, so rebuilding a trained student (``flowkit sample``)
    never touches it, and it is kept out of the student's ``state_dict``.

    Args:
        run: a run directory (``flowkit train ... --out RUN``; EMA weights when kept), or a
            recipe ``.yaml`` that is first trained in a temporary directory by a separate
            ``flowkit train`` process, so that one command reproduces the whole pipeline.
        train_steps: ``train.steps`` for a recipe teacher (default: the recipe's own).
        method, steps, rtol, atol: the ODE solver (see :func:`flowkit.samplers.ode.odeint`).
        guidance: classifier-free guidance scale of a conditional teacher.
    """

    def __init__(self, run: str | Path, *, train_steps: Optional[int] = None,
                 method: Literal["dopri5", "euler", "midpoint", "heun", "rk4"] = "dopri5",
                 steps: int = 16, rtol: float = 1e-5, atol: float = 1e-5,
                 guidance: float = 0.0) -> None:
        if train_steps is not None and train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {train_steps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.run, self.train_steps = str(run), train_steps
        self.method, self.steps, self.rtol, self.atol = method, int(steps), float(rtol), float(atol)
        self.guidance = float(guidance)
        self._built = None

    def load(self, device: torch.device | str = "cpu"):
        """The teacher's :class:`~flowkit.recipe.Built` parts (trained first for a recipe)."""
        if self._built is None:
            from .run import load_run

            path = Path(self.run)
            if path.suffix in (".yaml", ".yml"):
                if not path.is_file():
                    raise FileNotFoundError(f"teacher recipe {path} not found (relative paths are "
                                            f"taken from the working directory {os.getcwd()})")
                with tempfile.TemporaryDirectory(prefix="flowkit-teacher-") as tmp:
                    self._train_recipe(path, Path(tmp))
                    self._built, _ = load_run(tmp)
            else:
                if not path.is_dir():
                    raise FileNotFoundError(f"teacher run directory {path} not found; train one with "
                                            f"`flowkit train RECIPE --out {path}` or give a recipe .yaml")
                self._built, _ = load_run(path)
            self._built.objective.eval().requires_grad_(False)
        if next(iter(self._built.objective.parameters()), torch.empty(0)).device != torch.device(device):
            self._built.objective.to(device)
        return self._built

    def _train_recipe(self, recipe: Path, out: Path) -> None:
        overrides = ["train.checkpoint_every=0", "train.sample_every=0", "train.eval_every=0",
                     f"train.threads={torch.get_num_threads()}"]
        if self.train_steps is not None:
            overrides.append(f"train.steps={self.train_steps}")
        env = {k: v for k, v in os.environ.items()
               if k not in _DISTRIBUTED_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "flowkit", "train", str(recipe), *overrides, "--out", str(out),
               "--no-progress"]
        warnings.warn(f"training the reflow teacher {recipe} first ({' '.join(cmd[3:])}); pass a run "
                      f"directory as the teacher to reuse one", stacklevel=3)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"training the teacher {recipe} failed (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        from .samplers.ode_samplers import integrate_flow

        built = self.load(noise.device)
        flow = built.objective.flow()
        std = getattr(flow.prior, "std", 1.0)
        teacher_cond = cond if built.conditional else None
        fixed = self.method != "dopri5"
        res = integrate_flow(flow, noise * std, cond=teacher_cond, method=self.method,
                             rtol=self.rtol, atol=self.atol, steps=self.steps if fixed else None,
                             guidance=self.guidance)
        return res.x.to(x_data.dtype).detach(), noise

    def __getstate__(self) -> dict:
        # Copies (the trainer's EMA deep-copies the objective) reload the teacher lazily.
        state = dict(vars(self))
        state["_built"] = None
        return state
