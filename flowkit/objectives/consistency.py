r"""Consistency models: consistency training and consistency distillation.

A consistency model (Song, Dhariwal, Chen, Sutskever 2023) learns the map ``f(x_t, t)`` that
sends every point of a probability-flow ODE trajectory to the trajectory's end at the data
time ``t0``, so one network evaluation generates a sample.

Parameterisation (Song et al. 2023, eq. 5, written for any Gaussian path)
--------------------------------------------------------------------------
Song et al. work on the variance-exploding path ``x = x_data + ς ε`` with noise level ``ς``;
a :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε`` is that path for the
scaled state ``x_t / α_t`` at the level ``ς_t = σ_t / α_t``. With ``ς_0 = ς_{t0}`` and
``σ_d`` the data scale (``sigma_data``),

.. math::  f_\theta(x, t) = \alpha_{t_0}\Big[c_{\text{skip}}(\varsigma_t)\, \frac{x}{\alpha_t}
           + c_{\text{out}}(\varsigma_t)\, F_\theta\big(t,\ c_{\text{in}}(\varsigma_t)\, \tfrac{x}{\alpha_t}\big)\Big],

.. math::  c_{\text{skip}} = \frac{\sigma_d^2}{(\varsigma - \varsigma_0)^2 + \sigma_d^2}, \quad
           c_{\text{out}} = \frac{\sigma_d (\varsigma - \varsigma_0)}{\sqrt{\sigma_d^2 + \varsigma^2}}, \quad
           c_{\text{in}} = \frac{1}{\sqrt{\varsigma^2 + \sigma_d^2}}

(Song et al. 2023, Appendix C; EDM's ``c_in``, Karras et al. 2022). At ``t = t0``,
``c_skip = 1`` and ``c_out = 0``: the boundary condition ``f(x, t0) = x`` holds by
construction, exactly (eq. 5). Everything is computed in ``(α, σ)`` form
(``c_in x/α = x / sqrt(σ² + σ_d² α²)``), finite wherever ``α > 0``.

Training (``consistency``, Song et al. 2023 Alg. 3, with Song & Dhariwal 2023)
--------------------------------------------------------------------------------
At training step ``k`` the noise levels are the ``N(k)`` Karras levels (ρ = 7) between
``ς(t0)`` and ``ς(t1)``, mapped back to times of the path. An index ``i`` is drawn, one noise
``z`` makes ``x_{i+1} = α_{i+1} x + σ_{i+1} z`` and ``x_i = α_i x + σ_i z`` (the conditional
ODE's states, the unbiased stand-in for a teacher's ODE step; Song et al. 2023, Thm. 2), and
the loss is ``λ(ς_i) d(f_θ(x_{i+1}, t_{i+1}), sg f_θ(x_i, t_i))``. From *Improved Techniques
for Training Consistency Models* (Song & Dhariwal 2023) this implements:

* **no EMA teacher** (Sec. 3.2): the target network is the stop-gradient of the online one
  (``target_ema = 0``, the default; ``> 0`` restores the original EMA target ``θ⁻``);
* **pseudo-Huber metric** (Sec. 3.3): ``d(x, y) = sqrt(‖x − y‖² + c²) − c`` with
  ``c = 0.00054 sqrt(d)`` (``loss: l2`` gives the squared distance);
* **weighting** ``λ(ς_i) = 1 / (ς_{i+1} − ς_i)`` (Sec. 3.4);
* **lognormal noise levels** (Sec. 3.5): ``p(i) ∝ erf((log ς_{i+1} − P_mean)/(√2 P_std)) −
  erf((log ς_i − P_mean)/(√2 P_std))``, ``P_mean = −1.1``, ``P_std = 2``;
* **exponential discretisation curriculum** (Sec. 3.4, eq. 8): ``N(k) = min(s_0 2^{⌊k/K'⌋},
  s_1) + 1``, ``K' = ⌊K / (log₂⌊s_1/s_0⌋ + 1)⌋``, ``s_0 = 10``, ``s_1 = 1280``; ``K`` is
  ``curriculum_steps`` (set it to ``train.steps``). The step ``k`` is kept in the state dict
  (``after_step``), so a resumed run continues the curriculum.

Not implemented: dropout in the network, the Fourier-noise embedding of the network's time
input (flowkit's dynamics take ``t``).

Distillation (``consistency_distillation``, Song et al. 2023 Alg. 2)
--------------------------------------------------------------------
``x_i`` is instead one step of the teacher's probability-flow ODE from ``(x_{i+1}, t_{i+1})``
to ``t_i`` (``method``: Euler, midpoint, Heun — the paper's — or RK4). The teacher is a trained
run or recipe, handed over by :func:`flowkit.teacher.attach_teacher` as for
``rectified_flow``; it must follow the student's Gaussian path (a teacher flow that declares
its ``path`` is checked). The curriculum, weighting and metric are those of training (fix
``N`` with ``start_scales = end_scales``, as the paper's CD does with ``N = 18``).

The model
---------
:meth:`ConsistencyTraining.flow` provides

* ``flow_map(x, t, s)``: ``s = t0`` gives ``f(x, t)``; for ``s > t0`` the deterministic map
  through ``x`` and ``f``: ``(x̂₀, ε̂)`` solve ``x = α_t x̂₀ + σ_t ε̂`` and
  ``f = α_{t0} x̂₀ + σ_{t0} ε̂``, and ``x_s = α_s x̂₀ + σ_s ε̂`` (DDIM's update, Song, Meng,
  Ermon 2021, eq. 12, with the consistency estimate as ``x̂₀``; for ``σ_{t0} = 0``,
  ``α_{t0} = 1`` it is ``α_s f + σ_s (x − α_t f)/σ_t``). It is exact at ``s = t0`` and ``s = t``;
* ``denoise(t, x)``: that ``x̂₀`` — the model's estimate of the trajectory's end, *not*
  Tweedie's posterior mean (which a consistency model does not learn);
* ``path``: the Gaussian path, for the renoising steps of multistep sampling
  (:func:`flowkit.samplers.flow_map.flow_map`, ``renoise=True``; Song et al. 2023, Alg. 1).

It declares ``defines_density = False`` and has no ``velocity``: ``f`` is a map from noise to
data, not a field whose change of variables gives a density, so the model has no tractable
likelihood; ``flowkit nll`` refuses it rather than print a number.

References:
    Song, Dhariwal, Chen, Sutskever (2023). Consistency Models. ICML.
    Song & Dhariwal (2023). Improved Techniques for Training Consistency Models. ICLR 2024.
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS.
    Song, Meng, Ermon (2021). Denoising Diffusion Implicit Models. ICLR.

Example:
    >>> from flowkit.dynamics.mlp import MLP
    >>> obj = ConsistencyTraining(lambda: MLP(dim=2, hidden=[16]), (2,), curriculum_steps=100)
    >>> out = obj.loss(torch.randn(8, 2))
    >>> out.loss.shape, sorted(out.metrics)
    (torch.Size([]), ['loss', 'scales'])
    >>> x = torch.randn(3, 2)
    >>> torch.equal(obj.consistency(x, torch.zeros(3)), x)  # f(x, t0) = x
    True
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, ClassVar, Literal, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..components import OBJECTIVES, PATHS
from ..constraints import AtLeast, FiniteFloat, PositiveFloat, PositiveInt, Range, Rule
from ..flow import Flow, guided
from ..paths import VE, GaussianPath
from ..registry import Registry
from ..solvers import FIXED_STEP, SolverSpec, odeint
from .base import DynamicsFactory, LossOutput, Objective, as_column, per_sample_times
from .flow_matching import TeacherSpec

__all__ = ["ConsistencyTraining", "ConsistencyDistillation", "TeacherFlow", "karras_levels", "scales_at",
           "lognormal_index_probabilities"]

#: the one-step ODE methods a distillation teacher may take: the fixed-step methods of the solver table
TeacherMethod = Literal[tuple(FIXED_STEP)]  # type: ignore[valid-type]
#: ρ of the Karras noise levels
Rho = Annotated[float, AtLeast(1)]


def karras_levels(lo: float, hi: float, n: int, rho: float = 7.0) -> Tensor:
    r"""``n`` noise levels ``(lo^{1/ρ} + i/(n−1) (hi^{1/ρ} − lo^{1/ρ}))^ρ``, increasing, float64
    (Karras et al. 2022, eq. 5).

    Example:
        >>> karras_levels(0.002, 80.0, 3).tolist()[0], round(karras_levels(0.002, 80.0, 3).tolist()[-1], 10)
        (0.002, 80.0)
    """
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    a, b = lo ** (1 / rho), hi ** (1 / rho)
    levels = (a + i * (b - a)) ** rho
    levels[0], levels[-1] = lo, hi
    return levels


def scales_at(step: int, total: int, start: int = 10, end: int = 1280) -> int:
    r"""The discretisation curriculum (Song & Dhariwal 2023, eq. 8): ``N(k)`` levels at step ``k``.

    ``N(k) = min(s_0 2^{⌊k/K'⌋}, s_1) + 1`` with ``K' = ⌊K / (log₂⌊s_1/s_0⌋ + 1)⌋``.

    Example:
        >>> [scales_at(k, 800) for k in (0, 99, 100, 799)]
        [11, 11, 21, 1281]
    """
    stages = math.floor(math.log2(math.floor(end / start))) + 1
    per_stage = max(total // stages, 1)
    return min(start * 2 ** (step // per_stage), end) + 1


def lognormal_index_probabilities(levels: Tensor, mean: float = -1.1, std: float = 2.0) -> Tensor:
    r"""``p(i) ∝ erf((log ς_{i+1} − P_mean)/(√2 P_std)) − erf((log ς_i − P_mean)/(√2 P_std))``
    for the ``len(levels) − 1`` intervals (Song & Dhariwal 2023, Sec. 3.5)."""
    c = torch.special.erf((torch.log(levels.double()) - mean) / (math.sqrt(2) * std))
    p = (c[1:] - c[:-1]).clamp_min(0)
    return p / p.sum()


@runtime_checkable
class TeacherFlow(Protocol):
    """What consistency distillation is handed (:func:`flowkit.teacher.attach_teacher`): the
    teacher's flow on a device and whether it takes the batch's condition."""

    def teacher_flow(self, device: torch.device) -> tuple[Flow, bool]: ...


@OBJECTIVES.register("consistency")
class ConsistencyTraining(Objective):
    """Consistency training (Song et al. 2023, Alg. 3) with the improvements of Song & Dhariwal (2023).

    Args:
        dynamics, shape: set by flowkit; the network ``F(t, x)`` of the parameterisation.
        path: the Gaussian path (default VE with ``σ_min = 0.002``, ``σ_max = 80``, Song et al.'s
            ``ε`` and ``T``); needs ``α_{t1} > 0`` (for ``cond_ot``, ``t1 < 1``).
        sigma_data: the data scale ``σ_d`` of ``c_skip``, ``c_out``, ``c_in``.
        rho: ρ of the Karras levels.
        start_scales, end_scales: ``s_0`` and ``s_1`` of the curriculum.
        curriculum_steps: ``K``, the training steps the curriculum spans (``train.steps``).
        p_mean, p_std: the lognormal noise-level distribution.
        loss: ``pseudo_huber`` or ``l2`` (squared Euclidean distance).
        huber_c: ``c`` of the pseudo-Huber metric; default ``0.00054 sqrt(dim)``.
        target_ema: EMA decay of the target network (0: stop-gradient of the online network).

    Raises:
        ValueError: a path with ``α_{t1} = 0`` or a noise level that does not grow with ``t``.
    """

    nested: ClassVar[Mapping[str, Registry]] = {"path": PATHS}
    provides: ClassVar[frozenset[str]] = frozenset({"flow_map", "denoise", "path"})
    #: a consistency model is a map from noise to data: no field, so no change of variables
    defines_density: ClassVar[bool] = False
    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("start_scales", "end_scales"), lambda a: a["start_scales"] <= a["end_scales"],
             "need start_scales <= end_scales, got {start_scales}, {end_scales}"),
    )

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], path: Optional[GaussianPath] = None,
                 sigma_data: PositiveFloat = 0.5, rho: Rho = 7.0, start_scales: Annotated[int, AtLeast(2)] = 10,
                 end_scales: Annotated[int, AtLeast(2)] = 1280, curriculum_steps: PositiveInt = 400_000,
                 p_mean: FiniteFloat = -1.1, p_std: PositiveFloat = 2.0,
                 loss: Literal["pseudo_huber", "l2"] = "pseudo_huber", huber_c: Optional[PositiveFloat] = None,
                 target_ema: Annotated[float, Range(0, 1, hi_open=True)] = 0.0) -> None:
        super().__init__(shape)
        self.path = VE(sigma_min=0.002, sigma_max=80.0) if path is None else path
        if not isinstance(self.path, GaussianPath):
            raise TypeError(f"path must be a flowkit.paths.GaussianPath, got {type(path).__name__}")
        if not 2 <= start_scales <= end_scales:
            raise ValueError(f"need 2 <= start_scales <= end_scales, got {start_scales}, {end_scales}")
        if loss not in ("pseudo_huber", "l2"):
            raise ValueError(f"loss must be pseudo_huber or l2, got {loss!r}")
        ends = self._level(torch.tensor([self.path.t0, self.path.t1], dtype=torch.float64))
        if not bool(torch.isfinite(ends).all()) or not float(ends[1]) > float(ends[0]) >= 0:
            raise ValueError(f"objective.path: consistency models need a finite noise level σ/α at both ends "
                             f"(α > 0 at t1) that grows with t; {self.path!r} has {ends.tolist()} "
                             "(for cond_ot set t1 < 1, e.g. 0.995)")
        self.level_range = (float(ends[0]), float(ends[1]))
        self.net = dynamics()
        self.sigma_data, self.rho = float(sigma_data), float(rho)
        self.start_scales, self.end_scales, self.curriculum_steps = int(start_scales), int(end_scales), \
            int(curriculum_steps)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.metric = loss
        self.huber_c = float(huber_c) if huber_c is not None else 0.00054 * math.sqrt(math.prod(self.shape))
        self.target_ema = float(target_ema)
        self.target = copy.deepcopy(self.net).requires_grad_(False) if self.target_ema > 0 else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._grids: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ the parameterisation
    def _level(self, t: Tensor) -> Tensor:
        return self.path.sigma(t) / self.path.alpha(t)

    def consistency(self, x: Tensor, t: Tensor | float, cond: Optional[Tensor] = None,
                    net: Optional[nn.Module] = None) -> Tensor:
        """``f_θ(x, t)`` (module docstring); ``t`` scalar or one per sample; ``f(x, t0) = x``."""
        t = per_sample_times(t, x)
        net = self.net if net is None else net
        t0 = torch.as_tensor(self.path.t0, dtype=x.dtype, device=x.device)
        a0, s0 = self.path.alpha(t0), self.path.sigma(t0)
        a, s = as_column(self.path.alpha(t), x), as_column(self.path.sigma(t), x)
        sd2 = self.sigma_data**2
        gap = s - (s0 / a0) * a  # α (ς − ς_0)
        skip = sd2 * a / (gap * gap + sd2 * a * a)  # c_skip / α
        out = self.sigma_data * gap / torch.sqrt(sd2 * a * a + s * s)  # c_out
        inp = x / torch.sqrt(s * s + sd2 * a * a)  # c_in x / α
        return a0 * (skip * x + out * net(t, inp, cond))

    def _endpoints(self, f: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x̂₀, ε̂)`` with ``x = α_t x̂₀ + σ_t ε̂`` and ``f = α_{t0} x̂₀ + σ_{t0} ε̂``."""
        t0 = torch.as_tensor(self.path.t0, dtype=x.dtype, device=x.device)
        a0, s0 = self.path.alpha(t0), self.path.sigma(t0)
        a, s = as_column(self.path.alpha(t), x), as_column(self.path.sigma(t), x)
        det = a0 * s - s0 * a
        safe = torch.where(det > 0, det, torch.ones_like(det))
        x0 = torch.where(det > 0, (s * f - s0 * x) / safe, f / a0)
        eps = torch.where(det > 0, (a0 * x - a * f) / safe, torch.zeros_like(x))
        return x0, eps

    def flow_map(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Optional[Tensor] = None) -> Tensor:
        """``x_s`` from ``x_t``: ``f(x, t)`` at ``s = t0``, else ``α_s x̂₀ + σ_s ε̂`` (module docstring)."""
        t, s = per_sample_times(t, x), per_sample_times(s, x)
        f = self.consistency(x, t, cond)
        x0, eps = self._endpoints(f, x, t)
        moved = as_column(self.path.alpha(s), x) * x0 + as_column(self.path.sigma(s), x) * eps
        return torch.where(as_column(s <= self.path.t0, x), f, moved)

    def denoise(self, t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """``x̂₀``: the data the consistency estimate ``f(x, t)`` implies (not Tweedie's mean)."""
        t = per_sample_times(t, x)
        return self._endpoints(self.consistency(x, t, cond), x, t)[0]

    def flow(self) -> Flow:
        """Flow map, denoiser and path; no velocity (the model defines no density)."""
        return Flow(velocity=None, prior=self.path.prior(self.shape),  # type: ignore[arg-type]
                    t0=float(self.path.t0), t1=float(self.path.t1), denoise=self.denoise, path=self.path,
                    flow_map=self.flow_map)

    # ------------------------------------------------------------------ training
    def scales(self) -> int:
        """``N(k)``: the number of noise levels at the current training step."""
        return scales_at(int(self.step), self.curriculum_steps, self.start_scales, self.end_scales)

    def grid(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(levels, times, p)`` of ``n`` Karras levels (float64): the times where ``σ_t/α_t``
        takes them (bisection) and the lognormal probabilities of the ``n − 1`` intervals."""
        if n not in self._grids:
            lo, hi = self.level_range
            levels = karras_levels(lo, hi, n, self.rho)
            a = torch.full_like(levels, float(self.path.t0))
            b = torch.full_like(levels, float(self.path.t1))
            for _ in range(64):  # ς(t) increases: bisection to float64 resolution
                mid = 0.5 * (a + b)
                below = self._level(mid) < levels
                a, b = torch.where(below, mid, a), torch.where(below, b, mid)
            times = 0.5 * (a + b)
            times[0], times[-1] = float(self.path.t0), float(self.path.t1)
            self._grids[n] = (levels, times, lognormal_index_probabilities(levels, self.p_mean, self.p_std))
        return self._grids[n]

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample ``d(a, b)``: pseudo-Huber ``sqrt(‖a − b‖² + c²) − c`` or ``‖a − b‖²``."""
        sq = (a - b).flatten(1).pow(2).sum(1)
        if self.metric == "l2":
            return sq
        return torch.sqrt(sq + self.huber_c**2) - self.huber_c

    def pair(self, x: Tensor, noise: Tensor, t_hi: Tensor, t_lo: Tensor,
             cond: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(x_{i+1}, x_i)``: both on the conditional path with one noise (training)."""
        return self.path.sample(x, t_hi, noise), self.path.sample(x, t_lo, noise)

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        """``mean λ(ς_i) d(f_θ(x_{i+1}, t_{i+1}), sg f_θ⁻(x_i, t_i))``; metrics ``loss`` and ``scales`` (N)."""
        n = self.scales()
        levels, times, p = self.grid(n)
        i = torch.multinomial(p, x.shape[0], replacement=True)
        t_lo, t_hi = times[i].to(x), times[i + 1].to(x)
        weight = (1.0 / (levels[i + 1] - levels[i])).to(x)
        x_hi, x_lo = self.pair(x, torch.randn_like(x), t_hi, t_lo, cond)
        pred = self.consistency(x_hi, t_hi, cond)
        with torch.no_grad():
            target = self.consistency(x_lo.detach(), t_lo, cond, net=self.target)
        loss = (weight * self.distance(pred, target)).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "scales": float(n)})

    def after_step(self, step: int) -> None:
        """Advance the curriculum; update the EMA target network where there is one."""
        self.step.fill_(int(step))
        if self.target is not None:
            with torch.no_grad():
                for p_t, p in zip(self.target.parameters(), self.net.parameters()):
                    p_t.lerp_(p.detach(), 1.0 - self.target_ema)

    def extra_repr(self) -> str:
        return (f"path={self.path!r}, sigma_data={self.sigma_data}, scales=({self.start_scales}, "
                f"{self.end_scales}) over {self.curriculum_steps} steps, loss={self.metric!r}, "
                f"target_ema={self.target_ema}")


@OBJECTIVES.register("consistency_distillation")
class ConsistencyDistillation(ConsistencyTraining):
    """Consistency distillation (Song et al. 2023, Alg. 2) from a trained flow on the same path.

    Args:
        dynamics, shape: set by flowkit.
        teacher: run directory of the trained flow, or a recipe ``.yaml`` to train first
            (as for ``rectified_flow``; :mod:`flowkit.teacher`).
        teacher_steps: ``train.steps`` when ``teacher`` is a recipe.
        method: the one-step ODE method from ``t_{i+1}`` to ``t_i`` (Heun in the paper).
        guidance: classifier-free guidance scale applied to a conditional teacher.
        path, sigma_data, rho, start_scales, end_scales, curriculum_steps, p_mean, p_std, loss,
            huber_c, target_ema: as for :class:`ConsistencyTraining` (the paper's CD fixes
            ``N = 18`` and uses an EMA target, ``μ = 0.95``).
    """

    needs_teacher: ClassVar[bool] = True

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], teacher: str,
                 teacher_steps: Optional[PositiveInt] = None, method: TeacherMethod = "heun",
                 guidance: FiniteFloat = 0.0, path: Optional[GaussianPath] = None,
                 sigma_data: PositiveFloat = 0.5, rho: Rho = 7.0, start_scales: Annotated[int, AtLeast(2)] = 18,
                 end_scales: Annotated[int, AtLeast(2)] = 18, curriculum_steps: PositiveInt = 400_000,
                 p_mean: FiniteFloat = -1.1, p_std: PositiveFloat = 2.0,
                 loss: Literal["pseudo_huber", "l2"] = "pseudo_huber", huber_c: Optional[PositiveFloat] = None,
                 target_ema: Annotated[float, Range(0, 1, hi_open=True)] = 0.0) -> None:
        super().__init__(dynamics, shape, path=path, sigma_data=sigma_data, rho=rho, start_scales=start_scales,
                         end_scales=end_scales, curriculum_steps=curriculum_steps, p_mean=p_mean, p_std=p_std,
                         loss=loss, huber_c=huber_c, target_ema=target_ema)
        self.teacher_spec = TeacherSpec(str(teacher), teacher_steps, SolverSpec(method, steps=1), float(guidance))
        self._teacher: Optional[_Shared] = None

    def attach_teacher(self, teacher: TeacherFlow) -> None:
        """Hand over the teacher (:func:`flowkit.teacher.attach_teacher` does)."""
        if not isinstance(teacher, TeacherFlow):
            raise TypeError(f"consistency distillation needs a teacher with teacher_flow(device) -> (flow, "
                            f"conditional) (flowkit.teacher.attach_teacher), got {type(teacher).__name__}")
        self._teacher = _Shared(teacher)

    def teacher_step(self, x_hi: Tensor, t_hi: Tensor, t_lo: Tensor, cond: Optional[Tensor]) -> Tensor:
        """One step of the teacher's probability-flow ODE from ``(x_hi, t_hi)`` to ``t_lo`` (per sample)."""
        if self._teacher is None:
            raise RuntimeError(f"the distillation teacher {self.teacher_spec.source} is not attached: build the "
                               "objective from a recipe (flowkit.build, `flowkit train`), or call "
                               "flowkit.teacher.attach_teacher(objective[, flow])")
        flow, conditional = self._teacher.teacher.teacher_flow(x_hi.device)
        if flow.path is not None and repr(flow.path) != repr(self.path):
            raise ValueError(f"objective.teacher: the teacher follows {flow.path!r}, the student {self.path!r}; "
                             "set objective.path to the teacher's path")
        field = guided(flow.velocity, self.teacher_spec.guidance) if self.teacher_spec.guidance else flow.velocity
        c = cond if conditional else None
        h = as_column(t_lo - t_hi, x_hi)

        def rescaled(u: Tensor, y: Tensor) -> Tensor:  # u ∈ [0, 1] ↦ t_hi + u (t_lo − t_hi)
            return h * field(t_hi + u * (t_lo - t_hi), y, c)

        with torch.no_grad():
            return odeint(rescaled, x_hi, [0.0, 1.0], self.teacher_spec.solver).ys[-1]

    def pair(self, x: Tensor, noise: Tensor, t_hi: Tensor, t_lo: Tensor,
             cond: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(x_{i+1}, x̂_i)``: ``x̂_i`` one teacher ODE step from ``x_{i+1}`` (Alg. 2)."""
        x_hi = self.path.sample(x, t_hi, noise)
        return x_hi, self.teacher_step(x_hi, t_hi, t_lo, cond)


class _Shared:
    """Holds the teacher; copies of the objective (the trainer's EMA) share it, never clone it."""

    def __init__(self, teacher: TeacherFlow) -> None:
        self.teacher = teacher

    def __deepcopy__(self, memo: dict[int, object]) -> "_Shared":
        return self
