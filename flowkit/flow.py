"""The one object every objective hands to samplers and likelihood code.

Time convention (the only one in flowkit)
-----------------------------------------
**Data lives at ``t = t0`` (0, or a small ε for diffusions) and the prior at
``t = t1 = T``.** Every vector field is ``field(t, x, cond=None) -> dx/dt`` in this
time. Generation integrates from ``t1`` down to ``t0``; likelihood integrates from
``t0`` up to ``t1``. This is FFJORD's direction (data → base), the score-SDE's
(data at 0, noise at T) and DiffFlow's. Flow-matching papers put noise at 0 and
data at 1; :mod:`flowkit.paths` converts at that edge (``t_fm = 1 − t``).

For a flow ``dx/dt = v(t, x)`` the instantaneous change of variables
(Chen et al. 2018, Thm. 1; FFJORD eq. 2) gives

.. math::  \\log p_{t_0}(x(t_0)) = \\log p_{t_1}(x(t_1)) + \\int_{t_0}^{t_1} \\operatorname{tr}
           \\frac{\\partial v}{\\partial x}(t, x(t))\\, dt .
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["Field", "Schedule", "Prior", "StandardNormal", "TimeGrid", "Flow", "guided", "FieldError", "NonFiniteFieldError"]


class FieldError(ValueError):
    """A field, or the data and options given with it, break the contract of the likelihood API.

    Raised before any solving where possible: ``x`` that is not ``[batch, *event_shape]``, empty
    or non-finite; a field whose output is not shaped like ``x``, is not deterministic, or
    cannot be differentiated; options such as ``n_probes <= 0``. The message names the argument,
    the expected shape and how many samples are bad. The CLI maps it to exit status 2.
    """


class NonFiniteFieldError(FieldError):
    """A field returned NaN or inf (for the data, or at a state reached during a solve).

    A subclass of :class:`FieldError`, so one ``except FieldError`` catches both; the trainer's
    periodic evaluation can catch this one alone to report a diverged model.
    """


class Field(Protocol):
    def __call__(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor: ...


class Schedule(Protocol):
    """What a flow's Gaussian path gives the solvers: ``x_t = α_t x_data + σ_t ε`` and the rates.

    :class:`flowkit.paths.GaussianPath` is the implementation (it imports this module, so the
    protocol stands in for it here)."""

    t0: float
    t1: float

    def alpha(self, t: Tensor) -> Tensor: ...

    def sigma(self, t: Tensor) -> Tensor: ...

    def d_alpha(self, t: Tensor) -> Tensor: ...

    def d_sigma(self, t: Tensor) -> Tensor: ...


class Prior(Protocol):
    shape: tuple[int, ...]

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor: ...

    def log_prob(self, z: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class StandardNormal:
    """Isotropic Gaussian ``N(0, std² I)`` over event ``shape``."""

    shape: tuple[int, ...]
    std: float = 1.0

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        z = torch.randn((n, *self.shape), generator=generator, device=device,
                        dtype=dtype or torch.get_default_dtype())
        return z * self.std

    def log_prob(self, z: Tensor) -> Tensor:
        d = math.prod(self.shape)
        sq = z.flatten(1).pow(2).sum(1) / self.std**2
        return -0.5 * sq - 0.5 * d * math.log(2 * math.pi * self.std**2)


@dataclass(frozen=True)
class TimeGrid:
    r"""The time grid a model was trained on, which step-by-step samplers use by default.

    ``steps + 1`` times from ``t1`` down to ``t0``,

    .. math::  t_k = t_0 + (t_1 - t_0) \left(\frac{k}{\mathrm{steps}}\right)^{\mathrm{power}},
               \qquad k = \mathrm{steps}, \dots, 0,

    uniform for ``power = 1``; DiffFlow's ``L_β`` grid (Zhang & Chen 2021, Sec. 3.3) for
    ``power = β``. A model whose networks only ever saw these times samples best on them.

    Args:
        steps: number of steps ``N >= 1``.
        power: exponent ``β > 0`` of the spacing.

    Raises:
        ValueError: ``steps`` not an integer ``>= 1`` or ``power`` not ``> 0``.

    Example:
        >>> TimeGrid(steps=2, power=2.0).times(0.0, 1.0, like=torch.zeros(()))
        tensor([1.0000, 0.2500, 0.0000])
    """

    steps: int
    power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"TimeGrid.steps must be an integer >= 1, got {self.steps!r}")
        if not float(self.power) > 0 or not math.isfinite(float(self.power)):
            raise ValueError(f"TimeGrid.power must be a finite number > 0, got {self.power!r}")

    def times(self, t0: float, t1: float, like: Tensor) -> Tensor:
        """The ``steps + 1`` times from ``t1`` down to ``t0``, in ``like``'s dtype and device."""
        steps, power = int(self.steps), float(self.power)
        if power == 1.0:
            return torch.linspace(t1, t0, steps + 1, dtype=like.dtype, device=like.device)
        k = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
        return (t0 + (t1 - t0) * k**power).to(dtype=like.dtype, device=like.device)


@dataclass
class Flow:
    """A learned flow of probability mass, ready for sampling and likelihood.

    Attributes:
        velocity: the probability-flow ODE field ``v(t, x, cond)`` on ``[t0, t1]``.
        prior: the density at ``t1``.
        t0, t1: data time and prior time.
        blocks: for stacked CNFs, the fields of the blocks in order from data to prior,
            each on its own ``[t0, t1]``; ``velocity`` is then the first block's field.
        score: ``∇x log p_t(x)`` where the model defines one (diffusion, flow matching).
        drift / diffusion: the forward SDE ``dx = f(t,x) dt + g(t) dw`` whose marginals
            the flow shares; needed by reverse-SDE samplers.
        denoise: Tweedie's ``E[x_data | x_t]`` for a final denoising step, if available.
        time_grid: the :class:`TimeGrid` the model was trained on (DiffFlow's ``L_β`` grid with
            its last ``N``), or ``None`` for a model trained at continuous times; reverse-SDE
            samplers take their ``steps`` and ``grid_power`` from it unless given.
        path: the :class:`~flowkit.paths.GaussianPath` ``x_t = α_t x_data + σ_t ε`` whose marginals
            the flow follows, where it has one (score matching, flow matching, rectified flow); the
            semi-linear solvers (DDIM, DPM-Solver++, UniPC, EDM) need its ``(α_t, σ_t)``.
        flow_map: a learned two-time map ``flow_map(x, t, s, cond) -> x_s`` that moves a state at
            time ``t`` to an earlier time ``s`` in one network evaluation (consistency models,
            MeanFlow); ``None`` where the model only knows the instantaneous field.
    """

    velocity: Field
    prior: Prior
    t0: float = 0.0
    t1: float = 1.0
    blocks: Sequence[Field] = ()
    score: Optional[Field] = None
    drift: Optional[Field] = None
    diffusion: Optional[Callable[[Tensor], Tensor]] = None
    denoise: Optional[Field] = None
    time_grid: Optional[TimeGrid] = None
    path: Optional[Schedule] = None
    flow_map: Optional[Callable[..., Tensor]] = None

    def segments(self) -> list[tuple[Field, float, float]]:
        """``(field, t_start, t_end)`` from data to prior; one per stacked block."""
        fields = list(self.blocks) or [self.velocity]
        return [(f, float(self.t0), float(self.t1)) for f in fields]

    def require(self, *attributes: str, by: str) -> None:
        """Raise a clear error if the flow lacks what a sampler needs."""
        missing = [a for a in attributes if getattr(self, a) is None]
        if missing:
            raise ValueError(f"{by} needs a model that defines {', '.join(missing)}; "
                             f"this one does not (use an ODE sampler instead)")
        if len(self.segments()) > 1 and by != "ode":
            raise ValueError(f"{by} does not support stacked CNF blocks")


def guided(fn: Field, scale: float, null_cond: Optional[Tensor] = None) -> Field:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    ``(1 + w) f(t, x, c) − w f(t, x, ∅)``, with ``∅`` the null condition.

    Both predictions come from one batched call.
    """
    if scale == 0.0:
        return fn

    def field_fn(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        if cond is None:
            return fn(t, x, None)
        null = null_cond_like(cond) if null_cond is None else null_cond.expand_as(cond)
        both = fn(t, torch.cat([x, x]), torch.cat([cond, null]))
        c, u = both.chunk(2)
        return (1 + scale) * c - scale * u

    return field_fn


def null_cond_like(cond: Tensor) -> Tensor:
    """The "no condition" token: label −1 for integer labels, zeros (+ mask) for vectors."""
    if cond.dtype in (torch.int64, torch.int32, torch.long):
        return torch.full_like(cond, -1)
    return torch.full_like(cond, float("nan"))
