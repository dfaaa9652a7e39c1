"""FFJORD: maximum likelihood of a continuous normalizing flow.

Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models". The augmented ODE (appendix C, Algorithm 1)

.. math:: \\frac{d}{dt}\\begin{bmatrix} z \\\\ Δ \\end{bmatrix} =
          \\begin{bmatrix} f(t, z) \\\\ \\operatorname{tr} \\partial f / \\partial z \\end{bmatrix},
          \\qquad \\log p(x) = \\log p_T(z(T)) + Δ(T),

is integrated from data (``t = 0``) to the Gaussian base (``t = T``); the trace is exact
or Hutchinson's estimate with noise fixed over the solve (eq. 4). RNODE (Finlay et al.
2020, eq. 4) adds ``λ_K ∫‖f‖² + λ_J ∫‖∂f/∂z‖²_F``, integrated alongside.

The end time ``T`` of each block is learnable: the block's field is solved on the unit
interval as ``T · f(T s, z)`` so ``T`` is an ordinary parameter that receives gradients in
both the direct and the adjoint mode.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar, Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from ..components import OBJECTIVES
from ..dopri5 import StepPlan
from ..constraints import DropProbability, NonNegativeFloat, PositiveFloat, PositiveInt, Rule
from ..fast_divergence import PATHS, FieldWrapper, declared_paths
from ..flow import Flow, StandardNormal
from ..likelihood import integrate_augmented
from ..solvers import ODEMethod, SolverSpec, StepCount, Tolerance, fixed_step_needs_steps
from .base import DynamicsFactory, LossOutput, Objective, drop_condition

__all__ = ["FFJORD", "TimeScaledField"]


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

CompileMode = Literal[False, True, "default", "reduce-overhead", "max-autotune"]


def _compile_mode(compile: CompileMode) -> Optional[str]:
    """The ``torch.compile`` mode of the objective's ``compile`` option (None: eager)."""
    if not compile:
        return None
    if compile is True:
        return "default"
    if compile not in ("default", "reduce-overhead", "max-autotune"):
        raise ValueError(f"compile must be false, true, default, reduce-overhead or max-autotune, got {compile!r}")
    return compile


def _compiled(field: nn.Module, method: str, mode: str):
    """``torch.compile(field.<method>, mode=mode)``, cached per module and method (kept out of
    the module itself so that copies — the EMA — and checkpoints are unaffected)."""
    cache = _COMPILED.setdefault(field, {})
    key = (method, mode)
    if key not in cache:
        cache[key] = torch.compile(getattr(field, method), mode=mode, dynamic=False)
    return cache[key]


class TimeScaledField(FieldWrapper):
    """``T · f(T s, x)`` on ``s ∈ [0, 1]`` with ``T = exp(log_T)`` (learnable or fixed).

    A :class:`~flowkit.fast_divergence.FieldWrapper`: the network's declared fast divergence
    paths are carried (all three: the map of the output is the scalar ``T``), the forward-mode
    ones compiled with ``compile`` while training.
    """

    carries = frozenset(PATHS)

    def __init__(self, field: nn.Module, end_time: float, learn: bool,
                 compile: Optional[CompileMode] = False) -> None:
        super().__init__(field)
        self.compile_mode = _compile_mode(compile)
        log_t = torch.tensor(math.log(end_time))
        if learn:
            self.log_end_time = nn.Parameter(log_t)
        else:
            self.register_buffer("log_end_time", log_t)

    @property
    def end_time(self) -> Tensor:
        return self.log_end_time.exp()

    def enter(self, s: Tensor, x: Tensor):
        scale = self.end_time.to(x.dtype)
        return s * scale, x, lambda f: scale * f

    def method(self, path: str):
        if path != "bottleneck" and self.compile_mode and self.training:
            return _compiled(self.field, PATHS[path], self.compile_mode)
        return super().method(path)


@OBJECTIVES.register("ffjord")
class FFJORD(Objective):
    """Maximum-likelihood CNF (FFJORD) with exact or Hutchinson trace and RNODE regularisers.

    Args:
        dynamics, shape: set by flowkit from the recipe's ``dynamics`` and ``data``.
        blocks: number of stacked CNF blocks, each with its own network and end time.
        end_time: initial integration time ``T`` of each block (FFJORD toy: 0.5).
        learn_end_time: make ``T`` a trained parameter.
        divergence: ``exact`` trace or ``hutchinson`` estimate during training.
        noise: Hutchinson probe distribution.
        method, rtol, atol, steps, per_sample_norm, adjoint: the training-time solver, kept as one
            :class:`~flowkit.solvers.SolverSpec` in :attr:`solver` (any method of
            :data:`flowkit.solvers.METHODS`; ``adjoint``: adjoint gradients, memory O(1) in
            the steps, instead of direct backprop).
        kinetic: RNODE weight of the kinetic energy ``∫‖f‖² dt``.
        jacobian: RNODE weight of the Jacobian norm ``∫‖∂f/∂z‖²_F dt``.
        cond_dropout: probability of dropping the condition (classifier-free guidance).
        compile: ``torch.compile`` the field's forward-mode divergence for training — the
            Jacobian (exact trace, ``concatsquash``) or the Jacobian–vector product
            (Hutchinson, ``concat_conv``). ``true``/``default``: inductor kernels (a one-off
            compilation of ~30 s, then about half the time per function evaluation on CPU
            for the toy model); ``reduce-overhead``: the same, replayed as CUDA graphs on
            a GPU (launch-bound models; equal to ``default`` on CPU); ``max-autotune``:
            with kernel autotuning. Networks that declare no forward-mode path (``jacobian``,
            ``jvp``; :mod:`flowkit.fast_divergence`) run eagerly.
        warm_start: start each training step's solves from the previous step's accepted step
            sizes (:class:`~flowkit.dopri5.StepPlan`; ``dopri5`` without the adjoint): fewer
            rejected steps and no small first step, the same error control (every step is still
            accepted only within the tolerance). The plans are saved in checkpoints, so a
            resumed run continues exactly as the uninterrupted one. ``false``: every solve
            starts with the Hairer–Nørsett–Wanner starting step, as torchdiffeq does.
        multiscale: FFJORD's multiscale image CNF (appendix D): ``blocks`` networks per
            scale, squeeze and factor-out expressed as blocks that move only their scale's
            coordinates (:func:`flowkit.dynamics.multiscale.multiscale_fields`).
        n_scales: number of scales (default: as many as the image allows, 3 for MNIST).
    """

    # a CNF defines only its ODE: no score, no SDE, no denoiser (ODE samplers only)
    provides: ClassVar[frozenset[str]] = frozenset({"velocity"})
    #: Grathwohl et al. 2019, the FFJORD code's train_toy.py defaults: Adam 1e-3, batch 100, weight decay 1e-5
    training_defaults: ClassVar[Mapping[str, Any]] = {"lr": 1e-3, "batch_size": 100, "weight_decay": 1e-5}
    argument_rules: ClassVar[tuple[Rule, ...]] = (fixed_step_needs_steps,)

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...], blocks: PositiveInt = 1,
                 end_time: PositiveFloat = 0.5, learn_end_time: bool = True,
                 divergence: Literal["exact", "hutchinson"] = "exact",
                 noise: Literal["rademacher", "gaussian"] = "rademacher",
                 method: ODEMethod = "dopri5",
                 rtol: Tolerance = 1e-5, atol: Tolerance = 1e-5, steps: Optional[StepCount] = None,
                 per_sample_norm: bool = False, adjoint: bool = False, kinetic: NonNegativeFloat = 0.0,
                 jacobian: NonNegativeFloat = 0.0, cond_dropout: DropProbability = 0.0,
                 compile: CompileMode = False, warm_start: bool = True, multiscale: bool = False,
                 n_scales: Optional[PositiveInt] = None) -> None:
        solver = SolverSpec(method, rtol=rtol, atol=atol, steps=steps, per_sample_norm=per_sample_norm,
                            adjoint=adjoint)  # bad settings fail here, before anything is built
        super().__init__(shape)
        if blocks < 1:
            raise ValueError("blocks must be >= 1")
        if end_time <= 0:
            raise ValueError("end_time must be positive")
        compile_mode = _compile_mode(compile)  # a wrong mode fails here, before anything is built
        if multiscale:
            from ..dynamics.multiscale import multiscale_fields

            nets = multiscale_fields(dynamics, self.shape, blocks, n_scales)
        else:
            nets = [dynamics() for _ in range(blocks)]
        self.blocks = nn.ModuleList(TimeScaledField(n, end_time, learn_end_time, compile_mode) for n in nets)
        for block in self.blocks:  # a network's declared fast divergence paths must exist: fail here, not in training
            declared_paths(block)
        self.divergence, self.noise = divergence, noise
        self.solver = solver
        self.kinetic, self.jacobian = kinetic, jacobian
        self.cond_dropout = cond_dropout
        self.prior = StandardNormal(self.shape)
        self.warm_start = warm_start
        #: the last training step's accepted steps, one plan per block (see ``warm_start``)
        self.step_plans: list[Optional[StepPlan]] = []

    def flow(self) -> Flow:
        fields = list(self.blocks)
        return Flow(velocity=fields[0], prior=self.prior, t0=0.0, t1=1.0,
                    blocks=fields if len(fields) > 1 else ())

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        cond = drop_condition(cond, self.cond_dropout) if self.training else cond
        regularise = bool(self.kinetic or self.jacobian)
        warm = self.warm_start and self.training and torch.is_grad_enabled()
        sol = integrate_augmented(self.flow().segments(), x, cond=cond, estimator=self.divergence, noise=self.noise,
                                  solver=self.solver, regularise=regularise, create_graph=True,
                                  step_plans=self.step_plans if warm else None)
        if warm:
            self.step_plans = list(sol.step_plans)
        log_prob = self.prior.log_prob(sol.z) + sol.delta
        nll = -log_prob.mean()
        loss = nll
        forward_nfe = sol.nfe
        metrics = {"nll": nll.item(), "nfe": float(forward_nfe),
                   "end_time": float(sum(b.end_time.item() for b in self.blocks))}
        if regularise:
            kinetic = sol.kinetic.mean()
            jac = sol.jacobian_norm.mean()
            loss = loss + self.kinetic * kinetic + self.jacobian * jac
            metrics.update(kinetic=kinetic.item(), jacobian=jac.item())

        def backward_nfe() -> dict[str, float]:
            total = sol.evaluations()
            return {"nfe_backward": float(total - forward_nfe) if self.solver.adjoint else float(forward_nfe)}

        return LossOutput(loss, metrics, backward_nfe)

    def solver_state(self) -> dict[str, Tensor]:
        return {f"step_plan.{i}": plan.to_tensor() for i, plan in enumerate(self.step_plans) if plan is not None}

    def load_solver_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore the plans; one that cannot be read (a damaged checkpoint) is dropped and its
        block's next solve starts cold: a plan only proposes step sizes."""
        plans: list[Optional[StepPlan]] = [None] * len(self.blocks)
        for key, data in (state.items() if isinstance(state, Mapping) else ()):
            index = key.rsplit(".", 1)[1] if isinstance(key, str) and key.startswith("step_plan.") else ""
            if index.isdigit() and int(index) < len(plans) and torch.is_tensor(data):
                try:
                    plans[int(index)] = StepPlan.from_tensor(data)
                except ValueError:
                    pass
        self.step_plans = plans
