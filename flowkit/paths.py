r"""Gaussian probability paths: diffusion SDEs and flow-matching paths are one object.

Time convention (see :mod:`flowkit.flow`)
-----------------------------------------
Data lives at ``t = t0`` (0, or a small ε where the path is singular at 0) and noise at
``t = t1 = T``. A :class:`GaussianPath` is the affine family

.. math::  x_t = \alpha_t\, x_{\text{data}} + \sigma_t\, \varepsilon, \qquad
           \varepsilon \sim \mathcal N(0, I),

with :math:`\alpha_{t_0} \approx 1`, :math:`\sigma_{t_0} \approx 0` and
:math:`\sigma_{t_1} / \alpha_{t_1}` large. Flow-matching papers (Lipman et al. 2023,
Liu et al. 2023) put noise at 0 and data at 1; at that edge only, ``t_fm = 1 − t`` and
``x_1 = x_data``, so their ``(α_t, σ_t)`` become ours at ``1 − t`` and every velocity
changes sign (``v = −u_fm``). :class:`CondOT` is written out in flowkit time below.

One schedule, four parameterisations
------------------------------------
A model may predict the noise ε̂, the clean data x̂₀ (Tweedie's ``E[x_data | x_t]``), the
score ``s = ∇ log p_t`` or the velocity ``v`` of the probability-flow ODE. Because
``x_t = α x̂₀ + σ ε̂`` holds for the posterior means, and Tweedie's formula gives
``ε̂ = −σ s`` (Kingma et al. 2021, VDM, appendix; Efron 2011), all four
are affine in one another given ``(α, σ, α̇, σ̇)``; the ``*_from_*`` methods implement
the eight maps. The key quantity is

.. math::  D_t = \alpha_t \dot\sigma_t - \sigma_t \dot\alpha_t
              = \alpha_t^2 \frac{d}{dt}\frac{\sigma_t}{\alpha_t} > 0,

positive whenever the signal-to-noise ratio ``α²/σ²`` decreases in ``t``.

The forward SDE
---------------
Every path is the marginal law of the linear SDE ``dx = f(t) x dt + g(t) dw`` (Song et al.
2021, eq. 5) with

.. math::  f(t) = \frac{d \log \alpha_t}{dt} = \frac{\dot\alpha_t}{\alpha_t}, \qquad
           g(t)^2 = \frac{d \sigma_t^2}{dt} - 2 f(t) \sigma_t^2
                  = \frac{2 \sigma_t D_t}{\alpha_t},

since then the covariance obeys ``dΣ/dt = 2 f Σ + g² I`` (the moment equation of a
linear SDE; Särkkä & Solin 2019, ch. 6), solved by ``Σ_t = α_t² Σ_0 + σ_t² I``. Song et
al.'s VE, VP and sub-VP SDEs (eqs. 9 and 11, sub-VP in their Sec. 3.4) are such paths.
Paths with ``α_{t1} = 0`` (:class:`CondOT`, :class:`Cosine`, :class:`Polynomial`) have
``f, g → ∞`` at ``t1``: ``f``, ``g`` and the maps that divide by ``σ`` where ``σ_{t0} = 0``
evaluate the schedule at ``t`` clamped to ``[EDGE, 1 − EDGE]`` (``EDGE = 1e-5``), and SDE
samplers on them need ``t1`` a little below 1, e.g. ``t1=0.999`` (a constructor argument).
The maps that divide by ``α`` (``x0_from_eps``, ``x0_from_score``, ``velocity_from_eps``,
``velocity_from_score``) take their coefficients at ``t`` itself, the time the model was
evaluated at, wherever ``α_t > 0`` (above rounding): the coefficients of one time with a model output of
another are wrong by ``O(1)``, not ``O(EDGE)``, near ``α = 0`` (the numerator
``α̇ x_t − σ D s = α α̇ x̂₀`` is itself ``O(α)``). Only where ``α_t = 0`` — where the score is
``−x/σ²`` whatever the data and determines neither ``x̂₀`` nor ``v`` — do they use
:meth:`GaussianPath.conversion_time`, and the model output must then come from that time
too (:func:`flowkit.diffusion.probability_flow_field` evaluates the score there).

So a diffusion's SDE and a flow-matching path are one type with one registry,
:data:`flowkit.components.PATHS`: every registered path serves score matching
(``objective.sde``) and flow matching (``objective.path``) alike, and declares no
capability beyond the schedule.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole (2021). Score-Based Generative
    Modeling through Stochastic Differential Equations. ICLR.
    Lipman, Chen, Ben-Hamu, Nickel, Le (2023). Flow Matching for Generative Modeling. ICLR.
    Kingma, Salimans, Poole, Ho (2021). Variational Diffusion Models. NeurIPS.
    Lipman et al. (2024). Flow Matching Guide and Code. arXiv:2412.06264.
    Efron (2011). Tweedie's Formula and Selection Bias. JASA.

Example:
    >>> path = PATHS.build("vp")
    >>> x0, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    >>> t = torch.full((4,), 0.3, dtype=torch.float64)
    >>> xt = path.sample(x0, t, eps)
    >>> torch.allclose(path.x0_from_eps(eps, t, xt), x0)
    True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

import torch
from torch import Tensor

from .components import PATHS
from .constraints import NonNegativeFloat, PositiveFloat, Range, Rule

#: the ends of a path's time interval: ``t0 < t1`` (both checked by ``flowkit check``)
_T0_BEFORE_T1 = Rule(("t0", "t1"), lambda a: a["t0"] < a["t1"], "need t0 < t1, got t0={t0}, t1={t1}")
#: a time in the unit interval, for the paths defined on ``[0, 1]``
UnitTime = Annotated[float, Range(0, 1)]
from .flow import StandardNormal

__all__ = ["PathCoefficients", "GaussianPath", "VP", "SubVP", "VE", "CondOT", "Cosine",
           "Polynomial", "EDGE"]

EDGE = 1e-5
"""Distance from a singular end (``α = 0`` or ``σ = 0``) at which conversions are evaluated."""


@dataclass(frozen=True)
class PathCoefficients:
    """``(α_t, σ_t, α̇_t, σ̇_t)`` at some times, each of the shape of ``t``."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @property
    def det(self) -> Tensor:
        """``D_t = α σ̇ − σ α̇``, the determinant of the ``(x̂₀, ε̂) → (x_t, v)`` map."""
        return self.alpha * self.d_sigma - self.sigma * self.d_alpha


class GaussianPath:
    """Base class: ``x_t = α_t x_data + σ_t ε`` on ``[t0, t1]`` (data at ``t0``).

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`d_alpha` and :meth:`d_sigma`
    (elementwise on a tensor ``t`` of any shape) and may override
    :meth:`diffusion_squared` with a closed form. Everything else follows.

    Attributes:
        t0: smallest time used (data end).
        t1: largest time (noise end, ``T``).
        safe_range: ``(lo, hi)`` to which ``t`` is clamped inside the conversions and
            ``f``/``g`` (only differs from ``(−∞, ∞)`` for paths singular at an end).
    """

    t0: float = 0.0
    t1: float = 1.0
    safe_range: tuple[float, float] = (-math.inf, math.inf)

    # -- the schedule ------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale ``α_t``."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale ``σ_t``."""
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        """``dα_t/dt``."""
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        """``dσ_t/dt``."""
        raise NotImplementedError

    def schedule(self, t: Tensor | float) -> PathCoefficients:
        """``(α_t, σ_t, α̇_t, σ̇_t)`` at ``t`` (same shape as ``t``)."""
        t = _as_tensor(t)
        return PathCoefficients(self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))

    @property
    def prior_std(self) -> float:
        """Standard deviation of the isotropic prior at ``t1`` (1 unless overridden)."""
        return 1.0

    def prior(self, shape: tuple[int, ...] | list[int]) -> StandardNormal:
        """The reference density at ``t1``: ``N(0, prior_std² I)`` over event ``shape``.

        It approximates the true marginal ``p_{t1} = p_data ⋆ N(0, σ²)`` scaled by ``α_{t1}``;
        the mismatch is the (small) prior term of the likelihood bias.
        """
        return StandardNormal(tuple(shape), self.prior_std)

    def sample(self, x_data: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        """``x_t = α_t x_data + σ_t ε``; ``t`` scalar or ``[B]``, broadcast over event dims."""
        c = self._coefficients(t, x_data, safe=False)
        return c.alpha * x_data + c.sigma * noise

    # -- the forward SDE ---------------------------------------------------------------
    def drift_coefficient(self, t: Tensor | float) -> Tensor:
        """``f(t) = d log α_t / dt = α̇_t / α_t``."""
        c = self.schedule(self._clamp(_as_tensor(t)))
        return c.d_alpha / c.alpha

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        """``g(t)² = dσ²/dt − 2 f σ² = 2 σ_t D_t / α_t``."""
        c = self.schedule(self._clamp(_as_tensor(t)))
        return 2 * c.sigma * c.det / c.alpha

    def drift(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Forward drift ``f(t) x`` (Song et al. 2021, eq. 5); ``t`` scalar or ``[B]``."""
        return _broadcast(self.drift_coefficient(_as_tensor(t, x)), x) * x

    def diffusion(self, t: Tensor | float) -> Tensor:
        """Forward diffusion coefficient ``g(t) = sqrt(dσ²/dt − 2 f σ²)``."""
        return self.diffusion_squared(t).clamp_min(0).sqrt()

    # -- parameterisations -------------------------------------------------------------
    def score_from_eps(self, eps: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        r"""``s = −ε̂ / σ_t`` (Tweedie; the minimiser of Song et al. 2021, eq. 7)."""
        c = self._coefficients(t, x_t)
        return -eps / c.sigma

    def eps_from_score(self, score: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``ε̂ = −σ_t s``."""
        c = self._coefficients(t, x_t)
        return -c.sigma * score

    def x0_from_eps(self, eps: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``x̂₀ = (x_t − σ_t ε̂) / α_t``."""
        c = self._over_alpha(t, x_t)
        return (x_t - c.sigma * eps) / c.alpha

    def eps_from_x0(self, x0: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``ε̂ = (x_t − α_t x̂₀) / σ_t``."""
        c = self._coefficients(t, x_t)
        return (x_t - c.alpha * x0) / c.sigma

    def x0_from_score(self, score: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """Tweedie's formula ``E[x_data | x_t] = (x_t + σ_t² s) / α_t`` (Efron 2011)."""
        c = self._over_alpha(t, x_t)
        return (x_t + c.sigma**2 * score) / c.alpha

    def score_from_x0(self, x0: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``s = (α_t x̂₀ − x_t) / σ_t²``."""
        c = self._coefficients(t, x_t)
        return (c.alpha * x0 - x_t) / c.sigma**2

    def velocity_from_score(self, score: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        r"""Probability-flow velocity ``v = f x − ½ g² s`` (Song et al. 2021, eq. 13).

        With ``f = α̇/α`` and ``½ g² = σ D / α`` this is

        .. math::  v = \frac{\dot\alpha\, x_t - \sigma D\, s}{\alpha}
                     = \dot\alpha\, \hat x_0 + \dot\sigma\, \hat\varepsilon,

        the second form by substituting ``x_t = α x̂₀ + σ ε̂`` and ``s = −ε̂/σ``: the PF-ODE
        of a diffusion is the conditional flow-matching velocity ``E[α̇ x₀ + σ̇ ε | x_t]``
        (Lipman et al. 2023, Thm. 1).

        ``score`` must be the score at ``t`` — or, where ``α_t = 0``, at
        :meth:`conversion_time` ``(t)``, whose coefficients are then used (module docstring).
        """
        c = self._over_alpha(t, x_t)
        return (c.d_alpha * x_t - c.sigma * c.det * score) / c.alpha

    def score_from_velocity(self, velocity: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        r"""Invert :meth:`velocity_from_score`: ``α v = α̇ x − σ D s``, so

        .. math::  s = \frac{\dot\alpha\, x_t - \alpha\, v}{\sigma_t D_t}.

        Finite at ``α = 0`` (where ``s = −x/σ²`` whatever the data), singular where ``σ = 0``.
        """
        c = self._coefficients(t, x_t)
        return (c.d_alpha * x_t - c.alpha * velocity) / (c.sigma * c.det)

    def velocity_from_eps(self, eps: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``v = α̇ x̂₀ + σ̇ ε̂ = (α̇ x_t + D ε̂) / α``."""
        c = self._over_alpha(t, x_t)
        return (c.d_alpha * x_t + c.det * eps) / c.alpha

    def eps_from_velocity(self, velocity: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """Solve ``[x_t; v] = [[α, σ], [α̇, σ̇]] [x̂₀; ε̂]`` for ε̂: ``(α v − α̇ x_t) / D``."""
        c = self._coefficients(t, x_t)
        return (c.alpha * velocity - c.d_alpha * x_t) / c.det

    def velocity_from_x0(self, x0: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """``v = α̇ x̂₀ + σ̇ (x_t − α x̂₀)/σ = (σ̇ x_t − D x̂₀) / σ``."""
        c = self._coefficients(t, x_t)
        return (c.d_sigma * x_t - c.det * x0) / c.sigma

    def x0_from_velocity(self, velocity: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """Solve the same 2×2 system for x̂₀: ``(σ̇ x_t − σ v) / D``."""
        c = self._coefficients(t, x_t)
        return (c.d_sigma * x_t - c.sigma * velocity) / c.det

    def conversion_time(self, t: Tensor | float) -> Tensor:
        """``t`` clamped to ``safe_range``: the time at which to evaluate a model whose output
        is converted by a map that divides by ``α`` where ``α_t = 0`` (see the module docstring).

        Example:
            >>> one = torch.tensor(1.0, dtype=torch.float64)
            >>> float(CondOT().conversion_time(one)), float(VP().conversion_time(one))
            (0.99999, 1.0)
        """
        return self._clamp(_as_tensor(t))

    # -- helpers -----------------------------------------------------------------------
    def _over_alpha(self, t: Tensor | float, x: Tensor) -> PathCoefficients:
        """Coefficients for a map that divides by ``α``: at ``t`` itself where ``α_t > 0``, at
        :meth:`conversion_time` where ``α_t = 0`` (to rounding: ``α_t ≤`` the dtype's epsilon, as
        ``cos(π/2)`` is)."""
        t = _as_tensor(t, x)
        t = torch.where(self.alpha(t) <= torch.finfo(t.dtype).eps, self._clamp(t), t)
        c = self.schedule(t)
        return PathCoefficients(*(_broadcast(v, x) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)))

    def _clamp(self, t: Tensor) -> Tensor:
        lo, hi = self.safe_range
        if math.isinf(lo) and math.isinf(hi):
            return t
        return t.clamp(lo, hi)

    def _coefficients(self, t: Tensor | float, x: Tensor, safe: bool = True) -> PathCoefficients:
        t = _as_tensor(t, x)
        c = self.schedule(self._clamp(t) if safe else t)
        return PathCoefficients(*(_broadcast(v, x) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)))

    def __repr__(self) -> str:
        names = inspect.signature(type(self).__init__).parameters
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in names if hasattr(self, k))
        return f"{type(self).__name__}({args})"


def _as_tensor(t: Tensor | float, like: Optional[Tensor] = None) -> Tensor:
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if torch.is_tensor(t):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


def _broadcast(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient ``[B]`` → ``[B, 1, ..., 1]``; scalars pass through."""
    if c.dim() == 1 and x.dim() > 1 and c.shape[0] == x.shape[0]:
        return c.reshape(-1, *([1] * (x.dim() - 1)))
    return c


# ----------------------------------------------------------------------------- diffusions
@PATHS.register("vp")
class VP(GaussianPath):
    r"""Variance-preserving SDE (DDPM's limit; Song et al. 2021, eq. 11): ``α² + σ² = 1``.

    ``β(t) = β_min + (β_max − β_min) t / T``, ``B(t) = ∫₀ᵗ β``, ``α_t = exp(−B(t)/2)``,
    ``σ_t = sqrt(1 − α_t²)``; the SDE is ``dx = −½β x dt + sqrt(β) dw`` (``f = −β/2``,
    ``g² = β``).

    Args:
        beta_min: ``β(0)``.
        beta_max: ``β(T)``.
        t1: the horizon ``T``.
        t0: smallest time used (``σ_0 = 0`` makes the score singular at 0).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("beta_max", "beta_min"), lambda a: a["beta_min"] <= a["beta_max"],
             "need beta_min <= beta_max, got {beta_min}, {beta_max}"),
        _T0_BEFORE_T1,
    )

    def __init__(self, beta_min: NonNegativeFloat = 0.1, beta_max: NonNegativeFloat = 20.0,
                 t1: PositiveFloat = 1.0, t0: NonNegativeFloat = 1e-5) -> None:
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        if not 0 <= t0 < t1:
            raise ValueError(f"need 0 <= t0 < t1, got t0={t0}, t1={t1}")
        self.beta_min, self.beta_max, self.t1, self.t0 = float(beta_min), float(beta_max), float(t1), float(t0)

    def beta(self, t: Tensor) -> Tensor:
        """Noise rate ``β(t)``."""
        return self.beta_min + (self.beta_max - self.beta_min) * t / self.t1

    def integrated_beta(self, t: Tensor) -> Tensor:
        """``B(t) = β_min t + (β_max − β_min) t² / (2T)``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2 / self.t1

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        # σ dσ = −α dα = ½ β α²
        return 0.5 * self.beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def drift_coefficient(self, t: Tensor | float) -> Tensor:
        return -0.5 * self.beta(_as_tensor(t))

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        return self.beta(_as_tensor(t))


@PATHS.register("subvp")
class SubVP(VP):
    r"""Sub-VP SDE (Song et al. 2021, Sec. 3.4): VP's ``α_t``, ``σ_t = 1 − α_t²``.

    ``g² = β(t) (1 − exp(−2B(t)))`` ≤ VP's, so the variance stays below VP's at all ``t``.

    Args:
        beta_min, beta_max, t1, t0: as for :class:`VP`.
    """

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.beta(t) * self.alpha(t) ** 2

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t))


@PATHS.register("ve")
class VE(GaussianPath):
    r"""Variance-exploding SDE (SMLD's limit; Song et al. 2021, eq. 9): ``α = 1``.

    ``σ_t = σ_min (σ_max/σ_min)^{t/T}``, ``f = 0``, ``g² = dσ²/dt = 2 σ_t² log(σ_max/σ_min) / T``.
    The data end carries ``σ_min`` of noise already (``x_{t0} = x_data + σ_min ε``), so the
    density at ``t0 = 0`` is the data smoothed by ``N(0, σ_min²)``. The prior is
    ``N(0, σ_max² I)``.

    Args:
        sigma_min: ``σ(0)``.
        sigma_max: ``σ(T)``.
        t1: the horizon ``T``.
        t0: smallest time used.
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("sigma_max", "sigma_min"), lambda a: a["sigma_min"] < a["sigma_max"],
             "need sigma_min < sigma_max, got {sigma_min}, {sigma_max}"),
        _T0_BEFORE_T1,
    )

    def __init__(self, sigma_min: PositiveFloat = 0.01, sigma_max: PositiveFloat = 50.0,
                 t1: PositiveFloat = 1.0, t0: NonNegativeFloat = 0.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not 0 <= t0 < t1:
            raise ValueError(f"need 0 <= t0 < t1, got t0={t0}, t1={t1}")
        self.sigma_min, self.sigma_max, self.t1, self.t0 = float(sigma_min), float(sigma_max), float(t1), float(t0)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(self._log_ratio * t / self.t1)

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.sigma(t) * self._log_ratio / self.t1

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        return 2 * self.sigma(_as_tensor(t)) ** 2 * self._log_ratio / self.t1

    @property
    def prior_std(self) -> float:
        return self.sigma_max


# ------------------------------------------------------------------------ flow matching
def _check_end(t0: float, t1: float) -> None:
    if not 0 <= t0 < t1 <= 1:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")


@PATHS.register("cond_ot")
class CondOT(GaussianPath):
    r"""Conditional optimal transport path (Lipman et al. 2023, eq. 20) in flowkit time.

    Lipman et al. write ``μ_s = s x₁``, ``σ_s = 1 − (1 − σ_min) s`` with data ``x₁`` at
    ``s = 1``; with ``s = 1 − t``: ``α_t = 1 − t``, ``σ_t = σ_min + (1 − σ_min) t``, so
    ``v = σ̇ ε − x_data`` (``= (1 − σ_min) ε − x_data``) is a straight line. ``α_1 = 0``.

    Args:
        sigma_min: noise left at the data end (0: the data themselves).
        t0, t1: the interval used (``t1 < 1`` for SDE samplers, see the module docstring).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (_T0_BEFORE_T1,)

    def __init__(self, sigma_min: Annotated[float, Range(0, 1, hi_open=True)] = 0.0, t0: UnitTime = 0.0,
                 t1: UnitTime = 1.0) -> None:
        if not 0 <= sigma_min < 1:
            raise ValueError(f"need 0 <= sigma_min < 1, got {sigma_min}")
        _check_end(t0, t1)
        self.sigma_min, self.t0, self.t1 = float(sigma_min), float(t0), float(t1)
        self.safe_range = (EDGE if self.sigma_min == 0 else 0.0, 1 - EDGE)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min + (1 - self.sigma_min) * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, 1 - self.sigma_min)


@PATHS.register("cosine")
class Cosine(GaussianPath):
    r"""Trigonometric path ``α_t = cos(πt/2)``, ``σ_t = sin(πt/2)`` (variance preserving).

    ``D_t = π/2`` is constant; ``f = −(π/2) tan(πt/2)``, ``g² = π tan(πt/2)``. The
    continuous-time cosine schedule (Nichol & Dhariwal 2021, without the offset; the
    "GVP" path of Albergo & Vanden-Eijnden 2023).

    Args:
        t0, t1: the interval used (``t1 < 1`` for SDE samplers).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (_T0_BEFORE_T1,)

    def __init__(self, t0: UnitTime = 0.0, t1: UnitTime = 1.0) -> None:
        _check_end(t0, t1)
        self.t0, self.t1 = float(t0), float(t1)
        self.safe_range = (EDGE, 1 - EDGE)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def diffusion_squared(self, t: Tensor | float) -> Tensor:
        return math.pi * torch.tan(0.5 * math.pi * self._clamp(_as_tensor(t)))


@PATHS.register("polynomial")
class Polynomial(GaussianPath):
    r"""Polynomial convex path ``α_t = (1 − t)^n``, ``σ_t = 1 − (1 − t)^n``.

    In flow-matching time this is ``α_s = s^n``, ``σ_s = 1 − s^n`` (the polynomial convex
    scheduler ``κ_s = s^n`` of Lipman et al. 2024); ``n = 1`` is :class:`CondOT`
    with ``σ_min = 0``. Larger ``n`` spends longer near the data end before noise
    dominates. ``D_t = n (1 − t)^{n−1}``.

    Args:
        exponent: ``n > 0``.
        t0, t1: the interval used (``t1 < 1`` for SDE samplers).
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (_T0_BEFORE_T1,)

    def __init__(self, exponent: PositiveFloat = 2.0, t0: UnitTime = 0.0, t1: UnitTime = 1.0) -> None:
        if not exponent > 0:
            raise ValueError(f"need exponent > 0, got {exponent}")
        _check_end(t0, t1)
        self.exponent, self.t0, self.t1 = float(exponent), float(t0), float(t1)
        self.safe_range = (EDGE, 1 - EDGE)

    def alpha(self, t: Tensor) -> Tensor:
        return (1 - t) ** self.exponent

    def sigma(self, t: Tensor) -> Tensor:
        return 1 - (1 - t) ** self.exponent

    def d_alpha(self, t: Tensor) -> Tensor:
        return -self.exponent * (1 - t) ** (self.exponent - 1)

    def d_sigma(self, t: Tensor) -> Tensor:
        return self.exponent * (1 - t) ** (self.exponent - 1)
