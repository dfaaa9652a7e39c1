"""What every sampler returns, and what a sampler declares: what it needs from a flow, and
how many field evaluations its steps cost."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, TypeVar, Union

from torch import Tensor

from ..constraints import Rule
from ..solvers import SolverSpec

if TYPE_CHECKING:
    from ..flow import Flow

__all__ = ["SampleResult", "FLOW_PARTS", "ADAPTIVE", "Evaluations", "declare", "declared_nfe"]

#: the optional parts of a :class:`~flowkit.flow.Flow` a model may define and a sampler may
#: need (``prior`` is always there): an objective lists those its flow has in ``provides``,
#: a sampler those it uses in ``needs``; :func:`flowkit.recipe.validate` compares them.
FLOW_PARTS = ("velocity", "score", "drift", "diffusion", "denoise", "path", "flow_map")

#: the ``evaluations`` of a sampler without ``steps``: its step control chooses how many
ADAPTIVE: Literal["adaptive"] = "adaptive"

#: what a sampler's ``steps`` cost in field evaluations (:func:`declare`): a number ``k`` per step,
#: :data:`ADAPTIVE`, or ``(flow, steps, settings) -> NFE`` (``None``: adaptive with these settings)
Evaluations = Union[int, Literal["adaptive"], Callable[["Flow", int, Mapping[str, Any]], Optional[int]]]

F = TypeVar("F", bound=Callable)


def declare(*, needs: Iterable[str], evaluations: Evaluations, argument_rules: Sequence[Rule] = (),
            order: Optional[int] = None) -> Callable[[F], F]:
    """Declare what a sampler needs from a flow, what its steps cost, which argument
    combinations it refuses and, for a deterministic fixed-step solver, its order of convergence.

    Sets ``sampler.needs`` (a frozenset of :data:`FLOW_PARTS`), ``sampler.evaluations``,
    ``sampler.argument_rules`` and ``sampler.order``.

    ``evaluations`` is the exact number of field evaluations (the ``nfe`` of its
    :class:`SampleResult`) ``steps`` steps cost, read by :func:`declared_nfe` (and so by
    :mod:`flowkit.nfe_sweep`, which turns an NFE budget into ``steps``): an integer ``k >= 1``
    for ``k`` a step (``euler`` 1, ``rk4`` 4), a function ``(flow, steps, settings) -> int``
    where the count depends on the flow or the options (``settings``: the sampler's defaults
    updated by the options given; it returns ``None`` for settings without a step count,
    e.g. ``probability_flow`` with an adaptive method), or :data:`ADAPTIVE` for a sampler
    without ``steps`` (``dopri5``). A sampler with a ``steps`` argument must declare a count,
    one without must declare :data:`ADAPTIVE`.

    ``order`` is the ``p`` with endpoint error ``O(steps^-p)`` on a smooth problem (halving the
    step divides the error by ``≈ 2^p``), or ``None`` where no such order is declared (adaptive
    and stochastic samplers, and the fixed-step ODE samplers, whose order is their method's in
    :data:`flowkit.solvers.METHODS`).

    Raises:
        ValueError: an unknown flow part, an order that is not an integer ``>= 1``, or
            ``evaluations`` that is not a count, a function or :data:`ADAPTIVE`, or does not
            match whether the sampler takes ``steps``.

    Example:
        >>> @declare(needs=("score", "drift", "diffusion"), evaluations=1)
        ... def my_sampler(flow, x, *, cond=None, steps: int = 10): ...
        >>> sorted(my_sampler.needs), my_sampler.order, declared_nfe(my_sampler, None, 7)
        (['diffusion', 'drift', 'score'], None, 7)
    """
    parts = frozenset(needs)
    unknown = parts - set(FLOW_PARTS)
    if unknown:
        raise ValueError(f"unknown flow parts {sorted(unknown)}; choose from {', '.join(FLOW_PARTS)}")
    if order is not None and (isinstance(order, bool) or int(order) != order or order < 1):
        raise ValueError(f"order must be an integer >= 1 or None, got {order!r}")
    counted = not (isinstance(evaluations, str) and evaluations == ADAPTIVE)
    if counted and not callable(evaluations) and (
            isinstance(evaluations, (bool, str)) or not isinstance(evaluations, int) or evaluations < 1):
        raise ValueError(f"evaluations must be an integer >= 1 (per step), a function (flow, steps, settings) "
                         f"-> NFE, or {ADAPTIVE!r}; got {evaluations!r}")

    def mark(fn: F) -> F:
        stepped = "steps" in inspect.signature(fn).parameters
        if stepped != counted:
            why = ("takes steps: declare what they cost (evaluations=k per step, or a function)" if stepped
                   else f"takes no steps: declare evaluations={ADAPTIVE!r}")
            raise ValueError(f"sampler {fn.__name__} {why}")
        fn.needs = parts  # type: ignore[attr-defined]
        fn.evaluations = evaluations  # type: ignore[attr-defined]
        fn.argument_rules = tuple(argument_rules)  # type: ignore[attr-defined]
        fn.order = None if order is None else int(order)  # type: ignore[attr-defined]
        return fn

    return mark


def declared_nfe(sampler: Callable[..., "SampleResult"], flow: "Flow", steps: int, **options: Any) -> Optional[int]:
    """The field evaluations ``sampler`` declares for ``steps`` steps with ``options`` on ``flow``
    (its ``evaluations``, :func:`declare`); ``None`` for an adaptive sampler or settings.

    Example:
        >>> from flowkit.components import SAMPLERS
        >>> from flowkit.flow import Flow, StandardNormal
        >>> flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
        >>> [declared_nfe(SAMPLERS.get(name), flow, 5) for name in ("euler", "rk4", "dopri5")]
        [5, 20, None]
        >>> declared_nfe(SAMPLERS.get("probability_flow"), flow, 5, method="heun")
        10
    """
    declared = sampler.evaluations  # type: ignore[attr-defined]
    if isinstance(declared, str):  # ADAPTIVE
        return None
    if not callable(declared):
        return int(steps) * int(declared)
    params = inspect.signature(sampler).parameters
    settings = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    settings.update(options, steps=int(steps))
    count = declared(flow, int(steps), settings)
    return None if count is None else int(count)


@dataclass
class SampleResult:
    """``x``: samples at data time; ``nfe``: network evaluations per sample batch;
    ``trajectory``: states at the requested times (``[n_times, B, ...]``) or None;
    ``solver``: the ODE solver that made ``x`` (None for the SDE samplers)."""

    x: Tensor
    nfe: int
    trajectory: Optional[Tensor] = None
    solver: Optional[SolverSpec] = None
