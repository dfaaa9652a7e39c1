r"""Time-step schedules for the few-step samplers, on any Gaussian path.

A sampler of :mod:`flowkit.samplers.semilinear` steps through knots ``t1 = τ_0 > τ_1 > … > τ_K``
of a flow's :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε``. Which knots is a
named choice, ``schedule``, made in the path's own ``(α, σ)`` so that one name means the same
spacing on VP, sub-VP, VE and the flow-matching paths:

``uniform``
    uniform in ``t`` (DDIM's "uniform" spacing of continuous time);
``logsnr``
    uniform in the half log-SNR ``λ_t = log(α_t / σ_t)`` (Lu et al. 2022, DPM-Solver, Sec. 3.3:
    the variable the exponential integrators step in);
``karras``
    the ``ρ``-spacing of the noise-to-signal ratio ``σ̃_t = σ_t / α_t = e^{−λ_t}`` (Karras et al.
    2022, eq. 5): ``σ̃_k = (σ̃_max^{1/ρ} + k/n (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ``, ``ρ = 7``.

``λ_t`` decreases in ``t`` on every path flowkit has, so a knot ``λ_k`` maps to one time, found by
bisection (:func:`time_of_log_snr`).

Singular ends (the EDGE convention)
-----------------------------------
Where ``α_{t1} = 0`` (``cond_ot``, ``cosine``, ``polynomial`` at ``t1 = 1``) ``λ_{t1} = −∞``, and
where ``σ_{t0} = 0`` (``cond_ot`` with ``σ_min = 0``, ``t0 = 0``) ``λ_{t0} = +∞``: no spacing in
``λ`` or ``σ̃`` reaches them. The ``logsnr`` and ``karras`` spacings then run between ``λ`` at
``t1 − EDGE`` and/or ``t0 + EDGE`` (``EDGE = 1e-5``, the distance :mod:`flowkit.paths` keeps from a
singular end), and the first and last knots are set to ``t1`` and ``t0`` themselves, so sampling
still starts from the prior at ``t1`` and ends at ``t0``. The step out of ``α = 0`` and the step
into ``σ = 0`` are infinitely long in ``λ``; the samplers take them in closed form (see
:mod:`flowkit.samplers.semilinear`). On such paths the spacings in ``λ`` crowd knots at both
ends (with ``EDGE = 1e-5`` the interior covers ``|λ| ≤ 11.5``); ``uniform`` is the natural
choice for a straight (``cond_ot``) path.

The final step
--------------
``final`` states where the last step lands:

``"t0"``
    ``steps`` steps from ``t1`` to the flow's ``t0`` (the last noise level ``σ_{t0}``): the
    result approximates the probability-flow ODE's solution at ``t0``, as ``dopri5`` does.
``"denoise"``
    ``steps − 1`` steps from ``t1`` to ``t0``, then one step to ``σ = 0``, which returns the
    data prediction ``x̂₀ = E[x_data | x_{t0}]`` (Tweedie; the ``denoise`` of the SDE
    samplers, k-diffusion's appended ``σ = 0``, diffusers' ``final_sigmas_type="zero"``).

Where ``σ_{t0} = 0`` already the two coincide: the last of ``steps`` steps lands on ``t0``,
where ``x = α_{t0} x̂₀``.

References:
    Lu, Zhou, Bao, Chen, Li, Zhu (2022). DPM-Solver: A Fast ODE Solver for Diffusion
    Probabilistic Model Sampling in Around 10 Steps. NeurIPS.
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS.

Example:
    >>> from flowkit.paths import VP, CondOT
    >>> g = sampling_grid(VP(), 4, "logsnr", final="t0")
    >>> g.t[0] == 1.0 and g.t[-1] == 1e-5, len(g.t)
    (True, 5)
    >>> [round(b - a, 6) for a, b in zip(g.log_snr, g.log_snr[1:])] == [round(g.log_snr[1] - g.log_snr[0], 6)] * 4
    True
    >>> sampling_grid(CondOT(), 4, "uniform").t
    (1.0, 0.75, 0.5, 0.25, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..flow import Schedule
from ..paths import EDGE

__all__ = ["SCHEDULES", "FINAL_STEPS", "ScheduleName", "SamplerSchedule", "FinalStep", "Grid", "log_snr",
           "resolve_schedule", "time_of_log_snr",
           "schedule_times", "sampling_grid"]

#: the named spacings of the knots
SCHEDULES = ("uniform", "logsnr", "karras")
#: where the last step lands (see the module docstring)
FINAL_STEPS = ("denoise", "t0")
#: a named spacing
ScheduleName = Literal["uniform", "logsnr", "karras"]
#: a sampler's ``schedule`` argument: a named spacing, or ``"auto"`` (:func:`resolve_schedule`)
SamplerSchedule = Literal["auto", "uniform", "logsnr", "karras"]
#: a sampler's ``final`` argument
FinalStep = Literal["denoise", "t0"]

_F64 = torch.float64
_BISECTIONS = 64  # (t1 − t0) 2^-64: far below the float64 spacing of any knot that matters


def log_snr(path: Schedule, t: Tensor | float) -> Tensor:
    """``λ_t = log α_t − log σ_t`` in float64 (``−∞`` where ``α = 0``, ``+∞`` where ``σ = 0``)."""
    t = torch.as_tensor(t, dtype=_F64)
    return torch.log(path.alpha(t)) - torch.log(path.sigma(t))


def resolve_schedule(path: Schedule, schedule: str, preferred: str) -> str:
    """A sampler's ``schedule``: itself, or for ``"auto"`` the sampler's ``preferred`` spacing
    (``logsnr``; ``karras`` for EDM's Heun) where ``λ`` is finite at both ends of the path's
    ``[t0, t1]``, and ``uniform`` where it is not (``α_{t1} = 0`` or ``σ_{t0} = 0``: ``cond_ot``,
    ``cosine``, ``polynomial``).

    Where ``λ`` is unbounded the ``logsnr`` and ``karras`` spacings span ``λ`` at ``EDGE`` from the
    singular end (``|λ| ≤ 11.5`` with ``EDGE = 1e-5``) and spend most steps where the straight
    path's velocity hardly changes, so on a flow-matching model they fall behind Euler at equal
    NFE (measured on a trained CFM model, ``bench/few_step.py --part trained``); uniform knots in
    ``t`` do not (DDIM on ``cond_ot`` with uniform knots is Euler, and the higher-order solvers
    improve on it).

    Example:
        >>> from flowkit.paths import VP, CondOT
        >>> resolve_schedule(VP(), "auto", "logsnr"), resolve_schedule(CondOT(), "auto", "karras")
        ('logsnr', 'uniform')
    """
    if schedule != "auto":
        return schedule
    ends = log_snr(path, torch.tensor([float(path.t0), float(path.t1)], dtype=_F64))
    return preferred if bool(torch.isfinite(ends).all()) else "uniform"


def time_of_log_snr(path: Schedule, lam: Tensor) -> Tensor:
    """The times in ``[t0, t1]`` with ``λ_t = lam`` (bisection; ``λ`` decreases in ``t``).

    Values of ``lam`` beyond ``λ`` at the ends give the end (``t1`` below ``λ_{t1}``, ``t0``
    above ``λ_{t0}``).
    """
    lam = torch.as_tensor(lam, dtype=_F64)
    lo = torch.full_like(lam, float(path.t0))
    hi = torch.full_like(lam, float(path.t1))
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        above = log_snr(path, mid) > lam  # still on the data side of the target: move right
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _finite_end(path: Schedule, t: float, inward: float) -> float:
    """``λ`` at ``t``, or at ``t + inward`` where ``λ_t`` is infinite (the EDGE convention)."""
    lam = float(log_snr(path, t))
    return lam if math.isfinite(lam) else float(log_snr(path, t + inward))


def schedule_times(path: Schedule, steps: int, schedule: str = "logsnr", rho: float = 7.0) -> Tensor:
    """``steps + 1`` float64 times from ``path.t1`` down to ``path.t0`` spaced by ``schedule``.

    Args:
        path: the flow's Gaussian path (``alpha``, ``sigma``, ``t0``, ``t1``).
        steps: number of intervals, ``>= 0`` (0 gives ``[t1]``).
        schedule: ``"uniform"``, ``"logsnr"`` or ``"karras"`` (see the module docstring).
        rho: ``ρ > 0`` of the ``karras`` spacing.

    Returns:
        A strictly decreasing ``[steps + 1]`` tensor, first ``t1`` and last ``t0`` exactly.

    Raises:
        ValueError: an unknown ``schedule``, ``rho <= 0`` or a negative ``steps``.
    """
    _check_schedule(schedule, rho)
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 here, got {steps!r}")
    t0, t1, n = float(path.t0), float(path.t1), int(steps)
    if n == 0:
        return torch.tensor([t1], dtype=_F64)
    k = torch.arange(n + 1, dtype=_F64) / n
    if schedule == "uniform":
        times = t1 + (t0 - t1) * k
    else:
        width = EDGE * (t1 - t0)
        lam_start, lam_end = _finite_end(path, t1, -width), _finite_end(path, t0, width)
        if schedule == "logsnr":
            lam = lam_start + (lam_end - lam_start) * k
        else:  # karras: ρ-spacing of σ̃ = e^{−λ}
            hi, lo = math.exp(-lam_start / rho), math.exp(-lam_end / rho)
            lam = -rho * torch.log(hi + (lo - hi) * k)
        times = time_of_log_snr(path, lam)
    times[0], times[-1] = t1, t0
    return times


@dataclass(frozen=True)
class Grid:
    """The knots a sampler steps through, as float64 Python numbers.

    Attributes:
        t: the times, ``t[0] = t1``; the last is ``nan`` for the ``σ = 0`` end of the
            ``"denoise"`` convention (a noise level, not a time of the path).
        alpha, sigma: ``α`` and ``σ`` at each knot (``(1, 0)`` at the ``σ = 0`` end).
        log_snr: ``λ = log(α/σ)`` at each knot (``±∞`` at singular ends).
    """

    t: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    log_snr: tuple[float, ...]

    @property
    def steps(self) -> int:
        """Number of steps (knots − 1)."""
        return len(self.t) - 1

    def singular(self, i: int) -> bool:
        """Whether step ``i`` (from knot ``i`` to ``i + 1``) is infinitely long in ``λ``:
        it leaves ``α = 0`` or lands on ``σ = 0``."""
        return not (math.isfinite(self.log_snr[i]) and math.isfinite(self.log_snr[i + 1]))


def sampling_grid(path: Schedule, steps: int, schedule: str = "logsnr", *, rho: float = 7.0,
                  final: str = "denoise") -> Grid:
    """The knots of ``steps`` sampler steps on ``path`` (see the module docstring).

    Args:
        path: the flow's Gaussian path.
        steps: number of steps ``>= 1``.
        schedule: ``"uniform"``, ``"logsnr"`` or ``"karras"``.
        rho: ``ρ > 0`` of the ``karras`` spacing.
        final: ``"denoise"`` (the last step lands on ``σ = 0``) or ``"t0"`` (on the flow's ``t0``).

    Returns:
        A :class:`Grid` of ``steps + 1`` knots.

    Raises:
        ValueError: ``steps`` not an integer ``>= 1``, an unknown ``schedule`` or ``final``, or
            ``rho <= 0``, each named with the accepted values.
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if final not in FINAL_STEPS:
        raise ValueError(f"unknown final step {final!r}; choose one of: {', '.join(FINAL_STEPS)}")
    _check_schedule(schedule, rho)
    steps = int(steps)
    sigma_end = float(path.sigma(torch.as_tensor(float(path.t0), dtype=_F64)))
    extra = final == "denoise" and sigma_end > 0
    times = schedule_times(path, steps - 1 if extra else steps, schedule, rho)
    alpha, sigma = path.alpha(times).tolist(), path.sigma(times).tolist()
    t = times.tolist()
    if extra:
        t, alpha, sigma = t + [math.nan], alpha + [1.0], sigma + [0.0]
    lam = [_log_ratio(a, s) for a, s in zip(alpha, sigma)]
    return Grid(tuple(t), tuple(alpha), tuple(sigma), tuple(lam))


def _log_ratio(alpha: float, sigma: float) -> float:
    if alpha <= 0:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def _check_schedule(schedule: str, rho: float) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
