r"""Bertsekas' auction algorithm with ε-scaling, in torch, all bids of a round at once (Jacobi).

The dense square assignment problem ``min_π Σ_i C_{iπ(i)}`` over permutations ``π`` is
solved as a market: rows ("persons") buy columns ("objects") at prices ``p``. Each
unassigned person ``i`` bids for its most profitable object

.. math::  j^* = \arg\max_j\, (-C_{ij} - p_j),

raising ``p_{j^*}`` by the gap to its second-best profit plus ``ε``; each object goes to its
highest bidder, whose predecessor becomes unassigned. A phase ends with a complete
assignment in ε-complementary slackness, which costs at most ``optimum + n ε`` (Bertsekas
1988, Prop. 1). Phases run with ``ε`` shrinking geometrically and keep their prices
(Bertsekas & Eckstein 1988), which bounds the bids per phase.

This version runs on the cost's device (a GPU batch never leaves it); on the CPU the
sequential C auction of :mod:`flowkit.ot.compiled` is much faster (``bench/ot_assignment.py``).

References:
    Bertsekas (1988). The auction algorithm: a distributed relaxation method for the
    assignment problem. Annals of Operations Research 14, 105–123.
    Bertsekas & Eckstein (1988). Dual coordinate step methods for linear network flow
    problems. Mathematical Programming 42, 203–243.

Example:
    >>> cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]], dtype=torch.float64)
    >>> auction_assignment(cost).tolist()
    [1, 0, 2]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["auction_assignment"]


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

