"""ODE samplers: integrate a flow's probability-flow ODE from the prior to data.

Each is registered in ``SAMPLERS`` and called as ``sampler(flow, x, cond=None, **options)``
with ``x`` drawn from ``flow.prior``. A sampler's flat solver arguments (the recipe's
``sampler.rtol``, ``sampler.steps`` …) make one :class:`~flowkit.solvers.SolverSpec`, which
:func:`integrate_flow` hands to :func:`~flowkit.solvers.odeint` and the
:class:`~flowkit.samplers.base.SampleResult` reports. ``dopri5`` is adaptive RK45 (FFJORD's
solver); one fixed-step sampler per fixed-step method of :data:`~flowkit.solvers.METHODS`
(``euler``, ``midpoint``, ``heun``, ``rk4``) spends exactly ``steps × stages`` evaluations.
``probability_flow`` is the same ODE named for diffusion users (Song et al. 2021, eq. 13), with
any method of the table. ``guidance`` (w) applies classifier-free guidance to the field.

Example:
    >>> from flowkit.flow import Flow, StandardNormal
    >>> flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
    >>> res = FIXED_STEP_SAMPLERS["rk4"](flow, torch.ones(3, 2), steps=5)
    >>> res.solver == SolverSpec("rk4", steps=5), res.nfe
    (True, 20)
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from ..components import SAMPLERS
from ..constraints import AtLeast, FiniteFloat
from ..flow import Flow, guided
from ..solvers import FIXED_STEP, ODEMethod, SolverSpec, StepCount, Tolerance, as_solver, \
    fixed_step_needs_steps, odeint
from .base import ADAPTIVE, SampleResult, declare

#: times per segment returned when > 2 (2: the end points only, no trajectory)
NTimes = Annotated[int, AtLeast(2)]

__all__ = ["integrate_flow", "dopri5", "FIXED_STEP_SAMPLERS", "probability_flow"]


def integrate_flow(flow: Flow, x: Tensor, *, solver: Optional[SolverSpec] = None, cond: Optional[Tensor] = None,
                   guidance: float = 0.0, n_times: int = 2, reverse: bool = True, **settings: Any) -> SampleResult:
    """Integrate every segment of ``flow`` (reverse: prior → data; else data → prior).

    Args:
        flow: the flow.
        x: the start (at ``flow.t1`` when ``reverse``, else at ``flow.t0``).
        solver: the ODE solver (default ``SolverSpec()``: ``dopri5``, ``rtol = atol = 1e-5``).
        cond: condition passed to the fields.
        guidance: classifier-free guidance scale.
        n_times: ``> 2`` also returns the trajectory at that many times per segment.
        reverse: integrate from the prior to data.
        **settings: instead of ``solver``, its fields one by one (``method="rk4", steps=8``).

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` carrying the ``solver`` used.
    """
    solver = as_solver(solver, **settings)
    segments = flow.segments()
    if reverse:
        segments = [(f, b, a) for f, a, b in reversed(segments)]
    nfe, path = 0, []
    with torch.no_grad():
        for field_fn, a, b in segments:
            fn = guided(field_fn, guidance) if guidance else field_fn
            times = torch.linspace(a, b, max(n_times, 2))
            sol = odeint(lambda t, y: fn(t, y, cond), x, times, solver)
            x, nfe = sol.ys[-1], nfe + sol.nfe
            path.append(sol.ys if not path else sol.ys[1:])
    return SampleResult(x, nfe, torch.cat(path) if n_times > 2 else None, solver)


def _stage_count(method: Optional[str] = None) -> Callable[[Flow, int, Mapping[str, Any]], Optional[int]]:
    """The declared ``evaluations`` of an ODE sampler: ``steps`` × the stages of ``method`` (``None``:
    of the sampler's ``method`` option) for every block of a stacked CNF; ``None`` for an
    adaptive method."""

    def evaluations(flow: Flow, steps: int, settings: Mapping[str, Any]) -> Optional[int]:
        stages = FIXED_STEP.get(method or settings["method"])
        return None if stages is None else steps * stages * len(flow.segments())

    return evaluations


@SAMPLERS.register("dopri5")
@declare(needs=("velocity",), evaluations=ADAPTIVE)
def dopri5(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, rtol: Tolerance = 1e-5,
           atol: Tolerance = 1e-5, per_sample_norm: bool = False, guidance: FiniteFloat = 0.0,
           n_times: NTimes = 2) -> SampleResult:
    """Adaptive RK45 (Dormand–Prince) on the flow's ODE, via torchdiffeq."""
    solver = SolverSpec("dopri5", rtol=rtol, atol=atol, per_sample_norm=per_sample_norm)
    return integrate_flow(flow, x, solver=solver, cond=cond, guidance=guidance, n_times=n_times)


def _fixed_step_sampler(method: str) -> Callable[..., SampleResult]:
    """The registered sampler of the fixed-step ``method`` of :data:`~flowkit.solvers.METHODS`."""

    def sampler(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 100,
                guidance: FiniteFloat = 0.0, n_times: NTimes = 2) -> SampleResult:
        solver = SolverSpec(method, steps=steps)
        return integrate_flow(flow, x, solver=solver, cond=cond, guidance=guidance, n_times=n_times)

    stages = FIXED_STEP[method]
    sampler.__name__ = sampler.__qualname__ = method
    sampler.__doc__ = (f"Fixed-step {method} on the flow's ODE: exactly steps × {stages} "
                       f"evaluation{'s' * (stages > 1)} per block.")
    return SAMPLERS.register(method)(declare(needs=("velocity",), evaluations=_stage_count(method))(sampler))


#: one sampler per fixed-step method of the table, registered under the method's name
FIXED_STEP_SAMPLERS: dict[str, Callable[..., SampleResult]] = {m: _fixed_step_sampler(m) for m in FIXED_STEP}


@SAMPLERS.register("probability_flow")
@declare(needs=("velocity",), evaluations=_stage_count(), argument_rules=(fixed_step_needs_steps,))
def probability_flow(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, method: ODEMethod = "dopri5",
                     rtol: Tolerance = 1e-5, atol: Tolerance = 1e-5, steps: Optional[StepCount] = None,
                     per_sample_norm: bool = False, guidance: FiniteFloat = 0.0, n_times: NTimes = 2) -> SampleResult:
    """The probability-flow ODE dx/dt = f − ½g²∇log p_t (Song et al. 2021, eq. 13), any method of the solver table."""
    solver = SolverSpec(method, rtol=rtol, atol=atol, steps=steps, per_sample_norm=per_sample_norm)
    return integrate_flow(flow, x, solver=solver, cond=cond, guidance=guidance, n_times=n_times)
