r"""ODE solvers: one table of methods, one validated :class:`SolverSpec`, one :func:`odeint`.

A solve of ``dx/dt = field(t, x)`` is a function of ``(field, x, times, solver)``; the
settings of the solver are one frozen, validated object, :class:`SolverSpec`, used alike by
training (``objective.method`` … of :class:`~flowkit.objectives.ffjord.FFJORD`), sampling
(``sampler.steps`` …), evaluation (``eval.method`` …) and the reflow teacher
(:class:`~flowkit.objectives.flow_matching.TeacherSpec`). Recipes keep their flat keys; each
component turns its flat arguments into one spec and passes that down.

:data:`METHODS` is the one table of methods; every ``method`` annotation (:data:`ODEMethod`)
and every list of names (:data:`FIXED_STEP`, :data:`ADAPTIVE`) is derived from it:

* **adaptive** Runge–Kutta pairs from torchdiffeq (``dopri5`` — Dormand & Prince 1980, the
  RK45 of FFJORD — ``bosh3``, ``adaptive_heun``, ``dopri8``, ``fehlberg2``; a shared-step
  ``dopri5`` solve without the adjoint runs flowkit's lean :mod:`flowkit.dopri5`, the same
  step-size control with fewer operations per stage) with ``rtol`` /
  ``atol``, an optional cap ``max_steps`` and an optional **per-sample** error norm: a step is
  accepted when the worst sample's RMS error is within tolerance, instead of the RMS over the
  whole batch, so one outlier cannot hide behind many easy samples;
* **per-sample step control** (``step_control``, ``dopri5`` with the per-sample norm): every
  sample has its own time, step size and error test, and finished samples retire from the
  batch (:mod:`flowkit.solvers_per_sample`), so the easy samples no longer take the hardest
  one's steps. It needs a field that takes per-sample times, declared by wrapping it in
  :class:`PerSampleTimeField` (``field(t [B], x, rows)``); the default ``"auto"`` uses it for such
  a field whenever the settings allow, and shares steps otherwise (every field of today);
* **fixed-step** ``euler`` (order 1), ``midpoint`` and ``heun`` (order 2) and ``rk4`` (the
  classical method, order 4), written here and evaluating every stage at its own time, so a
  solve costs exactly ``steps × stages`` evaluations per segment between consecutive times.
  A fixed-step method needs ``steps``; an adaptive one ignores it (it picks its own steps).

Times may decrease (generation runs from the prior at ``t1`` to data at ``t0``).
``adjoint=True`` differentiates by the adjoint method (Chen et al. 2018, Alg. 1) through
torchdiffeq's ``odeint_adjoint`` in either time direction, with the seminorm of Kidger et al.
(2021) for adaptive methods; a fixed-step adjoint solve uses torchdiffeq's method of the
same name (:attr:`Method.torchdiffeq`: ``heun`` is its ``heun2``, and its ``rk4`` is Kutta's
3/8 rule — same order, same four stages).

Every method is supported everywhere a solver is configured (objective, sampler, eval,
teacher): there are no subsets. A component that could only take some methods would derive
its ``Literal`` from :data:`METHODS` (e.g. ``Literal[ADAPTIVE]``) and say why.

References:
    Dormand & Prince (1980). A family of embedded Runge–Kutta formulae. J. Comp. Appl. Math.
    Chen, Rubanova, Bettencourt, Duvenaud (2018). Neural Ordinary Differential Equations. NeurIPS.
    Kidger, Chen, Lyons (2021). "Hey, that's not an ODE": Faster ODE Adjoints via Seminorms. ICML.

Example:
    >>> import torch
    >>> spec = SolverSpec("rk4", steps=10)
    >>> sol = odeint(lambda t, x: -x, torch.ones(2, 1), [0.0, 1.0], spec)
    >>> sol.nfe == spec.steps * METHODS["rk4"].stages
    True
    >>> round(sol.ys[-1, 0, 0].item(), 5)  # exp(-1)
    0.36788
    >>> try:
    ...     SolverSpec("rk4", rtol=-1.0)
    ... except SolverError as err:
    ...     print(*err.errors, sep="\n")  # doctest: +ELLIPSIS
    rtol: must be > 0, got -1.0
    steps: fixed-step method 'rk4' needs steps >= 1 (or choose an adaptive method: dopri5, ...)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .dopri5 import StepPlan, dopri5
from .solution import PerSampleTimeField, Solution, SolverError
from .solvers_per_sample import odeint_per_sample
from .constraints import PositiveFloat, PositiveInt, Rule, check_value
from .registry import did_you_mean

__all__ = [
    "Method", "METHODS", "FIXED_STEP", "ADAPTIVE", "ALL_METHODS", "ODEMethod", "Tolerance", "StepCount",
    "fixed_step_needs_steps", "SolverError", "SolverSpec", "SETTINGS", "as_solver",
    "odeint", "Solution", "CountingField", "per_sample_rms_norm", "StepControl", "PerSampleTimeField",
]


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: the ``method`` a recipe gives.
        order: order of accuracy (of the propagated solution, for adaptive pairs).
        stages: field evaluations per step of a fixed-step method; ``None`` for an adaptive one.
        torchdiffeq: torchdiffeq's name for it (adaptive solves, fixed-step adjoint solves).
        reference: where the method comes from.
    """

    name: str
    order: int
    stages: Optional[int]
    torchdiffeq: str
    reference: str

    @property
    def adaptive(self) -> bool:
        return self.stages is None


#: the one table of ODE methods, adaptive first (the order error messages list them in)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dopri5", 5, None, "dopri5", "Dormand & Prince 1980, RK5(4)"),
    Method("bosh3", 3, None, "bosh3", "Bogacki & Shampine 1989, RK3(2)"),
    Method("adaptive_heun", 2, None, "adaptive_heun", "Heun's method with an Euler error estimate, RK2(1)"),
    Method("dopri8", 8, None, "dopri8", "Prince & Dormand 1981, RK8(7)"),
    Method("fehlberg2", 2, None, "fehlberg2", "Fehlberg 1969, RK2(1)"),
    Method("euler", 1, 1, "euler", "forward Euler"),
    Method("midpoint", 2, 2, "midpoint", "explicit midpoint rule"),
    Method("heun", 2, 2, "heun2", "Heun's (explicit trapezoidal) rule"),
    Method("rk4", 4, 4, "rk4", "classical Runge–Kutta"),
)}

#: fixed-step methods and their stages (field evaluations) per step
FIXED_STEP: dict[str, int] = {m.name: m.stages for m in METHODS.values() if m.stages is not None}
#: adaptive methods (``rtol``/``atol``-controlled)
ADAPTIVE: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.adaptive)
#: every method, in table order
ALL_METHODS: tuple[str, ...] = tuple(METHODS)

#: the ``method`` annotation of every component that configures a solver
ODEMethod = Literal[ALL_METHODS]  # type: ignore[valid-type]
#: ``rtol`` / ``atol``: positive and finite
Tolerance = PositiveFloat
#: ``steps`` of a fixed-step method (per segment between consecutive times)
StepCount = PositiveInt

#: ``step_control``: ``"batch"`` (one step size for the whole batch), ``"per_sample"`` (each sample
#: its own; :mod:`flowkit.solvers_per_sample`) or ``"auto"`` (per-sample where the field takes
#: per-sample times and the settings allow it, see :meth:`SolverSpec.per_sample_problems`)
StepControl = Literal["auto", "batch", "per_sample"]
#: the one method with a per-sample implementation
PER_SAMPLE_METHOD = "dopri5"
#: the method whose shared-step solves without the adjoint run flowkit's own lean solver
#: (:mod:`flowkit.dopri5`: torchdiffeq's step-size control, fewer operations per stage); the
#: adjoint and the other adaptive methods run through torchdiffeq
LEAN_METHOD = "dopri5"

#: declared on components with ``method`` and ``steps`` arguments (and run by :class:`SolverSpec`)
fixed_step_needs_steps = Rule(
    ("steps", "method"), lambda a: a["method"] not in FIXED_STEP or a["steps"] is not None,
    "fixed-step method {method!r} needs steps >= 1 (or choose an adaptive method: " + ", ".join(ADAPTIVE) + ")")


#: what ``step_control="per_sample"`` needs from the other settings (run by :class:`SolverSpec`)
per_sample_step_rules = (
    Rule(("step_control", "method"), lambda a: a["step_control"] != "per_sample" or a["method"] == PER_SAMPLE_METHOD,
         "'per_sample' is implemented for " + PER_SAMPLE_METHOD + " only, got method {method!r} (or use step_control: "
         "batch)"),
    Rule(("step_control", "per_sample_norm"), lambda a: a["step_control"] != "per_sample" or a["per_sample_norm"],
         "'per_sample' tests each sample's own error: it needs per_sample_norm: true (or use step_control: batch)"),
    Rule(("step_control", "adjoint"), lambda a: a["step_control"] != "per_sample" or not a["adjoint"],
         "'per_sample' is for evaluation and does not differentiate: it excludes adjoint: true (use "
         "step_control: batch or auto)"),
)


@dataclass(frozen=True)
class SolverSpec:
    """The settings of an ODE solve, validated when made.

    Attributes:
        method: a name of :data:`METHODS`.
        rtol, atol: tolerances of adaptive methods (> 0).
        steps: steps of a fixed-step method between consecutive times (≥ 1; required for
            those methods, unused by adaptive ones).
        per_sample_norm: adaptive error norm per sample (max over the batch of each
            sample's RMS) instead of the batch RMS.
        adjoint: differentiate by the adjoint method (needs the field to be an ``nn.Module``
            or ``adjoint_params`` given to :func:`odeint`).
        max_steps: adaptive methods: give up after this many steps (≥ 1; ``None``: no cap);
            with per-sample steps, trial steps per sample.
        step_control: ``"batch"``: one step size for the batch (today's solves);
            ``"per_sample"``: each sample its own time, step and error test, finished samples
            retired (:mod:`flowkit.solvers_per_sample`; needs ``dopri5``, ``per_sample_norm`` and
            no adjoint, and a :class:`PerSampleTimeField`); ``"auto"`` (default): per-sample for a
            :class:`PerSampleTimeField` when those settings hold, batch otherwise.

    Raises:
        SolverError: naming every bad setting — a value outside its declared type or range
            (the same annotations recipes are checked against), an unknown method (with the
            list and a "did you mean"), a fixed-step method without ``steps``,
            ``step_control="per_sample"`` with settings it cannot honour.
    """

    method: ODEMethod = "dopri5"
    rtol: Tolerance = 1e-5
    atol: Tolerance = 1e-5
    steps: Optional[StepCount] = None
    per_sample_norm: bool = False
    adjoint: bool = False
    max_steps: Optional[PositiveInt] = None
    step_control: StepControl = "auto"

    def __post_init__(self) -> None:
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        errors, bad = [], set()
        for name, hint in _HINTS.items():
            problem = check_value(name, settings[name], hint)
            if problem is not None:
                errors.append(problem)
                bad.add(name)
        for rule in (fixed_step_needs_steps, *per_sample_step_rules):
            if not bad.intersection(rule.keys):
                found = rule.check(settings)
                if found is not None:
                    errors.append(f"{found[0]}: {found[1]}")
        if errors:
            raise SolverError(errors)
        object.__setattr__(self, "rtol", float(self.rtol))
        object.__setattr__(self, "atol", float(self.atol))

    @property
    def fixed_step(self) -> bool:
        """Whether :attr:`method` takes ``steps`` fixed steps (else it is adaptive)."""
        return self.method in FIXED_STEP

    def per_sample_problems(self) -> list[str]:
        """What keeps these settings from per-sample step control (empty: nothing)."""
        problems = []
        if self.step_control == "batch":
            problems.append("step_control other than 'batch'")
        if self.method != PER_SAMPLE_METHOD:
            problems.append(f"method {PER_SAMPLE_METHOD} (got {self.method})")
        if not self.per_sample_norm:
            problems.append("per_sample_norm: true")
        if self.adjoint:
            problems.append("adjoint: false")
        return problems

    def nfe_per_segment(self) -> Optional[int]:
        """Field evaluations between two consecutive times: ``steps × stages``; ``None`` if adaptive."""
        return self.steps * FIXED_STEP[self.method] if self.fixed_step else None


#: :class:`SolverSpec`'s annotations, ``Annotated`` ranges kept: what its values are checked against
_HINTS: dict[str, Any] = typing.get_type_hints(SolverSpec, include_extras=True)
#: the names of :class:`SolverSpec`'s settings
SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SolverSpec))


def as_solver(solver: Optional[SolverSpec] = None, default: Optional[SolverSpec] = None,
              **settings: Any) -> SolverSpec:
    """``solver``, or ``default`` (``SolverSpec()`` if None) with the named ``settings`` replaced.

    Lets a function take either ``solver=SolverSpec(...)`` or its fields one by one
    (``method="rk4", steps=8``) without spelling the defaults a second time.

    Raises:
        TypeError: an unknown setting (with a "did you mean"), or both ``solver`` and settings.
        SolverError: the settings make an invalid spec.

    Example:
        >>> as_solver(method="rk4", steps=8) == SolverSpec("rk4", steps=8)
        True
    """
    unknown = [k for k in settings if k not in SETTINGS]
    if unknown:
        raise TypeError(f"unknown solver setting {unknown[0]!r}{did_you_mean(unknown[0], SETTINGS)}; "
                        f"valid: {', '.join(SETTINGS)}")
    if solver is not None:
        if settings:
            raise TypeError(f"give solver=SolverSpec(...) or the settings {', '.join(settings)}, not both")
        if not isinstance(solver, SolverSpec):
            raise TypeError(f"solver must be a flowkit.solvers.SolverSpec, got {type(solver).__name__}")
        return solver
    base = SolverSpec() if default is None else default
    return dataclasses.replace(base, **settings) if settings else base


class CountingField(nn.Module):
    """Wraps ``field(t, x)`` and counts its calls (NFE)."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(t, x)


def per_sample_rms_norm(batch_dims: int = 1) -> Callable[[Tensor], Tensor]:
    """Error norm = max over samples of each sample's RMS (state ``[B, ...]``)."""

    def norm(err: Tensor) -> Tensor:
        if err.dim() <= batch_dims:
            return err.abs().max()
        return err.flatten(batch_dims).pow(2).mean(-1).sqrt().max()

    return norm


def odeint(
    field: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    times: Tensor | Sequence[float],
    solver: Optional[SolverSpec] = None,
    *,
    adjoint_params: Optional[Sequence[Tensor]] = None,
    step_plan: Optional[StepPlan] = None,
    **settings: Any,
) -> Solution:
    """Solve ``dx/dt = field(t, x)`` from ``times[0]``, returning the state at each time.

    Args:
        field: vector field ``field(t, x)``, or a :class:`PerSampleTimeField`, which with an
            ``auto`` or ``per_sample`` ``step_control`` (and ``dopri5``, ``per_sample_norm``) is
            solved with per-sample steps (:func:`flowkit.solvers_per_sample.odeint_per_sample`).
        x: initial state at ``times[0]``.
        times: monotone times (increasing or decreasing), at least two.
        solver: the solver (default ``SolverSpec()``: ``dopri5``, ``rtol = atol = 1e-5``).
        adjoint_params: with ``solver.adjoint``: the parameters to differentiate (default:
            those of ``field``, which must then be an ``nn.Module``).
        step_plan: warm start from an earlier solve's :attr:`Solution.step_plan` over the same
            times (shared-step ``dopri5`` without the adjoint; see :mod:`flowkit.dopri5`: only
            the step proposals change, every step is still error-controlled). Other methods
            take no plan and return none.
        **settings: instead of ``solver``, its fields one by one (``method="rk4", steps=8``).

    Returns:
        :class:`Solution` with ``ys`` of shape ``[len(times), *x.shape]``; a fixed-step solve
        has ``nfe = steps × stages × (len(times) − 1)``.

    Raises:
        SolverError: invalid settings (an unknown method, a fixed-step method without
            ``steps``, a tolerance ≤ 0, ...); ``step_control="per_sample"`` for a field that is
            not a :class:`PerSampleTimeField`.
        ValueError: ``times`` not a 1-D sequence of at least two times.
    """
    solver = as_solver(solver, **settings)
    if isinstance(field, PerSampleTimeField) and not solver.per_sample_problems():
        return odeint_per_sample(field, x, times, solver)
    if solver.step_control == "per_sample":
        raise SolverError([f"step_control: 'per_sample' needs a field that takes per-sample times, declared by "
                           f"wrapping it in flowkit.solvers.PerSampleTimeField (fn(t[B], x, rows)); got "
                           f"{type(field).__name__} (or use step_control: auto or batch)"])
    if isinstance(field, PerSampleTimeField):
        field = field.shared_time()
    times = torch.as_tensor(times, dtype=x.dtype, device=x.device) if not torch.is_tensor(times) \
        else times.to(dtype=x.dtype, device=x.device)
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError("times must be a 1-D sequence of at least two times")
    counted = field if isinstance(field, CountingField) else CountingField(field)
    start = counted.nfe
    if solver.fixed_step and not solver.adjoint:
        ys = _fixed(counted, x, times, solver.method, int(solver.steps))
    elif solver.method == LEAN_METHOD and not solver.adjoint:
        lean = dopri5(counted, x, times, rtol=solver.rtol, atol=solver.atol,
                      norm=per_sample_rms_norm() if solver.per_sample_norm else None, max_steps=solver.max_steps,
                      plan=step_plan)
        ys, step_plan = lean.ys, lean.plan
    else:
        ys, step_plan = _torchdiffeq(counted, x, times, solver, adjoint_params), None
    nfe = counted.nfe - start
    return Solution(ys, nfe, sample_evals=nfe * x.shape[0], step_plan=step_plan)


def _fixed(field, x: Tensor, times: Tensor, method: str, steps: int) -> Tensor:
    out = [x]
    for a, b in zip(times[:-1], times[1:]):
        h = (b - a) / steps
        for k in range(steps):
            t = a + k * h
            x = _STEPS[method](field, t, x, h)
        out.append(x)
    return torch.stack(out)


def _euler(f, t, x, h):
    return x + h * f(t, x)


def _midpoint(f, t, x, h):
    k1 = f(t, x)
    return x + h * f(t + h / 2, x + h / 2 * k1)


def _heun(f, t, x, h):
    k1 = f(t, x)
    k2 = f(t + h, x + h * k1)
    return x + h / 2 * (k1 + k2)


def _rk4(f, t, x, h):
    k1 = f(t, x)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


#: one step of each fixed-step method of :data:`METHODS`
_STEPS = {"euler": _euler, "midpoint": _midpoint, "heun": _heun, "rk4": _rk4}


def _torchdiffeq(field, x: Tensor, times: Tensor, solver: SolverSpec,
                 adjoint_params: Optional[Sequence[Tensor]]) -> Tensor:
    import torchdiffeq

    method = METHODS[solver.method]
    options: dict = {}
    if solver.fixed_step:
        options["step_size"] = float((times[1] - times[0]).abs() / solver.steps)
    else:
        # land exactly on the requested times instead of stepping past the end and
        # interpolating back (a field may be undefined beyond its interval, e.g. VP at t < 0)
        options["step_t"] = times[1:]
        if solver.per_sample_norm:
            options["norm"] = per_sample_rms_norm()
        if solver.max_steps is not None:
            options["max_num_steps"] = int(solver.max_steps)
    kwargs = dict(rtol=solver.rtol, atol=solver.atol, method=method.torchdiffeq, options=options)
    if not solver.adjoint:
        return torchdiffeq.odeint(field, x, times, **kwargs)
    params = tuple(adjoint_params) if adjoint_params is not None else tuple(
        p for p in field.parameters() if p.requires_grad)
    # seminorm: the adjoint's error control ignores the parameter-gradient channels
    # (Kidger et al. 2021, "Hey, that's not an ODE"), which cuts backward NFE.
    return torchdiffeq.odeint_adjoint(field, x, times, adjoint_params=params,
                                      adjoint_options={"norm": "seminorm"} if method.adaptive else None,
                                      **kwargs)
