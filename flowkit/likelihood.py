"""Likelihood of any flow: the augmented ODE of FFJORD (appendix C, Algorithm 1).

The state ``[x, Δ]`` with ``dΔ/dt = tr ∂v/∂x`` is integrated from data at ``t0`` to the
prior at ``t1``; then ``log p(x) = log p_{t1}(x(t1)) + Δ(t1)`` (see :mod:`flowkit.flow`).
Training (FFJORD) and evaluation (every objective) use the same
:class:`AugmentedDynamics`, with RNODE's kinetic-energy and Jacobian-norm integrals
(Finlay et al. 2020, eq. 4) as optional extra channels.

Contract (no silent wrong answers)
----------------------------------
Every likelihood entry point (:func:`log_likelihood`, :func:`flow_log_likelihood`,
:func:`flowkit.score_log_likelihood`, :func:`flowkit.evaluate_nll`) checks, before solving:

* ``x`` is a floating tensor ``[batch, *event_shape]`` with at least one sample and finite
  values (else :class:`~flowkit.flow.FieldError` naming ``x``, the shape and the bad rows);
  options such as ``n_probes >= 1``;
* one call of each field at the start time: its output is shaped like ``x`` and finite, and
  the same for the same input (a model left in training mode with dropout is not);
* whether autograd sees the whole dependence of the field on ``x``: the directional
  derivative ``εᵀ J ε`` by autograd is compared with central differences over a ladder of
  steps, at the step whose error estimate is smallest, at ``t0``, the midpoint and ``t1``
  (a one-off: two calls on the batch, ~33 calls and 3 backward passes on at most 128 samples).
  A field called under ``torch.no_grad()`` or ``torch.inference_mode()``, or whose output (or
  part of it, e.g. the score inside a probability-flow velocity) is ``.detach()``-ed, would
  otherwise get a divergence of 0 for that part. Such a field is differentiated by central
  finite differences instead (see :mod:`flowkit.divergence`), with a warning.

During the solve each evaluation of the augmented field is checked for NaN/inf (one
``isfinite`` reduction): :class:`~flowkit.flow.NonFiniteFieldError` names the field, the
time and how many samples, instead of the solver's "underflow in dt". The evaluation runs
with autograd and outside inference mode whatever the caller's mode, so
``with torch.no_grad():`` or ``with torch.inference_mode():`` around a call changes nothing.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .divergence import DIFFERENTIATIONS, ESTIMATORS, NO_GRAPH, NOISES, divergence, finite_difference_step, sample_probe
from .flow import FieldError, Flow, NonFiniteFieldError, Prior
from .solvers import SolverSpec, as_solver, odeint

__all__ = ["AugmentedDynamics", "log_likelihood", "flow_log_likelihood", "Likelihood", "bits_per_dim",
           "FieldError", "NonFiniteFieldError", "check_data", "LIKELIHOOD_SOLVER"]

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
            step (see :func:`~flowkit.divergence.divergence`).
        check_finite: raise :class:`~flowkit.flow.NonFiniteFieldError` at the first evaluation
            with NaN or inf, naming ``name``, the time and the number of samples (evaluation;
            off in training, where a non-finite loss is the trainer's "diverged").
        name: how errors refer to the field.
    """

    def __init__(self, velocity: Callable, shape: Sequence[int], *, estimator: str = "exact",
                 probe: Optional[Tensor] = None, cond: Optional[Tensor] = None,
                 regularise: bool = False, create_graph: bool = False, differentiate: str = "autograd",
                 fd_step: Optional[float] = None, check_finite: bool = False, name: str = "velocity") -> None:
        super().__init__()
        self.velocity = velocity
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
        self.name = name
        if isinstance(velocity, nn.Module):
            self.module = velocity  # registers parameters for the adjoint

    def _field(self, t: Tensor, x: Tensor) -> Tensor:
        if self.cond is None:
            return self.velocity(t, x)
        # Exact trace replicates the batch D times; repeat the condition to match.
        reps = x.shape[0] // self.cond.shape[0]
        cond = self.cond if reps == 1 else self.cond.repeat(reps, *([1] * (self.cond.dim() - 1)))
        return self.velocity(t, x, cond)

    def _jacobian(self, t: Tensor, x: Tensor):
        if self.cond is None:
            return self.velocity.forward_with_jacobian(t, x)
        return self.velocity.forward_with_jacobian(t, x, self.cond)

    def _jvp(self, t: Tensor, x: Tensor, v: Tensor):
        if self.cond is None:
            return self.velocity.forward_with_jvp(t, x, v)
        return self.velocity.forward_with_jvp(t, x, v, self.cond)

    def forward(self, t: Tensor, state: Tensor) -> Tensor:
        x = state[:, : self.dim].reshape(-1, *self.shape)
        split = None
        if self.estimator == "hutchinson" and getattr(self.velocity, "bottleneck", False):
            split = lambda t_, x_: self.velocity.split(t_, x_, self.cond)  # noqa: E731
        jacobian = None
        if self.estimator == "exact" and hasattr(self.velocity, "forward_with_jacobian"):
            jacobian = self._jacobian
        jvp = None
        if self.estimator == "hutchinson" and split is None and hasattr(self.velocity, "forward_with_jvp"):
            jvp = self._jvp
        out = divergence(self._field, t, x, estimator=self.estimator, probe=self.probe,
                         create_graph=self.create_graph, frobenius=self.regularise, split=split,
                         jacobian=jacobian, jvp=jvp, differentiate=self.differentiate, fd_step=self.fd_step)
        if tuple(out.dx.shape) != tuple(x.shape):
            raise FieldError(f"{self.name} returned shape {tuple(out.dx.shape)} at t={float(t):.6g}, expected "
                             f"{tuple(x.shape)}, the shape of its input x ([batch, *event_shape])")
        parts = [out.dx.reshape(x.shape[0], -1), out.div.unsqueeze(1)]
        if self.regularise:
            parts += [out.dx.reshape(x.shape[0], -1).pow(2).sum(1, keepdim=True),
                      out.jac_frobenius.unsqueeze(1)]
        result = torch.cat(parts, 1)
        if self.check_finite:
            self._check_finite(t, result)
        return result

    def _check_finite(self, t: Tensor, result: Tensor) -> None:
        """One ``isfinite`` reduction per evaluation; the details only on failure."""
        finite = torch.isfinite(result)
        if bool(finite.all()):
            return
        bad_dx = ~finite[:, : self.dim].all(1)
        bad = ~finite.all(1)
        what = "NaN or inf" if bool(bad_dx.any()) else "a NaN or inf divergence (tr ∂v/∂x)"
        raise NonFiniteFieldError(
            f"{self.name} returned {what} for {int(bad.sum())} of {result.shape[0]} samples at "
            f"t={float(t):.6g} during the solve (first bad samples: {_first(bad)}); the model is not finite "
            f"along these trajectories: check it there (a diverged model, a singular time, an overflow)")

    def initial_state(self, x: Tensor) -> Tensor:
        extra = 3 if self.regularise else 1
        return torch.cat([x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0], extra)], 1)


@dataclass
class Likelihood:
    """Per-sample results: ``log_prob = prior_log_prob + delta`` (nats), the image ``z``
    of ``x`` at ``t1``, and the solver's NFE."""

    log_prob: Tensor
    prior_log_prob: Tensor
    delta: Tensor
    z: Tensor
    nfe: int


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
        **settings: instead of ``solver``, the fields of :class:`~flowkit.solvers.SolverSpec`
            that differ from :data:`LIKELIHOOD_SOLVER` (``method="rk4", steps=8``).

    Returns:
        :class:`Likelihood`, per sample.

    Raises:
        FieldError: ``x`` not a finite floating ``[batch, *event_shape]`` tensor with a sample,
            ``cond`` not one row per sample, an unknown ``estimator``/``noise``,
            ``n_probes < 1``, a field whose output is not shaped like ``x`` or differs
            between two calls on the same input, a prior whose ``log_prob`` is not ``[batch]``.
        NonFiniteFieldError: a field returned NaN or inf, for the data or during the solve.
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
    return _solve(fields, list(names), x, prior, times=times, cond=cond, estimator=estimator,
                  noise=noise, n_probes=n_probes, solver=solver, generator=generator)


def _solve(fields: Sequence[Callable], names: Sequence[str], x: Tensor, prior: Prior, *,
           times: Sequence[float], cond: Optional[Tensor], estimator: str, noise: str, n_probes: int,
           solver: SolverSpec, generator: torch.Generator | None) -> Likelihood:
    """:func:`log_likelihood` of the fields in turn, each checked once at its start (module docstring)."""
    check_data(x)
    _check_cond(cond, x)
    times = _check_options(estimator, noise, n_probes, times)
    with torch.inference_mode(False):  # the divergence needs autograd whatever the caller's mode
        x = x.clone() if x.is_inference() else x
        cond = cond.clone() if cond is not None and cond.is_inference() else cond
        shape = tuple(x.shape[1:])
        dim = math.prod(shape)
        state, nfe = None, 0
        for field_fn, name in zip(fields, names):
            start = x if state is None else state[:, :dim].reshape(x.shape)
            aug = AugmentedDynamics(field_fn, shape, estimator=estimator, cond=cond, check_finite=True, name=name)
            aug.differentiate, aug.fd_step = _inspect(aug, times, start, name, estimator, n_probes)
            if estimator == "hutchinson":
                template = x if aug.differentiate == "finite_difference" else _probe_template(field_fn, x, cond)
                aug.probe = sample_probe(template, noise, n_probes, generator=generator)
            with torch.no_grad():
                state = aug.initial_state(x) if state is None else state
                sol = odeint(aug, state, [times[0], times[-1]], solver)
                state, nfe = sol.ys[-1], nfe + sol.nfe
        z = state[:, :dim].reshape(x.shape)
        delta = state[:, dim]
        prior_lp = prior.log_prob(z)
        _check_prior(prior_lp, z)
        return Likelihood(prior_lp + delta, prior_lp, delta, z, nfe)


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

    At ``t0`` one call checks the output's shape and finiteness and a second that the field
    is deterministic. Then, on the first ``_PROBE_ROWS`` samples, at ``t0``, the midpoint and
    ``t1`` (a part of the field that autograd misses may matter only at some times, e.g. the
    score term of a sub-VP probability-flow velocity, negligible at ``t0``), autograd's
    ``a = εᵀ J ε`` for a fixed Rademacher ``ε`` is compared with central differences ``d_j``
    over a ladder of steps (:func:`_directional`); autograd is trusted if they agree at every
    time. Else —
    no graph, or a graph that misses part of the dependence on ``x`` — the divergence is
    taken by central differences with the step chosen at ``t0``, and a warning says so (not
    for a field without graph that is constant in ``x`` near the data, e.g. ``zeros_like(x)``:
    its differences are exactly 0, which is its divergence).

    Returns:
        ``("autograd", None)`` or ``("finite_difference", relative_step)``.

    Raises:
        FieldError: wrong shape, or different outputs for the same input.
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


def _probe_template(velocity, x: Tensor, cond) -> Tensor:
    """A tensor shaped like the Hutchinson probe: ``x``, or the bottleneck's ``h``."""
    if not getattr(velocity, "bottleneck", False):
        return x
    split = velocity.split
    with torch.enable_grad():
        h, _ = split(torch.zeros((), dtype=x.dtype, device=x.device), x.detach().requires_grad_(True), cond)
    return h.detach()


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
