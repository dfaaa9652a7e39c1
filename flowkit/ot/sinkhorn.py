r"""Entropic optimal transport between two uniform empirical measures: log-domain Sinkhorn.

For a cost ``C ∈ R^{n×m}`` and ``reg > 0``, the entropic OT problem (Cuturi 2013)

.. math::  \min_{P \in U(1/n, 1/m)}\ \langle P, C\rangle - \mathrm{reg}\, H(P),\qquad
           H(P) = -\sum_{ij} P_{ij} (\log P_{ij} - 1),

has the unique solution ``P_ij = exp((f_i + g_j − C_ij) / reg)`` for the dual potentials
``(f, g)``, which Sinkhorn's iterations find by alternately fitting the row and the column
marginals. Run on the potentials in the log domain (Peyré & Cuturi 2019, Sec. 4.4) they stay
finite however small ``reg`` is. As ``reg → 0`` the plan approaches an optimal assignment;
with ``reg = 2σ²`` it is the static Schrödinger bridge of a Brownian reference of variance
``σ²`` (the coupling of SB-CFM).

References:
    Cuturi (2013). Sinkhorn Distances: Lightspeed Computation of Optimal Transport. NeurIPS.
    Peyré & Cuturi (2019). Computational Optimal Transport. Foundations and Trends in
    Machine Learning 11(5–6), Sec. 4.4.

Example:
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> plan = sinkhorn_log_plan(cost, 0.1, tol=1e-10).exp()
    >>> plan.sum(0).tolist(), plan.sum(1).tolist()  # uniform marginals
    ([0.5, 0.5], [0.5, 0.5])
    >>> bool(plan[0, 0] > 0.49)  # nearly the identity assignment at small reg
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["sinkhorn_potentials", "sinkhorn_log_plan"]


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
        ``(f, g, iterations)``: the potentials ``[n]`` and ``[m]`` in the units of ``cost``.

    Raises:
        ValueError: ``reg`` is not positive.
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


def sinkhorn_log_plan(cost: Tensor, reg: float, **options: Any) -> Tensor:
    """``log P`` of the entropic plan (``P`` sums to one).

    Args:
        cost: ``[n, m]``.
        reg: entropic regularisation (> 0).
        **options: ``max_iter`` and ``tol`` of :func:`sinkhorn_potentials`.

    Returns:
        ``[n, m]`` log-probabilities ``(f_i + g_j − C_ij) / reg``.
    """
    f, g, _ = sinkhorn_potentials(cost, reg, **options)
    return (f[:, None] + g[None, :] - cost) / reg
