"""Every user error in a recipe is caught by `flowkit check`, before anything is built.

Contracts over the registries, not lists of cases:

* every int/float argument of every registered component and of the ``train`` / ``eval``
  settings declares its range (:mod:`flowkit.constraints`), and `flowkit check` enforces
  exactly that range for 0, -1, NaN, ±inf and ``true`` — exit 2 with one line and no
  traceback where the declaration refuses the value, exit 0 where it allows it (and then
  the component really accepts it);
* each objective's declared ``provides`` is what its ``flow()`` fills in, each sampler's
  declared ``needs`` is what it uses, and `flowkit check` refuses a sampler whose needs
  the objective does not provide;
* reading a recipe: duplicated keys, non-UTF-8 text and a bad command-line override are
  recipe errors (exit 2) that say where the problem is.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml

import flowkit
from flowkit.cli import main
from flowkit.config import EvalConfig, TrainConfig
from flowkit.constraints import SEQUENCE_ORIGINS, Constraint, constraints_of
from flowkit.flow import Flow, StandardNormal
from flowkit.recipe import COMMAND_LINE, INJECTED, RecipeError, load_recipe, validate
from flowkit.samplers.base import FLOW_PARTS
from flowkit.solvers import ADAPTIVE, FIXED_STEP

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))



# ------------------------------------------------------------------ the declarations

def _union_args(hint):
    base, _ = constraints_of(hint)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(base) if a is not type(None)]
    return [hint]


Form = tuple[type, tuple[Constraint, ...]]  # (int or float, its constraints)


def numeric_forms(hint) -> tuple[list[Form], list[Form]]:
    """``(scalars, lists)``: the int/float forms a hint accepts, each with its constraints."""
    scalars, lists = [], []
    for arm in _union_args(hint):
        base, marks = constraints_of(arm)
        origin = typing.get_origin(base)
        if base in (int, float):
            scalars.append((base, marks))
        elif base in SEQUENCE_ORIGINS or origin in SEQUENCE_ORIGINS:
            args = [a for a in typing.get_args(base) if a is not Ellipsis]
            if len(args) == 1:
                inner, inner_marks = constraints_of(args[0])
                if inner in (int, float):
                    lists.append((inner, inner_marks))
    return scalars, lists


def _hints(obj):
    return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj, include_extras=True)


def _settable(obj, injected=()):
    sig = inspect.signature(obj)
    return [n for n, p in sig.parameters.items()
            if n not in injected and n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


COMPONENT_REGISTRIES = {
    "dynamics": flowkit.DYNAMICS, "objective": flowkit.OBJECTIVES, "sampler": flowkit.SAMPLERS,
    "data": flowkit.DATASETS, "objective.sde": flowkit.PATHS, "objective.path": flowkit.PATHS,
    "objective.coupling": flowkit.COUPLINGS, "objective.posterior": flowkit.posteriors.POSTERIORS,
}


def _components():
    out = []
    for section, registry in COMPONENT_REGISTRIES.items():
        injected = INJECTED.get(section, ())
        for name in registry.names():
            if name.startswith("test_"):
                continue
            out.append((section, name, registry.get(name), injected))
    return out


COMPONENTS = _components()


@pytest.mark.parametrize("section,name,obj,injected", [
    pytest.param(*c, id=f"{c[0]}:{c[1]}") for c in COMPONENTS])
def test_every_numeric_argument_declares_its_range(section, name, obj, injected):
    hints = _hints(obj)  # must resolve: unresolvable annotations would skip every check
    undeclared = []
    for key in _settable(obj, injected):
        scalars, lists = numeric_forms(hints.get(key, typing.Any))
        if any(not marks for _, marks in scalars + lists):
            undeclared.append(key)
    assert not undeclared, f"{section} {name}: numeric arguments without a declared range: {undeclared}"


@pytest.mark.parametrize("cls", [TrainConfig, EvalConfig])
def test_every_numeric_setting_declares_its_range(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    undeclared = [f.name for f in dataclasses.fields(cls)
                  if any(not marks for _, marks in sum(numeric_forms(hints[f.name]), []))]
    assert not undeclared


# ------------------------------------------------------------------ driving `flowkit check`

BASE = {
    "data": {"name": "8gaussians"},
    "dynamics": {"name": "mlp", "hidden": [8]},
    "objective": {"name": "cfm"},
    "sampler": {"name": "dopri5"},
}


def _base_for(section: str, name: str) -> dict:
    """A valid recipe that uses component ``name`` in ``section`` (and fits its needs)."""
    recipe = {k: dict(v) for k, v in BASE.items()}
    top, _, sub = section.partition(".")
    obj = COMPONENT_REGISTRIES[section].get(name)
    spec = {"name": name}
    nested = getattr(obj, "nested", {})
    for key, p in inspect.signature(obj).parameters.items():  # required: a component or a dummy path
        if p.default is p.empty and key not in INJECTED.get(section, ()) and key != "self" \
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            spec[key] = {"name": "8gaussians"} if key in nested else "/nonexistent/flowkit-test"
    if sub:  # a nested component: put it in an objective that takes it
        host = {"sde": "score_matching", "path": "cfm", "coupling": "cfm", "posterior": "vae"}[sub]
        recipe["objective"] = {"name": host, sub: spec}
    else:
        recipe[top] = spec
    host = COMPONENT_REGISTRIES["objective"].get(recipe["objective"]["name"])
    if not host.needs_dynamics:  # builds its own networks (vae)
        recipe.pop("dynamics")
    if host.variational:  # samples itself: no sampler section
        recipe.pop("sampler")
        recipe["data"] = {"name": "digits", "binarize": True}
    if top == "dynamics" and name in ("unet", "concat_conv"):
        recipe["data"] = {"name": "digits"}
    if "sampler" in recipe and not _fits(recipe["objective"]["name"], recipe["sampler"]["name"]):
        if top == "sampler":  # host the sampler in an objective whose flow can feed it
            recipe["objective"] = {"name": next(
                o for o in flowkit.OBJECTIVES.names() if _fits(o, name) and not _required_args(o))}
        else:  # the default sampler is one the objective can feed (recipe.default_sampler)
            recipe.pop("sampler")
    return recipe


def _required_args(objective: str) -> list[str]:
    sig = inspect.signature(flowkit.OBJECTIVES.get(objective))
    return [k for k, p in sig.parameters.items() if p.default is p.empty and k not in INJECTED["objective"]
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


VALUES = {"0": 0, "-1": -1, ".nan": math.nan, ".inf": math.inf, "-.inf": -math.inf, "true": True}


def _expected_ok(base: type, marks, value) -> bool:
    """The declaration's verdict on a scalar value, read straight from the markers."""
    if isinstance(value, bool):
        return False  # a bool is not a number
    if base is int and not isinstance(value, int):
        return False
    if base is float and not math.isfinite(value):
        return False
    return all(m.check(value) for m in marks)


def _cases():
    cases = []
    for section, name, obj, injected in COMPONENTS:
        hints = _hints(obj)
        for key in _settable(obj, injected):
            scalars, lists = numeric_forms(hints.get(key, typing.Any))
            if scalars or lists:
                cases.append(pytest.param(section, name, key, scalars, lists, id=f"{section}:{name}.{key}"))
    for section, cls in (("train", TrainConfig), ("eval", EvalConfig)):
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            scalars, lists = numeric_forms(hints[f.name])
            if scalars or lists:
                cases.append(pytest.param(section, None, f.name, scalars, lists, id=f"{section}.{f.name}"))
    return cases


CASES = _cases()


def test_the_drive_covers_every_registry_and_setting():
    kinds = {c.values[0] for c in CASES}
    assert {"dynamics", "objective", "sampler", "data", "train", "eval"} <= kinds
    assert len(CASES) > 80


def _check(recipe_file: Path, overrides: list[str], capsys) -> tuple[int, str]:
    rc = main(["check", str(recipe_file), *overrides])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return rc, captured.err


def _rules_hold(section: str, name, recipe: dict, key: str, value) -> bool:
    """The declared cross-argument rules that involve ``key`` hold with ``key = value``."""
    if name is None:
        cls = {"train": TrainConfig, "eval": EvalConfig}[section]
        args = {**dataclasses.asdict(cls()), **recipe.get(section, {})}
    else:
        cls = COMPONENT_REGISTRIES[section].get(name)
        spec = recipe
        for part in section.split("."):
            spec = spec[part]
        args = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
        args.update((k, v) for k, v in spec.items() if k != "name")
    args[key] = value
    return all(rule.holds(args) for rule in getattr(cls, "argument_rules", ()) if key in rule.keys)


@pytest.mark.parametrize("section,name,key,scalars,lists", CASES)
def test_check_enforces_the_declared_range(section, name, key, scalars, lists, tmp_path, capsys):
    recipe = _base_for(section, name) if name else {k: dict(v) for k, v in BASE.items()}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert _check(recipe_file, [], capsys)[0] == 0, "the base recipe must be valid"
    path = f"{section}.{key}"
    accepted = []
    for text, value in VALUES.items():
        in_range = any(_expected_ok(base, marks, value) for base, marks in scalars)
        ok = in_range and _rules_hold(section, name, recipe, key, value)
        rc, err = _check(recipe_file, [f"{path}={text}"], capsys)
        assert rc == (0 if ok else 2), f"{path}={text}: exit {rc}, expected {0 if ok else 2}\n{err}"
        if ok:
            accepted.append(value)
        else:  # one line naming the key (a broken rule names the rule's first key)
            assert (path if not in_range else f"{section}.") in err and err.count("\n") <= 3, err
    for base, marks in lists:  # list-valued: bad elements and a bare scalar are refused
        for text, value in VALUES.items():
            if not _expected_ok(base, marks, value):
                rc, err = _check(recipe_file, [f"{path}=[{text}]"], capsys)
                assert rc == 2 and f"{path}[0]" in err, err
        if not scalars:
            rc, err = _check(recipe_file, [f"{path}=3"], capsys)
            assert rc == 2 and "expected a list" in err, err
    if accepted and section in ("dynamics", "objective", "data") and name:
        _construct_with(section, name, key, accepted)


def _construct_with(section: str, name: str, key: str, values: list) -> None:
    """Declared-valid values are accepted by the constructor itself (the declaration is not
    looser than the code)."""
    obj = COMPONENT_REGISTRIES[section].get(name)
    required = [k for k, p in inspect.signature(obj).parameters.items()
                if p.default is p.empty and k not in INJECTED.get(section, ()) and k != "self"]
    if required:  # files / hub names: nothing to build offline
        return
    for value in values:
        if section == "dynamics":
            shape = (1, 8, 8) if name in ("unet", "concat_conv") else (2,)
            kwargs = {"dim": math.prod(shape), key: value}
            if "shape" in inspect.signature(obj).parameters:
                kwargs["shape"] = shape
            obj(**kwargs)
        elif section == "objective":
            obj(dynamics=lambda **kw: flowkit.dynamics.MLP(dim=2, hidden=[8], **kw), shape=(2,), **{key: value})
        else:
            obj(**{key: value})


# ------------------------------------------------------------------ capabilities

def _small_objective(name: str):
    obj = flowkit.OBJECTIVES.get(name)
    kwargs = {"teacher": "/nonexistent/teacher-run"} if "teacher" in _required_args(name) else {}
    return obj(dynamics=lambda **kw: flowkit.dynamics.MLP(dim=2, hidden=[8], **kw), shape=(2,), **kwargs)


@pytest.mark.parametrize("name", [n for n in flowkit.OBJECTIVES.names() if not n.startswith("test_")])
def test_objective_provides_exactly_what_its_flow_has(name):
    declared = flowkit.OBJECTIVES.get(name).provides
    if flowkit.OBJECTIVES.get(name).variational:  # no flow at all, and it says so
        assert declared == frozenset()
        with pytest.raises(flowkit.FieldError, match="defines no flow"):
            _small_objective(name).flow()
        return
    flow = _small_objective(name).flow()
    actual = {part for part in FLOW_PARTS if getattr(flow, part) is not None}
    assert declared == actual


def _flow_with(parts: set[str]) -> Flow:
    one = lambda t: torch.ones_like(torch.as_tensor(t, dtype=torch.float32))  # noqa: E731
    full = dict(velocity=lambda t, x, c=None: -0.5 * x, score=lambda t, x, c=None: -x,
                drift=lambda t, x, c=None: 0 * x, diffusion=one, denoise=lambda t, x, c=None: x,
                path=flowkit.PATHS.build("vp"), flow_map=lambda x, t, s, c=None: x)
    kwargs = {k: v for k, v in full.items() if k in parts}
    kwargs.setdefault("velocity", None)
    return Flow(prior=StandardNormal((2,)), **kwargs)


@pytest.mark.parametrize("name", [n for n in flowkit.SAMPLERS.names() if not n.startswith("test_")])
def test_sampler_needs_exactly_what_it_declares(name):
    fn = flowkit.SAMPLERS.get(name)
    needs = fn.needs  # declared by every flowkit sampler, not defaulted
    assert needs <= set(FLOW_PARTS)
    options = {"steps": 4} if "steps" in inspect.signature(fn).parameters else {}
    if name == "probability_flow":
        options = {}
    out = fn(_flow_with(set(needs)), torch.randn(3, 2), **options)  # enough
    assert out.x.shape == (3, 2) and torch.isfinite(out.x).all()
    for part in needs:  # and each declared part is really used
        with pytest.raises((ValueError, TypeError)):
            fn(_flow_with(set(needs) - {part}), torch.randn(3, 2), **options)


def _fits(objective: str, sampler: str) -> bool:
    return flowkit.SAMPLERS.get(sampler).needs <= flowkit.OBJECTIVES.get(objective).provides


@pytest.mark.parametrize("objective", [n for n in flowkit.OBJECTIVES.names() if not n.startswith("test_")])
def test_check_refuses_a_sampler_the_objective_cannot_feed(objective, tmp_path, capsys):
    recipe = {**BASE, "objective": _base_for("objective", objective)["objective"]}
    variational = flowkit.OBJECTIVES.get(objective).variational
    if variational:  # its own base recipe (no dynamics), then any sampler section is refused
        recipe = _base_for("objective", objective)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    fit = [] if variational else [s for s in flowkit.SAMPLERS.names() if _fits(objective, s)]
    if variational:
        for sampler in flowkit.SAMPLERS.names():
            rc, err = _check(recipe_file, [f"sampler={sampler}"], capsys)
            assert rc == 2 and f"sampler: objective {objective} defines no flow to sample" in err
        return
    for sampler in flowkit.SAMPLERS.names():
        rc, err = _check(recipe_file, [f"sampler={sampler}"], capsys)
        if sampler in fit:
            assert rc == 0, err
        else:
            assert rc == 2
            assert f"sampler.name: {sampler} needs a flow with" in err
            assert f"objective {objective} provides" in err and f"choose one of: {', '.join(fit)}" in err


def test_ffjord_with_euler_maruyama_fails_check_not_training(capsys):
    rc, err = _check(ROOT / "recipes/ffjord_8gaussians.yaml", ["sampler=euler_maruyama"], capsys)
    assert rc == 2
    assert "euler_maruyama needs a flow with diffusion, drift, score" in err
    assert "objective ffjord provides velocity only" in err and "dopri5" in err


# ------------------------------------------------------------------ cross-argument rules

@pytest.mark.parametrize("recipe,overrides,message", [
    ("ffjord_8gaussians", ["objective.method=rk4"], "objective.steps: fixed-step method 'rk4' needs steps"),
    ("ffjord_8gaussians", ["eval.method=euler"], "eval.steps: fixed-step method 'euler' needs steps"),
    ("cfm_8gaussians", ["sampler={name: probability_flow, method: heun}"], "sampler.steps: fixed-step"),
    ("score_vp_8gaussians", ["objective.importance_sampling=true", "objective.weighting=sigma2"],
     "objective.importance_sampling: importance sampling"),
    ("diffflow_rings", ["objective.steps=[10, 20]", "objective.milestones=[]"],
     "objective.milestones: steps needs one more entry than milestones"),
    ("diffflow_rings", ["objective.steps=[10, 20, 30]", "objective.milestones=[50, 20]"],
     "objective.milestones: milestones must increase"),
    ("score_vp_8gaussians", ["sampler={name: euler_maruyama, backend: torchsde, grid_power: 2.0}"],
     "sampler.grid_power: backend 'torchsde' takes uniform steps"),
    ("cfm_digits", ["dynamics.groups=7"], "dynamics.groups: groups=7 must divide"),
])
def test_combinations_that_cannot_work_fail_check(recipe, overrides, message, capsys):
    rc, err = _check(ROOT / f"recipes/{recipe}.yaml", overrides, capsys)
    assert rc == 2 and message in err, err


def test_eval_method_is_one_of_the_solver_table(capsys):
    rc, err = _check(ROOT / "recipes/ffjord_8gaussians.yaml", ["eval.method=dopri"], capsys)
    assert rc == 2 and "eval.method: 'dopri' is not one of:" in err
    assert ", ".join((*ADAPTIVE, *FIXED_STEP)) in err
    for method in ADAPTIVE:
        assert _check(ROOT / "recipes/ffjord_8gaussians.yaml", [f"eval.method={method}"], capsys)[0] == 0
    assert _check(ROOT / "recipes/ffjord_8gaussians.yaml", ["eval.method=rk4", "eval.steps=8"], capsys)[0] == 0


@pytest.mark.parametrize("override,message", [
    ("dynamics.hidden=64", "dynamics.hidden: expected a list (list of int >= 1), got 64"),
    ("dynamics.hidden=[64, 0]", "dynamics.hidden[1]: must be >= 1, got 0"),
    ("dynamics.hidden=[64, 2.5]", "dynamics.hidden[1]: expected an integer, got 2.5"),
    ("train.trackers=tensorboard", "train.trackers: expected a list"),
    ("train.ema=1.0", "train.ema: must be in [0, 1), got 1.0"),
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.steps=true", "train.steps: expected an integer, got True"),
    ("objective.rtol=-1e-5", "objective.rtol: must be > 0, got -1e-05"),
])
def test_values_are_checked_against_their_declarations(override, message, capsys):
    rc, err = _check(ROOT / "recipes/ffjord_8gaussians.yaml", [override], capsys)
    assert rc == 2 and message in err, err


def test_valid_edges_pass(capsys):
    ok = ["train.ema=0.999", "train.warmup=0", "train.checkpoint_every=0", "train.keep_checkpoints=0",
          "train.grad_clip=0", "train.threads=0", "objective.kinetic=0", "dynamics.hidden=[]",
          "eval.steps=null", "train.lr=1"]
    assert _check(ROOT / "recipes/ffjord_8gaussians.yaml", ok, capsys)[0] == 0


# ------------------------------------------------------------------ reading YAML

def test_duplicated_keys_are_errors_with_the_line(tmp_path, capsys):
    f = tmp_path / "dup.yaml"
    f.write_text("data: {name: 8gaussians}\ndynamics: {name: mlp}\nobjective: {name: cfm}\n"
                 "train: {steps: 5}\ntrain: {steps: 6}\n")
    rc, err = _check(f, [], capsys)
    assert rc == 2 and "dup.yaml: not valid YAML: line 5, column 1: duplicate key 'train' (first given at line 4)" in err
    f.write_text("data: {name: 8gaussians}\ndynamics:\n  name: mlp\n  hidden: [8]\n  hidden: [16]\nobjective: {name: cfm}\n")
    rc, err = _check(f, [], capsys)
    assert rc == 2 and "line 5, column 3: duplicate key 'hidden' (first given at line 4)" in err


def test_merge_keys_may_still_be_overridden(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {name: mlp, hidden: [8]}\n".replace("base", "dynamics") +
                 "data: {name: 8gaussians}\nobjective: {name: cfm}\n"
                 "sampler: {<<: {name: rk4, steps: 4}, steps: 8}\n")
    assert load_recipe(f)["sampler"] == {"name": "rk4", "steps": 8}


def test_non_utf8_file_is_a_recipe_error(tmp_path, capsys):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("data: {name: 8gaussians}\n# café\ndynamics: {name: mlp}\nobjective: {name: cfm}\n".encode("latin-1"))
    rc, err = _check(f, [], capsys)
    assert rc == 2 and "latin1.yaml: not UTF-8 text (byte 0xe9 on line 2); save the recipe as UTF-8" in err


def test_bad_override_blames_the_command_line(capsys):
    recipe = ROOT / "recipes/ffjord_8gaussians.yaml"
    rc, err = _check(recipe, ["train.lr=[1"], capsys)
    assert rc == 2
    assert "in the command-line overrides (applied to" in err
    assert f"{COMMAND_LINE}: override 'train.lr=[1': the value '[1' is not valid YAML [column 3:" in err
    assert f"{recipe}: " not in err  # the file is not blamed
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe, ["dynamics.hidden={a: 1, a: 2}"])
    assert exc.value.origin == COMMAND_LINE and "duplicate key 'a'" in exc.value.errors[0]


def test_every_error_at_once():
    recipe = load_recipe(ROOT / "recipes/ffjord_8gaussians.yaml",
                         ["train.lr=-1", "train.batch_size=0", "eval.rtol=.nan", "sampler=euler_maruyama"])
    with pytest.raises(RecipeError) as exc:
        validate(recipe, "r.yaml")
    keys = sorted(e.split(":")[0] for e in exc.value.errors)
    assert keys == ["eval.rtol", "sampler.name", "train.batch_size", "train.lr"]


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_passes_check(path, capsys):
    rc, err = _check(path, [], capsys)
    assert rc == 0, err
