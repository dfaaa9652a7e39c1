"""What every sampler returns, and what a sampler declares it needs from a flow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, TypeVar

from torch import Tensor

from ..constraints import Rule
from ..solvers import SolverSpec

__all__ = ["SampleResult", "FLOW_PARTS", "declare"]

#: the optional parts of a :class:`~flowkit.flow.Flow` a model may define and a sampler may
#: need (``prior`` is always there): an objective lists those its flow has in ``provides``,
#: a sampler those it uses in ``needs``; :func:`flowkit.recipe.validate` compares them.
FLOW_PARTS = ("velocity", "score", "drift", "diffusion", "denoise", "path", "flow_map")

F = TypeVar("F", bound=Callable)


def declare(*, needs: Iterable[str], argument_rules: Sequence[Rule] = (),
            order: Optional[int] = None) -> Callable[[F], F]:
    """Declare what a sampler needs from a flow, which argument combinations it refuses and,
    for a deterministic fixed-step solver, its order of convergence.

    Sets ``sampler.needs`` (a frozenset of :data:`FLOW_PARTS`), ``sampler.argument_rules`` and
    ``sampler.order``: the ``p`` with endpoint error ``O(steps^-p)`` on a smooth problem
    (halving the step divides the error by ``≈ 2^p``), or ``None`` where no such order is
    declared (adaptive and stochastic samplers, and the fixed-step ODE samplers, whose order is
    their method's in :data:`flowkit.solvers.METHODS`).

    Example:
        >>> @declare(needs=("score", "drift", "diffusion"))
        ... def my_sampler(flow, x, *, cond=None, steps: int = 10): ...
        >>> sorted(my_sampler.needs), my_sampler.order
        (['diffusion', 'drift', 'score'], None)
    """
    parts = frozenset(needs)
    unknown = parts - set(FLOW_PARTS)
    if unknown:
        raise ValueError(f"unknown flow parts {sorted(unknown)}; choose from {', '.join(FLOW_PARTS)}")
    if order is not None and (isinstance(order, bool) or int(order) != order or order < 1):
        raise ValueError(f"order must be an integer >= 1 or None, got {order!r}")

    def mark(fn: F) -> F:
        fn.needs = parts  # type: ignore[attr-defined]
        fn.argument_rules = tuple(argument_rules)  # type: ignore[attr-defined]
        fn.order = None if order is None else int(order)  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass
class SampleResult:
    """``x``: samples at data time; ``nfe``: network evaluations per sample batch;
    ``trajectory``: states at the requested times (``[n_times, B, ...]``) or None;
    ``solver``: the ODE solver that made ``x`` (None for the SDE samplers)."""

    x: Tensor
    nfe: int
    trajectory: Optional[Tensor] = None
    solver: Optional[SolverSpec] = None
