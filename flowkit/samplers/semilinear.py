r"""Few-step samplers that use the semi-linear structure of a Gaussian path's ODE.

For a flow on a :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε`` the
probability-flow ODE, written with the data prediction ``x̂₀(x, t) = E[x_data | x_t = x]``
in the half log-SNR ``λ = log(α/σ)``, has the exact solution (Lu et al. 2022b, eq. 9)

.. math::  x_t = \frac{\sigma_t}{\sigma_s}\, x_s + \sigma_t \int_{\lambda_s}^{\lambda_t}
           e^{\lambda}\, \hat x_0(x_\lambda, \lambda)\, d\lambda
           = \frac{\sigma_t}{\sigma_s}\, x_s + \alpha_t \int_0^h e^{\tau - h}\,
             \hat x_0(\lambda_s + \tau)\, d\tau, \qquad h = \lambda_t - \lambda_s,

so a solver only approximates ``x̂₀`` along the step: by a constant (DDIM), or by the polynomial
through earlier values (DPM-Solver++, UniPC), whose integrals against ``e^{τ−h}`` are
``G_n(h) = ∫_0^h e^{τ−h} (τ/h)^n dτ`` (``G_0 = 1 − e^{−h}``, ``G_n = 1 − n G_{n−1}/h``).
The samplers here take ``x̂₀`` from any flow that declares a ``path``: it is the velocity
solved for the data, ``x̂₀ = (σ̇ x − σ v) / (α σ̇ − σ α̇)``
(:meth:`~flowkit.paths.GaussianPath.x0_from_velocity`), so one solver serves score matching
(VP, sub-VP, VE), flow matching on any path (the straight ``cond_ot`` included), rectified flow
and classifier-free guidance (``guidance`` w: the guided velocity, hence the guided ``x̂₀``).
The coefficients are evaluated at the knots' own times, not clamped to the path's
``safe_range``: ``α σ̇ − σ α̇`` is finite and positive at both ends of every registered path, and
clamping at ``t1 = 1`` on ``cond_ot`` would bias ``x̂₀`` by ``EDGE · v``.

Registered samplers (``steps`` steps on the knots of :mod:`flowkit.samplers.schedules`):

===================  =========================================================  ====  ============
name                 method                                                      order NFE
===================  =========================================================  ====  ============
``ddim``             DDIM, deterministic (Song et al. 2021a, eq. 12, η = 0)     1     steps
``dpmpp_2m``         DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2)                 2     steps
``dpmpp_3m``         DPM-Solver++(3M) (Lu et al. 2022b, App. B)                 2*    steps
``unipc``            UniPC-2 with B(h) = 1 − e^{−h} (bh2; Zhao et al. 2023)      3     steps
``edm_heun``         EDM's Heun sampler (Karras et al. 2022, Alg. 1; churn:     2     2·steps − k
                     Alg. 2)
``sde_dpmpp_2m``     SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 / App. B)    —     steps
===================  =========================================================  ====  ============

``k`` counts the steps out of ``α = 0`` or into ``σ = 0``, which cost one evaluation.
\* ``dpmpp_3m`` as published (the default, ``third_order="published"``) weights the curvature term
by half the exact quadratic's weight, so its steps are second order (measured 2.0–2.1). With
``third_order="exact"`` its steps are third order, but like every multistep DPM-Solver it starts
with a first- and a second-order step (no history yet), whose ``O(h²)`` error bounds the global
order at 2; the constant is the change of ``x̂₀`` over the first step, small when ``t1`` is deep
in noise (on VP and VE with an exact score it measures ≈ 2.7–3.1 from 64 to 256 steps; on a
Gaussian under VP with ``β_max = 4``, 2.1). ``unipc``'s corrector raises its first step too: order 3.

Singular steps
--------------
On a path with ``α_{t1} = 0`` (``cond_ot``, ``cosine``) the first step starts at ``λ = −∞``, and
on one with ``σ_{t0} = 0`` (or with ``final="denoise"``) the last lands on ``λ = +∞``. Such a
step has ``h = ∞``: every method takes it in the closed form of a constant ``x̂₀``,
``x_t = (σ_t/σ_s) x_s + α_t x̂₀(x_s)`` (``G_0(∞) = 1``), which is the exact limit (no polynomial in
``λ`` can be integrated to ``λ = ∞``), and a knot at ``λ = −∞`` is left out of later
polynomials. Such a step is first order in ``t`` (its error is ``O(Δt²)``), so on these paths a
solver of declared order 3 converges at order 2 — as every multistep DPM-Solver / UniPC
implementation does where it finishes with a first-order step into ``σ = 0``.

References:
    Song, Meng, Ermon (2021a). Denoising Diffusion Implicit Models. ICLR.
    Lu, Zhou, Bao, Chen, Li, Zhu (2022a). DPM-Solver: A Fast ODE Solver for Diffusion
    Probabilistic Model Sampling in Around 10 Steps. NeurIPS.
    Lu, Zhou, Bao, Chen, Li, Zhu (2022b). DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models. arXiv:2211.01095.
    Zhao, Bai, Rao, Zhou, Lu (2023). UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models. NeurIPS.
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS.

Example:
    >>> from flowkit.diffusion import flow_from_score
    >>> from flowkit.paths import VP
    >>> flow = flow_from_score(lambda t, x, cond=None: -x, VP(), (2,))  # data N(0, I): v = 0
    >>> x = torch.ones(3, 2, dtype=torch.float64)  # the exact solution keeps x
    >>> [(f(flow, x, steps=10).x - x).abs().max().item() < tol
    ...  for f, tol in ((ddim, 0.3), (dpmpp_2m, 0.05))]
    [True, True]
    >>> edm_heun(flow, x, steps=10, final="t0").nfe, edm_heun(flow, x, steps=10).nfe  # "denoise": Euler into σ = 0
    (20, 19)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, Optional, get_args

import torch
from torch import Tensor

from ..components import SAMPLERS
from ..constraints import FiniteFloat, NonNegativeFloat, PositiveFloat, Seed
from ..flow import Flow, guided
from ..solvers import StepCount
from .base import SampleResult, declare
from .schedules import FinalStep, Grid, SamplerSchedule, log_snr, resolve_schedule, sampling_grid, time_of_log_snr

__all__ = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "edm_heun", "sde_dpmpp_2m", "phi_integrals",
           "DataPrediction", "History"]

#: what every sampler here uses from a flow: the velocity and the path that converts it to x̂₀
NEEDS = ("velocity", "path")
#: ``dpmpp_3m``'s third-order step: Lu et al.'s published weights, or the exact quadratic
ThirdOrder = Literal["published", "exact"]
THIRD_ORDER: tuple[str, ...] = get_args(ThirdOrder)


# ----------------------------------------------------------------------------- the pieces
def phi_integrals(h: float, n: int) -> list[float]:
    r"""``[G_0(h), …, G_{n}(h)]`` with ``G_k(h) = ∫_0^h e^{τ−h} (τ/h)^k dτ`` (``h = ∞``: all 1).

    ``G_0 = 1 − e^{−h}``, ``G_k = 1 − k G_{k−1} / h``; for small ``h`` the series
    ``G_k = h Σ_j (−h)^j k! / (k + j + 1)!`` avoids the cancellation.

    Example:
        >>> [round(g, 6) for g in phi_integrals(1.0, 2)]
        [0.632121, 0.367879, 0.264241]
    """
    if math.isinf(h):
        return [1.0] * (n + 1)
    if h < 0.5:
        out = []
        for k in range(n + 1):
            term, total = h * math.factorial(k) / math.factorial(k + 1), 0.0
            for j in range(40):
                total += term
                term *= -h / (k + j + 2)
            out.append(total)
        return out
    out = [-math.expm1(-h)]
    for k in range(1, n + 1):
        out.append(1.0 - k * out[-1] / h)
    return out


class DataPrediction:
    """``x̂₀(t, x)`` of a flow from its (guided) velocity and its path, counting evaluations.

    Args:
        flow: a flow with ``velocity`` and ``path``.
        cond: condition passed to the velocity.
        guidance: classifier-free guidance scale w (one batched call per evaluation).
        by: the sampler's name, for error messages.
    """

    def __init__(self, flow: Flow, cond: Optional[Tensor], guidance: float, by: str) -> None:
        flow.require(*NEEDS, by=by)
        self.path, self.cond, self.by = flow.path, cond, by
        self.velocity = guided(flow.velocity, guidance) if guidance else flow.velocity
        self.nfe = 0

    def __call__(self, t: float, x: Tensor) -> Tensor:
        tt = torch.tensor(t, dtype=torch.float64)
        path = self.path
        alpha, sigma, d_alpha, d_sigma = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
        det = float(alpha * d_sigma - sigma * d_alpha)
        if not (math.isfinite(det) and det > 0 and math.isfinite(float(d_sigma)) and math.isfinite(float(sigma))):
            raise ValueError(f"{self.by}: the path {self.path!r} has no finite data prediction at t={t:g} "
                             f"(α σ̇ − σ α̇ = {det:g}); move the path's t0/t1 inside its interval")
        self.nfe += 1
        v = self.velocity(torch.as_tensor(t, dtype=x.dtype, device=x.device), x, self.cond)
        return (float(d_sigma) * x - float(sigma) * v) / det


def _check_guidance(guidance: float) -> None:
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")


def _ddim(grid: Grid, i: int, x: Tensor, m0: Tensor) -> Tensor:
    """The constant-``x̂₀`` step from knot ``i`` to ``i + 1``: ``(σ_t/σ_s) x + α_t G_0(h) x̂₀``."""
    h = grid.log_snr[i + 1] - grid.log_snr[i]
    return (grid.sigma[i + 1] / grid.sigma[i]) * x + (grid.alpha[i + 1] * phi_integrals(h, 0)[0]) * m0


def _polynomial_step(grid: Grid, i: int, x: Tensor, m0: Tensor, points: list[tuple[float, Tensor]],
                     weights: Callable[[float, list[float]], list[float]]) -> Tensor:
    """``(σ_t/σ_s) x + α_t [G_0 m0 + Σ_k a_k (m_k − m0)/r_k]`` with ``r_k = (λ_k − λ_s)/h``."""
    h = grid.log_snr[i + 1] - grid.log_snr[i]
    if not points or math.isinf(h):
        return _ddim(grid, i, x, m0)
    rs = [(lam - grid.log_snr[i]) / h for lam, _ in points]
    a = weights(h, rs)
    out = m0 * phi_integrals(h, 0)[0]
    for ak, rk, (_, mk) in zip(a, rs, points):
        out = out + (ak / rk) * (mk - m0)
    return (grid.sigma[i + 1] / grid.sigma[i]) * x + grid.alpha[i + 1] * out


def _solve_weights(rs: list[float], targets: list[float]) -> list[float]:
    """The ``a_k`` with ``Σ_k a_k r_k^{n−1} = targets[n − 1]``, ``n = 1..K``."""
    if len(rs) == 1:
        return [targets[0]]
    mat = torch.tensor([[r**n for r in rs] for n in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(mat, torch.tensor(targets, dtype=torch.float64)).tolist()


def _exact_weights(h: float, rs: list[float]) -> list[float]:
    r"""Solve ``Σ_k a_k r_k^{n−1} = G_n(h)`` for ``n = 1..K``: then ``Σ_k a_k (m_k − m_0)/r_k`` is the
    exact integral against ``e^{τ−h}`` of the polynomial through ``(0, m_0)`` and the ``(r_k, m_k)``."""
    return _solve_weights(rs, phi_integrals(h, len(rs))[1:])


def _dpmpp_2m_weights(h: float, rs: list[float]) -> list[float]:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): ``D = (1 + 1/(2r)) m_0 − 1/(2r) m_1`` with
    ``r = h_{i−1}/h_i = −r_1``, i.e. ``a_1 (m_1 − m_0)/r_1 = G_0 (m_0 − m_1)/(2r)``: ``a_1 = G_0/2``."""
    return [0.5 * phi_integrals(h, 0)[0]]


def _dpmpp_3m_weights(h: float, rs: list[float]) -> list[float]:
    r"""DPM-Solver++(3M) as published (Lu et al. 2022b, App. B; the DPM-Solver reference code):
    ``G_0 m_0 + G_1 D_1 − φ_3 D_2`` with ``−φ_3 = G_2 / 2`` (half the exact quadratic's weight),
    i.e. the order conditions ``Σ a_k = G_1``, ``Σ a_k r_k = G_2 / 2``; with one earlier point,
    the 2M step (the reference code's warm-up, ``solver_type="dpmsolver"``)."""
    if len(rs) == 1:
        return _dpmpp_2m_weights(h, rs)
    g = phi_integrals(h, 2)
    return _solve_weights(rs, [g[1], 0.5 * g[2]])


class History:
    r"""The bookkeeping every multistep solver here shares: the ``x̂₀`` it evaluated at each knot
    passed, and which of them a step may use.

    Step ``i`` (knot ``i`` → ``i + 1``) uses the latest ``depth`` earlier ``(λ_j, x̂₀(t_j))``,
    ``j < i``, latest first; so the first steps, with fewer behind them, are of lower order
    (the warm-up). Only knots at finite ``λ`` count (a knot at ``α = 0`` has ``λ = −∞``: the
    points before it are not used either), and a step from a knot at infinite ``λ`` or of
    infinite ``h`` (out of ``α = 0``, into ``σ = 0``: the closed-form step, see the module
    docstring) uses none, which lowers the last step's order on paths with ``σ_{t0} = 0`` or
    with ``final="denoise"``.

    Args:
        grid: the knots the solver steps through.
        depth: how many earlier points a step uses at most (order − 1 for DPM-Solver++(kM)).

    Example:
        >>> from flowkit.paths import CondOT
        >>> from flowkit.samplers.schedules import sampling_grid
        >>> history = History(sampling_grid(CondOT(), 4, "uniform"), depth=2)
        >>> uses = []
        >>> for i in range(4):  # α = 0 at the first knot, σ = 0 at the last
        ...     uses.append(len(history.points(i)))
        ...     history.add(torch.zeros(1))
        >>> uses
        [0, 0, 1, 0]
    """

    def __init__(self, grid: Grid, depth: int) -> None:
        self.grid, self.depth = grid, int(depth)
        self.values: list[Tensor] = []  # x̂₀ at knots 0, 1, … in order

    def add(self, m: Tensor) -> None:
        """Record ``x̂₀`` at the next knot (knot ``len(values)``)."""
        self.values.append(m)

    def points(self, i: int) -> list[tuple[float, Tensor]]:
        """The ``(λ_j, x̂₀(t_j))`` step ``i`` uses (class docstring), latest first."""
        lam = self.grid.log_snr
        if not (math.isfinite(lam[i]) and math.isfinite(lam[i + 1] - lam[i])):
            return []
        out: list[tuple[float, Tensor]] = []
        for j in range(min(i, len(self.values)) - 1, -1, -1):
            if len(out) == self.depth or not math.isfinite(lam[j]):
                break
            out.append((lam[j], self.values[j]))
        return out


def _grid(flow: Flow, steps: int, schedule: str, rho: float, final: str, by: str,
          preferred: str = "logsnr") -> Grid:
    flow.require(*NEEDS, by=by)
    return sampling_grid(flow.path, steps, resolve_schedule(flow.path, schedule, preferred), rho=rho, final=final)


# ---------------------------------------------------------------------------- multistep
def _multistep(flow: Flow, x: Tensor, cond: Optional[Tensor], steps: int, schedule: str, rho: float,
               final: str, guidance: float, by: str, order: int,
               weights: Callable[[float, list[float]], list[float]]) -> SampleResult:
    _check_guidance(guidance)
    grid = _grid(flow, steps, schedule, rho, final, by)
    model = DataPrediction(flow, cond, guidance, by)
    history = History(grid, order - 1)
    with torch.no_grad():
        for i in range(grid.steps):
            m0 = model(grid.t[i], x)
            x = _polynomial_step(grid, i, x, m0, history.points(i), weights)
            history.add(m0)
    return SampleResult(x, model.nfe)



@SAMPLERS.register("ddim")
@declare(needs=NEEDS, evaluations=1, order=1)
def ddim(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 20,
         schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
         guidance: FiniteFloat = 0.0) -> SampleResult:
    r"""Deterministic DDIM (Song et al. 2021a, eq. 12 with η = 0) on any Gaussian path.

    ``x_t = α_t x̂₀ + σ_t ε̂`` with ``ε̂ = (x_s − α_s x̂₀)/σ_s``, i.e.
    ``x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) x̂₀`` (the first-order DPM-Solver++; Euler in
    ``σ/α``). On the straight ``cond_ot`` path with ``schedule="uniform"`` it is the Euler method.

    Args:
        flow: a flow with ``velocity`` and ``path``.
        x: samples of the prior at ``flow.t1``.
        cond: optional condition.
        steps: number of steps (= network evaluations).
        schedule: ``"uniform"``, ``"logsnr"``, ``"karras"``, ``"trailing"`` or ``"power"``
            (:mod:`flowkit.samplers.schedules`), or ``"auto"``
            (:func:`~flowkit.samplers.schedules.resolve_schedule`): ``power`` (``t_k = t0 + (t1 − t0)
            (1 − k/n)^{7/4}``, the last knot at ``σ = 0`` with ``final="denoise"``) on paths whose
            noise vanishes at ``t = 0`` (VP, sub-VP), ``logsnr`` on VE, ``uniform`` on paths with
            ``α_{t1} = 0`` (``cond_ot``, ``cosine``, ``polynomial``).
        rho: ``ρ`` of the ``karras`` schedule.
        final: ``"denoise"`` (last step to ``σ = 0``) or ``"t0"`` (stop at the flow's ``t0``). With
            ``"t0"`` on the ``trailing`` / ``power`` knots the last interval, from ``t_{n−1}`` to
            ``t0`` (``λ = 6.9`` on VP), is long, and a multistep solver extrapolates ``x̂₀`` over it;
            ``"denoise"`` takes that step in closed form.
        guidance: classifier-free guidance scale w.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.
    """
    return _multistep(flow, x, cond, steps, schedule, rho, final, guidance, "ddim", 1, _exact_weights)


@SAMPLERS.register("dpmpp_2m")
@declare(needs=NEEDS, evaluations=1, order=2)
def dpmpp_2m(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 20,
             schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
             guidance: FiniteFloat = 0.0) -> SampleResult:
    r"""DPM-Solver++(2M), multistep data prediction (Lu et al. 2022b, Algorithm 2).

    With ``r = h_{i−1} / h_i``: ``D = (1 + 1/(2r)) x̂₀(t_i) − 1/(2r) x̂₀(t_{i−1})`` and
    ``x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} (1 − e^{−h_i}) D``; the first step (no history) and a
    step of infinite ``h`` are DDIM steps. Arguments as for :func:`ddim`.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.
    """
    return _multistep(flow, x, cond, steps, schedule, rho, final, guidance, "dpmpp_2m", 2, _dpmpp_2m_weights)


@SAMPLERS.register("dpmpp_3m")
@declare(needs=NEEDS, evaluations=1, order=2)
def dpmpp_3m(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 20,
             schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
             guidance: FiniteFloat = 0.0, third_order: ThirdOrder = "published") -> SampleResult:
    r"""DPM-Solver++(3M): multistep data prediction from the last three ``x̂₀`` (Lu et al. 2022b, App. B).

    With ``m_j = x̂₀(t_{i−j})``, ``r_j = h_{i−1−j}/h_i``, ``D_{1,0} = (m_0 − m_1)/r_0``,
    ``D_{1,1} = (m_1 − m_2)/r_1``, ``D_1 = D_{1,0} + r_0 (D_{1,0} − D_{1,1})/(r_0 + r_1)`` and
    ``D_2 = (D_{1,0} − D_{1,1})/(r_0 + r_1)`` (for the quadratic through the three points in
    ``τ = (λ − λ_i)/h``, ``D_1`` is its slope and ``D_2`` half its curvature):

    .. math::  x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} x_i + \alpha_{i+1}\big[G_0 m_0 + G_1 D_1 + c\, D_2\big],

    ``third_order`` chooses ``c``:

    ``"published"`` (default)
        ``c = −φ_3 = G_2/2`` in the φ-notation of Lu et al. (``φ_3 = φ_2/h − 1/2``,
        ``φ_2 = 1 − G_0/h``), the DPM-Solver++(3M) of the paper's reference code and of
        diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``; the second step (one earlier
        point) is the 2M step. Since ``c`` is half the exact weight, its steps are second order:
        measured global order 2.0–2.1 (VP, VE, ``cond_ot``; the mixture of
        ``tests/test_fast_samplers.py``, 32 → 256 steps). At 4–20 NFE it is the more accurate
        variant (1.2–1.7× smaller endpoint error on ``bench/few_step.py --part exact``).
    ``"exact"``
        ``c = G_2``: the quadratic integrated exactly against ``e^{τ−h}``; the second step
        integrates the line through two points (``a_1 = G_1``). Its steps are third order, and
        the lower-order first steps bound the global order at 2 in theory, but their error
        constant is small when ``t1`` is deep in noise: measured 2.7–3.1 on VP and VE from 64
        to 256 steps (2.0 on ``cond_ot``, see the module docstring; 2.1 on a Gaussian under VP
        with ``β_max = 4``) — the better choice at many steps, the worse at few.

    Declared order: 2 (both). Arguments as for :func:`ddim`, and

    Args:
        third_order: ``"published"`` or ``"exact"`` (above).

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.
    """
    if third_order not in THIRD_ORDER:
        raise ValueError(f"dpmpp_3m: unknown third_order {third_order!r}; choose from {', '.join(THIRD_ORDER)}")
    weights = _dpmpp_3m_weights if third_order == "published" else _exact_weights
    return _multistep(flow, x, cond, steps, schedule, rho, final, guidance, "dpmpp_3m", 3, weights)


# --------------------------------------------------------------------------------- UniPC
@SAMPLERS.register("unipc")
@declare(needs=NEEDS, evaluations=1, order=3)
def unipc(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 20,
          schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
          guidance: FiniteFloat = 0.0) -> SampleResult:
    r"""UniPC-2, B(h) = 1 − e^{−h} ("bh2"), data prediction (Zhao et al. 2023, Algs. 1–3).

    Predictor UniP-2 from ``x̂₀`` at ``t_i`` and ``t_{i−1}``; after the network is evaluated at the
    predicted ``x_{i+1}``, the corrector UniC redoes the step with that evaluation too,
    ``x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1}[G_0 m_0 + B Σ_k a_k D_k]``, ``D_k = (m_k − m_0)/r_k``
    (``r = 1`` for the new point), the ``a_k`` solving ``Σ_k a_k r_k^{n−1} = G_n(h)/B(h)``
    (the order conditions), and the next step starts from the corrected state with the
    evaluation already made — no extra NFE. The last step is not corrected. Convergence order
    3 (UniC raises UniP-2 by one). Arguments as for :func:`ddim`.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.
    """
    _check_guidance(guidance)
    grid = _grid(flow, steps, schedule, rho, final, "unipc")
    model = DataPrediction(flow, cond, guidance, "unipc")
    history = History(grid, 1)  # UniP-2: one earlier point
    start: Optional[Tensor] = None  # the (corrected) state the last step started from

    def bh2(h: float, rs: list[float]) -> list[float]:
        # one difference: a_1 = 1/2 (Zhao et al.'s UniP-2 / first UniC), so the weight is B(h)/2;
        # more: the order conditions solved exactly (then B cancels)
        return [0.5 * phi_integrals(h, 0)[0]] if len(rs) == 1 else _exact_weights(h, rs)

    with torch.no_grad():
        for i in range(grid.steps):
            m0 = model(grid.t[i], x)
            if i > 0:  # UniC: the step i−1 → i again, with the new evaluation at r = 1
                points = history.points(i - 1) + [(grid.log_snr[i], m0)]
                x = _polynomial_step(grid, i - 1, start, history.values[i - 1], points, bh2)
            start = x
            x = _polynomial_step(grid, i, x, m0, history.points(i), bh2)
            history.add(m0)
    return SampleResult(x, model.nfe)


# ------------------------------------------------------------------------------ EDM Heun
def _euler_only(grid: Grid, i: int) -> bool:
    """Whether EDM's step ``i`` is the one-evaluation Euler (DDIM) step: out of ``α = 0`` or into ``σ = 0``."""
    return grid.alpha[i] == 0.0 or grid.sigma[i + 1] == 0.0


def _edm_heun_evaluations(flow: Flow, steps: int, settings: Mapping[str, Any]) -> int:
    """Two evaluations a step, one for each :func:`_euler_only` step of the grid."""
    grid = _grid(flow, steps, settings["schedule"], settings["rho"], settings["final"], "edm_heun",
                 preferred="karras")
    return sum(1 if _euler_only(grid, i) else 2 for i in range(grid.steps))


@SAMPLERS.register("edm_heun")
@declare(needs=NEEDS, evaluations=_edm_heun_evaluations, order=2)
def edm_heun(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 18,
             schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
             guidance: FiniteFloat = 0.0, s_churn: NonNegativeFloat = 0.0, s_tmin: NonNegativeFloat = 0.0,
             s_tmax: Optional[PositiveFloat] = None, s_noise: PositiveFloat = 1.0,
             seed: Optional[Seed] = None) -> SampleResult:
    r"""EDM's Heun sampler (Karras et al. 2022, Algorithm 1; with ``s_churn > 0`` Algorithm 2).

    In the variables ``x̃ = x/α``, ``σ̃ = σ/α`` every Gaussian path's ODE is
    ``dx̃/dσ̃ = (x̃ − x̂₀)/σ̃ = ε̂`` (Karras et al. 2022, eq. 4 with ``s = 1``, ``σ(t) = t``); each
    step is Heun's method on it, ``x̃_{i+1} = x̃_i + (σ̃_{i+1} − σ̃_i)(ε̂_i + ε̂'_{i+1})/2``, two
    evaluations, except a step into ``σ = 0`` or out of ``α = 0``, which is the Euler (DDIM) step,
    one evaluation (Alg. 1, line 8).

    With ``s_churn > 0`` (Alg. 2), at each knot with ``s_tmin ≤ σ̃_i ≤ s_tmax`` noise is first
    added to raise ``σ̃_i`` to ``σ̂ = σ̃_i (1 + γ)``, ``γ = min(s_churn / steps, √2 − 1)``:
    ``x̃ ← x̃ + sqrt(σ̂² − σ̃_i²) · s_noise · z``, and the Heun step starts from ``σ̂`` (at the time
    ``t̂`` with ``σ/α = σ̂``, capped at ``t1``). That sampler is stochastic (``seed``).

    Args:
        flow, x, cond, steps, schedule, rho, final, guidance: as for :func:`ddim`
            (default ``schedule="auto"``: ``karras`` with ``ρ = 7`` as in EDM on VE; ``trailing``
            — uniform in ``t``, the last knot at ``σ = 0`` with ``final="denoise"`` — on paths whose
            noise vanishes at ``t = 0`` (VP, sub-VP), where Karras knots down to ``σ̃(t0) = 10^{-3}``
            drop ``σ̃`` up to 610-fold in one Heun step at 7 NFE and the corrector, evaluated at
            that ``σ̃``, multiplies the predictor's error by about half that ratio: the sampler
            diverged below 16 NFE; ``uniform`` where ``α_{t1} = 0``; 18 steps as in EDM).
        s_churn: total stochasticity ``S_churn ≥ 0`` (0: the deterministic Alg. 1).
        s_tmin, s_tmax: the ``σ̃`` range where noise is added (``s_tmax=None``: no upper limit).
        s_noise: ``S_noise``, the scale of the added noise.
        seed: seeds the churn noise (``None``: torch's global generator).

    Returns:
        :class:`~flowkit.samplers.base.SampleResult`; ``nfe = 2·steps − k``, ``k`` the steps into
        ``σ = 0`` or out of ``α = 0``.
    """
    _check_guidance(guidance)
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if s_tmax is not None and not (math.isfinite(s_tmax) and s_tmax > 0):
        raise ValueError(f"s_tmax must be a finite number > 0 or None, got {s_tmax!r}")
    if not (math.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"s_noise must be a finite number > 0, got {s_noise!r}")
    grid = _grid(flow, steps, schedule, rho, final, "edm_heun", preferred="karras")
    model = DataPrediction(flow, cond, guidance, "edm_heun")
    path = flow.path
    gamma_max = min(s_churn / grid.steps, math.sqrt(2.0) - 1.0)
    gen = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    lam_t1 = float(log_snr(path, float(path.t1)))
    with torch.no_grad():
        for i in range(grid.steps):
            t, a, s, lam = grid.t[i], grid.alpha[i], grid.sigma[i], grid.log_snr[i]
            ratio = math.exp(-lam) if math.isfinite(lam) else math.inf  # σ̃_i
            if gamma_max > 0 and math.isfinite(ratio) and s_tmin <= ratio <= (math.inf if s_tmax is None else s_tmax):
                lam_hat = max(lam - math.log1p(gamma_max), lam_t1)  # σ̂ = σ̃ (1 + γ), at most σ̃(t1)
                if lam_hat < lam:
                    t = float(time_of_log_snr(path, torch.tensor(lam_hat))) if lam_hat > lam_t1 else float(path.t1)
                    a_hat = float(path.alpha(torch.tensor(t, dtype=torch.float64)))
                    s_hat = float(path.sigma(torch.tensor(t, dtype=torch.float64)))
                    z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
                    extra = math.sqrt(max((s_hat / a_hat) ** 2 - ratio**2, 0.0)) * s_noise
                    x = a_hat * (x / a + extra * z)
                    a, s, lam = a_hat, s_hat, math.log(a_hat) - math.log(s_hat)
                    ratio = s / a
            m = model(t, x)
            eps = (x - a * m) / s
            a_next, s_next = grid.alpha[i + 1], grid.sigma[i + 1]
            if _euler_only(grid, i):  # the Euler (DDIM) step: x = α x̂₀ + σ ε̂ (α = 0 stays 0: no churn)
                x = a_next * m + s_next * eps
                continue
            ratio_next = s_next / a_next
            x_euler = a_next * (x / a + (ratio_next - ratio) * eps)
            m_next = model(grid.t[i + 1], x_euler)
            eps_next = (x_euler - a_next * m_next) / s_next
            x = a_next * (x / a + (ratio_next - ratio) * 0.5 * (eps + eps_next))
    return SampleResult(x, model.nfe)


# -------------------------------------------------------------------- SDE-DPM-Solver++(2M)
@SAMPLERS.register("sde_dpmpp_2m")
@declare(needs=NEEDS, evaluations=1)
def sde_dpmpp_2m(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: StepCount = 20,
                 schedule: SamplerSchedule = "auto", rho: PositiveFloat = 7.0, final: FinalStep = "denoise",
                 guidance: FiniteFloat = 0.0, seed: Optional[Seed] = None) -> SampleResult:
    r"""SDE-DPM-Solver++(2M): the second-order multistep solver of the reverse SDE (Lu et al.
    2022b, Sec. 5 and Appendix B), data prediction.

    The reverse SDE's solution in ``λ`` has the linear part ``(σ_t/σ_s) e^{−h} x_s``, the data
    integral ``2 α_t ∫ e^{−2(λ_t−λ)} x̂₀ dλ`` and the noise ``σ_t sqrt(1 − e^{−2h}) z``; with
    ``D = (1 + 1/(2r)) x̂₀(t_i) − 1/(2r) x̂₀(t_{i−1})``:

    .. math::  x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} e^{-h} x_i + \alpha_{i+1}(1 - e^{-2h})\, D
               + \sigma_{i+1}\sqrt{1 - e^{-2h}}\; z_i .

    The first step and a step of infinite ``h`` use ``D = x̂₀(t_i)``; the step into ``σ = 0`` adds
    no noise. Samples have the path's marginals at every knot up to discretisation error
    (stochastic: ``seed``). Arguments as for :func:`ddim`.

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.
    """
    _check_guidance(guidance)
    grid = _grid(flow, steps, schedule, rho, final, "sde_dpmpp_2m")
    model = DataPrediction(flow, cond, guidance, "sde_dpmpp_2m")
    gen = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    history = History(grid, 1)
    with torch.no_grad():
        for i in range(grid.steps):
            m0 = model(grid.t[i], x)
            lam_s, lam_t = grid.log_snr[i], grid.log_snr[i + 1]
            h = lam_t - lam_s
            decay = math.exp(-h)  # e^{−h} (0 for h = ∞)
            d = m0
            for lam_prev, m_prev in history.points(i):  # at most one: the 2M step
                r = (lam_s - lam_prev) / h
                d = (1 + 0.5 / r) * m0 - (0.5 / r) * m_prev
            x = (grid.sigma[i + 1] / grid.sigma[i] * decay) * x + (grid.alpha[i + 1] * -math.expm1(-2 * h)) * d
            if grid.sigma[i + 1] > 0:
                z = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen)
                x = x + grid.sigma[i + 1] * math.sqrt(-math.expm1(-2 * h)) * z
            history.add(m0)
    return SampleResult(x, model.nfe)
