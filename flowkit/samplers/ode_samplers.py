"""ODE samplers: integrate a flow's probability-flow ODE from the prior to data.

Each is registered in ``SAMPLERS`` and called as ``sampler(flow, x, cond=None, **options)``
with ``x`` drawn from ``flow.prior``. ``dopri5`` is adaptive RK45 (FFJORD's solver);
``euler``/``midpoint``/``heun``/``rk4`` spend exactly ``steps × stages`` evaluations.
``probability_flow`` is the same ODE named for diffusion users (Song et al. 2021, eq. 13).
``guidance`` (w) applies classifier-free guidance to the field.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import torch
from torch import Tensor

from ..components import SAMPLERS
from ..constraints import AtLeast, FiniteFloat, PositiveFloat, PositiveInt
from ..flow import Flow, guided
from .base import SampleResult, declare
from .ode import ADAPTIVE, FIXED_STEP, fixed_step_needs_steps, odeint

#: times per segment returned when > 2 (2: the end points only, no trajectory)
NTimes = Annotated[int, AtLeast(2)]

__all__ = ["integrate_flow", "dopri5", "euler", "midpoint", "heun", "rk4", "probability_flow"]


def integrate_flow(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, method: str = "dopri5",
                   rtol: float = 1e-5, atol: float = 1e-5, per_sample_norm: bool = False,
                   steps: Optional[int] = None, guidance: float = 0.0, n_times: int = 2,
                   reverse: bool = True) -> SampleResult:
    """Integrate every segment of ``flow`` (reverse: prior → data; else data → prior).

    ``n_times > 2`` also returns the trajectory at that many times per segment.
    """
    segments = flow.segments()
    if reverse:
        segments = [(f, b, a) for f, a, b in reversed(segments)]
    nfe, path = 0, []
    with torch.no_grad():
        for field_fn, a, b in segments:
            fn = guided(field_fn, guidance) if guidance else field_fn
            times = torch.linspace(a, b, max(n_times, 2))
            sol = odeint(lambda t, y: fn(t, y, cond), x, times, method=method, rtol=rtol, atol=atol,
                         per_sample_norm=per_sample_norm, steps=steps)
            x, nfe = sol.ys[-1], nfe + sol.nfe
            path.append(sol.ys if not path else sol.ys[1:])
    return SampleResult(x, nfe, torch.cat(path) if n_times > 2 else None)


@SAMPLERS.register("dopri5")
@declare(needs=("velocity",))
def dopri5(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, rtol: PositiveFloat = 1e-5,
           atol: PositiveFloat = 1e-5, per_sample_norm: bool = False, guidance: FiniteFloat = 0.0,
           n_times: NTimes = 2) -> SampleResult:
    """Adaptive RK45 (Dormand–Prince) on the flow's ODE, via torchdiffeq."""
    return integrate_flow(flow, x, cond=cond, method="dopri5", rtol=rtol, atol=atol,
                          per_sample_norm=per_sample_norm, guidance=guidance, n_times=n_times)


def _fixed(method: str):
    def sampler(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: PositiveInt = 100,
                guidance: FiniteFloat = 0.0, n_times: NTimes = 2) -> SampleResult:
        return integrate_flow(flow, x, cond=cond, method=method, steps=steps, guidance=guidance,
                              n_times=n_times)

    stages = FIXED_STEP[method]
    sampler.__name__ = method
    sampler.__doc__ = (f"Fixed-step {method} on the flow's ODE: exactly steps × {stages} "
                       f"evaluation{'s' * (stages > 1)} per block.")
    return SAMPLERS.register(method)(declare(needs=("velocity",))(sampler))


euler = _fixed("euler")
midpoint = _fixed("midpoint")
heun = _fixed("heun")
rk4 = _fixed("rk4")


@SAMPLERS.register("probability_flow")
@declare(needs=("velocity",), argument_rules=(fixed_step_needs_steps,))
def probability_flow(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None,
                     method: Literal["dopri5", "bosh3", "adaptive_heun", "euler", "midpoint", "heun", "rk4"] = "dopri5",
                     rtol: PositiveFloat = 1e-5, atol: PositiveFloat = 1e-5, steps: Optional[PositiveInt] = None,
                     per_sample_norm: bool = False, guidance: FiniteFloat = 0.0, n_times: NTimes = 2) -> SampleResult:
    """The probability-flow ODE dx/dt = f − ½g²∇log p_t (Song et al. 2021, eq. 13), any solver."""
    if method in FIXED_STEP and steps is None:
        raise ValueError(f"probability_flow with fixed-step method {method!r} needs steps")
    return integrate_flow(flow, x, cond=cond, method=method, rtol=rtol, atol=atol, steps=steps,
                          per_sample_norm=per_sample_norm, guidance=guidance, n_times=n_times)
