r"""Discrete DDPM noise schedules as a continuous variance-preserving path, exact at every timestep.

A DDPM (Ho et al. 2020) is trained on ``N`` discrete timesteps ``n = 0, …, N − 1`` with

.. math::  x_n = \sqrt{\bar\alpha_n}\, x_{\text{data}} + \sqrt{1 - \bar\alpha_n}\, \varepsilon,
           \qquad \bar\alpha_n = \prod_{i=0}^{n} (1 - \beta_i)

(Ho et al. 2020, eq. 4). A CNF needs a field at every time, so :class:`DDPMPath` puts the
timesteps on flowkit's time axis and interpolates between them:

* **Time.** Timestep ``n`` sits at ``t_n = (n + 1) / N``; the clean data (the empty product,
  ``ᾱ = 1``) at ``t = 0``. The model is fed the fractional timestep ``τ(t) = N t − 1``
  (:meth:`DDPMPath.timestep`), so ``τ(t_n) = n`` exactly; a diffusers ``UNet2DModel`` embeds
  float timesteps like integer ones.
* **Schedule.** ``L(t) = log α_t²`` is the natural cubic spline through the ``N + 1`` knots
  ``(k/N, log ᾱ_{k−1})``, ``ᾱ_{−1} = 1``, made monotone where needed by Fritsch & Carlson's
  (1980) limiter (:func:`_monotone_slopes`). Hence ``α_{t_n}² = ᾱ_n`` and
  ``σ_{t_n}² = 1 − ᾱ_n`` **exactly at every timestep** (to float64 rounding of the ``ᾱ_n``,
  which are computed as the scheduler computes them: ``β`` and the cumulative product in
  float32); between timesteps ``log ᾱ`` is interpolated, monotone (so ``β(t) ≥ 0``),
  ``C¹`` everywhere and ``C²`` where the limiter is inactive (everywhere for the four
  schedules below with diffusers' default parameters). ``σ_t² = 1 − α_t²`` (variance preserving) everywhere.
* **SDE.** ``f(t) = L'(t)/2`` and ``g(t)² = β(t) = −L'(t)``; on ``[t_{n−1}, t_n]`` the
  integrated rate is ``∫β = −log(1 − β_n)``, the exact discrete decrement (≈ ``β_n``: the
  familiar ``β(t) ≈ N β_n`` limit of Song et al. 2021, appendix B).
* **Ends.** ``t0 = t_0 = 1/N`` (the first timestep, ``σ_{t0}² = β_0``, e.g. 1e-4), ``t1 = 1``
  (the last timestep) by default; the prior is ``N(0, I)``, which differs from the true
  ``p_{t1}`` by the ``α_{t1} = sqrt(ᾱ_{N−1})`` of signal left (6.4e-3 for the linear schedule).

Why not piecewise-linear ``log ᾱ``: it is also exact at the timesteps, but makes ``β(t)``
piecewise constant, so the probability-flow velocity jumps at each of the ``N`` timesteps; with
the exact mixture score (tests/test_adapters.py) dopri5 at ``rtol = atol = 1e-5`` then took
1.2–1.7× the steps and erred 4–56× more than with the cubic (measured: 2-D and 8-D, linear
and cosine schedules), which costs no more than a smooth schedule.

Schedules (the ``beta_schedule`` of a diffusers ``DDPMScheduler`` config): ``linear``
(``β`` evenly spaced from ``beta_start`` to ``beta_end``; Ho et al. 2020), ``scaled_linear``
(``sqrt β`` evenly spaced; latent diffusion), ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021,
eq. 17: ``ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)``, ``β_n = min(1 − ᾱ((n+1)/N)/ᾱ(n/N), 0.999)``),
``sigmoid`` (``β = sigmoid(linspace(−6, 6))`` rescaled to ``[beta_start, beta_end]``), or
``trained_betas`` given explicitly.

References:
    Ho, Jain, Abbeel (2020). Denoising Diffusion Probabilistic Models. NeurIPS.
    Nichol, Dhariwal (2021). Improved Denoising Diffusion Probabilistic Models. ICML.
    Song et al. (2021). Score-Based Generative Modeling through SDEs. ICLR.
    Fritsch, Carlson (1980). Monotone Piecewise Cubic Interpolation. SIAM J. Numer. Anal. 17(2).

Example:
    >>> path = DDPMPath.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    >>> t = path.time(torch.tensor([0.0, 999.0], dtype=torch.float64))
    >>> t.tolist(), path.timestep(t).tolist()
    ([0.001, 1.0], [0.0, 999.0])
    >>> bool(torch.allclose(path.alpha(t) ** 2, path.alphas_cumprod[[0, -1]], rtol=1e-12))
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..paths import EDGE, GaussianPath, PathCoefficients

__all__ = ["DDPMPath", "ddpm_betas", "SCHEDULES"]

#: the ``beta_schedule`` values understood (diffusers' names)
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


class ScheduleError(ValueError):
    """A scheduler config flowkit cannot turn into a path (unknown schedule, zero terminal SNR)."""


def ddpm_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None) -> Tensor:
    """The ``N`` betas of a DDPM schedule, in float32 as a diffusers scheduler stores them.

    Args:
        num_train_timesteps: ``N``.
        beta_start, beta_end: ``β_0`` and ``β_{N−1}`` (linear, scaled_linear, sigmoid).
        beta_schedule: one of :data:`SCHEDULES` (see the module docstring).
        trained_betas: explicit betas (then ``beta_schedule`` is ignored).

    Raises:
        ScheduleError: unknown schedule, or betas not in ``(0, 1)``.
    """
    n = int(num_train_timesteps)
    if n < 2:
        raise ScheduleError(f"num_train_timesteps: need at least 2, got {num_train_timesteps}")
    if trained_betas is not None:
        betas = torch.as_tensor(list(trained_betas), dtype=torch.float64)
        if betas.numel() != n:
            raise ScheduleError(f"trained_betas: {betas.numel()} values for num_train_timesteps={n}")
    elif beta_schedule == "linear":  # float32 throughout, as the scheduler does
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        s = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float32)) * (beta_end - beta_start) + beta_start
    else:
        raise ScheduleError(f"beta_schedule: unknown {beta_schedule!r}; choose one of {', '.join(SCHEDULES)} "
                            "(or give trained_betas)")
    betas = betas.to(torch.float32)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ScheduleError(f"betas must lie in (0, 1); schedule {beta_schedule!r} gives "
                            f"[{betas.min().item():g}, {betas.max().item():g}]")
    return betas


class DDPMPath(GaussianPath):
    r"""The continuous VP path through a DDPM's discrete ``ᾱ_n`` (see the module docstring).

    Args:
        alphas_cumprod: ``ᾱ_0, …, ᾱ_{N−1}``, decreasing in ``(0, 1)``.
        t0: data-end time (default the first timestep, ``1/N``).
        t1: noise-end time (default the last timestep, 1).

    Raises:
        ScheduleError: ``ᾱ`` not strictly decreasing in ``(0, 1)`` (e.g. zero terminal SNR).
    """

    def __init__(self, alphas_cumprod: Tensor, t0: Optional[float] = None, t1: float = 1.0) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        n = abar.numel()
        if n < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ScheduleError("alphas_cumprod must decrease strictly inside (0, 1); a schedule with zero "
                                "terminal SNR (rescale_betas_zero_snr, ᾱ_{N-1} = 0) has no finite log-SNR "
                                "at its last timestep and is not supported")
        self.num_train_timesteps = n
        self.alphas_cumprod = abar
        self.t0 = 1.0 / n if t0 is None else float(t0)
        self.t1 = float(t1)
        if not 0 < self.t0 < self.t1:
            raise ScheduleError(f"need 0 < t0 < t1, got t0={self.t0}, t1={self.t1}")
        self.safe_range = (EDGE, math.inf)
        self._y = torch.cat([abar.new_zeros(1), abar.log()])  # knots (k/N, log ᾱ_{k−1}), k = 0..N
        self._m = _monotone_slopes(self._y, 1.0 / n)
        h, y0, y1, m0, m1 = 1.0 / n, self._y[:-1], self._y[1:], self._m[:-1], self._m[1:]
        # Hermite form → power form in s ∈ [0, 1] on each interval: L = c0 + c1 s + c2 s² + c3 s³
        self._coef = torch.stack([y0, h * m0, 3 * (y1 - y0) - h * (2 * m0 + m1), 2 * (y0 - y1) + h * (m0 + m1),
                                  self._m[-1].expand_as(y0)], -1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], t0: Optional[float] = None) -> "DDPMPath":
        """The path of a diffusers ``DDPMScheduler`` config (dict or its ``scheduler_config.json``).

        Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
        ``trained_betas`` and refuses ``rescale_betas_zero_snr: true``. ``ᾱ_n`` is the float32
        cumulative product of ``1 − β``, as the scheduler computes it.

        Raises:
            ScheduleError: see :func:`ddpm_betas`, and zero terminal SNR.
        """
        if config.get("rescale_betas_zero_snr"):
            raise ScheduleError("rescale_betas_zero_snr: true gives ᾱ = 0 at the last timestep (infinite "
                                "log-SNR), which a probability-flow likelihood cannot start from; not supported")
        betas = ddpm_betas(int(config.get("num_train_timesteps", 1000)), float(config.get("beta_start", 1e-4)),
                           float(config.get("beta_end", 0.02)), str(config.get("beta_schedule", "linear")),
                           config.get("trained_betas"))
        return cls(torch.cumprod(1 - betas, 0), t0=t0)

    # -- the time map ------------------------------------------------------------------
    def timestep(self, t: Tensor) -> Tensor:
        """The model's (fractional) timestep ``τ = N t − 1`` at flowkit time ``t``."""
        return t * self.num_train_timesteps - 1

    def time(self, timestep: Tensor) -> Tensor:
        """flowkit time ``t = (τ + 1) / N`` of timestep ``τ``."""
        return (timestep + 1) / self.num_train_timesteps

    # -- the schedule ------------------------------------------------------------------
    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """``L(t) = log α_t²``: the cubic between knots, linear beyond ``t = 1``, 0 below 0."""
        return self._interpolate(t)[0]

    def beta(self, t: Tensor) -> Tensor:
        """Continuous noise rate ``β(t) = −L'(t) = g(t)²``."""
        return -self._interpolate(t)[1]

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        lab, slope = self._interpolate(t)
        return 0.5 * slope * torch.exp(0.5 * lab)

    def d_sigma(self, t: Tensor) -> Tensor:
        lab, slope = self._interpolate(t)  # σ dσ = −α dα = −½ L' α²
        return -0.5 * slope * torch.exp(lab) / torch.sqrt(-torch.expm1(lab))

    def drift_coefficient(self, t: Tensor | float) -> Tensor:
        return 0.5 * self._interpolate(torch.as_tensor(t, dtype=torch.float64))[1]

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        return self.beta(torch.as_tensor(t, dtype=torch.float64))

    def schedule(self, t: Tensor | float) -> PathCoefficients:
        """``(α, σ, α̇, σ̇)`` from one interpolation of ``L`` (instead of one per coefficient)."""
        t = torch.as_tensor(t) if not torch.is_tensor(t) else t
        lab, slope = self._interpolate(t)
        alpha, sigma = torch.exp(0.5 * lab), torch.sqrt(-torch.expm1(lab))
        d_alpha = 0.5 * slope * alpha
        return PathCoefficients(alpha, sigma, d_alpha, -alpha * d_alpha / sigma)

    def _interpolate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(L(t), L'(t))`` elementwise; computed in float64, returned in ``t``'s dtype."""
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        n = self.num_train_timesteps
        if self._coef.device != t.device:
            self._coef = self._coef.to(t.device)
        tt = t.to(torch.float64)
        u = tt.clamp(0.0, 1.0) * n
        k = u.floor().clamp_(0, n - 1)
        s = u - k
        c = self._coef[k.long()]  # [..., 5]: the cubic in s on interval k, and the slope beyond t = 1
        c0, c1, c2, c3 = c.unbind(-1)[:4]
        value = c0 + s * (c1 + s * (c2 + s * c3))
        slope = (c1 + s * (2 * c2 + 3 * s * c3)) * n
        beyond = tt > 1.0  # linear continuation past the last timestep (the solver's first-step probe)
        if bool(beyond.any()):
            last = self._coef[-1]
            end_value = last[0] + last[1] + last[2] + last[3]
            value = torch.where(beyond, end_value + last[4] * (tt - 1.0), value)
            slope = torch.where(beyond, last[4].expand_as(slope), slope)
        return value.to(dtype), slope.to(dtype)

    def __repr__(self) -> str:
        return f"DDPMPath(N={self.num_train_timesteps}, t0={self.t0:g}, t1={self.t1:g})"


def _monotone_slopes(y: Tensor, h: float) -> Tensor:
    """Knot derivatives of a monotone ``C²``-where-possible cubic Hermite interpolant on a
    uniform grid: the natural cubic spline's derivatives (``m_{k−1} + 4 m_k + m_{k+1} =
    3 (y_{k+1} − y_{k−1})/h``, ``L'' = 0`` at both ends), then Fritsch & Carlson's (1980)
    limiter, which rescales the two slopes of any interval where the cubic would stop being
    monotone (slope of the wrong sign → 0; ``a² + b² > 9`` with ``a = m_k/d_k``,
    ``b = m_{k+1}/d_k`` → scaled onto the circle of radius 3). Where the limiter is inactive
    the interpolant is the ``C²`` natural spline; everywhere it is ``C¹`` and monotone."""
    n = y.numel()
    d = (y[1:] - y[:-1]) / h
    rhs = torch.empty_like(y)
    rhs[1:-1] = 3 * (d[:-1] + d[1:])
    rhs[0], rhs[-1] = 3 * d[0], 3 * d[-1]
    main = torch.full_like(y, 4.0)
    main[0] = main[-1] = 2.0
    m = _tridiagonal_solve(torch.ones(n - 1, dtype=y.dtype), main, torch.ones(n - 1, dtype=y.dtype), rhs)
    # Fritsch–Carlson limiter, each knot taking the stronger of its two intervals' limits
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    a, b = m[:-1] / safe_d, m[1:] / safe_d
    radius = torch.sqrt(a * a + b * b)
    shrink = torch.where(radius > 3, 3 / radius, torch.ones_like(radius))
    left = torch.where((d == 0) | (a < 0), torch.zeros_like(a), shrink)   # factor for m[k] from interval k
    right = torch.where((d == 0) | (b < 0), torch.zeros_like(b), shrink)  # factor for m[k+1] from interval k
    factor = torch.ones_like(m)
    factor[:-1] = torch.minimum(factor[:-1], left)
    factor[1:] = torch.minimum(factor[1:], right)
    return m * factor


def _tridiagonal_solve(lower: Tensor, main: Tensor, upper: Tensor, rhs: Tensor) -> Tensor:
    """Thomas algorithm for a diagonally dominant tridiagonal system (float64, once per path)."""
    n = main.numel()
    c, dd = upper.tolist(), rhs.tolist()
    b, a = main.tolist(), lower.tolist()
    cp, dp = [0.0] * n, [0.0] * n
    cp[0] = c[0] / b[0] if n > 1 else 0.0
    dp[0] = dd[0] / b[0]
    for i in range(1, n):
        den = b[i] - a[i - 1] * cp[i - 1]
        cp[i] = c[i] / den if i < n - 1 else 0.0
        dp[i] = (dd[i] - a[i - 1] * dp[i - 1]) / den
    x = [0.0] * n
    x[-1] = dp[-1]
    for i in range(n - 2, -1, -1):
        x[i] = dp[i] - cp[i] * x[i + 1]
    return torch.tensor(x, dtype=rhs.dtype)
