"""One solver spec (issue 13, step 1): one table of methods, one validated SolverSpec, used by
the objective, the samplers, evaluation and the reflow teacher alike."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import typing
from pathlib import Path
from typing import Optional

import pytest
import torch

import flowkit
from flowkit.cli import main
from flowkit.config import EvalConfig
from flowkit.flow import Flow, StandardNormal
from flowkit.objectives.ffjord import FFJORD
from flowkit.objectives.flow_matching import RectifiedFlow
from flowkit.samplers.ode_samplers import FIXED_STEP_SAMPLERS, integrate_flow
from flowkit.teacher import attach_teacher
from flowkit.solvers import (ADAPTIVE, ALL_METHODS, FIXED_STEP, METHODS, SETTINGS, ODEMethod, SolverError,
                             SolverSpec, odeint)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowkit"
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
DECAY = lambda t, x: -x  # noqa: E731  dx/dt = -x: x(t) = exp(-t) x(0)


# ----------------------------------------------------------------------------- the spec validates itself

@pytest.mark.parametrize("settings,message", [
    (dict(method="dopri"), "method: 'dopri' is not one of: dopri5, bosh3"),
    (dict(method="dopri4"), "(did you mean dopri5?)"),
    (dict(rtol=-1), "rtol: must be > 0, got -1"),
    (dict(rtol=0.0), "rtol: must be > 0, got 0.0"),
    (dict(atol=float("nan")), "atol: must be a finite number, got nan"),
    (dict(atol=True), "atol: expected a number, got True"),
    (dict(method="rk4", steps=0), "steps: must be >= 1, got 0"),
    (dict(method="rk4", steps=2.5), "steps: expected an integer, got 2.5"),
    (dict(method="rk4"), "steps: fixed-step method 'rk4' needs steps >= 1"),
    (dict(per_sample_norm="yes"), "per_sample_norm: expected true or false, got 'yes'"),
    (dict(adjoint=1), "adjoint: expected true or false, got 1"),
    (dict(max_steps=0), "max_steps: must be >= 1, got 0"),
    (dict(step_control="fast"), "step_control: 'fast' is not one of: auto, batch, per_sample"),
    (dict(step_control="per_sample"), "step_control: 'per_sample' tests each sample's own error"),
    (dict(step_control="per_sample", per_sample_norm=True, method="rk4", steps=2), "implemented for dopri5 only"),
])
def test_each_bad_setting_is_refused_by_name(settings, message):
    with pytest.raises(SolverError) as info:
        SolverSpec(**settings)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)  # what the CLI and callers already catch


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(SolverError) as info:
        SolverSpec(method="dopri", rtol=-1, atol=float("inf"), steps=0, per_sample_norm="no", adjoint=None,
                   max_steps=-3, step_control="per sample")
    named = [line.split(":")[0] for line in info.value.errors]
    assert named == list(SETTINGS)


def test_spec_is_frozen_and_replace_validates():
    spec = SolverSpec("rk4", steps=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 0  # type: ignore[misc]
    with pytest.raises(SolverError, match="steps: must be >= 1"):
        dataclasses.replace(spec, steps=0)
    assert SolverSpec(rtol=1) == SolverSpec(rtol=1.0) and isinstance(SolverSpec(rtol=1).rtol, float)
    assert spec.nfe_per_segment() == 16 and SolverSpec().nfe_per_segment() is None


def test_odeint_takes_a_spec_or_its_settings_not_both():
    x = torch.ones(2, 1)
    a = odeint(DECAY, x, [0.0, 1.0], SolverSpec("rk4", steps=3))
    b = odeint(DECAY, x, [0.0, 1.0], method="rk4", steps=3)
    assert torch.equal(a.ys, b.ys) and a.nfe == b.nfe == 12
    with pytest.raises(TypeError, match="not both"):
        odeint(DECAY, x, [0.0, 1.0], SolverSpec("rk4", steps=3), steps=4)
    with pytest.raises(TypeError, match="unknown solver setting 'rtl' \\(did you mean rtol\\?\\)"):
        odeint(DECAY, x, [0.0, 1.0], rtl=1e-3)
    with pytest.raises(SolverError, match="steps: fixed-step method 'euler' needs steps"):
        odeint(DECAY, x, [0.0, 1.0], method="euler")


# ----------------------------------------------------------------------------- the one table

def test_table_lists_and_alias_are_derived_from_it():
    assert set(FIXED_STEP) | set(ADAPTIVE) == set(METHODS) and not set(FIXED_STEP) & set(ADAPTIVE)
    assert typing.get_args(ODEMethod) == ALL_METHODS == tuple(METHODS)
    assert all(FIXED_STEP[m] == METHODS[m].stages for m in FIXED_STEP)
    assert set(FIXED_STEP_SAMPLERS) == set(FIXED_STEP) <= set(flowkit.SAMPLERS.names())


def _method_names_in(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in METHODS}


def test_no_other_module_spells_out_the_method_names():
    """No ``Literal["dopri5", ...]`` or list/tuple/set/dict of method names outside flowkit/solvers.py."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "solvers.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            hand_typed = (
                isinstance(node, ast.Subscript) and getattr(node.value, "id", getattr(node.value, "attr", None))
                == "Literal" and _method_names_in(node.slice)
            ) or (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_method_names_in(node)) > 1) \
                or (isinstance(node, ast.Dict) and len(_method_names_in(ast.Tuple(elts=node.keys))) > 1)
            if hand_typed:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "method names typed by hand (derive them from flowkit.solvers.METHODS):\n" + "\n".join(found)


def _configured_solvers():
    """Every place that configures an ODE solver from flat arguments, found by its arguments."""
    places = {"eval": EvalConfig}
    for registry in flowkit.all_registries().values():
        for name in registry.names():
            obj = registry.get(name)
            params = inspect.signature(obj).parameters
            if {"rtol", "atol"} & set(params) or name in FIXED_STEP:
                places[name] = obj
    return places


def test_every_solver_argument_has_the_spec_annotation():
    spec_hints = typing.get_type_hints(SolverSpec, include_extras=True)
    places = _configured_solvers()
    assert {"eval", "ffjord", "rectified_flow", "probability_flow", "dopri5", *FIXED_STEP} <= set(places)
    for where, obj in places.items():
        target = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(target, include_extras=True)
        for key in SETTINGS:
            if key in inspect.signature(obj).parameters:
                want = spec_hints[key]
                assert hints[key] in (want, Optional[want], typing.get_args(want)[0] if
                                      typing.get_origin(want) is typing.Union else want), (where, key)
        if "method" in hints:
            assert hints["method"] == ODEMethod, where


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_still_validates(path):
    flowkit.validate(flowkit.load_recipe(path), str(path))


@pytest.mark.parametrize("recipe,overrides,message", [
    ("ffjord_8gaussians", ["sampler.rtol=-1"], "sampler.rtol: must be > 0, got -1"),
    ("ffjord_8gaussians", ["eval.method=dopri"], "eval.method: 'dopri' is not one of"),
    ("ffjord_8gaussians", ["sampler=rk4", "sampler.steps=0"], "sampler.steps: must be >= 1, got 0"),
    ("ffjord_8gaussians", ["sampler={name: probability_flow, method: rk4}"], "sampler.steps: fixed-step method"),
    ("ffjord_8gaussians", ["sampler={name: rk4, method: dopri5, steps: 4}"], "sampler.method: unknown argument of rk4"),
    ("ffjord_8gaussians", ["sampler={name: dopri5, steps: 4}"], "sampler.steps: unknown argument of dopri5"),
    ("ffjord_8gaussians", ["objective.method=rk4"], "objective.steps: fixed-step method 'rk4' needs steps"),
    ("ffjord_8gaussians", ["objective.atol=.inf"], "objective.atol: must be a finite number"),
    ("ffjord_8gaussians", ["eval.method=euler", "eval.steps=0"], "eval.steps: must be >= 1, got 0"),
    ("reflow_8gaussians", ["objective.method=rk45"], "objective.method: 'rk45' is not one of"),
    ("reflow_8gaussians", ["objective.steps=0"], "objective.steps: must be >= 1, got 0"),
])
def test_wrong_solver_settings_fail_check(recipe, overrides, message, capsys):
    rc = main(["check", str(ROOT / f"recipes/{recipe}.yaml"), *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_every_method_of_the_table_passes_check_everywhere(capsys):
    for method in ALL_METHODS:
        steps = ["objective.steps=2"] if method in FIXED_STEP else []
        for recipe, section in (("ffjord_8gaussians", "objective"), ("reflow_8gaussians", "objective")):
            args = [f"{section}.method={method}", *steps, f"sampler={{name: probability_flow, method: {method}, "
                    f"steps: 2}}", f"eval.method={method}", "eval.steps=2"]
            assert main(["check", str(ROOT / f"recipes/{recipe}.yaml"), *args]) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- constructors build the spec

def _mlp():
    return flowkit.DYNAMICS.build("mlp", dim=2, hidden=[8])


@pytest.mark.parametrize("make,named", [
    (lambda: FFJORD(_mlp, (2,), rtol=-1.0), "rtol: must be > 0"),
    (lambda: FFJORD(_mlp, (2,), method="heun"), "steps: fixed-step method 'heun' needs steps"),
    (lambda: RectifiedFlow(_mlp, (2,), teacher="run", method="rk4", steps=0), "steps: must be >= 1"),
    (lambda: EvalConfig(method="midpoint"), "steps: fixed-step method 'midpoint' needs steps"),
    (lambda: EvalConfig(atol=0.0), "atol: must be > 0"),
    (lambda: flowkit.SAMPLERS.get("probability_flow")(Flow(velocity=DECAY, prior=StandardNormal((2,))),
                                                       torch.zeros(1, 2), method="rk4"), "steps: fixed-step"),
    (lambda: flowkit.SAMPLERS.get("dopri5")(Flow(velocity=DECAY, prior=StandardNormal((2,))),
                                            torch.zeros(1, 2), rtol=float("nan")), "rtol: must be a finite"),
])
def test_constructors_refuse_bad_settings_through_the_spec(make, named):
    with pytest.raises(SolverError, match=named):
        make()


# ----------------------------------------------------------------------------- the solver's mathematics

@pytest.mark.parametrize("method", list(FIXED_STEP))
@pytest.mark.parametrize("adjoint", [False, True])
def test_fixed_step_nfe_is_steps_times_stages(method, adjoint):
    net = torch.nn.Linear(1, 1)
    field = lambda t, x: net(x)  # noqa: E731
    times = [0.0, 0.5, 1.0]  # two segments
    for steps in (1, 3):
        spec = SolverSpec(method, steps=steps, adjoint=adjoint)
        sol = odeint(field, torch.ones(2, 1, requires_grad=adjoint), times, spec,
                     adjoint_params=tuple(net.parameters()) if adjoint else None)
        assert sol.nfe == steps * METHODS[method].stages * (len(times) - 1) == 2 * spec.nfe_per_segment()
    flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
    assert FIXED_STEP_SAMPLERS[method](flow, torch.ones(3, 2), steps=5).nfe == 5 * METHODS[method].stages


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("direction", [1, -1])
def test_adaptive_methods_solve_exponential_decay(float64, method, direction):
    times = torch.linspace(0.0, 2.0, 5) if direction == 1 else torch.linspace(2.0, 0.0, 5)
    x0 = torch.tensor([[1.0], [-3.0]])
    exact = torch.exp(-(times - times[0]))[:, None, None] * x0
    errors = []
    for tol in (1e-4, 1e-6):
        sol = odeint(DECAY, x0, times, SolverSpec(method, rtol=tol, atol=tol))
        assert sol.ys.shape == (5, 2, 1) and sol.nfe > 0
        errors.append(((sol.ys - exact).abs() / (1 + exact.abs())).max().item())
    # tolerances bound the local error estimate, not the global error: at 1e-6 dopri5 is within
    # 4e-7, bosh3 and adaptive_heun within 4e-6, fehlberg2 (whose RK2(1) estimate is optimistic)
    # within 2e-4; dopri8 is exact to 1e-10 at either tolerance
    assert errors[1] < 1e-3, errors
    assert errors[1] < errors[0] / 10 or errors[0] < 1e-9, errors  # a tighter tolerance buys accuracy


def test_max_steps_reaches_the_adaptive_solver():
    with pytest.raises(AssertionError, match="max_num_steps"):
        odeint(lambda t, x: -50 * x, torch.ones(1, 1), [0.0, 10.0], SolverSpec(rtol=1e-10, atol=1e-10, max_steps=3))


# ----------------------------------------------------------------------------- one spec, four users

class _Recorder:
    """Wraps ``odeint`` and keeps the spec each solve received."""

    def __init__(self) -> None:
        self.solvers: list[SolverSpec] = []

    def __call__(self, field, x, times, solver=None, **kwargs):
        assert isinstance(solver, SolverSpec), f"a solve got {solver!r}, not a SolverSpec"
        self.solvers.append(solver)
        return odeint(field, x, times, solver, **kwargs)


def test_objective_sampler_eval_and_teacher_pass_one_spec_down(monkeypatch):
    import flowkit.likelihood
    import flowkit.objectives.ffjord
    import flowkit.samplers.ode_samplers

    rec = _Recorder()
    for module in (flowkit.likelihood, flowkit.samplers.ode_samplers):  # FFJORD solves through likelihood.integrate_augmented
        monkeypatch.setattr(module, "odeint", rec)
    recipe = flowkit.load_recipe(ROOT / "recipes/ffjord_8gaussians.yaml", [
        "dynamics.hidden=[8]", "objective.method=rk4", "objective.steps=2", "objective.rtol=1e-4",
        "sampler={name: probability_flow, method: midpoint, steps: 3}", "eval.method=euler", "eval.steps=2"])
    built = flowkit.build(recipe)
    x = torch.randn(4, 2)

    # objective: FFJORD keeps one spec and hands that very object to every block's solve
    assert built.objective.solver == SolverSpec("rk4", rtol=1e-4, steps=2)
    built.objective.loss(x)
    assert rec.solvers and all(s is built.objective.solver for s in rec.solvers)

    # sampler: its flat recipe arguments make one spec, which the result reports
    rec.solvers.clear()
    res = built.sampler(built.objective.flow(), x)
    assert res.solver == SolverSpec("midpoint", steps=3) and all(s is res.solver for s in rec.solvers)
    assert res.nfe == 3 * 2

    # eval: EvalConfig.solver is what every likelihood solve gets
    rec.solvers.clear()
    assert built.eval.solver == SolverSpec("euler", steps=2, per_sample_norm=True)
    flowkit.evaluate_nll(built.objective.flow(), x, built.eval)
    assert rec.solvers and all(s == built.eval.solver for s in rec.solvers)

    # teacher: the reflow objective's spec is the one its teacher map integrates with
    rec.solvers.clear()
    student = RectifiedFlow(_mlp, (2,), teacher="a flow", method="heun", steps=4, rtol=1e-3)
    assert student.teacher_spec.solver == SolverSpec("heun", rtol=1e-3, steps=4)
    attach_teacher(student, Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,))))
    data, _ = student.coupling(torch.zeros(3, 2), torch.ones(3, 2))
    assert rec.solvers and all(s is student.teacher_spec.solver for s in rec.solvers)
    # four Heun steps of dx/dt = -x from t = 1 to 0, h = -1/4: x ← x (1 − h + h²/2)
    assert torch.allclose(data, torch.full((3, 2), (1 + 1 / 4 + 1 / 32) ** 4), atol=1e-5)


def test_teacher_takes_any_method_of_the_table():
    """Before, the teacher knew only dopri5 or fixed-step (a second, shorter method list)."""
    flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
    for method in ADAPTIVE:
        student = RectifiedFlow(_mlp, (2,), teacher="a flow", method=method, rtol=1e-6, atol=1e-6)
        attach_teacher(student, flow)
        data, _ = student.coupling(torch.zeros(2, 2), torch.ones(2, 2))
        assert torch.allclose(data, torch.full((2, 2), math.e), rtol=1e-3), method


def test_integrate_flow_reports_its_solver():
    flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)))
    res = integrate_flow(flow, torch.ones(2, 2), method="rk4", steps=2)
    assert res.solver == SolverSpec("rk4", steps=2) and res.nfe == 8


# ----------------------------------------------------------------------------- layering

def _imports(path: Path) -> set[str]:
    """The flowkit modules ``path`` imports (relative imports resolved), at any depth."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("flowkit"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("flowkit"))
    return found


def test_solver_is_core_and_likelihood_does_not_import_samplers():
    # solvers imports the per-sample solver (below it); both share the result and error types of flowkit.solution
    assert _imports(PACKAGE / "solvers.py") <= {"flowkit.constraints", "flowkit.registry", "flowkit.solvers_per_sample",
                                                 "flowkit.dopri5", "flowkit.solution"}
    assert _imports(PACKAGE / "solvers_per_sample.py") <= {"flowkit.solution", "flowkit.flow", "flowkit.dopri5"}
    assert not _imports(PACKAGE / "flow.py") & {"flowkit.solvers", "flowkit.solvers_per_sample"}  # no cycle
    for module in ("likelihood.py", "config.py", "diffusion.py", "objectives/ffjord.py"):
        imported = _imports(PACKAGE / module)
        assert "flowkit.solvers" in imported, (module, imported)
        assert not any(m.startswith("flowkit.samplers") for m in imported), (module, imported)
    assert not (PACKAGE / "samplers" / "ode.py").exists()
    assert flowkit.odeint is odeint
