r"""Conditional flow matching on Gaussian paths, Schrödinger-bridge CFM and rectified flow.

One path, two readings
----------------------
A :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε`` is both a diffusion's
forward process and a flow-matching interpolant. Conditional flow matching (Lipman et al.
2023, Thm. 2; Tong et al. 2024) regresses a network ``v_θ(t, x)`` on the velocity of the
path *given its end points*,

.. math::  \mathcal L(\theta) = \mathbb E_{t, (x_{\text{data}}, \varepsilon) \sim q}
           \big\lVert v_\theta(t, x_t) - (\dot\alpha_t\, x_{\text{data}} + \dot\sigma_t\, \varepsilon)\big\rVert^2 ,

whose minimiser is the marginal velocity ``E[α̇ x_data + σ̇ ε | x_t]`` — the probability-flow
ODE of the path's marginals (:meth:`~flowkit.paths.GaussianPath.velocity_from_score`). The
squared norm is summed over the event dimensions and averaged over the batch.

**Time.** Everything here is in flowkit time (:mod:`flowkit.flow`): data at ``t0``, noise at
``t1``. The network predicts ``dx/dt`` in that time, so for ``cond_ot`` (``α = 1 − t``,
``σ = σ_min + (1 − σ_min) t``) the target is ``(1 − σ_min) ε − x_data``, the negative of
the flow-matching papers' ``u`` in their time ``t_fm = 1 − t``.

Because the network *is* a velocity on a Gaussian path, :meth:`CFM.flow` also derives the
score (:meth:`~flowkit.paths.GaussianPath.score_from_velocity`), Tweedie's denoiser and the
path's forward SDE, so reverse-SDE samplers and likelihood code work on a flow-matching
model unchanged (score and SDE need ``t`` away from a singular end; see :mod:`flowkit.paths`).

Times are drawn uniformly on ``[t0, t1]`` or from the logit-normal density of Esser et al.
(2024, eq. 19), ``t = sigmoid(m + s n)``, ``n ~ N(0, 1)``; their rectified-flow time has
data at 0 like flowkit's, so ``logit_mean > 0`` favours the noisier half there too.

Couplings
---------
``coupling`` (:mod:`flowkit.couplings`) pairs each data batch with noise before the loss:
``independent`` (I-CFM), ``exact_ot`` (OT-CFM, a permutation) or ``sinkhorn``. With integer
labels and ``cond_dropout > 0`` the condition is dropped *after* coupling, so the
unconditional model sees the same pairs.

Schrödinger-bridge CFM
----------------------
``sbcfm`` (Tong et al. 2024, Sec. 3.3) couples with entropic OT at ``reg = 2σ²`` and uses
the Brownian bridge between the paired points, written in flowkit time as

.. math::  x_t = (1 - t)\, x_{\text{data}} + t\, \varepsilon + \sigma \sqrt{t (1 - t)}\, z,
           \qquad u_t = \varepsilon - x_{\text{data}} + \sigma \frac{1 - 2t}{2 \sqrt{t(1 - t)}}\, z ,

``z ~ N(0, I)``. This is not an affine path of ``(x_data, ε)`` alone, so it lives in the
objective rather than in :data:`~flowkit.components.PATHS`; its flow has a velocity and the
``N(0, I)`` prior (``x_1 = ε``) but no score conversion, so sample it with ODE samplers.

Rectified flow
--------------
``rectified_flow`` (Liu et al. 2023, "reflow") trains the same loss on the deterministic
coupling ``(teacher(ε), ε)`` of a trained flow (:class:`~flowkit.couplings.Teacher`) with
the straight ``cond_ot`` path: the new flow is straighter and needs fewer steps. The objective
names its teacher (a run directory or a recipe); the application loads it and hands it over
(:mod:`flowkit.teacher`), so this module neither loads runs nor integrates ODEs.

References:
    Lipman, Chen, Ben-Hamu, Nickel, Le (2023). Flow Matching for Generative Modeling. ICLR.
    Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf, Bengio (2024). Improving and
    Generalizing Flow-Based Generative Models with Minibatch Optimal Transport. TMLR.
    Liu, Gong, Liu (2023). Flow Straight and Fast: Learning to Generate and Transfer Data
    with Rectified Flow. ICLR.
    Esser et al. (2024). Scaling Rectified Flow Transformers for High-Resolution Image
    Synthesis. ICML.
    Ho & Salimans (2022). Classifier-Free Diffusion Guidance.

Example:
    >>> from flowkit.dynamics.mlp import MLP
    >>> from flowkit.couplings import ExactOT
    >>> obj = CFM(lambda: MLP(dim=2, hidden=[32]), (2,), coupling=ExactOT())
    >>> out = obj.loss(torch.randn(16, 2))
    >>> out.loss.shape, obj.flow().t1
    (torch.Size([]), 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..components import COUPLINGS, OBJECTIVES, PATHS
from ..constraints import DropProbability, FiniteFloat, PositiveFloat, PositiveInt
from ..couplings import Coupling, Independent, Sinkhorn, Teacher, TeacherMap
from ..diffusion import flow_from_velocity
from ..flow import Flow, StandardNormal
from ..paths import EDGE, CondOT, GaussianPath
from ..registry import Registry
from ..solvers import ODEMethod, SolverSpec, StepCount, Tolerance
from .base import DynamicsFactory, LossOutput, Objective, drop_condition

__all__ = ["CFM", "SBCFM", "RectifiedFlow", "TeacherSpec", "sample_times"]

TimeSampler = Literal["uniform", "logit_normal"]


def sample_times(n: int, like: Tensor, t0: float, t1: float, sampler: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """``n`` times in ``[t0, t1]``: uniform, or ``t0 + (t1 − t0) sigmoid(m + s N(0, 1))``."""
    if sampler == "uniform":
        u = torch.rand(n, dtype=like.dtype, device=like.device)
    elif sampler == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, dtype=like.dtype, device=like.device))
    else:
        raise ValueError(f"unknown time sampler {sampler!r}; choose uniform or logit_normal")
    return u if (t0, t1) == (0.0, 1.0) else t0 + (t1 - t0) * u


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1)))


@OBJECTIVES.register("cfm")
class CFM(Objective):
    """Conditional flow matching on an affine Gaussian path (I-CFM / OT-CFM / any path).

    Args:
        dynamics, shape: set by flowkit from the recipe's ``dynamics`` and ``data``.
        path: the probability path (``{name: cond_ot, sigma_min: ...}``, ``cosine``,
            ``polynomial``, ``vp``); default ``cond_ot`` with ``σ_min = 0``.
        coupling: how data and noise are paired (``independent``, ``exact_ot``, ``sinkhorn``).
        time_sampler: ``uniform`` on ``[t0, t1]`` or ``logit_normal`` (Esser et al. 2024).
        logit_mean, logit_std: location and scale of the logit-normal time density.
        cond_dropout: probability of replacing the condition by the null condition
            (classifier-free guidance training).
    """

    nested: ClassVar[Mapping[str, Registry]] = {"path": PATHS, "coupling": COUPLINGS}
    # the velocity of a Gaussian path gives its score, denoiser and forward SDE (see flow())
    provides: ClassVar[frozenset[str]] = frozenset({"velocity", "score", "drift", "diffusion", "denoise", "path"})
    #: Tong et al. 2024 (2-D experiments) and recipes/{cfm,otcfm,reflow}_8gaussians.yaml: Adam 1e-3, batch 256
    training_defaults: ClassVar[Mapping[str, Any]] = {"lr": 1e-3, "batch_size": 256}

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...],
                 path: Optional[GaussianPath] = None, coupling: Optional[Coupling] = None,
                 time_sampler: TimeSampler = "uniform", logit_mean: FiniteFloat = 0.0,
                 logit_std: PositiveFloat = 1.0, cond_dropout: DropProbability = 0.0) -> None:
        super().__init__(shape)
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        if time_sampler not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampler must be uniform or logit_normal, got {time_sampler!r}")
        if path is not None and not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowkit.paths.GaussianPath, got {type(path).__name__}")
        self.net = dynamics()
        self.path = CondOT() if path is None else path
        self.coupling = Independent() if coupling is None else coupling
        self.time_sampler, self.logit_mean, self.logit_std = time_sampler, float(logit_mean), float(logit_std)
        self.cond_dropout = float(cond_dropout)

    # ------------------------------------------------------------------ training
    def time_range(self) -> tuple[float, float]:
        """The interval times are drawn from."""
        return float(self.path.t0), float(self.path.t1)

    def conditional(self, x_data: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, target)``: the point on the conditional path and its velocity ``dx_t/dt``."""
        if type(self.path) is CondOT:  # the same formulas in fewer kernels (the hot path)
            s_min = self.path.sigma_min
            tt = _per_sample(t, x_data)
            if s_min == 0.0:
                return torch.lerp(x_data, noise, tt), noise - x_data
            return torch.lerp(x_data, noise * (1 - s_min), tt) + s_min * noise, (1 - s_min) * noise - x_data
        c = self.path.schedule(t)
        alpha, sigma = _per_sample(c.alpha, x_data), _per_sample(c.sigma, x_data)
        d_alpha, d_sigma = _per_sample(c.d_alpha, x_data), _per_sample(c.d_sigma, x_data)
        return torch.addcmul(alpha * x_data, sigma, noise), torch.addcmul(d_alpha * x_data, d_sigma, noise)

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        noise = torch.randn_like(x)
        x, noise = self.coupling(x, noise, cond)
        t0, t1 = self.time_range()
        t = sample_times(x.shape[0], x, t0, t1, self.time_sampler, self.logit_mean, self.logit_std)
        x_t, target = self.conditional(x, noise, t)
        if self.training:
            cond = drop_condition(cond, self.cond_dropout)
        pred = self.net(t, x_t, cond)
        loss = F.mse_loss(pred, target, reduction="sum") / x.shape[0]
        return LossOutput(loss)

    # ------------------------------------------------------------------ the model
    def flow(self) -> Flow:
        """Velocity = the network; score, denoiser and forward SDE through the path
        (:func:`flowkit.diffusion.flow_from_velocity`)."""
        return flow_from_velocity(self.net, self.path, self.shape)


@OBJECTIVES.register("sbcfm")
class SBCFM(CFM):
    """Schrödinger-bridge CFM (Tong et al. 2024): Sinkhorn coupling and a Brownian bridge.

    Pairs by entropic OT at ``reg = 2σ²`` and regresses on the Brownian bridge of variance
    ``σ² t (1 − t)`` between the paired points.

    Args:
        dynamics, shape: set by flowkit.
        sigma: bridge noise ``σ > 0``.
        coupling: default ``sinkhorn`` with ``reg = 2σ²``; any coupling may be given.
        time_sampler, logit_mean, logit_std, cond_dropout: as for :class:`CFM`.
    """

    nested: ClassVar[Mapping[str, Registry]] = {"coupling": COUPLINGS}
    # the Brownian bridge is not an affine Gaussian path: no score conversion (ODE samplers only)
    provides: ClassVar[frozenset[str]] = frozenset({"velocity"})

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], sigma: PositiveFloat = 0.5,
                 coupling: Optional[Coupling] = None, time_sampler: TimeSampler = "uniform",
                 logit_mean: FiniteFloat = 0.0, logit_std: PositiveFloat = 1.0,
                 cond_dropout: DropProbability = 0.0) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        super().__init__(dynamics, shape, path=CondOT(),
                         coupling=Sinkhorn(reg=2 * sigma**2) if coupling is None else coupling,
                         time_sampler=time_sampler, logit_mean=logit_mean, logit_std=logit_std,
                         cond_dropout=cond_dropout)
        self.sigma = float(sigma)

    def time_range(self) -> tuple[float, float]:
        return EDGE, 1.0 - EDGE  # the bridge's σ̇ is singular at both ends

    def conditional(self, x_data: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _per_sample(t, x_data)
        z = torch.randn_like(x_data)
        root = torch.sqrt(t * (1 - t))
        x_t = (1 - t) * x_data + t * noise + self.sigma * root * z
        target = noise - x_data + (self.sigma * (1 - 2 * t) / (2 * root)) * z
        return x_t, target

    def flow(self) -> Flow:
        """The bridge's probability-flow velocity and its ``N(0, I)`` prior (no score)."""
        return Flow(velocity=self.net, prior=StandardNormal(self.shape), t0=0.0, t1=1.0)


@dataclass(frozen=True)
class TeacherSpec:
    """What a ``rectified_flow`` objective asks of its teacher, as its recipe gives it.

    :func:`flowkit.teacher.attach_teacher` turns it into the map its :class:`Teacher`
    coupling is handed.

    Attributes:
        source: run directory of the trained flow, or a recipe ``.yaml`` to train first.
        train_steps: ``train.steps`` for a recipe teacher (``None``: the recipe's own).
        solver: the solver integrating the teacher from noise to data.
        guidance: classifier-free guidance scale applied to a conditional teacher.
    """

    source: str
    train_steps: Optional[int] = None
    solver: SolverSpec = SolverSpec()
    guidance: float = 0.0


@OBJECTIVES.register("rectified_flow")
class RectifiedFlow(CFM):
    """Rectified flow / reflow (Liu et al. 2023): CFM on a trained flow's pairs (teacher(ε), ε).

    The path defaults to the straight ``cond_ot``.

    The data batch only supplies the batch size and, for a conditional teacher, the labels.
    The objective declares ``needs_teacher``: whoever builds it hands the teacher over
    (:func:`flowkit.teacher.attach_teacher`; :func:`flowkit.build` does, lazily, so the
    teacher is loaded — or trained — at the first batch and never for sampling a student).

    Args:
        dynamics, shape: set by flowkit.
        teacher: run directory of the trained flow, or a recipe ``.yaml`` to train first
            (see :mod:`flowkit.teacher`).
        teacher_steps: ``train.steps`` when ``teacher`` is a recipe (default: its own).
        method, steps, rtol, atol: the solver integrating the teacher from noise to data, kept
            as one :class:`~flowkit.solvers.SolverSpec` in ``teacher_spec.solver`` (any method
            of :data:`flowkit.solvers.METHODS`; ``steps`` is used by the fixed-step ones,
            ``rtol``/``atol`` by the adaptive ones).
        guidance: classifier-free guidance scale applied to a conditional teacher.
        path, time_sampler, logit_mean, logit_std, cond_dropout: as for :class:`CFM`.
    """

    nested: ClassVar[Mapping[str, Registry]] = {"path": PATHS}
    #: the application hands this objective its teacher (flowkit.teacher.attach_teacher)
    needs_teacher: ClassVar[bool] = True

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], teacher: str,
                 teacher_steps: Optional[PositiveInt] = None,
                 method: ODEMethod = "dopri5",
                 steps: StepCount = 16, rtol: Tolerance = 1e-5, atol: Tolerance = 1e-5,
                 guidance: FiniteFloat = 0.0, path: Optional[GaussianPath] = None,
                 time_sampler: TimeSampler = "uniform", logit_mean: FiniteFloat = 0.0,
                 logit_std: PositiveFloat = 1.0, cond_dropout: DropProbability = 0.0) -> None:
        if teacher_steps is not None and teacher_steps < 1:
            raise ValueError(f"teacher_steps must be >= 1, got {teacher_steps}")
        spec = TeacherSpec(str(teacher), teacher_steps, SolverSpec(method, rtol=rtol, atol=atol, steps=steps),
                           float(guidance))
        super().__init__(dynamics, shape, path=path, coupling=Teacher(source=spec.source),
                         time_sampler=time_sampler, logit_mean=logit_mean, logit_std=logit_std,
                         cond_dropout=cond_dropout)
        self.teacher_spec = spec

    def attach_teacher(self, transport: TeacherMap) -> None:
        """Hand over the teacher's map ``(noise, cond) -> data`` (see :class:`Teacher`)."""
        self.coupling.attach(transport)
