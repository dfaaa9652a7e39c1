r"""Time-step schedules for the few-step samplers, on any Gaussian path.

A sampler of :mod:`flowkit.samplers.semilinear` steps through knots ``t1 = τ_0 > τ_1 > … > τ_K``
of a flow's :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε``. Which knots is a
named choice, ``schedule``. The ``logsnr`` and ``karras`` spacings are made in the path's own
``(α, σ)``, so one name means the same noise levels on VP, sub-VP, VE and the flow-matching
paths; ``uniform``, ``trailing`` and ``power`` are spacings of the path's time ``t``:

``uniform``
    uniform in ``t`` (DDIM's "uniform" spacing of continuous time);
``logsnr``
    uniform in the half log-SNR ``λ_t = log(α_t / σ_t)`` (Lu et al. 2022, DPM-Solver, Sec. 3.3:
    the variable the exponential integrators step in);
``karras``
    the ``ρ``-spacing of the noise-to-signal ratio ``σ̃_t = σ_t / α_t = e^{−λ_t}`` (Karras et al.
    2022, eq. 5): ``σ̃_k = (σ̃_max^{1/ρ} + k/n (σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ``, ``ρ = 7``;
``trailing``
    uniform in ``t``, counted back from ``t1`` in ``n`` equal steps; with ``final="denoise"`` the
    ``n``-th step lands on ``σ = 0`` instead of ``t0`` (below);
``power``
    ``t_k = t0 + (t1 − t0)(1 − k/n)^p`` with ``p =`` :data:`POWER` ``= 7/4``, denser towards the
    data: between ``trailing`` (``p = 1``) and the quadratic time spacing (``p = 2``; the DDIM
    reference code's ``skip_type="quad"``, DPM-Solver's ``time_quadratic``); ``final="denoise"``
    as for ``trailing``.

``λ_t`` decreases in ``t`` on every path flowkit has, so a knot ``λ_k`` maps to one time, found by
bisection (:func:`time_of_log_snr`).

The default, ``"auto"`` (:func:`resolve_schedule`)
--------------------------------------------------
* ``uniform`` where ``α_{t1} = 0`` (``cond_ot``, ``cosine``, ``polynomial``): there the
  λ-spacings spend most steps where a straight path's velocity hardly changes.
* ``power`` (``trailing`` for EDM's Heun) where the noise vanishes at ``t = 0``, below or at
  ``t0`` (VP, sub-VP, a diffusers DDPM's ``DDPMPath``): on these paths ``t0`` (VP: ``1e-5``,
  ``σ̃ = 10^{-3}``, ``λ = 6.9``; sub-VP: ``λ = 13.8``) is only a guard against the score's
  singularity at 0, and uniform-λ knots from ``λ_{t1} = −5`` to ``λ_{t0}`` put a third of the
  steps where ``x̂₀`` no longer changes and a quarter where it is still ``E[x_data]``, and then
  spend one more evaluation on a denoising step at ``σ̃ = 10^{-3}`` that moves ``x`` by about
  ``10^{-3}`` (fractions for the 8 Gaussians: ``x̂₀`` changes for ``−2 ≲ λ ≲ 2.5``). Measured on
  them under VP (``bench/vp_few_step.py``): with ``logsnr`` DPM-Solver++(2M) and UniPC were
  2–4× *worse* than Euler in ``t`` at 4–8 NFE. EDM's Heun on Karras knots diverged below 16 NFE:
  its corrector evaluates ``ε̂ = (x̃ − x̂₀)/σ̃`` at the predicted point, which multiplies the
  predictor's error by about half the step's ratio ``σ̃_i/σ̃_{i+1}``, and Karras knots down to
  ``σ̃(t0) = 10^{-3}`` have ratios up to 610 at 7 NFE (150 000 at 3); ``trailing`` knots at most 9
  from 7 NFE up (45 at 3), and their last Heun step ends at ``σ̃ = 0.43`` at 8 steps.
  ``power`` crowds the knots where ``x̂₀`` changes (7 of the 8 evaluations at 8 steps lie in
  ``−3.2 ≤ λ ≤ 2.3``) and lands on ``σ = 0`` from ``σ̃ ≈ 0.3`` (4 steps) or ``0.1`` (8 steps),
  where the closed-form step costs ``O(σ̃²)``. The exponent: ``p = 1`` lands from too high a
  noise level (``σ̃ = 0.43`` at 8 steps: Tweedie's shrinkage is the error); ``p = 2`` puts the
  first knot deeper (``λ = −1.6`` at 4 steps), where it weights a trained ε-network's
  ``x̂₀(t1) = (x − σ ε̂)/α`` — its ``ε`` error times ``1/α_{t1} = 152``, RMS 3.6–4.8 against the
  exact ``x̂₀`` on the 8 Gaussians — by ``α`` at that knot: at 4 NFE up to 2.6× Euler's energy
  distance. ``7/4`` was the best measured between them, on the exact mixture and on three
  trained networks.
* the sampler's preferred spacing elsewhere (VE: ``logsnr``; ``karras`` for EDM's Heun).

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
    the last step lands on ``σ = 0`` and returns the data prediction ``x̂₀ = E[x_data | x]`` at
    the knot it starts from (Tweedie; the ``denoise`` of the SDE samplers, k-diffusion's
    appended ``σ = 0``, diffusers' ``final_sigmas_type="zero"``). With ``uniform``, ``logsnr``
    and ``karras`` that is ``steps − 1`` steps from ``t1`` to ``t0``, then one step to ``σ = 0``;
    with ``trailing`` and ``power`` it is the knots of ``steps`` steps from ``t1`` to ``t0`` with
    the last one moved from ``t0`` to ``σ = 0`` (the time-0 end of VP, where ``σ`` vanishes), so
    no evaluation is spent between ``t0`` and ``σ = 0`` (diffusers' "trailing" timesteps with a
    zero final sigma).

Where ``σ_{t0} = 0`` already the two coincide: the last of ``steps`` steps lands on ``t0``,
where ``x = α_{t0} x̂₀``.

References:
    Lu, Zhou, Bao, Chen, Li, Zhu (2022). DPM-Solver: A Fast ODE Solver for Diffusion
    Probabilistic Model Sampling in Around 10 Steps. NeurIPS. (Reference code README:
    ``skip_type`` "logSNR" recommended for low-resolution, "time_uniform" for high-resolution
    images, "time_quadratic" offered; ``t_end = 1e-3`` for ``steps <= 15``.)
    Song, Meng, Ermon (2021). Denoising Diffusion Implicit Models. ICLR. (Reference code:
    ``skip_type`` "uniform" and "quad".)
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS. (Reference sampler: ``σ_min = 0.002``, ``σ_max = 80``, ``ρ = 7``.)
    Lin, Liu, Li, Yang (2024). Common Diffusion Noise Schedules and Sample Steps are Flawed.
    WACV. ("Trailing" timesteps: diffusers' ``timestep_spacing="trailing"``, which cites their
    Table 2.)

Example:
    >>> from flowkit.paths import VP, CondOT
    >>> g = sampling_grid(VP(), 4, "logsnr", final="t0")
    >>> g.t[0] == 1.0 and g.t[-1] == 1e-5, len(g.t)
    (True, 5)
    >>> [round(b - a, 6) for a, b in zip(g.log_snr, g.log_snr[1:])] == [round(g.log_snr[1] - g.log_snr[0], 6)] * 4
    True
    >>> sampling_grid(CondOT(), 4, "uniform").t
    (1.0, 0.75, 0.5, 0.25, 0.0)
    >>> resolve_schedule(VP(), "auto", "logsnr"), resolve_schedule(CondOT(), "auto", "logsnr")
    ('power', 'uniform')
    >>> g = sampling_grid(VP(), 4, "power")  # four steps, the last from t = (1/4)^(7/4) to σ = 0
    >>> [round(t, 4) for t in g.t[:-1]], g.sigma[-1]
    ([1.0, 0.6044, 0.2973, 0.0884], 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..flow import Schedule
from ..paths import EDGE

__all__ = ["SCHEDULES", "TO_ZERO", "POWER", "FINAL_STEPS", "ScheduleName", "SamplerSchedule", "FinalStep", "Grid",
           "log_snr", "resolve_schedule", "time_of_log_snr", "schedule_times", "sampling_grid"]

#: the named spacings of the knots
SCHEDULES = ("uniform", "logsnr", "karras", "trailing", "power")
#: the spacings whose ``final="denoise"`` moves the last knot to ``σ = 0`` instead of adding a step
TO_ZERO = ("trailing", "power")
#: the exponent ``p`` of the ``power`` spacing, ``t_k = t0 + (t1 − t0)(1 − k/n)^p`` (module docstring)
POWER = 1.75
#: where the last step lands (see the module docstring)
FINAL_STEPS = ("denoise", "t0")
#: a named spacing
ScheduleName = Literal["uniform", "logsnr", "karras", "trailing", "power"]
#: a sampler's ``schedule`` argument: a named spacing, or ``"auto"`` (:func:`resolve_schedule`)
SamplerSchedule = Literal["auto", "uniform", "logsnr", "karras", "trailing", "power"]
#: ``"auto"`` on a path whose noise vanishes at ``t = 0`` (VP, sub-VP): the sampler's preferred
#: spacing → the time spacing used instead (module docstring)
_NOISE_FREE_AT_ZERO = {"logsnr": "power", "karras": "trailing"}
#: a sampler's ``final`` argument
FinalStep = Literal["denoise", "t0"]

_F64 = torch.float64
_BISECTIONS = 64  # (t1 − t0) 2^-64: far below the float64 spacing of any knot that matters


def log_snr(path: Schedule, t: Tensor | float) -> Tensor:
    """``λ_t = log α_t − log σ_t`` in float64 (``−∞`` where ``α = 0``, ``+∞`` where ``σ = 0``)."""
    t = torch.as_tensor(t, dtype=_F64)
    return torch.log(path.alpha(t)) - torch.log(path.sigma(t))


def resolve_schedule(path: Schedule, schedule: str, preferred: str) -> str:
    """A sampler's ``schedule``: itself, or for ``"auto"`` (the module docstring gives the
    measurements behind each choice)

    * ``uniform`` where ``α_{t1} = 0`` (``cond_ot``, ``cosine``, ``polynomial``), or where ``σ_{t0} = 0``
      on a path whose noise does not vanish at ``t = 0``;
    * ``power`` — ``trailing`` for a sampler preferring ``karras`` (EDM's Heun) — where the
      noise vanishes at ``t = 0``, at or below ``t0`` (VP, sub-VP, ``DDPMPath``);
    * the sampler's ``preferred`` spacing (``logsnr``; ``karras`` for EDM's Heun) elsewhere (VE).

    Where ``λ`` is unbounded at ``t1`` (``α_{t1} = 0``) the ``logsnr`` and ``karras`` spacings span
    ``λ`` at ``EDGE`` from the singular end (``|λ| ≤ 11.5`` with ``EDGE = 1e-5``) and spend most
    steps where the straight path's velocity hardly changes, so on a flow-matching model they fall
    behind Euler at equal NFE (measured on a trained CFM model, ``bench/few_step.py --part
    trained``); uniform knots in ``t`` do not (DDIM on ``cond_ot`` with uniform knots is Euler,
    and the higher-order solvers improve on it).

    Example:
        >>> from flowkit.paths import VE, VP, CondOT
        >>> [resolve_schedule(p, "auto", "logsnr") for p in (VP(), VE(), CondOT())]
        ['power', 'logsnr', 'uniform']
        >>> resolve_schedule(VP(), "auto", "karras"), resolve_schedule(VP(), "karras", "logsnr")
        ('trailing', 'karras')
    """
    if schedule != "auto":
        return schedule
    ends = torch.tensor([float(path.t0), float(path.t1)], dtype=_F64)
    alpha_t1 = float(path.alpha(ends[1]))
    if not alpha_t1 > 0:
        return "uniform"
    sigma_at_zero = float(path.sigma(torch.zeros((), dtype=_F64)))
    if sigma_at_zero == 0 and preferred in _NOISE_FREE_AT_ZERO:
        return _NOISE_FREE_AT_ZERO[preferred]
    return preferred if bool(torch.isfinite(log_snr(path, ends)).all()) else "uniform"


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
        schedule: one of :data:`SCHEDULES` (see the module docstring).
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
    if schedule in ("uniform", "trailing"):
        times = t1 + (t0 - t1) * k
    elif schedule == "power":
        times = t0 + (t1 - t0) * (1 - k) ** POWER
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
        schedule: one of :data:`SCHEDULES`.
        rho: ``ρ > 0`` of the ``karras`` spacing.
        final: ``"denoise"`` (the last step lands on ``σ = 0``) or ``"t0"`` (on the flow's ``t0``);
            the module docstring says where the knots before it lie.

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
    to_zero = final == "denoise" and sigma_end > 0  # the last step lands on σ = 0, not on t0
    moved = to_zero and schedule in TO_ZERO  # ... in place of the knot at t0, not after it
    times = schedule_times(path, steps - 1 if to_zero and not moved else steps, schedule, rho)
    if moved:
        times = times[:-1]
    alpha, sigma = path.alpha(times).tolist(), path.sigma(times).tolist()
    t = times.tolist()
    if to_zero:
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
