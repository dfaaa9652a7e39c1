r"""Optimal transport between minibatches: exact assignment and entropic (Sinkhorn) plans.

The solvers behind the OT couplings of :mod:`flowkit.couplings`, usable on their own. They
depend on torch alone (and, optionally, the compiled auction built at install time).

=====================================  ======================================================
function                               solves
=====================================  ======================================================
:func:`optimal_assignment`             ``min_π Σ_i C_{iπ(i)}`` exactly (method ``auto``,
                                       ``compiled``, ``ipm`` or ``auction``)
:func:`compiled_auction`               the same, sequential ε-scaling auction in C (CPU)
:func:`interior_point_assignment`      the assignment LP, primal-dual interior point (torch)
:func:`auction_assignment`             the same, vectorised ε-scaling auction (torch)
:func:`sinkhorn_potentials`            entropic OT, log-domain Sinkhorn (torch)
=====================================  ======================================================

Modules: :mod:`~flowkit.ot.assignment` (the dispatcher, costs), :mod:`~flowkit.ot.compiled`
(the C extension's wrapper), :mod:`~flowkit.ot.auction`, :mod:`~flowkit.ot.interior_point`,
:mod:`~flowkit.ot.sinkhorn`.

References:
    Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
    assignment problem. Annals of Operations Research 14.
    Cuturi (2013). Sinkhorn Distances: Lightspeed Computation of Optimal Transport. NeurIPS.

Example:
    >>> import torch
    >>> from flowkit import ot
    >>> x, y = torch.randn(64, 2), torch.randn(64, 2)
    >>> cost = ot.squared_distances(x, y)
    >>> perm = ot.optimal_assignment(cost)
    >>> bool(cost[torch.arange(64), perm].sum() <= cost.diagonal().sum())
    True
"""

from .assignment import (ASSIGNMENT_METHODS, AssignmentMethod, group_penalty, optimal_assignment,
                         squared_distances)
from .auction import auction_assignment
from .compiled import compiled_auction, compiled_auction_available
from .interior_point import interior_point_assignment, round_plan
from .sinkhorn import sinkhorn_log_plan, sinkhorn_potentials

__all__ = ["optimal_assignment", "squared_distances", "group_penalty", "ASSIGNMENT_METHODS",
           "AssignmentMethod", "compiled_auction", "compiled_auction_available",
           "interior_point_assignment", "round_plan", "auction_assignment", "sinkhorn_potentials",
           "sinkhorn_log_plan"]
