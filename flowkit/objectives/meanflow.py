r"""MeanFlow: one-step generation by learning the average velocity (Geng et al. 2025).

For a flow ``dz/dt = v(z, t)`` the *average velocity* over ``[r, t]`` along a trajectory is

.. math::  u(z_t, r, t) = \frac{1}{t - r} \int_r^t v(z_\tau, \tau)\, d\tau
           \qquad \text{(Geng et al. 2025, eq. 3)},

so ``z_r = z_t − (t − r) u(z_t, r, t)`` moves a state from ``t`` to ``r`` in one evaluation.
Differentiating ``(t − r) u = ∫_r^t v`` in ``t`` along the trajectory gives the *MeanFlow
identity* (eq. 6)

.. math::  u(z_t, r, t) = v(z_t, t) - (t - r)\, \frac{d}{dt} u(z_t, r, t), \qquad
           \frac{d}{dt} u = v\, \partial_z u + \partial_t u \quad \text{(eq. 8)},

and the network ``u_θ`` is regressed on its right-hand side with the conditional velocity
``v_t = α̇_t x + σ̇_t ε`` of the Gaussian path in place of ``v`` (eqs. 9–10):

.. math::  \mathcal L = \mathbb E\, w\, \big\lVert u_\theta(z_t, r, t) - \operatorname{sg}(u_{\text{tgt}})\big\rVert^2,
           \qquad u_{\text{tgt}} = v_t - (t - r)\big(v_t\, \partial_z u_\theta + \partial_t u_\theta\big).

``du/dt`` is **one** Jacobian–vector product (:func:`torch.func.jvp`) of ``(z, t) ↦ u_θ(z, r, t)``
with tangent ``(v_t, 1)`` (``r`` held fixed), which also returns ``u_θ`` itself; the target is
detached (stop-gradient). ``w = 1 / (‖Δ‖² + c)^p`` (detached) is the paper's adaptive loss
weight (``p = 0``: plain squared loss).

**Time.** Geng et al. write ``z_t = (1 − t) x + t ε`` with data at ``t = 0`` and noise at
``t = 1``, and ``v = ε − x``: that is already flowkit's convention (:mod:`flowkit.flow`), so
times, velocities and the map ``z_r = z_t − (t − r) u`` carry over unchanged (no ``1 − t``).

**(r, t) sampling.** Two times are drawn from the time density (logit-normal, ``(−0.4, 1.0)``
by default, the paper's choice) and sorted so that ``r ≤ t``; on a fraction
``1 − interval_fraction`` of the batch ``r = t`` (the paper's best ratio of ``r ≠ t`` is 25 %),
where the target is the flow-matching one.

**The second time.** flowkit's networks take ``(t, x, cond)``; the interval ``h = t − r`` is
fed as the network's vector condition (built with ``cond_dim = 1``: the paper's ``(t, t − r)``
input). ``r = t`` is the network's *null* condition (NaN, as classifier-free guidance encodes
"no condition"), so the instantaneous velocity ``u(z, t, t) = v(z, t)`` is ``net(t, z)``.
MeanFlow therefore does not take a data condition (labels); it refuses one.

The model
---------
``velocity`` is ``u(z, t, t) = v(z, t)``, the instantaneous velocity of the learned flow: its
ODE is a CNF, so ``flowkit nll`` computes a valid likelihood (``defines_density = True``);
the score, denoiser and forward SDE follow from the path as for flow matching. ``flow_map(x,
t, s) = x − (t − s) u(x, s, t)`` is the one-evaluation map from ``t`` down to ``s``.

References:
    Geng, Deng, Bai, Kolter, He (2025). Mean Flows for One-step Generative Modeling. NeurIPS.
    Lipman, Chen, Ben-Hamu, Nickel, Le (2023). Flow Matching for Generative Modeling. ICLR.

Example:
    >>> from flowkit.dynamics.mlp import MLP
    >>> obj = MeanFlow(lambda **kw: MLP(dim=2, hidden=[16], **kw), (2,))
    >>> out = obj.loss(torch.randn(8, 2))
    >>> out.loss.shape, obj.flow().flow_map(torch.zeros(3, 2), 1.0, 0.0).shape
    (torch.Size([]), torch.Size([3, 2]))
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Mapping, Optional

import torch
from torch import Tensor
from torch.func import jvp

from ..components import OBJECTIVES, PATHS
from ..constraints import FiniteFloat, NonNegativeFloat, PositiveFloat, Range
from ..diffusion import flow_from_velocity
from ..flow import Flow
from ..paths import CondOT, GaussianPath
from ..registry import Registry
from .base import DynamicsFactory, LossOutput, Objective, as_column, per_sample_times
from .flow_matching import sample_times

__all__ = ["MeanFlow"]


@OBJECTIVES.register("meanflow")
class MeanFlow(Objective):
    """MeanFlow (Geng et al. 2025): the average velocity ``u(z, r, t)`` through the MeanFlow identity.

    Args:
        dynamics, shape: set by flowkit; the network is built with ``cond_dim=1`` (it takes
            the interval ``t − r`` as its condition) and must accept that argument.
        path: the Gaussian path (default ``cond_ot``, the paper's).
        time_sampler, logit_mean, logit_std: the density of ``t`` and ``r`` (as for ``cfm``).
        interval_fraction: the fraction of the batch with ``r < t`` (the rest ``r = t``).
        weight_power, weight_eps: ``p`` and ``c`` of the adaptive weight ``1 / (‖Δ‖² + c)^p``.

    Raises:
        TypeError: the dynamics cannot take a vector condition (``cond_dim``).
        ValueError: the recipe's dynamics already have a condition (``num_classes`` / ``cond_dim``).
    """

    nested: ClassVar[Mapping[str, Registry]] = {"path": PATHS}
    provides: ClassVar[frozenset[str]] = frozenset(
        {"velocity", "score", "drift", "diffusion", "denoise", "path", "flow_map"})
    #: u(z, t, t) is the instantaneous velocity: its CNF gives the model's density
    defines_density: ClassVar[bool] = True

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], path: Optional[GaussianPath] = None,
                 time_sampler: Literal["uniform", "logit_normal"] = "logit_normal",
                 logit_mean: FiniteFloat = -0.4, logit_std: PositiveFloat = 1.0,
                 interval_fraction: Annotated[float, Range(0, 1)] = 0.25,
                 weight_power: NonNegativeFloat = 1.0, weight_eps: PositiveFloat = 1e-3) -> None:
        super().__init__(shape)
        if not 0.0 <= interval_fraction <= 1.0:
            raise ValueError(f"interval_fraction must be in [0, 1], got {interval_fraction}")
        if time_sampler not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampler must be uniform or logit_normal, got {time_sampler!r}")
        self.path = CondOT() if path is None else path
        if not isinstance(self.path, GaussianPath):
            raise TypeError(f"path must be a flowkit.paths.GaussianPath, got {type(path).__name__}")
        try:
            self.net = dynamics(cond_dim=1)
        except TypeError as exc:
            raise TypeError(f"dynamics: meanflow feeds the interval t − r to the network as a vector condition "
                            f"(cond_dim=1), which this network does not take ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"dynamics: meanflow uses the network's condition for the interval t − r; remove "
                             f"dynamics.num_classes / cond_dim ({exc})") from None
        self.time_sampler, self.logit_mean, self.logit_std = time_sampler, float(logit_mean), float(logit_std)
        self.interval_fraction = float(interval_fraction)
        self.weight_power, self.weight_eps = float(weight_power), float(weight_eps)

    # ------------------------------------------------------------------ the model
    @staticmethod
    def _interval(t: Tensor, r: Tensor) -> Tensor:
        """The network's condition: ``t − r`` as a column, NaN (the null condition) where ``r = t``."""
        h = t - r
        return torch.where(h > 0, h, torch.full_like(h, float("nan"))).unsqueeze(-1)

    def average_velocity(self, x: Tensor, r: Tensor | float, t: Tensor | float) -> Tensor:
        """``u_θ(x, r, t)``; ``r``, ``t`` scalar or one per sample, ``r ≤ t``."""
        t, r = per_sample_times(t, x), per_sample_times(r, x)
        return self.net(t, x, self._interval(t, r))

    def velocity(self, t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """``v(x, t) = u_θ(x, t, t)`` (the null condition)."""
        _refuse_condition(cond)
        return self.net(t, x)

    def flow_map(self, x: Tensor, t: Tensor | float, s: Tensor | float, cond: Optional[Tensor] = None) -> Tensor:
        """``x_s = x_t − (t − s) u_θ(x_t, s, t)`` for ``s ≤ t``."""
        _refuse_condition(cond)
        t, s = per_sample_times(t, x), per_sample_times(s, x)
        return x - as_column(t - s, x) * self.average_velocity(x, s, t)

    def flow(self) -> Flow:
        """Velocity ``u(z, t, t)``, flow map, and the path's score, denoiser and forward SDE
        (:func:`flowkit.diffusion.flow_from_velocity`)."""
        return flow_from_velocity(self.velocity, self.path, self.shape, flow_map=self.flow_map)

    # ------------------------------------------------------------------ training
    def sample_interval(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, t)``: two draws sorted, then ``r = t`` on a ``1 − interval_fraction`` share."""
        t0, t1 = float(self.path.t0), float(self.path.t1)
        a, b = (sample_times(n, like, t0, t1, self.time_sampler, self.logit_mean, self.logit_std) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.rand(n, dtype=like.dtype, device=like.device) < self.interval_fraction
        return torch.where(keep, r, t), t

    def target(self, z: Tensor, v: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(u_θ(z, r, t), u_tgt)`` with ``u_tgt = v − (t − r)(v ∂_z u_θ + ∂_t u_θ)`` detached;
        ``du/dt`` is one JVP with tangent ``(v, 1)`` (eqs. 8 and 10)."""
        h_null = t <= r

        def u_of(z_: Tensor, t_: Tensor) -> Tensor:
            h = torch.where(h_null, torch.full_like(t_, float("nan")), t_ - r).unsqueeze(-1)
            return self.net(t_, z_, h)

        u, dudt = jvp(u_of, (z, t), (v, torch.ones_like(t)))
        return u, (v - as_column(t - r, z) * dudt).detach()

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        """``mean sg(w) ‖u_θ − sg(u_tgt)‖²``; metrics ``loss`` and ``mse`` (the unweighted ``‖Δ‖²``)."""
        _refuse_condition(cond)
        noise = torch.randn_like(x)
        r, t = self.sample_interval(x.shape[0], x)
        c = self.path.schedule(t)
        z = as_column(c.alpha, x) * x + as_column(c.sigma, x) * noise
        v = as_column(c.d_alpha, x) * x + as_column(c.d_sigma, x) * noise
        u, target = self.target(z, v, r, t)
        sq = (u - target).flatten(1).pow(2).sum(1)
        weight = 1.0 / (sq.detach() + self.weight_eps) ** self.weight_power if self.weight_power else 1.0
        loss = (weight * sq).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "mse": float(sq.detach().mean())})

    def extra_repr(self) -> str:
        return (f"path={self.path!r}, time_sampler={self.time_sampler!r}, interval_fraction="
                f"{self.interval_fraction}, weight_power={self.weight_power}")


def _refuse_condition(cond: Optional[Tensor]) -> None:
    if cond is not None:
        raise ValueError("meanflow takes no data condition (its network's condition carries the interval t − r); "
                         "train it on unlabelled data (no dynamics.num_classes / cond_dim)")
