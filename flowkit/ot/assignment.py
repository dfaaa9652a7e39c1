r"""Exact minimum-cost assignment of a square cost matrix, the solver of minibatch OT.

For ``n`` data points and ``n`` noise samples with costs ``C_ij = ‖x_i − y_j‖²``, the
optimal transport plan between the two uniform empirical measures is a permutation
(Birkhoff), the solution of

.. math::  \min_{\pi \in S_n}\ \sum_i C_{i\pi(i)} .

:func:`optimal_assignment` picks one of three solvers, all of which stop in
ε-complementary slackness and so share one optimality guarantee (Bertsekas 1988, Prop. 1):

- ``compiled`` — the sequential ε-scaling auction in C (:mod:`flowkit.ot.compiled`),
- ``ipm`` — an interior-point solve of the LP (:mod:`flowkit.ot.interior_point`) that
  warm-starts the torch auction, on the cost's device,
- ``auction`` — the vectorised ε-scaling auction alone (:mod:`flowkit.ot.auction`).

References:
    Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
    assignment problem. Annals of Operations Research 14, 105–123.
    Bertsekas & Eckstein (1988). Dual coordinate step methods for linear network flow
    problems. Mathematical Programming 42, 203–243 (ε-scaling).

Example:
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    >>> y = torch.tensor([[2.1, 0.0], [-0.1, 0.0], [0.9, 0.0]])
    >>> optimal_assignment(squared_distances(x, y)).tolist()  # x_i is paired with y_perm[i]
    [1, 2, 0]
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor

from . import compiled
from .auction import auction_assignment
from .interior_point import interior_point_assignment, round_plan

__all__ = ["optimal_assignment", "squared_distances", "group_penalty", "ASSIGNMENT_METHODS",
           "AssignmentMethod"]

AssignmentMethod = Literal["auto", "compiled", "ipm", "auction"]
#: the names :func:`optimal_assignment` accepts
ASSIGNMENT_METHODS: tuple[str, ...] = ("auto", "compiled", "ipm", "auction")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``C_ij = ‖x_i − y_j‖²`` over flattened events, in float64 (float32 on MPS), detached.

    Args:
        x: ``[n, *event]``.
        y: ``[m, *event]``.

    Returns:
        ``[n, m]`` non-negative costs.

    Example:
        >>> squared_distances(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0]])).tolist()
        [[25.0, 1.0]]
    """
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    a, b = x.detach().flatten(1).to(dtype), y.detach().flatten(1).to(dtype)
    cost = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * (a @ b.T)
    return cost.clamp_min_(0)


def group_penalty(cost: Tensor, groups: Optional[Tensor], span: float) -> Tensor:
    """``cost`` plus a penalty on every pair across groups larger than any within-group plan.

    A pair ``(i, j)`` with ``groups[i] ≠ groups[j]`` costs ``(n + 1) · span + 1`` more, so a
    minimum-cost plan never takes one when every group is a square block.

    Args:
        cost: ``[n, n]``.
        groups: ``[n]`` labels, or ``None`` (no penalty).
        span: ``max C − min C`` of ``cost``.

    Returns:
        The penalised cost (``cost`` itself when there is nothing to forbid).

    Example:
        >>> group_penalty(torch.zeros(2, 2), torch.tensor([0, 1]), span=1.0).tolist()
        [[0.0, 4.0], [4.0, 0.0]]
    """
    if groups is None:
        return cost
    other = groups[:, None] != groups[None, :]
    if not bool(other.any()):
        return cost
    return cost + ((cost.shape[0] + 1) * span + 1.0) * other.to(cost.dtype)


def optimal_assignment(cost: Tensor, *, tol: float = 1e-7, method: AssignmentMethod = "auto",
                       groups: Optional[Tensor] = None, gap: float = 1e-5) -> Tensor:
    r"""Minimum-cost perfect assignment ``π`` of a square cost matrix.

    Every method stops with a complete assignment in ε-complementary slackness at
    ``ε = tol · span / n``, which certifies

    .. math::  \sum_i C_{i\pi(i)} \le \min_\sigma \sum_i C_{i\sigma(i)} + \mathrm{tol}\cdot\mathrm{span},
               \qquad \mathrm{span} = \max C - \min C

    (Bertsekas 1988, Prop. 1); the methods differ only in speed and where they run.

    - ``compiled`` — a sequential ε-scaling auction in C
      (:func:`~flowkit.ot.compiled_auction`), one bid at a time on the CPU. A cost on
      another device is copied to the host and the permutation back.
    - ``ipm`` — on the cost's device, in torch: the assignment LP is solved to a small
      duality gap by a primal-dual interior-point method
      (:func:`~flowkit.ot.interior_point_assignment`, about a dozen Newton steps, each one
      ``n × n`` Cholesky factorisation), then a vectorised auction
      (:func:`~flowkit.ot.auction_assignment`) starts from its duals and rounded primal
      and usually completes in a handful of rounds; past ``2n`` rounds it falls back to
      full ε-scaling from the current prices.
    - ``auction`` — the vectorised (Jacobi) ε-scaling auction alone, on the cost's device.
      Correct, but for clustered 2-D batches it needs thousands of rounds of a dozen kernels.
    - ``auto`` — ``compiled`` for a CPU cost where the extension was built (see
      :func:`~flowkit.ot.compiled_auction_available`), otherwise ``ipm`` (``auction`` where
      float64 is unavailable), so the batch never leaves its accelerator.

    ``bench/ot_assignment.py`` times them against SciPy's ``linear_sum_assignment``.

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
        ValueError: for a non-square or non-finite cost, or an unknown method.
        RuntimeError: ``method="compiled"`` where the extension was not built.

    Example:
        >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        >>> [optimal_assignment(cost, method=m).tolist() for m in ("ipm", "auction")]
        [[1, 0, 2], [1, 0, 2]]
    """
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"need a square [n, n] cost matrix, got shape {tuple(cost.shape)}")
    if method not in ASSIGNMENT_METHODS:
        raise ValueError(f"unknown method {method!r}; choose {', '.join(ASSIGNMENT_METHODS)}")
    n, device = cost.shape[0], cost.device
    if n <= 1:
        return torch.arange(n, device=device)
    if method == "auto" and device.type == "cpu" and compiled.compiled_auction_available():
        method = "compiled"
    if method == "compiled":
        compiled.extension()  # says why not, before any work
        cost = compiled.to_host(cost)
    else:
        cost = cost.detach().to(torch.float32 if device.type == "mps" else torch.float64)
    lo, hi = cost.aminmax()
    span, top = float(hi - lo), float(max(abs(hi), abs(lo)))
    if not math.isfinite(span):
        raise ValueError("the cost matrix must be finite")
    if span == 0.0:
        return torch.arange(n, device=device)
    cost = group_penalty(cost, groups, span)
    if method == "compiled":
        return compiled.run(cost, tol=tol, span=span).to(device)
    potentials = None
    if method == "ipm" or (method == "auto" and cost.dtype == torch.float64):
        solved = interior_point_assignment(cost, gap=gap, scale=top, dtype=torch.float32)
        if solved is not None:
            plan, _, potentials = solved
            perm = auction_assignment(cost, tol=tol, span=span, potentials=potentials,
                                      assignment=round_plan(plan), eps_start=tol * span / n,
                                      max_rounds=2 * n)
            if perm is not None:
                return perm
    return auction_assignment(cost, tol=tol, span=span, potentials=potentials)
