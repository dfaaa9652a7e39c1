"""Likelihood of any flow: the augmented ODE of FFJORD (appendix C, Algorithm 1).

The state ``[x, Δ]`` with ``dΔ/dt = tr ∂v/∂x`` is integrated from data at ``t0`` to the
prior at ``t1``; then ``log p(x) = log p_{t1}(x(t1)) + Δ(t1)`` (see :mod:`flowkit.flow`).
Training (FFJORD) and evaluation (every objective) use the same integrator,
:func:`integrate_augmented`, over a flow's segments (its stacked blocks), with RNODE's
kinetic-energy and Jacobian-norm integrals (Finlay et al. 2020, eq. 4) as optional extra
channels; evaluation runs it with the checks below (``trust=True``), training without.

Contract (no silent wrong answers)
----------------------------------
Every likelihood entry point (:func:`log_likelihood`, :func:`flow_log_likelihood`,
:func:`flowkit.score_log_likelihood`, :func:`flowkit.evaluate_nll`) checks, before solving:

* ``x`` is a floating tensor ``[batch, *event_shape]`` with at least one sample and finite
  values (else :class:`~flowkit.flow.FieldError` naming ``x``, the shape and the bad rows);
  options such as ``n_probes >= 1``, the solver's settings (:class:`~flowkit.solvers.SolverSpec`:
  ``rtol``/``atol`` finite and > 0, else :class:`~flowkit.solvers.SolverError` naming them), and
  the prior's declared event shape (``prior.shape``) against ``x``'s;
* one call of each field at the start time: its output is shaped like ``x`` and finite, and
  the same for the same input (a model left in training mode with dropout is not); one more
  on a batch of ``x``'s shape made of copies of its first rows: each sample's output must
  depend on that sample only (a BatchNorm in training mode, or any batch statistic, mixes
  them);
* whether autograd sees the whole dependence of the field on ``x``: the directional
  derivative ``εᵀ J ε`` by autograd is compared with central differences over a ladder of
  steps, at the step whose error estimate is smallest, at ``t0``, the midpoint and ``t1``
  (a one-off: three calls on the batch, ~33 calls and 3 backward passes on at most 128 samples).
  A field called under ``torch.no_grad()`` or ``torch.inference_mode()``, or whose output (or
  part of it, e.g. the score inside a probability-flow velocity) is ``.detach()``-ed, would
  otherwise get a divergence of 0 for that part. Such a field is differentiated by central
  finite differences instead (see :mod:`flowkit.trace`), with a warning.

During the solve each evaluation of the augmented field is checked for NaN/inf (one
``isfinite`` reduction). A non-finite value where the solver can still reject the step that
met it is left to the solver: the adaptive methods' first-step heuristic probes the field
beyond ``t1`` (made at ``t1``; a NaN there is ignored), and a trial step whose last stage is
non-finite is retried smaller. Where a non-finite value persists — it reaches the state, and
the solver gives up or ends in NaN — :class:`~flowkit.flow.NonFiniteFieldError` names the
field, the time and how many samples, instead of the solver's "underflow in dt" (see
:class:`AugmentedDynamics`). The evaluation runs
with autograd and outside inference mode whatever the caller's mode, so
``with torch.no_grad():`` or ``with torch.inference_mode():`` around a call changes nothing.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .trace import DIFFERENTIATIONS, ESTIMATORS, NO_GRAPH, NOISES, divergence, finite_difference_step, sample_probe
from .fast_divergence import bind, choose_strategy
from .flow import FieldError, Flow, NonFiniteFieldError, Prior
from .dopri5 import StepPlan
from .solvers import PerSampleTimeField, CountingField, SolverSpec, as_solver, odeint

__all__ = ["AugmentedDynamics", "AugmentedSolution", "integrate_augmented", "log_likelihood", "flow_log_likelihood",
           "Likelihood", "bits_per_dim", "FieldError", "NonFiniteFieldError", "check_data", "LIKELIHOOD_SOLVER"]

#: the solver of a likelihood solve unless told otherwise: dopri5 at 1e-5 with the per-sample
#: error norm, so no sample's log-density change is less accurate than the tolerance says
LIKELIHOOD_SOLVER = SolverSpec("dopri5", rtol=1e-5, atol=1e-5, per_sample_norm=True)


class AugmentedDynamics(nn.Module):
    """``d/dt [x, Δ, E, F] = [v, tr J, ‖v‖², ‖J‖²_F]`` on a flat state ``[B, D + 1 + R]``.

    Args:
        velocity: field ``v(t, x, cond)``.
        shape: event shape of ``x``.
        estimator: ``"exact"`` or ``"hutchinson"``.
        probe: Hutchinson probes, fixed for the whole solve (FFJORD eq. 4).
        regularise: integrate the kinetic energy and Jacobian Frobenius norm too.
        create_graph: keep the graph of the divergence (training).
        differentiate, fd_step: ``"autograd"`` or ``"finite_difference"`` and the latter's relative
            step (see :func:`~flowkit.trace.divergence`).
        check_finite: watch for NaN and inf (evaluation; off in training, where a non-finite
            loss is the trainer's "diverged"). A non-finite evaluation inside ``interval`` is
            left to the solver, as ±inf, so that an adaptive solver can reject the trial step
            that met it (see :meth:`_check_finite`); the solve then continues. If the solver
            cannot get past it — it gives up, or the final state is not finite — the
            solve fails with :class:`~flowkit.flow.NonFiniteFieldError` naming ``name``, the
            time and the number of samples of the first of the non-finite evaluations that
            led there (:meth:`raise_if_failed`, :func:`log_likelihood`).
        interval: ``(t0, t1)`` of the solve (with ``check_finite``). The adaptive solvers'
            first-step heuristic (Hairer, Nørsett & Wanner, II.4) evaluates the field once at
            ``t0 + h0`` with a guessed ``h0`` that can lie far beyond ``t1`` (t ≈ 9, or 1e6, for a
            VP model on [1e-5, 1]); the field is defined on the interval only, so such a
            probe is made at the nearest time inside it and is never an error: a non-finite
            probe is returned as NaN, which the heuristic ignores (an inf would make it choose
            a first step of 0). Every step the solver takes lies inside the interval.
        name: how errors refer to the field.

    The divergence is taken as :attr:`strategy` says: through a fast path ``velocity`` declares
    (:mod:`flowkit.fast_divergence`; checked at construction) or a generic estimator.
    """

    def __init__(self, velocity: Callable, shape: Sequence[int], *, estimator: str = "exact",
                 probe: Optional[Tensor] = None, cond: Optional[Tensor] = None,
                 regularise: bool = False, create_graph: bool = False, differentiate: str = "autograd",
                 fd_step: Optional[float] = None, check_finite: bool = False,
                 interval: Optional[tuple[float, float]] = None, name: str = "velocity") -> None:
        super().__init__()
        self.velocity = velocity  # a module's parameters register here (the adjoint's defaults)
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        self.estimator = estimator
        self.probe = probe
        self.cond = cond
        self.regularise = regularise
        self.create_graph = create_graph
        if differentiate not in DIFFERENTIATIONS:
            raise ValueError(f"unknown differentiate={differentiate!r}; choose one of: {', '.join(DIFFERENTIATIONS)}")
        self.differentiate = differentiate
        self.fd_step = fd_step
        self.check_finite = check_finite
        self.interval = None if interval is None else (min(map(float, interval)), max(map(float, interval)))
        self.name = name
        #: the fast divergence paths ``velocity`` declares, the condition bound (checked here)
        self.paths = bind(velocity, cond)
        #: the message of the first of the latest run of non-finite evaluations (None after a finite one)
        self.failure: Optional[str] = None
        self._chosen: Optional[tuple[tuple[str, str], str]] = None  # ((differentiate, device), strategy)

    @property
    def strategy(self) -> str:
        """How the divergence is computed (:func:`~flowkit.fast_divergence.choose_strategy`)."""
        return choose_strategy(self.estimator, self.paths.names, differentiate=self.differentiate,
                               frobenius=self.regularise, dim=self.dim, create_graph=self.create_graph)

    def _strategy_now(self, x: Tensor) -> str:
        """:func:`~flowkit.fast_divergence.choose_strategy` for ``x``'s device, made once per setting
        (``differentiate`` is set after construction by the evaluation's checks)."""
        key = (self.differentiate, x.device.type)
        if self._chosen is None or self._chosen[0] != key:
            self._chosen = (key, choose_strategy(self.estimator, self.paths.names, differentiate=self.differentiate,
                                                 frobenius=self.regularise, dim=self.dim, device=x.device.type,
                                                 create_graph=self.create_graph))
        return self._chosen[1]

    def probe_template(self, x: Tensor) -> Tensor:
        """A tensor shaped like one Hutchinson probe: ``x``, or the bottleneck's ``h`` where the
        strategy is ``bottleneck``."""
        if self.strategy != "bottleneck":
            return x
        with torch.enable_grad():
            h, _ = self.paths.split(torch.zeros((), dtype=x.dtype, device=x.device), x.detach().requires_grad_(True))
        return h.detach()

    def _field(self, t: Tensor, x: Tensor) -> Tensor:
        if self.cond is None:
            return self.velocity(t, x)
        # Exact trace replicates the batch D times; repeat the condition to match.
        reps = x.shape[0] // self.cond.shape[0]
        cond = self.cond if reps == 1 else self.cond.repeat(reps, *([1] * (self.cond.dim() - 1)))
        return self.velocity(t, x, cond)

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        if self.failure is not None and not bool(torch.isfinite(state).all()):
            # a stage of a step that already met a non-finite value: that step is lost (rejected, or
            # the solve ends in NaN); the field is spared a non-finite input
            return torch.full_like(state, float("inf"))
        asked = t
        if self.interval is not None:  # a tensor op, no host synchronisation
            t = torch.as_tensor(t).clamp(*self.interval)
        x = state[:, : self.dim].reshape(-1, *self.shape)
        out = divergence(self._field, t, x, estimator=self.estimator, probe=self.probe,
                         create_graph=self.create_graph, frobenius=self.regularise, paths=self.paths,
                         strategy=self._strategy_now(x), differentiate=self.differentiate, fd_step=self.fd_step)
        if tuple(out.dx.shape) != tuple(x.shape):
            raise FieldError(f"{self.name} returned shape {tuple(out.dx.shape)} at t={float(t):.6g}, expected "
                             f"{tuple(x.shape)}, the shape of its input x ([batch, *event_shape])")
        parts = [out.dx.reshape(x.shape[0], -1), out.div.unsqueeze(1)]
        if self.regularise:
            parts += [out.dx.reshape(x.shape[0], -1).pow(2).sum(1, keepdim=True),
                      out.jac_frobenius.unsqueeze(1)]
        result = torch.cat(parts, 1)
        if self.check_finite:
            return self._check_finite(asked, result)
        return result

    def forward_rows(self, t: Tensor, state: Tensor, rows: Tensor) -> Tensor:
        """:meth:`forward` with one time per sample (``t`` ``[B']``) on the rows ``rows`` of the
        batch the solve started with (their probes and condition). For per-sample step control
        (:mod:`flowkit.solvers_per_sample`), which rejects a step that meets a non-finite value
        and names the samples itself."""
        if self.interval is not None:
            t = t.clamp(*self.interval)
        x = state[:, : self.dim].reshape(-1, *self.shape)
        probe = None if self.probe is None else self.probe[:, rows]
        cond = None if self.cond is None else self.cond[rows]

        def field(_t: Tensor, y: Tensor) -> Tensor:  # y: the rows, or copies of them (exact trace, differences)
            reps = y.shape[0] // t.shape[0]
            tt = t if reps == 1 else t.repeat(reps)
            if cond is None:
                return self.velocity(tt, y)
            return self.velocity(tt, y, cond if reps == 1 else cond.repeat(reps, *([1] * (cond.dim() - 1))))

        # the declared fast paths take the rows' times and condition as they are (no copies of the rows)
        paths = bind(self.velocity, cond) if self.paths.names and cond is not None else self.paths
        out = divergence(field, t, x, estimator=self.estimator, probe=probe, differentiate=self.differentiate,
                         fd_step=self.fd_step, paths=paths, strategy=self._strategy_now(x))
        if tuple(out.dx.shape) != tuple(x.shape):
            raise FieldError(f"{self.name} returned shape {tuple(out.dx.shape)}, expected {tuple(x.shape)}, the "
                             f"shape of its input x ([batch, *event_shape])")
        return torch.cat([out.dx.reshape(x.shape[0], -1), out.div.unsqueeze(1)], 1)

    def _check_finite(self, t: Tensor, result: Tensor) -> Tensor:
        """One ``isfinite`` reduction per evaluation; the rest only when it fails (see ``check_finite``
        and ``interval``).

        torchdiffeq rejects a step whose error estimate is inf but not one whose estimate is
        NaN (the next step size becomes NaN, then 0: "underflow in dt", turned into this
        error by :func:`log_likelihood`). So a NaN inside the interval is handed on as inf: a
        non-finite last stage of a trial step (dopri5's ``f(t1, y1)``, which does not enter
        ``y1``) gives an inf estimate and the step is retried smaller. A non-finite earlier stage
        spreads into the states of the later ones, which :meth:`forward` answers with inf
        without calling the field; the step's estimate is then NaN and the solve fails
        (a solver whose error norm maps NaN to inf would reject that step too).
        """
        finite = torch.isfinite(result)
        if bool(finite.all()):
            self.failure = None
            return result
        if self.interval is not None and self._beyond(t):
            return torch.where(finite, result, torch.full_like(result, float("nan")))
        if self.failure is None:
            bad_dx = ~finite[:, : self.dim].all(1)
            bad = ~finite.all(1)
            what = "NaN or inf" if bool(bad_dx.any()) else "a NaN or inf divergence (tr ∂v/∂x)"
            self.failure = (
                f"{self.name} returned {what} for {int(bad.sum())} of {result.shape[0]} samples at "
                f"t={float(t):.6g} during the solve (first bad samples: {_first(bad)}); the model is not finite "
                f"along these trajectories: check it there (a diverged model, a singular time, an overflow)")
        return torch.where(torch.isnan(result), torch.full_like(result, float("inf")), result)

    def raise_if_failed(self, final: Tensor) -> None:
        """After a solve: raise :class:`~flowkit.flow.NonFiniteFieldError` if the final state is
        not finite (naming the first non-finite evaluation that led there)."""
        finite = torch.isfinite(final)
        if bool(finite.all()):
            return
        if self.failure is not None:
            raise NonFiniteFieldError(self.failure)
        bad = ~finite.all(1)
        raise NonFiniteFieldError(f"the solve of {self.name} ended in NaN or inf for {int(bad.sum())} of "
                                  f"{final.shape[0]} samples (first bad samples: {_first(bad)}): the state "
                                  f"overflowed; check the model along these trajectories")

    def _beyond(self, t: Tensor) -> bool:
        """Whether ``t`` lies outside :attr:`interval` by more than rounding."""
        t = torch.as_tensor(t)
        lo, hi = self.interval
        dtype = t.dtype if t.is_floating_point() else torch.float64
        slack = 64 * torch.finfo(dtype).eps * max(abs(lo), abs(hi), hi - lo)
        return not (lo - slack <= float(t) <= hi + slack)

    def initial_state(self, x: Tensor) -> Tensor:
        extra = 3 if self.regularise else 1
        return torch.cat([x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0], extra)], 1)


@dataclass
class Likelihood:
    """Per-sample results: ``log_prob = prior_log_prob + delta`` (nats), the image ``z``
    of ``x`` at ``t1``, and what the solve did: ``nfe`` (batched field calls),
    ``sample_evals`` (evaluations of single samples: the rows of every call, summed;
    ``nfe × B`` with shared steps, fewer where the per-sample solver retires finished samples)
    and, for a per-sample solve, ``steps`` ``[B]``: each sample's accepted + rejected steps
    (None with shared steps)."""

    log_prob: Tensor
    prior_log_prob: Tensor
    delta: Tensor
    z: Tensor
    nfe: int
    sample_evals: Optional[int] = None
    steps: Optional[Tensor] = None


def log_likelihood(
    velocity: Callable,
    x: Tensor,
    prior: Prior,
    *,
    times: Sequence[float] = (0.0, 1.0),
    blocks: Sequence[Callable] = (),
    cond: Optional[Tensor] = None,
    estimator: str = "exact",
    noise: str = "rademacher",
    n_probes: int = 1,
    solver: Optional[SolverSpec] = None,
    generator: torch.Generator | None = None,
    names: Optional[Sequence[str]] = None,
    time_per_sample: bool = False,
    **settings: Any,
) -> Likelihood:
    """``log p(x)`` of the flow ``dx/dt = velocity(t, x)`` whose density at ``times[-1]`` is ``prior``.

    The inputs and each field are checked before solving and the field's divergence is taken
    by autograd, or by central finite differences where autograd cannot see the field's
    dependence on ``x`` (e.g. a model called under ``torch.no_grad()``); see the module
    docstring. The caller's grad / inference mode does not matter.

    Args:
        velocity: the field in flowkit time (data at ``times[0]``).
        x: data ``[B, *event]``.
        prior: density at ``times[-1]``.
        times: ``(t0, t1)``.
        blocks: stacked fields applied in turn, each over ``times`` (``velocity`` unused then).
        estimator: ``"exact"`` trace or ``"hutchinson"``.
        noise, n_probes: Hutchinson probe distribution and number of probes averaged.
        solver: the ODE solver (default :data:`LIKELIHOOD_SOLVER`: ``dopri5``,
            ``rtol = atol = 1e-5``, per-sample error norm).
        generator: random source of the Hutchinson probes.
        names: how messages refer to the fields, one per field (default ``velocity`` or
            ``blocks[i]``).
        time_per_sample: the caller declares that every field takes a ``[B]`` tensor of
            per-sample times. The solve then steps each sample on its own, with its own error
            control, retiring finished samples (:mod:`flowkit.solvers_per_sample`) wherever
            ``solver`` allows it (``dopri5``, per-sample norm, no adjoint: the default); the
            batch no longer takes its hardest sample's steps.
        **settings: instead of ``solver``, the fields of :class:`~flowkit.solvers.SolverSpec`
            that differ from :data:`LIKELIHOOD_SOLVER` (``method="rk4", steps=8``).

    Returns:
        :class:`Likelihood`, per sample.

    Raises:
        FieldError: ``x`` not a finite floating ``[batch, *event_shape]`` tensor with a sample,
            ``cond`` not one row per sample, an unknown ``estimator``/``noise``,
            ``n_probes < 1``, a field whose output is not shaped like ``x``, differs
            between two calls on the same input or depends on other samples of the batch,
            a prior of another event shape or whose ``log_prob`` is not ``[batch]``.
        NonFiniteFieldError: a field returned NaN or inf for the data, or during the solve
            where the solver could not get past it.
        flowkit.solvers.SolverError: invalid solver settings.

    Example:
        >>> A = torch.tensor([[-0.5, 0.0], [0.0, -1.0]])
        >>> from flowkit.flow import StandardNormal
        >>> out = log_likelihood(lambda t, x: x @ A.T, torch.zeros(3, 2), StandardNormal((2,)))
        >>> torch.allclose(out.delta, torch.full((3,), -1.5), atol=1e-4)
        True
    """
    solver = as_solver(solver, LIKELIHOOD_SOLVER, **settings)
    fields = list(blocks) or [velocity]
    if names is None:
        names = [f"blocks[{i}]" for i in range(len(blocks))] if len(blocks) else ["velocity"]
    elif len(names) != len(fields):
        raise ValueError(f"names: expected {len(fields)} names, one per field, got {len(names)}")
    check_data(x)
    _check_cond(cond, x)
    _check_prior_shape(prior, x)
    t0, t1 = _check_options(estimator, noise, n_probes, times)
    with torch.inference_mode(False):  # the divergence needs autograd whatever the caller's mode
        sol = integrate_augmented([(f, t0, t1) for f in fields], x, cond=cond, estimator=estimator, noise=noise,
                                  n_probes=n_probes, generator=generator, solver=solver, trust=True, names=names,
                                  time_per_sample=time_per_sample)
        prior_lp = prior.log_prob(sol.z)
        _check_prior(prior_lp, sol.z)
        return Likelihood(prior_lp + sol.delta, prior_lp, sol.delta, sol.z, sol.nfe, sol.sample_evals, sol.steps)


@dataclass
class AugmentedSolution:
    """The end of :func:`integrate_augmented`, per sample: the image ``z`` of ``x``, the
    log-determinant ``delta = ∫ tr ∂v/∂x dt`` (so ``log p(x) = log p(z) + delta``), RNODE's
    integrals ``kinetic = ∫‖v‖² dt`` and ``jacobian_norm = ∫‖∂v/∂x‖²_F dt`` (None unless
    ``regularise``), ``nfe``, the field evaluations of the solves, ``step_plans``, one
    :class:`~flowkit.dopri5.StepPlan` (or None) per segment, to warm-start the next solve, and
    ``sample_evals`` and ``steps`` as in :class:`Likelihood` (summed over the segments; ``steps``
    only when every segment was solved per sample)."""

    z: Tensor
    delta: Tensor
    kinetic: Optional[Tensor]
    jacobian_norm: Optional[Tensor]
    nfe: int
    counters: Sequence[CountingField] = ()
    step_plans: Sequence[Optional[StepPlan]] = ()
    sample_evals: Optional[int] = None
    steps: Optional[Tensor] = None

    def evaluations(self) -> int:
        """Field evaluations so far, those of a later backward pass (adjoint) included."""
        return sum(c.nfe for c in self.counters)


def integrate_augmented(
    segments: Sequence[tuple[Callable, float, float]],
    x: Tensor,
    *,
    cond: Optional[Tensor] = None,
    estimator: str = "exact",
    noise: str = "rademacher",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    solver: SolverSpec = LIKELIHOOD_SOLVER,
    regularise: bool = False,
    create_graph: bool = False,
    trust: bool = False,
    names: Optional[Sequence[str]] = None,
    time_per_sample: bool = False,
    step_plans: Optional[Sequence[Optional[StepPlan]]] = None,
) -> AugmentedSolution:
    """Integrate ``d/dt [x, Δ, E, F] = [v, tr ∂v/∂x, ‖v‖², ‖∂v/∂x‖²_F]`` over ``segments`` in turn.

    The one integrator of the augmented ODE (FFJORD appendix C, Algorithm 1; RNODE, Finlay et
    al. 2020, eq. 4): :func:`log_likelihood` and the FFJORD objective's loss both call it.
    Each segment ``(field, t_start, t_end)`` — a flow's :meth:`~flowkit.flow.Flow.segments`,
    one per stacked block — starts from where the previous one ended, with ``Δ`` (and ``E``,
    ``F``) accumulated. Hutchinson probes are drawn per segment, where the divergence strategy
    says (the data's space, or a declared bottleneck's; :mod:`flowkit.fast_divergence`), and
    held fixed over its solve (FFJORD eq. 4).

    Args:
        segments: ``(field, t_start, t_end)`` from data to prior; ``field(t, x[, cond])``.
        x: data ``[batch, *event_shape]``.
        cond: one condition per sample, or None.
        estimator, noise, n_probes, generator: the trace estimator and its probes.
        solver: the ODE solver; with ``adjoint``, gradients reach each field's parameters.
        regularise: integrate the kinetic energy and Jacobian norm too.
        create_graph: keep the divergence's graph (training).
        trust: the evaluation contract of the module docstring: each field is checked at its
            start (:func:`_inspect`, which also picks autograd or finite differences), every
            evaluation is watched for NaN/inf, the field sees times clamped into its segment,
            and the solve runs without a graph. The inputs themselves are checked by the
            caller (:func:`log_likelihood`).
        names: how errors refer to the fields, one per segment.
        time_per_sample: every field takes a ``[B]`` tensor of per-sample times; with ``trust``
            and a solver that allows it, each sample is stepped on its own
            (:func:`log_likelihood`).
        step_plans: one plan per segment (or None) from an earlier solve's
            :attr:`AugmentedSolution.step_plans`: warm-started step proposals
            (:mod:`flowkit.dopri5`; the FFJORD objective passes the previous training step's).

    Returns:
        :class:`AugmentedSolution`.

    Raises:
        FieldError, NonFiniteFieldError: with ``trust``, see :func:`log_likelihood`.
        flowkit.fast_divergence.DivergenceDeclarationError: a field's declared fast paths are
            not implemented.

    Example:
        >>> A = torch.tensor([[-0.5, 0.0], [0.0, -1.0]])
        >>> sol = integrate_augmented([(lambda t, x: x @ A.T, 0.0, 1.0)], torch.zeros(3, 2))
        >>> torch.allclose(sol.delta, torch.full((3,), -1.5), atol=1e-4)
        True
    """
    shape = tuple(x.shape[1:])
    dim = math.prod(shape)
    names = [f"segments[{i}]" for i in range(len(segments))] if names is None else list(names)
    with torch.inference_mode(False):
        x = x.clone() if x.is_inference() else x
        cond = cond.clone() if cond is not None and cond.is_inference() else cond
        state, nfe, counters, plans, sample_evals, steps = None, 0, [], [], 0, 0
        given = list(step_plans) if step_plans is not None else []
        for index, ((field, t_start, t_end), name) in enumerate(zip(segments, names)):
            times = (float(t_start), float(t_end))
            aug = AugmentedDynamics(field, shape, estimator=estimator, cond=cond, regularise=regularise,
                                    create_graph=create_graph, check_finite=trust,
                                    interval=times if trust else None, name=name)
            if trust:
                start = x if state is None else state[:, :dim].reshape(x.shape)
                aug.differentiate, aug.fd_step = _inspect(aug, times, start, name, estimator, n_probes)
            if estimator == "hutchinson":
                aug.probe = sample_probe(aug.probe_template(x), noise, n_probes, generator=generator)
            counted = CountingField(aug)
            counters.append(counted)
            params = tuple(field.parameters()) if solver.adjoint and isinstance(field, nn.Module) else None
            with torch.no_grad() if trust else contextlib.nullcontext():
                state = aug.initial_state(x) if state is None else state
                per_sample = trust and time_per_sample and not regularise and not solver.per_sample_problems()
                try:
                    if per_sample:
                        sol = odeint(PerSampleTimeField(aug.forward_rows, name), state, list(times), solver)
                        counted.nfe += sol.nfe
                    else:
                        sol = odeint(counted, state, list(times), solver, adjoint_params=params,
                                     step_plan=given[index] if index < len(given) else None)
                except AssertionError:  # "underflow in dt" (torchdiffeq's, flowkit.dopri5's): a non-finite field
                    if aug.failure is None:
                        raise
                    raise NonFiniteFieldError(aug.failure) from None
                if trust:
                    aug.raise_if_failed(sol.ys[-1])
            state, nfe = sol.ys[-1], nfe + sol.nfe
            plans.append(sol.step_plan)
            sample_evals = None if sample_evals is None or sol.sample_evals is None else sample_evals + sol.sample_evals
            per_segment = None if sol.accepted is None or sol.rejected is None else sol.accepted + sol.rejected
            steps = None if steps is None or per_segment is None else steps + per_segment
    z = state[:, :dim].reshape(x.shape)
    extra = (state[:, dim + 1], state[:, dim + 2]) if regularise else (None, None)
    return AugmentedSolution(z, state[:, dim], *extra, nfe, counters, plans, sample_evals, steps)


def check_data(x: Tensor, name: str = "x") -> None:
    """Raise :class:`~flowkit.flow.FieldError` unless ``x`` is a finite floating tensor
    ``[batch, *event_shape]`` with at least one sample; the message counts the bad rows."""
    if not isinstance(x, Tensor):
        raise FieldError(f"{name}: expected a torch.Tensor of shape [batch, *event_shape], got {type(x).__name__}")
    if x.dim() < 2:
        raise FieldError(f"{name}: expected shape [batch, *event_shape], got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}; for one sample pass {name}[None], for a batch of scalars {name}[:, None]")
    if x.shape[0] == 0 or x.numel() == 0:
        raise FieldError(f"{name}: expected shape [batch, *event_shape] with at least one sample and a non-empty "
                         f"event, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FieldError(f"{name}: expected a floating-point tensor, got {x.dtype}; convert it with {name}.float()")
    bad = ~torch.isfinite(x.detach()).flatten(1).all(1)
    if bool(bad.any()):
        raise FieldError(f"{name}: {int(bad.sum())} of {x.shape[0]} samples contain NaN or inf (rows {_first(bad)}); "
                         "remove or repair them before computing a likelihood")


def _check_cond(cond: Optional[Tensor], x: Tensor) -> None:
    if cond is None:
        return
    if not isinstance(cond, Tensor) or cond.dim() < 1 or cond.shape[0] != x.shape[0]:
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise FieldError(f"cond: expected one condition per sample of x, shape [{x.shape[0]}, ...], got {got}")


def _check_prior_shape(prior: Prior, x: Tensor) -> None:
    """The prior's declared event shape (:class:`~flowkit.flow.Prior` ``.shape``) must be ``x``'s:
    ``StandardNormal((3,)).log_prob`` of 2-D points would return a number, silently wrong.
    (A prior that declares no shape is checked through its ``log_prob`` output alone.)"""
    declared = getattr(prior, "shape", None)
    if declared is None:
        return
    try:
        declared = tuple(int(d) for d in declared)
    except TypeError:
        raise FieldError(f"prior.shape: expected the event shape as a tuple of ints, got {declared!r}") from None
    if declared != tuple(x.shape[1:]):
        raise FieldError(f"prior: its event shape {declared} is not the event shape {tuple(x.shape[1:])} of x "
                         f"(x has shape {tuple(x.shape)}); build the prior for the data, e.g. "
                         f"StandardNormal({tuple(x.shape[1:])})")


def _check_options(estimator: str, noise: str, n_probes: int, times: Sequence[float]) -> tuple[float, float]:
    if estimator not in ESTIMATORS:
        raise FieldError(f"estimator: unknown {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if noise not in NOISES:
        raise FieldError(f"noise: unknown {noise!r}; choose one of: {', '.join(NOISES)}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral) or n_probes < 1:
        raise FieldError(f"n_probes: expected a positive integer (Hutchinson probes averaged per sample), "
                         f"got {n_probes!r}")
    try:
        t0, t1 = float(times[0]), float(times[-1])
    except (TypeError, IndexError, ValueError):
        raise FieldError(f"times: expected (t0, t1), two numbers, got {times!r}") from None
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise FieldError(f"times: expected (t0, t1), finite and distinct, got ({t0}, {t1})")
    return t0, t1


def _check_prior(prior_lp: Tensor, z: Tensor) -> None:
    if not isinstance(prior_lp, Tensor) or tuple(prior_lp.shape) != (z.shape[0],):
        got = tuple(prior_lp.shape) if isinstance(prior_lp, Tensor) else type(prior_lp).__name__
        raise FieldError(f"prior.log_prob returned shape {got} for z of shape {tuple(z.shape)}; "
                         f"expected ({z.shape[0]},), one log-density per sample")
    nan = torch.isnan(prior_lp)
    if bool(nan.any()):
        raise FieldError(f"prior.log_prob returned NaN for {int(nan.sum())} of {z.shape[0]} samples "
                         f"(rows {_first(nan)})")


def _first(mask: Tensor, k: int = 5) -> str:
    """The first ``k`` indices where ``mask`` holds, for messages."""
    idx = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, idx[:k])) + (", ..." if len(idx) > k else "")


def _check_output(out, x: Tensor, name: str, t: float, what: str = "") -> None:
    if not isinstance(out, Tensor):
        raise FieldError(f"{name} returned {type(out).__name__}{what} at t={t:.6g}, expected a tensor of shape "
                         f"{tuple(x.shape)} (the shape of x: [batch, *event_shape])")
    if tuple(out.shape) != tuple(x.shape):
        raise FieldError(f"{name} returned shape {tuple(out.shape)}{what} at t={t:.6g}, expected {tuple(x.shape)} "
                         f"(the shape of x: [batch, *event_shape]); a field returns dx/dt shaped like x")
    bad = ~torch.isfinite(out.detach()).flatten(1).all(1)
    if bool(bad.any()):
        raise NonFiniteFieldError(f"{name} returned NaN or inf{what} for {int(bad.sum())} of {x.shape[0]} samples "
                                  f"at t={t:.6g} (rows {_first(bad)})")


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside flowkit, so a warning points at the user's call."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


# relative steps tried by _inspect, from ε_mach^{1/3} down by factors of 4
_LADDER = (1.0, 1 / 4, 1 / 16, 1 / 64, 1 / 256)
# samples of the batch used by _inspect's derivative checks
_PROBE_ROWS = 128


def _inspect(aug: AugmentedDynamics, times: tuple[float, float], x: Tensor, name: str, estimator: str,
             n_probes: int) -> tuple[str, Optional[float]]:
    """Check the field once before a solve from ``x`` over ``times`` and decide how to differentiate it.

    At ``t0`` one call checks the output's shape and finiteness, a second that the field
    is deterministic and a third that it does not mix samples (:func:`_check_per_sample`).
    Then, on the first ``_PROBE_ROWS`` samples, at ``t0``, the midpoint and ``t1`` (a part of
    the field that autograd misses may matter only at some times, e.g. the score term of a
    sub-VP probability-flow velocity, negligible at ``t0``), autograd's ``a = εᵀ J ε`` for a
    fixed Rademacher ``ε`` is compared with central differences ``d_j`` over a ladder of steps
    (:func:`_directional`); autograd is trusted if they agree at every time. Else — no graph,
    or a graph that misses part of the dependence on ``x`` — the divergence is taken by
    central differences with the step chosen at ``t0``, and a warning says so (not
    for a field without graph that is constant in ``x`` near the data, e.g. ``zeros_like(x)``:
    its differences are exactly 0, which is its divergence).

    Returns:
        ``("autograd", None)`` or ``("finite_difference", relative_step)``.

    Raises:
        FieldError: wrong shape, different outputs for the same input, outputs that depend
            on the other samples of the batch.
        NonFiniteFieldError: NaN or inf at or near the data at ``t0``.
    """
    batch = x.shape[0]
    machine = torch.finfo(x.dtype).eps
    t0, t1 = times
    with torch.no_grad():
        tt = torch.tensor(t0, dtype=x.dtype, device=x.device)
        out = aug._field(tt, x.detach())
        _check_output(out, x, name, t0)
        again = aug._field(tt, x.detach())
        _check_output(again, x, name, t0, " on a second call")
    scale = out.flatten(1).abs().amax(1).clamp_min(1.0)
    differ = (again - out).flatten(1).abs().amax(1) > 1e3 * machine * scale
    if bool(differ.any()):
        raise FieldError(
            f"{name} returned different values for the same (t, x): {int(differ.sum())} of {batch} samples "
            f"differ between two calls at t={t0:.6g}; a likelihood needs a deterministic field whose output "
            f"for a sample depends on that sample only: put the model in eval mode (model.eval() switches "
            f"off dropout and batch statistics)")
    _check_per_sample(aug, tt, x, out, name, t0)
    # the derivative checks need no more than a few samples (their sums over the batch decide)
    rows = min(batch, _PROBE_ROWS)
    sub = aug if rows == batch else AugmentedDynamics(aug.velocity, aug.shape,
                                                      cond=None if aug.cond is None else aug.cond[:rows])
    xs = x[:rows]
    eps = sample_probe(xs, "rademacher", 1, generator=torch.Generator(device=x.device).manual_seed(0))[0]
    first = _directional(sub, t0, xs, eps, name, strict=True)
    step = first.step
    if first.auto is None:
        if first.constant:
            return "finite_difference", step  # no dependence on x near the data: differences give the exact 0
        reason = NO_GRAPH
    else:
        checks = [first] + [_directional(sub, t, xs, eps, name, strict=False) for t in ((t0 + t1) / 2, t1)]
        if all(c.agrees for c in checks):
            return "autograd", None
        reason = ("autograd sees only part of its dependence on x (part of it is computed under torch.no_grad() "
                  "or torch.inference_mode(), or .detach()-ed): autograd's εᵀ(∂v/∂x)ε disagrees with "
                  "finite differences")
    dim = x[0].numel()
    cost = f"2 x {dim} = {2 * dim}" if estimator == "exact" else f"2 x {n_probes} = {2 * n_probes}"
    warnings.warn(f"{name}: {reason}. Its divergence is computed by central finite differences instead "
                  f"({cost} extra field evaluations per step, relative error about "
                  f"{machine ** (2 / 3):.0e} in {x.dtype} for a smooth field); call the model with gradients "
                  f"enabled to use autograd", UserWarning, stacklevel=_caller_level())
    return "finite_difference", step


# rows of x repeated over the batch by _check_per_sample
_COUPLING_ROWS = 4


def _check_per_sample(aug: AugmentedDynamics, t: Tensor, x: Tensor, out: Tensor, name: str, t0: float) -> None:
    """Raise :class:`~flowkit.flow.FieldError` if the field's output for a sample depends on the
    other samples of the batch (a BatchNorm in training mode, a batch mean inside the model).

    The batch ``x'`` with ``x'_i = x_{i mod k}`` (the first ``k`` rows over and over) has the
    shape of ``x`` — so the same kernels run — but other batch statistics; a per-sample field
    gives each row of ``x'`` the output it gave that row in ``x`` (within the tolerance of the
    determinism check). One call, once per solve.
    """
    batch = x.shape[0]
    if batch < 2:
        return
    k = min(_COUPLING_ROWS, batch - 1)
    idx = torch.arange(batch, device=x.device) % k
    other = aug if aug.cond is None else AugmentedDynamics(aug.velocity, aug.shape, cond=aug.cond[idx])
    with torch.no_grad():
        mixed = other._field(t, x.detach()[idx])
    if not isinstance(mixed, Tensor) or tuple(mixed.shape) != tuple(x.shape):
        _check_output(mixed, x, name, t0, " on a batch of repeated rows")  # raises: names the shape
    expected = out[idx]
    scale = expected.flatten(1).abs().amax(1).clamp_min(1.0)
    close = (mixed - expected).flatten(1).abs().amax(1) <= 1e3 * torch.finfo(x.dtype).eps * scale  # NaN: not close
    if not bool(close.all()):
        raise FieldError(
            f"{name} mixes samples: its output for a sample depends on the other samples of the batch "
            f"({int((~close).sum())} of {batch} outputs change at t={t0:.6g} when the batch holds copies of "
            f"x's first {k} rows instead of x); a likelihood needs each sample's dx/dt to depend on that "
            f"sample only — a BatchNorm in training mode? call model.eval()")


@dataclass
class _Directional:
    """What :func:`_directional` found at one time: the field's output, autograd's ``εᵀJε`` per
    sample (None without a graph back to ``x``), whether it agrees with the central
    differences, the best relative step, and whether all differences were exactly 0."""

    out: Optional[Tensor]
    auto: Optional[Tensor]
    agrees: bool
    step: float
    constant: bool


def _directional(aug: AugmentedDynamics, t: float, x: Tensor, eps: Tensor, name: str, *,
                 strict: bool) -> _Directional:
    """Autograd's ``a = εᵀ J ε`` against central differences ``d_j`` at time ``t``.

    Steps ``h_j = 4^{-j} ε_mach^{1/3} max(1, ‖x‖_∞)``, ``j = 0..4`` (two calls each), give for
    the inner steps error estimates ``e_j = Σ_batch (|d_j − d_{j−1}| + |d_j − d_{j+1}|)
    + 2 ε_mach Σ_batch (‖f(x + h_j ε)‖ + ‖f(x − h_j ε)‖) / 2h_j``: truncation (``O(h²)``)
    shows as a trend along the ladder, rounding (``O(ε_mach / h)``, also of terms that cancel
    inside the field) as scatter, both bounded by the distance to the neighbours. At the step
    with the smallest ``e_j``, autograd agrees when
    ``Σ_batch |a − d_j| ≤ e_j + √ε_mach Σ_batch ‖ε‖ ‖εᵀJ‖``.

    ``strict``: check the outputs (shape, finiteness) and raise; otherwise a time where the
    field is not finite on the data is skipped (counted as agreeing).
    """
    batch = x.shape[0]
    machine = torch.finfo(x.dtype).eps
    tt = torch.tensor(t, dtype=x.dtype, device=x.device)
    skip = _Directional(None, None, True, machine ** (1 / 3), False)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = aug._field(tt, xg)
        if strict:
            _check_output(out, x, name, t)
        elif not _usable(out, x):
            return skip
        vjp = torch.autograd.grad(out, xg, eps, allow_unused=True)[0] if out.requires_grad else None
    e64 = eps.double().flatten(1)
    quotients, rounding = [], []
    with torch.no_grad():
        for level in _LADDER:
            h = finite_difference_step(x, level * machine ** (1 / 3)).to(x.dtype).view(batch, *([1] * (x.dim() - 1)))
            plus, minus = x + h * eps, x - h * eps
            f_plus, f_minus = aug._field(tt, plus), aug._field(tt, minus)
            if strict:
                _check_output(f_plus, x, name, t, " near the data")
                _check_output(f_minus, x, name, t, " near the data")
            elif not (_usable(f_plus, x) and _usable(f_minus, x)):
                return skip
            taken = ((plus - minus).double().flatten(1) * e64).sum(1) / e64.pow(2).sum(1)  # 2h after rounding
            quotients.append(((f_plus - f_minus).double().flatten(1) * e64).sum(1) / taken)
            size = f_plus.double().flatten(1).norm(dim=1) + f_minus.double().flatten(1).norm(dim=1)
            rounding.append(machine * size / taken)
    errors = {j: float((quotients[j] - quotients[j - 1]).abs().sum() + (quotients[j] - quotients[j + 1]).abs().sum()
                       + 2 * rounding[j].sum())
              for j in range(1, len(_LADDER) - 1)}
    best = min(errors, key=errors.__getitem__)
    step = _LADDER[best] * machine ** (1 / 3)
    constant = all(bool((q == 0).all()) for q in quotients)
    if vjp is None:
        return _Directional(out.detach(), None, False, step, constant)
    auto = (vjp.double().flatten(1) * e64).sum(1)
    width = e64.norm(dim=1) * vjp.double().flatten(1).norm(dim=1)
    agrees = float((auto - quotients[best]).abs().sum()) <= errors[best] + machine ** 0.5 * float(width.sum())
    return _Directional(out.detach(), auto, agrees, step, constant)


def _usable(out, x: Tensor) -> bool:
    return isinstance(out, Tensor) and tuple(out.shape) == tuple(x.shape) and bool(torch.isfinite(out).all())


def flow_log_likelihood(flow: Flow, x: Tensor, **options) -> Likelihood:
    """:func:`log_likelihood` of a :class:`~flowkit.flow.Flow` (its field, prior and times).

    Raises:
        FieldError: see :func:`log_likelihood`; messages name ``flow.velocity`` or ``flow.blocks[i]``.
    """
    blocks = list(flow.blocks)
    names = [f"flow.blocks[{i}]" for i in range(len(blocks))] if blocks else ["flow.velocity"]
    return log_likelihood(flow.velocity, x, flow.prior, times=(flow.t0, flow.t1), blocks=blocks,
                          names=options.pop("names", names), **options)


def bits_per_dim(nll_nats: Tensor | float, dim: int, log_scale: float = 0.0) -> Tensor | float:
    """Bits per dimension of data that were quantised to ``K`` levels and rescaled.

    If the model sees ``y = x / s`` (e.g. ``s = 256`` for 8-bit data scaled to [0, 1)), the
    density of the dequantised integers is ``p(x) = p(y) / s^D``, so
    ``bpd = (nll_y + D log s) / (D ln 2)``; pass ``log_scale = log s``.
    """
    return (nll_nats + dim * log_scale) / (dim * math.log(2.0))
