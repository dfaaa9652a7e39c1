r"""Dormand–Prince 5(4) with a time, a step size and an error test for every sample.

An adaptive solver that shares one step size across a batch must take, for every sample, the
steps of the hardest one (with the per-sample error norm of :class:`~flowkit.solvers.SolverSpec`)
or let the hard samples hide behind the easy ones (with the batch-RMS norm). Here each sample
``b`` of ``x`` is its own initial-value problem with its own time ``t_b``, step ``h_b`` and error
test, accepted or rejected alone; the field is evaluated on all unfinished samples at once, at
their own times, and a sample that has reached the last time **retires**: later calls receive
only the rows still active. A sample's result therefore depends on that sample alone, not on
the batch it was solved in (up to the rounding of batched kernels).

Field signature: ``field(t, x, rows)`` with ``t`` a ``[B']`` tensor of per-sample times, ``x``
``[B', ...]`` the active states and ``rows`` the ``[B']`` indices (``LongTensor``) of those
samples in the original batch — to slice per-sample constants such as Hutchinson probes or a
condition. A field declares this signature by being a :class:`~flowkit.solvers.PerSampleTimeField`.

The method (Dormand & Prince 1980, Table 2; the FSAL pair "DOPRI5"; Hairer, Nørsett & Wanner,
II.5, Table 5.2): seven stages, the last one at ``(t + h, y_{n+1})``, reused as the next step's
first (first same as last). The fifth-order solution is propagated; the error estimate is
``err = h Σ_i (b_i − b̂_i) k_i``. Per sample, with ``sc = atol + rtol max(|y_n|, |y_{n+1}|)``
over its own state components, the step is accepted when

.. math::  \mathrm{err}_b = \Bigl(\tfrac{1}{n}\sum_{j=1}^{n} (\mathrm{err}_{b,j} / \mathrm{sc}_{b,j})^2\Bigr)^{1/2} \le 1

(Hairer, Nørsett & Wanner, II.4, eq. 4.11). Step-size control: the PI controller of Hairer's
DOPRI5 code (II.4, "Automatic step size control"; Gustafsson 1991),
``h_new = h · clip(safety · err^{−α} · err_old^{β}, 0.2, 10)`` with ``α = 1/5 − 0.75 β``,
``β = 0.04``, ``safety = 0.9``, ``err_old`` the error of the sample's last accepted step
(``≥ 1e-4``); after a rejection the next step may not grow; a rejected step retries with
``h · max(0.2, safety · err^{−α})``. A non-finite error estimate (the field returned NaN or inf
somewhere in the trial step) rejects the step with the factor 0.2. Initial step: Hairer,
Nørsett & Wanner's algorithm (II.4, "Starting step size"), per sample, with one extra field
evaluation, its trial step clipped to the interval so the field is never called beyond it. The
last step of each segment is clipped to land exactly on the output time (when
``t + 1.01 h`` would pass it, ``h = t_out − t``), as Hairer's code does.

Counting: :attr:`~flowkit.solvers.Solution.nfe` is the number of batched field calls and
:attr:`~flowkit.solvers.Solution.sample_evals` the number of sample evaluations (the rows of
those calls, summed); ``accepted`` and ``rejected`` are each sample's step counts.

Gradients: the solve is not differentiable — it is for evaluation (likelihoods under
``torch.no_grad()``). An ``x`` that requires grad, or a field module with parameters that require
grad, under grad mode, is refused with :class:`~flowkit.solvers.SolverError`; training
integrates with shared steps (``step_control="batch"``, direct or adjoint backpropagation).

References:
    Dormand & Prince (1980). A family of embedded Runge–Kutta formulae. J. Comp. Appl. Math. 6.
    Hairer, Nørsett & Wanner (1993). Solving Ordinary Differential Equations I, 2nd ed., II.4–II.5.
    Gustafsson (1991). Control theoretic techniques for stepsize selection in explicit
    Runge–Kutta methods. ACM TOMS 17.

Example:
    >>> import torch
    >>> from flowkit.solvers import PerSampleTimeField, SolverSpec
    >>> rates = torch.tensor([[1.0], [50.0]])  # dx/dt = -λ_b x: an easy and a stiffer sample
    >>> field = PerSampleTimeField(lambda t, x, rows: -rates[rows] * x)
    >>> spec = SolverSpec(per_sample_norm=True, step_control="per_sample")
    >>> sol = odeint_per_sample(field, torch.ones(2, 1), [0.0, 1.0], spec)
    >>> bool(sol.accepted[0] < sol.accepted[1])  # the easy sample takes fewer steps
    True
    >>> bool(sol.sample_evals < sol.nfe * 2)  # ... and retires early
    True
    >>> round(sol.ys[-1, 0, 0].item(), 5)  # exp(-1)
    0.36788
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from .flow import NonFiniteFieldError
from .dopri5 import DOPRI5  # the one Dormand–Prince tableau
from .solution import PerSampleTimeField, Solution, SolverError


class ToleranceSpec(Protocol):
    """What this module reads of a :class:`flowkit.solvers.SolverSpec` (which imports this module)."""

    rtol: float
    atol: float
    max_steps: Optional[int]

    def per_sample_problems(self) -> list[str]: ...

__all__ = ["odeint_per_sample", "StepLimitError", "DOPRI5", "SAFETY", "MIN_FACTOR", "MAX_FACTOR", "PI_BETA"]

#: step-size controller: safety factor, bounds of ``h_new / h``, PI weight ``β`` (0: I controller)
SAFETY, MIN_FACTOR, MAX_FACTOR, PI_BETA = 0.9, 0.2, 10.0, 0.04
_ORDER = 5  # the error estimate is O(h^5): exponent α = 1/5 − 0.75 β


class StepLimitError(RuntimeError):
    """Some samples did not reach the end within ``max_steps`` trial steps, or their step size
    underflowed with a finite field (a singular or extremely stiff trajectory)."""


def odeint_per_sample(field: PerSampleTimeField, x: Tensor, times: Tensor | Sequence[float],
                      solver: ToleranceSpec) -> Solution:
    """Solve ``dx_b/dt = field(t_b, x_b)`` for every sample ``b`` alone (module docstring).

    Args:
        field: a :class:`~flowkit.solvers.PerSampleTimeField`, called ``field(t [B'], x [B', ...],
            rows [B'])`` on the unfinished samples only.
        x: initial states ``[B, ...]`` at ``times[0]``.
        times: monotone output times (increasing or decreasing), at least two; every sample
            lands exactly on each.
        solver: its ``rtol``, ``atol`` and ``max_steps`` (trial steps per sample, accepted or
            rejected) are used; the spec must allow per-sample step control (``dopri5``,
            ``per_sample_norm``, no adjoint). Errors name the field by ``field.name``.

    Returns:
        :class:`~flowkit.solvers.Solution` with ``ys [len(times), B, ...]``, ``nfe`` (batched
        calls), ``sample_evals``, per-sample ``accepted`` / ``rejected`` step counts and
        ``step_control="per_sample"``.

    Raises:
        SolverError: a spec that does not allow per-sample steps, a field that is not a
            :class:`~flowkit.solvers.PerSampleTimeField`, or a solve asked to carry gradients.
        NonFiniteFieldError: the field is NaN or inf for some sample at the start, or keeps
            being so until the sample's step size underflows (names the samples and times).
        StepLimitError: samples that exceed ``max_steps`` or whose step size underflows.
        ValueError: ``times`` not a 1-D monotone sequence of at least two distinct times.
    """
    problems = solver.per_sample_problems()
    if problems:
        raise SolverError([f"step_control: per-sample steps need {p}" for p in problems])
    if not isinstance(field, PerSampleTimeField):
        raise SolverError([f"step_control: per-sample steps need a field declared as taking per-sample times "
                           f"(flowkit.solvers.PerSampleTimeField, called field(t[B], x, rows)); got "
                           f"{type(field).__name__}"])
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in field.parameters())):
        raise SolverError(["step_control: the per-sample solve is not differentiable (it is for evaluation); "
                           "call it under torch.no_grad(), or use step_control='batch' to backpropagate"])
    grid = torch.as_tensor(times, dtype=torch.float64).to(x.device) if not torch.is_tensor(times) \
        else times.detach().to(device=x.device, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError("times must be a 1-D sequence of at least two times")
    steps = grid[1:] - grid[:-1]
    direction = 1.0 if float(steps[0]) > 0 else -1.0
    if not bool((steps * direction > 0).all()):
        raise ValueError(f"times must be strictly monotone, got {grid.tolist()}")
    with torch.no_grad():
        return _Solve(field, x, grid, direction, solver, field.name).run()


class _Solve:
    """The state of one solve; the active samples are kept compact and shrink as they finish."""

    def __init__(self, field: PerSampleTimeField, x: Tensor, grid: Tensor, direction: float, solver: ToleranceSpec,
                 name: str) -> None:
        self.field, self.grid, self.direction, self.name = field, grid, direction, name
        self.rtol, self.atol = solver.rtol, solver.atol
        self.max_steps = solver.max_steps
        self.dtype, self.device = x.dtype, x.device
        self.batch = batch = x.shape[0]
        self.shape = tuple(x.shape[1:])
        self.ys = x.new_empty((grid.numel(), *x.shape))
        self.ys[0] = x
        self.accepted = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.rejected = torch.zeros_like(self.accepted)
        self.nfe = 0
        self.sample_evals = 0
        self.span = float((grid[-1] - grid[0]).abs())
        # the compact active set: original rows, state [B', n], time (float64), step, FSAL stage, ...
        self.rows = torch.arange(batch, device=x.device)
        self.y = x.detach().reshape(batch, -1).clone()
        self.t = grid[0].expand(batch).clone()
        self.target = torch.ones(batch, dtype=torch.long, device=x.device)  # index into grid
        self.err_old = torch.full((batch,), 1e-4, dtype=torch.float64, device=x.device)
        self.no_grow = torch.zeros(batch, dtype=torch.bool, device=x.device)

    # ------------------------------------------------------------------ field
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        self.sample_evals += y.shape[0]
        out = self.field(t.to(self.dtype), y.reshape(-1, *self.shape), self.rows)
        if not isinstance(out, Tensor) or tuple(out.shape) != (y.shape[0], *self.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise SolverError([f"{self.name}: returned {got} for x of shape {(y.shape[0], *self.shape)}; a field "
                               "returns dx/dt shaped like its input x"])
        return out.reshape(y.shape[0], -1).to(self.dtype)

    def norm(self, v: Tensor, scale: Tensor) -> Tensor:
        """Per-sample RMS of ``v / scale`` over the state components, in float64 ``[B']``."""
        return (v.double() / scale).pow(2).mean(1).sqrt()

    # ------------------------------------------------------------------ Hairer–Nørsett–Wanner, II.4
    def initial_step(self, k1: Tensor) -> Tensor:
        scale = self.atol + self.rtol * self.y.double().abs()
        d0, d1 = self.norm(self.y, scale), self.norm(k1, scale)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
        h0 = h0.clamp(max=self.span)  # the trial evaluation stays inside the interval
        y1 = self.y + (self.direction * h0).to(self.dtype)[:, None] * k1
        k1b = self.f(self.t + self.direction * h0, y1)
        d2 = self.norm(k1b - k1, scale) / h0
        big = torch.maximum(d1, d2)
        # a non-finite trial evaluation carries no information on the step: fall back on h0
        big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
        h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                         (0.01 / big.clamp_min(1e-300)) ** (1.0 / _ORDER))
        return torch.minimum(100 * h0, h1).clamp(max=self.span)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Solution:
        tab = DOPRI5
        k1 = self.f(self.t, self.y)
        bad = ~torch.isfinite(k1).all(1)
        if bool(bad.any()):
            raise NonFiniteFieldError(
                f"{self.name} returned NaN or inf at the initial state for {int(bad.sum())} of {len(bad)} samples "
                f"at t={float(self.grid[0]):.6g} (samples {_first(self.rows[bad])}); check the model there")
        h = self.initial_step(k1)  # magnitudes, float64
        a, c, e = tab["a"], tab["c"], tab["e"]
        while self.rows.numel():
            goal = self.grid[self.target]
            remaining = (goal - self.t) * self.direction
            last = self.t + self.direction * 1.01 * h >= goal if self.direction > 0 else \
                self.t + self.direction * 1.01 * h <= goal
            h = torch.where(last, remaining, h)
            hs = self.direction * h  # signed step, float64
            hy = hs.to(self.dtype)[:, None]
            ks = [k1]
            for i in range(1, 7):
                y_i = self.y + hy * sum(w * k for w, k in zip(a[i], ks) if w != 0.0)
                if i == 6:
                    y_new = y_i  # the fifth-order solution (a[6] = b)
                ks.append(self.f(self.t + c[i] * hs, y_i))
            err_vec = hy * sum(w * k for w, k in zip(e, ks) if w != 0.0)
            scale = self.atol + self.rtol * torch.maximum(self.y.abs(), y_new.abs()).double()
            err = self.norm(err_vec, scale)
            finite = torch.isfinite(err) & torch.isfinite(y_new).all(1)
            err = torch.where(finite, err, torch.full_like(err, math.inf))
            ok = err <= 1.0
            # --- step-size control (PI, module docstring)
            alpha = 1.0 / _ORDER - 0.75 * PI_BETA
            safe_err = err.clamp_min(1e-300)
            grow = SAFETY * safe_err.pow(-alpha) * self.err_old.pow(PI_BETA)
            grow = grow.clamp(MIN_FACTOR, MAX_FACTOR)
            grow = torch.where(self.no_grow, grow.clamp(max=1.0), grow)
            shrink = (SAFETY * safe_err.pow(-alpha)).clamp(MIN_FACTOR, 1.0)
            shrink = torch.where(finite, shrink, torch.full_like(shrink, MIN_FACTOR))
            h_next = h * torch.where(ok, grow, shrink)
            self.err_old = torch.where(ok, err.clamp_min(1e-4), self.err_old)
            self.no_grow = ~ok
            # --- bookkeeping
            self.accepted.index_add_(0, self.rows, ok.long())
            self.rejected.index_add_(0, self.rows, (~ok).long())
            self.y = torch.where(ok[:, None], y_new, self.y)
            k1 = torch.where(ok[:, None], ks[6], k1)
            landed = ok & last
            self.t = torch.where(ok, torch.where(last, goal, self.t + hs), self.t)
            if bool(landed.any()):
                self.ys[self.target[landed], self.rows[landed]] = self.y[landed].reshape(-1, *self.shape)
                self.target = self.target + landed.long()
            done = self.target >= self.grid.numel()
            if bool(done.any()):  # retire the finished samples
                keep = ~done
                self.rows, self.y, self.t, k1, h_next = (self.rows[keep], self.y[keep], self.t[keep], k1[keep],
                                                         h_next[keep])
                self.target, self.err_old, self.no_grow = self.target[keep], self.err_old[keep], self.no_grow[keep]
                finite = finite[keep]
            self.check_progress(h_next, finite)
            h = h_next
        return Solution(self.ys, self.nfe, sample_evals=self.sample_evals, accepted=self.accepted,
                        rejected=self.rejected, step_control="per_sample")

    def check_progress(self, h_next: Tensor, finite: Tensor) -> None:
        """Raise for samples whose step underflowed or that used up ``max_steps``."""
        if not self.rows.numel():
            return
        # time is kept in float64: a step below this no longer moves it
        floor = 16 * torch.finfo(torch.float64).eps * torch.maximum(self.t.abs(), self.grid[self.target].abs())
        stuck = h_next < floor
        if bool(stuck.any()):
            if bool((stuck & ~finite).any()):
                bad = ~finite  # every sample whose last trial step met NaN or inf
                raise NonFiniteFieldError(
                    f"{self.name} returned NaN or inf for {int(bad.sum())} of {self.batch} samples at "
                    f"t={_times(self.t[bad])} during the solve, at every step size down to the smallest (first bad "
                    f"samples: {_first(self.rows[bad])}); the model is not finite along these trajectories")
            raise StepLimitError(
                f"{self.name}: the step size underflowed for {int(stuck.sum())} of {self.batch} samples (samples "
                f"{_first(self.rows[stuck])} at t={_times(self.t[stuck])}): the field is singular or extremely "
                "stiff there")
        if self.max_steps is not None:
            used = (self.accepted + self.rejected)[self.rows]
            over = used >= self.max_steps
            if bool(over.any()):
                raise StepLimitError(
                    f"{self.name}: {int(over.sum())} of {self.batch} samples did not reach the end within max_steps="
                    f"{self.max_steps} trial steps (samples {_first(self.rows[over])}, at t={_times(self.t[over])}); "
                    "raise max_steps or loosen rtol/atol")


def _first(rows: Tensor, k: int = 5) -> str:
    idx = rows.tolist()
    return ", ".join(map(str, idx[:k])) + (", ..." if len(idx) > k else "")


def _times(t: Tensor, k: int = 3) -> str:
    vals = t.tolist()
    return ", ".join(f"{v:.6g}" for v in vals[:k]) + (", ..." if len(vals) > k else "")
