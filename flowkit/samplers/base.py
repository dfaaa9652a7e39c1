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


def declare(*, needs: Iterable[str], argument_rules: Sequence[Rule] = ()) -> Callable[[F], F]:
    """Declare what a sampler needs from a flow and which argument combinations it refuses.

    Sets ``sampler.needs`` (a frozenset of :data:`FLOW_PARTS`) and ``sampler.argument_rules``.

    Example:
        >>> @declare(needs=("score", "drift", "diffusion"))
        ... def my_sampler(flow, x, *, cond=None, steps: int = 10): ...
        >>> sorted(my_sampler.needs)
        ['diffusion', 'drift', 'score']
    """
    parts = frozenset(needs)
    unknown = parts - set(FLOW_PARTS)
    if unknown:
        raise ValueError(f"unknown flow parts {sorted(unknown)}; choose from {', '.join(FLOW_PARTS)}")

    def mark(fn: F) -> F:
        fn.needs = parts  # type: ignore[attr-defined]
        fn.argument_rules = tuple(argument_rules)  # type: ignore[attr-defined]
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
