r"""A lean Dormand–Prince RK5(4) solver with shared steps, differentiated by plain autograd.

The adaptive solve of every shared-step ``dopri5`` without the adjoint (FFJORD training by
direct backpropagation, the likelihood solves with one step size for the batch) runs here
instead of through torchdiffeq: the same method and the same step-size control, with fewer
Python operations and autograd nodes per stage, so a small field (FFJORD's toy network,
~40 µs of arithmetic per call) is no longer dominated by the solver around it.

Method (Dormand & Prince 1980; Hairer, Nørsett & Wanner, *Solving ODEs I*, II.5, table 5.2):
the seven-stage pair with the first-same-as-last property, stage ``i`` at
``t + c_i h`` with ``y_i = y + h Σ_j a_ij k_j``, the fifth-order solution ``y₁ = y_6``
(the last stage's input) and the error estimate ``e = h Σ_j (b_j − b̂_j) k_j``.

Step-size control, as torchdiffeq's ``dopri5`` (so NFE and results agree to the tolerance):

* first step: Hairer, Nørsett & Wanner II.4 (the "starting step size" algorithm): ``d₀ = ‖y₀/s‖``,
  ``d₁ = ‖f₀/s‖`` with ``s = atol + rtol |y₀|``, ``h₀ = 0.01 d₀/d₁`` (``1e-6`` if either is
  below ``1e-5``), one probe ``f(t₀ + h₀, y₀ + h₀ f₀)`` giving ``d₂``, and
  ``h = min(100 h₀, (0.01 / max(d₁, d₂))^{1/5})`` — that probe is the one extra evaluation of
  a solve and is made without a graph;
* error ratio ``r = ‖e / (atol + rtol max(|y₀|, |y₁|))‖`` (RMS over the whole state, or the
  worst sample's RMS with ``per_sample_norm``), computed without a graph; accept when
  ``r ≤ 1``;
* next step ``h · min(10, max(0.9 r^{-1/5}, 0.2))`` (no shrinking below ``h`` after an
  accepted step; ``10 h`` when ``r = 0``);
* every requested time is landed on exactly (the state there is the step's ``y₁``, not an
  interpolation), so a field defined only on ``[t0, t1]`` is never evaluated past it;
* warm start (``plan``, a :class:`StepPlan` of an earlier solve of a similar problem over the same
  times — the previous training step's): the first step is the size the earlier solve's controller
  proposed after its first step (no starting-step probe), and after each accepted step ending at
  ``t`` the next step is at most what the earlier solve's controller proposed from the step that
  covered ``t``. Where the local error varies quickly along ``t`` (FFJORD's toy model: an error
  ratio of 0.5 then 2.5 at the same step size), this avoids most rejected steps and the small
  first step of the heuristic: 25 % fewer evaluations per training step on the reference recipe
  (``bench/ffjord_toy.py``). Only step *proposals* change: every step is still accepted only
  when its error ratio is ≤ 1, so the tolerance means what it meant.

Failures raise :class:`StepSizeUnderflow` (``underflow in dt``, ``non-finite values in
state``, ``max_num_steps exceeded``: torchdiffeq's words), an ``AssertionError`` as
torchdiffeq's are, so every caller handles both solvers alike.

Example:
    >>> y = dopri5(lambda t, x: -x, torch.ones(3, 1), [0.0, 1.0], rtol=1e-6, atol=1e-6)
    >>> round(y.ys[-1, 0, 0].item(), 5)  # exp(-1)
    0.36788
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["dopri5", "DOPRI5", "LeanSolution", "StepPlan", "StepSizeUnderflow", "rms_norm"]

#: the Dormand–Prince 5(4) tableau (Dormand & Prince 1980, Table 2): nodes ``c``, the rows of
#: ``a`` (row i: stage i + 1; the last row is the fifth-order weights ``b``: first same as last)
#: and ``e = b − b̂``, the error weights of the seven stages. The one copy in flowkit: the
#: per-sample solver (:mod:`flowkit.solvers_per_sample`) steps with it too.
DOPRI5 = {
    "c": (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    "a": ((),
          (1 / 5,),
          (3 / 40, 9 / 40),
          (44 / 45, -56 / 15, 32 / 9),
          (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
          (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
          (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    "e": (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
          -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60),
}
_C, _A, _E = DOPRI5["c"][1:], DOPRI5["a"][1:], DOPRI5["e"]
_ORDER = 5
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2


class StepSizeUnderflow(AssertionError):
    """The solve cannot continue: the step size underflowed, the state is not finite, or
    ``max_steps`` was used up. An ``AssertionError``, as torchdiffeq reports the same."""


def rms_norm(err: Tensor) -> Tensor:
    """Root mean square over the whole state (torchdiffeq's default error norm)."""
    return err.pow(2).mean().sqrt()


@dataclass(frozen=True)
class StepPlan:
    """The accepted steps of a solve, to warm-start the next solve of a similar problem.

    ``times``: the requested times of the solve; ``steps``: one ``(start, end, proposal)`` per
    accepted step, in order, ``proposal`` being the step size the controller chose after it
    (``inf`` after a step cut short to land on a requested time: it caps nothing).

    Example:
        >>> plan = dopri5(lambda t, x: -x, torch.ones(2, 1), [0.0, 1.0]).plan
        >>> again = dopri5(lambda t, x: -x, torch.ones(2, 1), [0.0, 1.0], plan=plan)
        >>> again.nfe < dopri5(lambda t, x: -x, torch.ones(2, 1), [0.0, 1.0]).nfe  # no probe, no small first step
        True
        >>> StepPlan.from_tensor(plan.to_tensor()) == plan  # a checkpoint holds it as data
        True
    """

    times: tuple[float, ...]
    steps: tuple[tuple[float, float, float], ...]

    def first_step(self) -> float:
        """The step to start with: the proposal after the first accepted step."""
        return self.steps[0][2] if math.isfinite(self.steps[0][2]) else abs(self.times[-1] - self.times[0])

    def cap(self, t: float, direction: float) -> Optional[float]:
        """The proposal from the accepted step that covered ``t`` (None past the last)."""
        u = t * direction
        for start, end, proposal in self.steps:
            if start * direction <= u < end * direction:
                return proposal
        return None

    def fits(self, times: Sequence[float]) -> bool:
        """Whether it was made over these requested times, holds a step, and can be followed: each
        step inside the times and forward, each proposal a size that advances from the step's end
        (``> 0``, not NaN; ``inf`` caps nothing). A plan read from a damaged checkpoint that fails
        this is not used (the solve starts cold) instead of stepping backwards or stalling."""
        if not self.steps or self.times != tuple(times):
            return False
        direction = 1.0 if self.times[-1] >= self.times[0] else -1.0
        lo, hi = min(self.times), max(self.times)
        for start, end, proposal in self.steps:
            if not (lo <= start <= hi and lo <= end <= hi and (end - start) * direction > 0):
                return False
            if not proposal > 0 or end + direction * proposal == end:
                return False
        return True

    def to_tensor(self) -> Tensor:
        """``[1 + k, max(3, len(times))]`` float64: the times, then the steps (for a checkpoint)."""
        width = max(3, len(self.times))
        out = torch.full((1 + len(self.steps), width), math.nan, dtype=torch.float64)
        out[0, : len(self.times)] = torch.tensor(self.times, dtype=torch.float64)
        if self.steps:
            out[1:, :3] = torch.tensor(self.steps, dtype=torch.float64)
        return out

    @classmethod
    def from_tensor(cls, data: Tensor) -> "StepPlan":
        """The inverse of :meth:`to_tensor`.

        Raises:
            ValueError: ``data`` is not a ``[1 + k, >= 3]`` table.
        """
        if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 3:
            raise ValueError(f"a step plan is a [1 + k, >= 3] table, got shape {tuple(data.shape)}")
        rows = data.double().tolist()
        times = tuple(v for v in rows[0] if not math.isnan(v))
        return cls(times, tuple((a, b, c) for a, b, c, *_ in rows[1:]))


@dataclass
class LeanSolution:
    """``ys[i]``: the state at ``times[i]``; ``nfe``: field evaluations; ``accepted`` /
    ``rejected``: steps; ``plan``: the accepted steps, to warm-start a later solve."""

    ys: Tensor
    nfe: int
    accepted: int
    rejected: int
    plan: Optional[StepPlan] = None


def dopri5(field: Callable[[Tensor, Tensor], Tensor], y0: Tensor, times: Sequence[float] | Tensor, *,
           rtol: float = 1e-5, atol: float = 1e-5, norm: Optional[Callable[[Tensor], Tensor]] = None,
           max_steps: Optional[int] = None, plan: Optional[StepPlan] = None) -> LeanSolution:
    """Solve ``dy/dt = field(t, y)`` from ``times[0]`` through each later time (monotone, either
    direction) with shared adaptive steps; differentiable by autograd through the accepted steps.

    Args:
        field: ``field(t, y)`` with ``t`` a 0-d tensor of ``y``'s dtype.
        y0: initial state.
        times: at least two monotone times.
        rtol, atol: tolerances of the error ratio (module docstring).
        norm: error norm (default :func:`rms_norm`; e.g.
            :func:`flowkit.solvers.per_sample_rms_norm`).
        max_steps: trial steps (accepted or rejected) between two requested times before giving up.
        plan: warm start from an earlier solve over the same ``times`` (module docstring); a plan
            made over other times is not used.

    Returns:
        :class:`LeanSolution`.

    Raises:
        StepSizeUnderflow: see the module docstring.
    """
    norm = rms_norm if norm is None else norm
    ts = [float(t) for t in (times.tolist() if torch.is_tensor(times) else times)]
    if len(ts) < 2:
        raise ValueError("times must hold at least two times")
    direction = 1.0 if ts[-1] >= ts[0] else -1.0
    dtype, device = y0.dtype, y0.device

    def f(t: float, y: Tensor) -> Tensor:
        return field(torch.tensor(t, dtype=dtype, device=device), y)

    coefs = [torch.tensor(row, dtype=dtype, device=device).reshape(1, -1) for row in _A]
    error_weights = torch.tensor(_E, dtype=dtype, device=device).reshape(1, -1)
    nfe = 1
    t = ts[0]
    y = y0
    k0 = f(t, y)
    plan = plan if plan is not None and plan.fits(ts) else None
    if plan is None:
        h = _initial_step(f, t, y, k0, direction, rtol, atol, norm)
        nfe += 1
    else:
        h = min(plan.first_step(), abs(ts[-1] - ts[0]))
    taken: list[tuple[float, float, float]] = []
    out = [y0]
    accepted = rejected = 0
    for target in ts[1:]:
        trials = 0
        while (target - t) * direction > 0:
            if max_steps is not None and trials >= max_steps:
                raise StepSizeUnderflow(f"max_num_steps exceeded ({trials}>={max_steps})")
            trials += 1
            if not math.isfinite(h):  # a NaN error ratio: torchdiffeq then takes a step of 0 and gives up
                h = 0.0
            last = abs(target - t) <= h
            step = (target - t) if last else direction * h  # land exactly on the requested time
            if t + step == t:
                raise StepSizeUnderflow(f"underflow in dt {h}")
            if not bool(torch.isfinite(y).all()):
                raise StepSizeUnderflow("non-finite values in state `y`")
            stacked = k0.reshape(1, -1)
            y_flat = y.reshape(1, -1)
            for c, coef in zip(_C, coefs):
                yi = torch.addmm(y_flat, coef, stacked, alpha=step).view_as(y)
                ti = target if (last and c == 1.0) else t + c * step
                k = f(ti, yi)
                stacked = torch.cat([stacked, k.reshape(1, -1)], 0)
            nfe += 6
            y1 = yi  # first same as last: the fifth-order solution is the last stage's input
            with torch.no_grad():
                err = (error_weights @ stacked).view_as(y) * step
                tol = atol + rtol * torch.maximum(y.abs(), y1.abs())
                ratio = float(norm(err / tol))
            h = _next_step(abs(step), ratio)
            if ratio <= 1.0:
                accepted += 1
                start, t = t, (target if last else t + step)
                y, k0 = y1, k  # first same as last: f(t₁, y₁) starts the next step
                taken.append((start, t, math.inf if last else h))  # a landing step was cut short: no cap
                cap = None if plan is None else plan.cap(t, direction)
                h = h if cap is None else min(h, cap)
            else:
                rejected += 1
        out.append(y)
    return LeanSolution(torch.stack(out), nfe, accepted, rejected, StepPlan(tuple(ts), tuple(taken)))


def _next_step(h: float, ratio: float) -> float:
    """torchdiffeq's rule: ``h · min(10, max(0.9 r^{-1/5}, 0.2))``, never shrinking after an accepted step."""
    if ratio == 0.0:
        return h * _IFACTOR
    if math.isnan(ratio):
        return math.nan
    if math.isinf(ratio):
        return h * _DFACTOR
    floor = 1.0 if ratio < 1.0 else _DFACTOR
    return h * min(_IFACTOR, max(_SAFETY / ratio ** (1.0 / _ORDER), floor))


def _initial_step(f, t0: float, y0: Tensor, f0: Tensor, direction: float, rtol: float, atol: float,
                  norm) -> float:
    """Hairer, Nørsett & Wanner II.4 (as torchdiffeq): one probe evaluation, without a graph."""
    with torch.no_grad():
        scale = atol + y0.abs() * rtol
        d0 = float(norm(y0 / scale).abs())
        d1 = float(norm(f0 / scale).abs())
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        f1 = f(t0 + direction * h0, y0 + (direction * h0) * f0)
        d2 = float(norm((f1 - f0) / scale).abs()) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        big = max(d1, d2)
        h1 = (0.01 / big) ** (1.0 / _ORDER) if math.isfinite(big) else 0.0
    return min(100 * h0, h1)
