r"""DiffFlow: a diffusion normalizing flow, trained by a discretised trajectory KL.

Zhang & Chen (2021), "Diffusion Normalizing Flow"; equation numbers are that paper's.
Time runs as in the rest of flowkit: data at ``t = 0``, the prior at ``t = T``.

Model
-----
Two networks from the recipe's ``dynamics`` section, a learnable forward drift
``f_θ(t, x)`` and a backward score ``s_θ(t, x)``, define

.. math::  dx = f_θ(t, x)\, dt + g(t)\, dw                       \quad\text{(forward, eq. 8)}
.. math::  dx = [f_θ(t, x) - g(t)^2 s_θ(t, x)]\, dt + g(t)\, d\bar w \quad\text{(backward, eq. 9)}

with a fixed diffusion ``g`` (constant, or linear from ``g`` to ``g_end``).

Discretisation and loss
-----------------------
On a grid ``0 = t_0 < … < t_N = T`` with ``Δ_i = t_{i+1} − t_i``, ``g_i = g(t_i)``, the
forward process is sampled by Euler–Maruyama (eq. 11),

.. math::  x_{i+1} = x_i + f_θ(t_i, x_i) Δ_i + g_i \sqrt{Δ_i}\, ξ_i, \qquad ξ_i \sim N(0, I),

and the backward kernel is the Euler–Maruyama step of eq. 9 from ``t_{i+1}`` (eq. 12),
``p_B(x_i | x_{i+1}) = N(x_{i+1} − [f_{i+1} − g_{i+1}^2 s_{i+1}](x_{i+1}) Δ_i,\ g_{i+1}^2 Δ_i I)``.
Its standardised residual on a forward trajectory ``τ`` is (eq. 14)

.. math::  δ_i^B(τ) = \frac{x_i - x_{i+1} + [f_θ(t_{i+1}, x_{i+1}) - g_{i+1}^2 s_θ(t_{i+1}, x_{i+1})] Δ_i}
                          {g_{i+1} \sqrt{Δ_i}} .

The trajectory KL (eq. 13) ``KL(p_F(τ) ‖ p_B(τ))`` expands, with both kernels Gaussian, into

.. math::  \mathbb E_{p_F}\Big[\log p_0(x_0) - \log p_B(x_N)
           + \sum_i \tfrac12 \lVert δ_i^B \rVert^2 - \sum_i \tfrac12 \lVert ξ_i \rVert^2
           + d \sum_i \log \tfrac{g_{i+1}}{g_i}\Big].

``ξ_i`` is the reparameterised forward noise (``δ_i^F`` in the paper), independent of θ;
``p_0`` (data) and the ``g`` ratios are constants too, which leaves the loss of eq. 15,

.. math::  L = \mathbb E_{τ \sim p_F}\Big[-\log p_B(x_N) + \sum_{i=0}^{N-1} \tfrac12 \lVert δ_i^B(τ)\rVert^2\Big].

**The value reported** (and returned as ``loss``) is eq. 15 minus the θ-free terms
``½ Σ‖ξ_i‖² − d log(g_N / g_0)`` of the sampled trajectory: the gradient is exactly eq. 15's,
and the value is the per-trajectory log-ratio ``log p_F(τ | x_0) − log p_B(τ)``, whose mean
is an upper bound on the negative log-likelihood (nats) of the discrete backward model
(Jensen; the negative ELBO). It no longer grows like ``N d / 2`` with the number of steps
and has far lower variance. As ``g → 0`` (with ``Δ³/g² → 0``) it becomes the NLL of the
discrete flow ``x ↦ x + f Δ`` on the same trajectory (Theorem 1): expanding ``f_{i+1}(x_{i+1})``
around ``x_i``, ``δ_i^B = −ξ_i + Δ_i (∂f/∂x) ξ_i + O(Δ_i^{3/2}/g) + O(g √Δ_i)``, so
``E[½‖δ_i^B‖² − ½‖ξ_i‖²] = −Δ_i tr ∂f/∂x + O(Δ_i²) + O(Δ_i³/g²)
= −log|det(I + Δ_i ∂f/∂x)| + …`` (checked in ``tests/test_diffflow.py``).

Prior
-----
``p_B = N(0, σ_T² I)``. The drift is learned, so the law of ``x_N`` is whatever ``f_θ``
makes it and ``−log p_B(x_N)`` pulls it onto ``p_B``; any ``σ_T`` can be reached. The
default, ``σ_T² = 1 + ∫_0^T g(t)² dt``, is the variance at ``T`` of the forward SDE with
zero drift started from unit-variance data, so a freshly initialised (near-zero) drift
starts close to its prior whatever ``g`` and ``T`` are; for DiffFlow's small-noise 2-D
settings (``g = 0.2, T = 0.05``) it is ``N(0, 1.002 I)``, the paper's standard normal.
``prior_std`` sets ``σ_T`` directly.

Time grids and the progressive schedule (Sec. 3.3)
--------------------------------------------------
``grid: fixed`` (``L_β``) uses ``t_i = T (i/N)^β``. ``grid: random`` (``L̂_β``) draws, once
per batch, each interior time uniformly in its cell of the fixed grid, between the
midpoints of its two neighbouring intervals (the ends ``0`` and ``T`` stay put), so the
times stay ordered and every step is at least half the smaller of its neighbours; the
networks see every time in ``(0, T]``, and a sampler may use any grid near ``L_β``.
``steps: [5, 10, 20, 30]`` with ``milestones: [m1, m2, m3]`` trains with ``N = 5`` until
``m1`` optimiser steps are done, then ``N = 10`` and so on (:meth:`DiffFlow.after_step`);
the step count is saved with the weights, so a resumed run continues on schedule.

Gradients: stochastic adjoint (Algorithm 2)
-------------------------------------------
``gradient: adjoint`` runs the forward trajectory without a graph and keeps only the
states ``x_0 … x_N`` (``(N + 1) · B · d`` numbers; the noise is not needed, since
``x_{i+1}`` is known). Write the per-sample loss as ``Φ(x_N) + Σ_i c_i(x_i, x_{i+1})``
with ``c_i = ½‖δ_i^B‖²`` and ``x_{i+1} = F_i(x_i) = x_i + f(t_i, x_i) Δ_i + g_i √Δ_i ξ_i``.
The networks evaluated at node ``i``, ``f(t_i, x_i)`` and ``s(t_i, x_i)``, enter only
``F_i`` and ``c_{i−1}``, so walking back from ``i = N`` with the adjoint
``a_{i+1} = dL/dx_{i+1}``, each node is recomputed once with a graph and one
vector–Jacobian product of

.. math::  J_i = Δ_i \langle a_{i+1}, f(t_i, x_i)\rangle + c_{i-1}(x_{i-1}, x_i)

gives ``∂J_i/∂θ`` (accumulated) and ``a_i = a_{i+1} + ∂J_i/∂x_i + ∂c_i/∂x_i``, the last term
being ``δ_i^B / (g_{i+1} √Δ_i)`` from the node before (node ``N`` starts with
``J_N = Φ(x_N) + c_{N−1}``). The gradients are those of backpropagation through the
unrolled trajectory up to rounding, at the cost of one extra forward pass without a
graph; memory holds one node's graph at a time (and no small tensor of a node outlives
it, so the allocator reuses its memory and the process's peak RSS stays flat in ``N``,
see ``bench/diffflow_timing.py``). It is a ``torch.autograd.Function``,
so ``loss.backward()`` (and DDP's hooks) work as for any loss. ``gradient: naive``
backpropagates through the unrolled loop (the test oracle).

Sampling and likelihood
-----------------------
:meth:`DiffFlow.flow` gives the probability-flow ODE ``v = f_θ − ½ g² s_θ`` (λ = 0 of
eq. 16) for ODE samplers and ``flowkit nll``, and ``score``, ``drift``, ``diffusion`` for
:func:`~flowkit.samplers.sde.euler_maruyama` (``noise_scale`` λ of eq. 16). The flow declares
its training grid as ``time_grid`` (the ``L_β`` grid with the schedule's last ``N``), which
``euler_maruyama`` samples on unless ``steps`` or ``grid_power`` are given. There is no Tweedie denoiser: ``E[x_0 | x_t] = (x_t +
σ_t² s)/α_t`` needs a Gaussian transition kernel, which a learned nonlinear drift does not
have. ``flow.denoise`` is therefore ``None`` and a sampler's ``denoise: true`` takes the
last reverse step without noise — the mean of the learned backward kernel ``p_B(x_0 |
x_1)`` (eq. 12), which is the one-step Tweedie estimate of ``x_0``.

References:
    Zhang & Chen (2021). Diffusion Normalizing Flow. NeurIPS.
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole (2021). Score-Based Generative
    Modeling through Stochastic Differential Equations. ICLR.
    Li, Wong, Chen, Duvenaud (2020). Scalable Gradients for Stochastic Differential
    Equations. AISTATS.

Example:
    >>> from flowkit.dynamics.mlp import MLP
    >>> obj = DiffFlow(lambda **kw: MLP(dim=2, **{"hidden": [32], **kw}), (2,),
    ...                steps=[5, 10], milestones=[100], score_hidden=[16])
    >>> out = obj.loss(torch.randn(64, 2))
    >>> out.loss.backward()
    >>> (out.metrics["steps"], obj.flow().t1)
    (5.0, 0.05)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..components import OBJECTIVES
from ..constraints import DropProbability, NonEmpty, PositiveFloat, PositiveInt, Rule
from ..flow import Flow, StandardNormal, TimeGrid
from .base import DynamicsFactory, LossOutput, Objective, drop_condition

__all__ = ["DiffFlow", "Trajectory", "power_grid", "randomised_grid"]


def power_grid(steps: int, end_time: float, beta: float, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """DiffFlow's ``L_β`` grid ``t_i = T (i/N)^β``, ``i = 0 … N`` (``[N + 1]``)."""
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    return (end_time * i**beta).to(dtype=dtype, device=device)


def randomised_grid(steps: int, end_time: float, beta: float, *, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """DiffFlow's ``L̂_β``: each interior time of :func:`power_grid` drawn uniformly between the
    midpoints of its neighbouring intervals; ``t_0 = 0`` and ``t_N = T`` fixed. Ordered."""
    fixed = power_grid(steps, end_time, beta, dtype=torch.float64)
    if steps > 1:
        mid = 0.5 * (fixed[1:] + fixed[:-1])  # [N]: midpoint of each interval
        lo, hi = mid[:-1], mid[1:]  # cell of interior node i = 1 … N − 1
        u = torch.rand(steps - 1, generator=generator, dtype=torch.float64)
        fixed = torch.cat([fixed[:1], lo + u * (hi - lo), fixed[-1:]])
    return fixed.to(dtype=dtype, device=device)


@dataclass
class Trajectory:
    """Per-sample eq. 15 loss ``[B]`` (differentiable) and the final state ``x_N`` (detached)."""

    loss: Tensor
    x_end: Tensor


def _sq(v: Tensor) -> Tensor:
    return v.flatten(1).pow(2).sum(1)


def _per_sample(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape(-1, *([1] * (like.dim() - 1)))


class _StochasticAdjoint(torch.autograd.Function):
    """Eq. 15 per sample with gradients by the stochastic adjoint (module docstring)."""

    @staticmethod
    def forward(ctx: Any, model: "DiffFlow", x0: Tensor, times: Tensor, noise: Tensor,
                cond: Optional[Tensor], *params: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            states, x_end, loss = model._rollout(x0, times, noise, cond, keep=True)
        ctx.model, ctx.cond = model, cond
        device = x0.device.type  # recompute under the forward's autocast state
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(states, times)
        x_end = x_end.clone()
        ctx.mark_non_differentiable(x_end)
        return loss, x_end

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_end: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        model, cond = ctx.model, ctx.cond
        states, times = ctx.saved_tensors
        n = times.shape[0] - 1
        params = [*model.drift.parameters(), *model.score.parameters()]  # the order of apply's
        n_drift = sum(1 for _ in model.drift.parameters())
        grads: list[Optional[Tensor]] = [None] * len(params)
        dts = times[1:] - times[:-1]
        gs = model.diffusion(times)
        w = _per_sample(grad_loss, states[0])

        def accumulate(new: Sequence[Optional[Tensor]]) -> None:
            for k, g in enumerate(new):
                if g is not None:  # the first is copied: autograd may return a tensor it aliases
                    grads[k] = g.clone() if grads[k] is None else grads[k].add_(g)

        device, autocast, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast):
            # node N: J_N = Φ(x_N) + c_{N-1}
            x = states[n].detach().requires_grad_(True)
            f, s = model._nets(times[n], x, cond)
            delta = model._residual(states[n - 1], x, f, s, gs[n], dts[n - 1])
            phi = -model.prior.log_prob(x)
            j = (grad_loss * (phi + 0.5 * _sq(delta))).sum()
            out = torch.autograd.grad(j, [x, *params], allow_unused=True)
            adj = out[0]
            accumulate(out[1:])
            carry = torch.empty_like(adj)  # reused in place: see _rollout on fragmentation
            torch.mul(w, delta.detach(), out=carry).div_(gs[n] * dts[n - 1].sqrt())
            # nodes N-1 … 1: J_i = Δ_i <a_{i+1}, f_i> + c_{i-1}
            for i in range(n - 1, 0, -1):
                x = states[i].detach().requires_grad_(True)
                f, s = model._nets(times[i], x, cond)
                delta = model._residual(states[i - 1], x, f, s, gs[i], dts[i - 1])
                j = dts[i] * (adj * f).sum() + 0.5 * (grad_loss * _sq(delta)).sum()
                out = torch.autograd.grad(j, [x, *params], allow_unused=True)
                adj.add_(out[0]).add_(carry)
                accumulate(out[1:])
                torch.mul(w, delta.detach(), out=carry).div_(gs[i] * dts[i - 1].sqrt())
                del x, f, s, delta, j, out  # nothing of this node outlives it
            # node 0 (data): J_0 = Δ_0 <a_1, f_0>; the score is not evaluated at t_0
            want_x0 = ctx.needs_input_grad[1]
            x = states[0].detach().requires_grad_(want_x0)
            f = model._drift(times[0], x, cond)
            j = dts[0] * (adj * f).sum()
            inputs = [x] if want_x0 else []
            out = torch.autograd.grad(j, [*inputs, *params[:n_drift]], allow_unused=True)
            grad_x0 = adj + out[0] + carry if want_x0 else None
            accumulate(out[len(inputs):])
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return (None, grad_x0, None, None, None, *grads)


@OBJECTIVES.register("diffflow")
class DiffFlow(Objective):
    """Diffusion normalizing flow (Zhang & Chen 2021): learned forward drift and backward score.

    Args:
        dynamics, shape: set by flowkit from the recipe's ``dynamics`` and ``data``; the
            factory builds both networks.
        end_time: ``T`` (DiffFlow 2-D: 0.05).
        g: diffusion coefficient ``g(t)`` (constant; DiffFlow 2-D: 0.2).
        g_end: if set, ``g(t)`` runs linearly from ``g`` at 0 to ``g_end`` at ``T``.
        steps: number of steps ``N``; a list is the progressive schedule, one more entry
            than ``milestones``.
        milestones: optimiser steps after which the next entry of ``steps`` is used.
        beta: exponent of the ``L_β`` grid ``t_i = T (i/N)^β``.
        grid: ``fixed`` (``L_β``) or ``random`` (``L̂_β``, redrawn every batch).
        gradient: ``adjoint`` (Algorithm 2, memory flat in ``N``) or ``naive`` backprop.
        prior_std: ``σ_T`` of the prior ``N(0, σ_T² I)``; default ``sqrt(1 + ∫ g²)``.
        drift_hidden / score_hidden: override the ``hidden`` widths of either network.
        cond_dropout: probability of dropping the condition (classifier-free guidance).
    """

    # the PF-ODE velocity, the learned score and forward SDE; no Tweedie denoiser
    provides: ClassVar[frozenset[str]] = frozenset({"velocity", "score", "drift", "diffusion"})
    #: Zhang & Chen 2021 2-D settings, as recipes/diffflow_rings.yaml: Adam 1e-2, batch 1000
    training_defaults: ClassVar[Mapping[str, Any]] = {"lr": 1e-2, "batch_size": 1000}
    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("milestones", "steps"),
             lambda a: len([a["steps"]] if isinstance(a["steps"], int) else a["steps"]) == len(a["milestones"]) + 1,
             "steps needs one more entry than milestones, got steps={steps} and milestones={milestones}"),
        Rule(("milestones",), lambda a: all(p < q for p, q in zip(a["milestones"], a["milestones"][1:])),
             "milestones must increase, got {milestones}"),
    )

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], end_time: PositiveFloat = 0.05,
                 g: PositiveFloat = 0.2, g_end: Optional[PositiveFloat] = None,
                 steps: Union[PositiveInt, Annotated[Sequence[PositiveInt], NonEmpty()]] = (30,),
                 milestones: Sequence[PositiveInt] = (), beta: PositiveFloat = 0.9,
                 grid: Literal["fixed", "random"] = "random",
                 gradient: Literal["adjoint", "naive"] = "adjoint", prior_std: Optional[PositiveFloat] = None,
                 drift_hidden: Optional[Sequence[PositiveInt]] = None,
                 score_hidden: Optional[Sequence[PositiveInt]] = None,
                 cond_dropout: DropProbability = 0.0) -> None:
        super().__init__(shape)
        steps = [steps] if isinstance(steps, int) else list(steps)
        milestones = list(milestones)
        problems = []
        if not end_time > 0:
            problems.append(f"end_time must be > 0, got {end_time!r}")
        if not g > 0 or (g_end is not None and not g_end > 0):
            problems.append(f"g and g_end must be > 0 (δ^B divides by g), got g={g!r}, g_end={g_end!r}")
        if not steps or any(int(n) != n or n < 1 for n in steps):
            problems.append(f"steps must be integers >= 1, got {steps!r}")
        if len(steps) != len(milestones) + 1:
            problems.append(f"steps needs one more entry than milestones, got steps={steps} and "
                            f"milestones={milestones}")
        if any(int(m) != m or m < 1 for m in milestones) or any(b <= a for a, b in zip(milestones, milestones[1:])):
            problems.append(f"milestones must be increasing integers >= 1, got {milestones!r}")
        if not beta > 0:
            problems.append(f"beta must be > 0, got {beta!r}")
        if grid not in ("fixed", "random"):
            problems.append(f"grid must be 'fixed' or 'random', got {grid!r}")
        if gradient not in ("adjoint", "naive"):
            problems.append(f"gradient must be 'adjoint' or 'naive', got {gradient!r}")
        if prior_std is not None and not prior_std > 0:
            problems.append(f"prior_std must be > 0, got {prior_std!r}")
        if not 0.0 <= cond_dropout < 1.0:
            problems.append(f"cond_dropout must be in [0, 1), got {cond_dropout!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.end_time, self.g, self.g_end = float(end_time), float(g), float(g if g_end is None else g_end)
        self.schedule, self.milestones = [int(n) for n in steps], [int(m) for m in milestones]
        self.beta, self.grid, self.gradient = float(beta), grid, gradient
        self.cond_dropout = float(cond_dropout)
        self.drift = dynamics(**({} if drift_hidden is None else {"hidden": list(drift_hidden)}))
        self.score = dynamics(**({} if score_hidden is None else {"hidden": list(score_hidden)}))
        if prior_std is None:
            prior_std = math.sqrt(1.0 + self.diffusion_integral())
        self.prior = StandardNormal(self.shape, float(prior_std))
        self.trained_steps = 0

    # ------------------------------------------------------------------ schedule
    @property
    def steps(self) -> int:
        """``N`` for the next batch (the progressive schedule at :attr:`trained_steps`)."""
        return self.steps_at(self.trained_steps)

    def steps_at(self, step: int) -> int:
        """``N`` used after ``step`` completed optimiser steps."""
        return self.schedule[bisect.bisect_right(self.milestones, step)]

    def after_step(self, step: int) -> None:
        self.trained_steps = int(step)

    def get_extra_state(self) -> dict:
        return {"trained_steps": self.trained_steps}

    def set_extra_state(self, state: dict) -> None:
        self.trained_steps = int(state.get("trained_steps", 0))

    # ---------------------------------------------------------------- the model
    def diffusion(self, t: Tensor | float) -> Tensor:
        """``g(t)``: constant, or linear from ``g`` to ``g_end`` over ``[0, T]``."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if self.g_end == self.g:
            return torch.full_like(t, self.g)
        return self.g + (self.g_end - self.g) * (t / self.end_time)

    def diffusion_integral(self) -> float:
        """``∫_0^T g(t)² dt``."""
        return self.end_time * (self.g**2 + self.g * self.g_end + self.g_end**2) / 3.0

    def time_grid(self, steps: Optional[int] = None, *, random: Optional[bool] = None,
                  generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
        """The training grid ``[N + 1]``: ``L_β``, or ``L̂_β`` when ``random`` (default: the recipe's)."""
        steps = self.steps if steps is None else int(steps)
        random = (self.grid == "random") if random is None else random
        if random:
            return randomised_grid(steps, self.end_time, self.beta, generator=generator, dtype=dtype,
                                   device=device)
        return power_grid(steps, self.end_time, self.beta, dtype=dtype, device=device)

    def _drift(self, t: Tensor, x: Tensor, cond: Optional[Tensor]) -> Tensor:
        return self.drift(t, x, cond)

    def _nets(self, t: Tensor, x: Tensor, cond: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self.drift(t, x, cond), self.score(t, x, cond)

    @staticmethod
    def _residual(x_prev: Tensor, x: Tensor, f: Tensor, s: Tensor, g: Tensor, dt: Tensor) -> Tensor:
        """``δ^B`` of eq. 14 for the step ``x_prev → x`` of length ``dt``, nets evaluated at ``x``."""
        return (x_prev - x + (f - g * g * s) * dt) / (g * dt.sqrt())

    def _rollout(self, x0: Tensor, times: Tensor, noise: Tensor, cond: Optional[Tensor],
                 keep: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """Forward trajectory (eq. 11) and the per-sample eq. 15 loss.

        Returns the stacked states ``[N + 1, B, …]`` when ``keep`` (else None), ``x_N`` and the
        loss ``[B]``.
        """
        n = times.shape[0] - 1
        dts = times[1:] - times[:-1]
        gs = self.diffusion(times)
        x, f = x0, self._drift(times[0], x0, cond)
        # States go into one preallocated buffer and each step's tensors are dropped before the
        # next: no small allocation outlives a step's large temporaries, so the allocator reuses
        # their memory instead of fragmenting the heap (peak RSS flat in N; glibc especially).
        states = x0.new_empty((n + 1, *x0.shape)) if keep else None
        if keep:
            states[0] = x0
        total = x0.new_zeros(x0.shape[0])
        for i in range(n):
            x_next = x + f * dts[i] + (gs[i] * dts[i].sqrt()) * noise[i]
            f_next, s_next = self._nets(times[i + 1], x_next, cond)
            delta = self._residual(x, x_next, f_next, s_next, gs[i + 1], dts[i])
            total = total + 0.5 * _sq(delta)
            if keep:
                states[i + 1] = x_next
            del x, f, s_next, delta
            x, f = x_next, f_next
        total = total - self.prior.log_prob(x)
        return states, x, total

    def trajectory_loss(self, x: Tensor, times: Tensor, noise: Tensor, cond: Optional[Tensor] = None,
                        gradient: Optional[Literal["adjoint", "naive"]] = None) -> Trajectory:
        """Eq. 15 per sample for the given grid and forward noise: ``−log p_B(x_N) + Σ ½‖δ_i^B‖²``.

        Args:
            x: data ``[B, *shape]`` (the states ``x_0``).
            times: increasing grid ``[N + 1]`` from 0 to ``T``.
            noise: forward noise ``ξ`` ``[N, B, *shape]``.
            cond: optional condition.
            gradient: ``adjoint`` or ``naive``; default the objective's.

        Returns:
            :class:`Trajectory`: the loss ``[B]`` (differentiable w.r.t. the networks and ``x``)
            and ``x_N``.
        """
        gradient = self.gradient if gradient is None else gradient
        if gradient not in ("adjoint", "naive"):
            raise ValueError(f"gradient must be 'adjoint' or 'naive', got {gradient!r}")
        if times.dim() != 1 or times.shape[0] < 2:
            raise ValueError(f"times must be a 1-D grid of N + 1 >= 2 times, got shape {list(times.shape)}")
        if noise.shape != (times.shape[0] - 1, *x.shape):
            raise ValueError(f"noise must have shape [N, *x.shape] = {[times.shape[0] - 1, *x.shape]}, "
                             f"got {list(noise.shape)}")
        if gradient == "adjoint" and torch.is_grad_enabled():
            params = (*self.drift.parameters(), *self.score.parameters())
            loss, x_end = _StochasticAdjoint.apply(self, x, times, noise, cond, *params)
            return Trajectory(loss, x_end)
        _, x_end, loss = self._rollout(x, times, noise, cond, keep=False)
        return Trajectory(loss, x_end.detach())

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        cond = drop_condition(cond, self.cond_dropout) if self.training else cond
        n = self.steps
        times = self.time_grid(n, dtype=x.dtype, device=x.device)
        noise = torch.randn((n, *x.shape), dtype=x.dtype, device=x.device)
        traj = self.trajectory_loss(x, times, noise, cond)
        # θ-free terms of log p_F(τ|x_0) − log p_B(τ): same gradient, a negative-ELBO value.
        const = 0.5 * noise.flatten(2).pow(2).sum(2).sum(0)
        d = x[0].numel()
        log_g = d * math.log(float(self.diffusion(self.end_time)) / float(self.diffusion(0.0)))
        nelbo = (traj.loss - const + log_g).mean()
        prior_nll = -self.prior.log_prob(traj.x_end).mean()
        metrics = {"prior_nll": float(prior_nll), "steps": float(n), "nfe": float(2 * n + 1)}
        return LossOutput(nelbo, metrics)

    # ------------------------------------------------------------------ the flow
    def flow(self) -> Flow:
        """PF-ODE velocity ``f − ½ g² s`` on ``[0, T]`` with the prior; score, drift and
        diffusion for reverse-SDE samplers; no Tweedie denoiser (see the module docstring);
        ``time_grid`` = the fixed ``L_β`` grid with the schedule's last ``N``."""
        drift, score, diffusion = self.drift, self.score, self.diffusion

        def velocity(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
            g = diffusion(t).to(x)
            return drift(t, x, cond) - 0.5 * g * g * score(t, x, cond)

        def diffusion_fn(t: Tensor) -> Tensor:
            return diffusion(t)

        return Flow(velocity=velocity, prior=self.prior, t0=0.0, t1=self.end_time,
                    score=lambda t, x, cond=None: score(t, x, cond),
                    drift=lambda t, x, cond=None: drift(t, x, cond),
                    diffusion=diffusion_fn, denoise=None,
                    time_grid=TimeGrid(steps=self.schedule[-1], power=self.beta))
