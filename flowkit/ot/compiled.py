r"""The compiled CPU assignment solver: Bertsekas' ε-scaling auction, one bid at a time, in C.

``flowkit/ot/_auction.c`` is built into ``flowkit.ot._auction`` at install time where a C
compiler exists (``setup.py`` marks the extension optional); this module is its only
caller. It checks and converts the arguments — any device, dtype and layout in, a
contiguous float64 CPU copy to the solver, the permutation back on the caller's device —
and says whether the extension is there (:func:`compiled_auction_available`).

Why keep C beside the torch solvers: the bids of one ε-phase depend on each other through
the prices, so the vectorised (Jacobi) auction of :mod:`flowkit.ot.auction` pays a dozen
kernel launches per round for thousands of rounds on clustered 2-D batches, while one
sequential bid here is a single pass over a row in L1 cache. ``bench/ot_assignment.py``
measures it against the torch solvers and SciPy's ``linear_sum_assignment``.

References:
    Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
    assignment problem. Annals of Operations Research 14, 105–123.
    Bertsekas & Eckstein (1988). Dual coordinate step methods for linear network flow
    problems. Mathematical Programming 42, 203–243 (ε-scaling).

Example:
    >>> import torch
    >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    >>> compiled_auction(cost).tolist() if compiled_auction_available() else [1, 0, 2]
    [1, 0, 2]
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

try:  # built at install time where a compiler exists (setup.py)
    from . import _auction as _extension
except ImportError:  # pragma: no cover - depends on the install
    _extension = None

__all__ = ["compiled_auction", "compiled_auction_available"]


def compiled_auction_available() -> bool:
    """Whether the C solver ``flowkit.ot._auction`` was built at install time.

    It needs a C compiler then; without one :func:`~flowkit.ot.optimal_assignment` uses
    the torch solvers.
    """
    return _extension is not None


def extension() -> ModuleType:
    """The built extension module.

    Raises:
        RuntimeError: it was not built (no C compiler at install time).
    """
    if _extension is None:
        raise RuntimeError(
            "flowkit's compiled assignment solver (flowkit.ot._auction) is not built: reinstall "
            "flowkit where a C compiler is available (`pip install -e .` builds it), or use "
            "method='ipm' / 'auction' (pure torch)")
    return _extension


def compiled_auction(cost: Tensor, *, tol: float = 1e-7, span: Optional[float] = None,
                     scaling: float = 5.0, eps_start: Optional[float] = None) -> Tensor:
    r"""Minimum-cost assignment by the sequential (Gauss–Seidel) ε-scaling auction, in C.

    Each unassigned row bids for its cheapest column ``j* = argmin_j C_ij + p_j``, raising
    ``p_{j*}`` by the gap to its second-cheapest plus ``ε``; every bid sees the prices the
    previous one left. ``ε`` shrinks by ``scaling`` per phase from ``eps_start`` (default
    ``(max C − min C) / 4``) to ``ε_final = tol · span / n``, prices kept between phases
    (Bertsekas & Eckstein 1988). A complete assignment in ε-complementary slackness costs

    .. math::  \sum_i C_{i\pi(i)} \le \min_\sigma \sum_i C_{i\sigma(i)} + n\,\varepsilon_{\text{final}}
               = \text{optimum} + \mathrm{tol}\cdot\mathrm{span}

    (Bertsekas 1988, Prop. 1).

    Args:
        cost: ``[n, n]`` finite costs on any device, any dtype and layout (copied to a
            contiguous float64 CPU tensor).
        tol: optimality tolerance relative to ``span`` (> 0).
        span: the span the tolerance refers to (default ``max C − min C``).
        scaling: factor by which ``ε`` shrinks between phases (> 1).
        eps_start: the first phase's ``ε``.

    Returns:
        ``perm`` ``[n]`` (long, on ``cost``'s device): row ``i`` takes column ``perm[i]``.

    Raises:
        RuntimeError: the extension was not built (no C compiler at install time).
        ValueError: a non-square or non-finite cost, or bad options.

    Example:
        >>> cost = torch.tensor([[1.0, 9.0], [9.0, 1.0]], dtype=torch.float64).T  # any layout
        >>> compiled_auction(cost).tolist() if compiled_auction_available() else [0, 1]
        [0, 1]
    """
    extension()
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"need a square [n, n] cost matrix, got shape {tuple(cost.shape)}")
    host = to_host(cost)
    if not bool(host.isfinite().all()):
        raise ValueError("the cost matrix must be finite")
    return run(host, tol=tol, span=span, scaling=scaling, eps_start=eps_start).to(cost.device)


def to_host(cost: Tensor) -> Tensor:
    """The solver's input: a detached, contiguous float64 CPU copy of ``cost`` (or itself)."""
    return cost.detach().to(device="cpu", dtype=torch.float64).contiguous()


def run(host: Tensor, *, tol: float, span: Optional[float] = None, scaling: float = 5.0,
        eps_start: Optional[float] = None) -> Tensor:
    """The C auction on a finite, contiguous float64 CPU cost ``[n, n]`` (see :func:`to_host`).

    ``host`` may carry a group penalty wider than ``span``; the phases start from its full
    span and end at ``tol · span / n``.

    Returns:
        The permutation ``[n]`` (long) on the CPU.
    """
    if not (tol > 0 and scaling > 1):
        raise ValueError(f"need tol > 0 and scaling > 1, got tol={tol}, scaling={scaling}")
    solver = extension()
    n = host.shape[0]
    lo, hi = host.aminmax()
    full_span = float(hi - lo)
    span = full_span if span is None else float(span)
    if n <= 1 or full_span == 0.0 or span <= 0.0:
        return torch.arange(n)
    perm = torch.empty(n, dtype=torch.int64)
    prices = torch.zeros(n, dtype=torch.float64)
    eps_final = tol * span / n
    start = full_span / 4 if eps_start is None else float(eps_start)
    # raw addresses: host, perm and prices stay referenced here for the whole call
    solver.auction(n, host.data_ptr(), perm.data_ptr(), prices.data_ptr(), max(start, eps_final),
                   eps_final, float(scaling))
    return perm
