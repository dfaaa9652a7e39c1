"""ODE solvers as functions of (field, x, times, options).

:func:`odeint` is the one entry point. ``method`` picks

* adaptive Runge–Kutta from torchdiffeq (``dopri5`` — Dormand & Prince 1980, the
  RK45 of FFJORD — ``bosh3``, ``adaptive_heun``), with ``rtol``/``atol`` and an optional
  **per-sample** error norm: the step is accepted when the worst sample's RMS error is
  within tolerance, instead of the RMS over the whole batch, so one outlier cannot hide
  behind many easy samples;
* fixed-step ``euler`` (order 1), ``midpoint`` and ``heun`` (order 2) and ``rk4``
  (classical, order 4) written here, evaluating every stage at its own time, so the
  number of function evaluations is known in advance: ``steps × stages`` per segment.

Times may decrease (generation runs from the prior at ``t1`` to data at ``t0``).
``adjoint=True`` differentiates by the adjoint method (Chen et al. 2018, Alg. 1)
through torchdiffeq's ``odeint_adjoint`` in either time direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..constraints import Rule

__all__ = ["odeint", "Solution", "FIXED_STEP", "ADAPTIVE", "ODEMethod", "fixed_step_needs_steps",
           "per_sample_rms_norm", "CountingField"]

# stages per step of the fixed-step methods
FIXED_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2")

#: every ``method`` :func:`odeint` accepts, as a type recipes are checked against
ODEMethod = Literal[ADAPTIVE + tuple(FIXED_STEP)]  # type: ignore[valid-type]

#: declared on components with ``method`` and ``steps`` arguments: fixed-step methods need steps
fixed_step_needs_steps = Rule(("steps", "method"), lambda a: a["method"] not in FIXED_STEP or a["steps"] is not None,
                              "fixed-step method {method!r} needs steps >= 1 (or choose an adaptive "
                              "method: " + ", ".join(ADAPTIVE) + ")")


@dataclass
class Solution:
    """``ys[i]`` is the state at ``times[i]``; ``nfe`` counts field evaluations."""

    ys: Tensor
    nfe: int


class CountingField(nn.Module):
    """Wraps ``field(t, x)`` and counts its calls (NFE)."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(t, x)


def per_sample_rms_norm(batch_dims: int = 1) -> Callable[[Tensor], Tensor]:
    """Error norm = max over samples of each sample's RMS (state ``[B, ...]``)."""

    def norm(err: Tensor) -> Tensor:
        if err.dim() <= batch_dims:
            return err.abs().max()
        return err.flatten(batch_dims).pow(2).mean(-1).sqrt().max()

    return norm


def odeint(
    field: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    times: Tensor | Sequence[float],
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    per_sample_norm: bool = False,
    steps: Optional[int] = None,
    adjoint: bool = False,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    max_steps: Optional[int] = None,
) -> Solution:
    """Solve ``dx/dt = field(t, x)`` from ``times[0]``, returning the state at each time.

    Args:
        field: vector field ``field(t, x)``.
        x: initial state at ``times[0]``.
        times: monotone times (increasing or decreasing), at least two.
        method: one of ``ADAPTIVE`` or ``FIXED_STEP``.
        rtol, atol: tolerances of adaptive methods.
        per_sample_norm: adaptive error norm per sample (max over the batch of RMS).
        steps: fixed-step methods: steps between consecutive ``times`` (required).
        adjoint: differentiate with the adjoint method (needs ``field`` to be an
            ``nn.Module`` or ``adjoint_params``).
        max_steps: adaptive methods: give up after this many steps.

    Returns:
        :class:`Solution` with ``ys`` of shape ``[len(times), *x.shape]``.

    Raises:
        ValueError: for an unknown method, or a fixed-step method without ``steps``.
    """
    times = torch.as_tensor(times, dtype=x.dtype, device=x.device) if not torch.is_tensor(times) \
        else times.to(dtype=x.dtype, device=x.device)
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError("times must be a 1-D sequence of at least two times")
    counted = field if isinstance(field, CountingField) else CountingField(field)
    start = counted.nfe
    if method in FIXED_STEP:
        if steps is None or int(steps) < 1:
            raise ValueError(f"fixed-step method {method!r} needs steps >= 1 (got {steps!r}); "
                             "a solve must never silently take a single step")
        if adjoint:
            ys = _torchdiffeq(counted, x, times, method if method != "heun" else "heun2",
                              rtol, atol, False, int(steps), True, adjoint_params, None)
        else:
            ys = _fixed(counted, x, times, method, int(steps))
    elif method in ADAPTIVE:
        ys = _torchdiffeq(counted, x, times, method, rtol, atol, per_sample_norm, None,
                          adjoint, adjoint_params, max_steps)
    else:
        from ..registry import did_you_mean
        choices = list(ADAPTIVE) + list(FIXED_STEP)
        raise ValueError(f"unknown ODE method {method!r}{did_you_mean(method, choices)}; "
                         f"choose one of: {', '.join(choices)}")
    return Solution(ys, counted.nfe - start)


def _fixed(field, x: Tensor, times: Tensor, method: str, steps: int) -> Tensor:
    out = [x]
    for a, b in zip(times[:-1], times[1:]):
        h = (b - a) / steps
        for k in range(steps):
            t = a + k * h
            x = _STEPS[method](field, t, x, h)
        out.append(x)
    return torch.stack(out)


def _euler(f, t, x, h):
    return x + h * f(t, x)


def _midpoint(f, t, x, h):
    k1 = f(t, x)
    return x + h * f(t + h / 2, x + h / 2 * k1)


def _heun(f, t, x, h):
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + h / 2 * (k1 + k2)


def _rk4(f, t, x, h):
    k1 = f(t, x)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4}


def _torchdiffeq(field, x, times, method, rtol, atol, per_sample_norm, steps, adjoint,
                 adjoint_params, max_steps) -> Tensor:
    import torchdiffeq

    options: dict = {}
    if steps is None:
        # land exactly on the requested times instead of stepping past the end and
        # interpolating back (a field may be undefined beyond its interval, e.g. VP at t < 0)
        options["step_t"] = times[1:]
    if steps is not None:
        options["step_size"] = float((times[1] - times[0]).abs() / steps)
    if per_sample_norm:
        options["norm"] = per_sample_rms_norm()
    if max_steps is not None:
        options["max_num_steps"] = int(max_steps)
    if adjoint:
        params = tuple(adjoint_params) if adjoint_params is not None else tuple(
            p for p in field.parameters() if p.requires_grad)
        # seminorm: the adjoint's error control ignores the parameter-gradient channels
        # (Kidger et al. 2021, "Hey, that's not an ODE"), which cuts backward NFE.
        kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, adjoint_params=params,
                      adjoint_options={"norm": "seminorm"} if method in ADAPTIVE else None)
        return torchdiffeq.odeint_adjoint(field, x, times, **kwargs)
    return torchdiffeq.odeint(field, x, times, rtol=rtol, atol=atol, method=method, options=options)
