"""Recipes: plain YAML naming one component per section.

A recipe has the sections ``data``, ``dynamics``, ``objective``, ``sampler`` (each
``{name: ..., **kwargs}``), ``train`` and optionally ``eval`` (plain settings)::

    # flowkit train recipes/ffjord_8gaussians.yaml --out runs/ffj8g
    data: {name: 8gaussians}
    dynamics: {name: concatsquash, hidden: [64, 64, 64], activation: tanh}
    objective: {name: ffjord, end_time: 0.5, divergence: exact}
    sampler: {name: dopri5, rtol: 1.0e-5, atol: 1.0e-5}
    train: {steps: 1000, batch_size: 100, lr: 1.0e-3}

:func:`validate` checks the whole recipe *before anything is built* — every section,
every name against its registry, every argument against the constructor's signature
(``inspect.signature(...).bind``), and every value against its declared type and range
(:mod:`flowkit.constraints`: ``Annotated[int, Positive()]``, ``Literal`` choices; floats
must be finite) — plus the declared combinations: each component's ``argument_rules`` and
whether the sampler's ``needs`` are among what the objective's flow ``provides``. It
reports **all** problems at once, each with the file and full key path. :func:`build`
then constructs the parts.

An optional ``compare`` section holds, per objective, the settings ``flowkit compare
--objectives`` uses when it swaps that objective into the recipe (see
:func:`swap_objective`); ``flowkit train`` validates it and otherwise ignores it::

    compare:
      score_matching:
        objective: {sde: {name: vp}}             # arguments of the swapped-in objective
        sampler: {name: euler_maruyama, steps: 500}
        train: {lr: 2.0e-3}                      # over the objective's training_defaults

Reading a recipe is strict too: a duplicated key, a file that is not UTF-8 and a
command-line override that is not valid YAML each raise :class:`RecipeError` (the CLI's
exit status 2), the last one blamed on the command line rather than the file.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from .components import DATASETS, DYNAMICS, OBJECTIVES, SAMPLERS
from .config import EvalConfig, TrainConfig
from .constraints import Rule, check_value
from .registry import Registry, RegistryError, did_you_mean

__all__ = ["RecipeError", "load_recipe", "apply_overrides", "validate", "build", "Built",
           "SECTIONS", "COMMAND_LINE", "component_arguments", "parse_yaml", "resolve_defaults",
           "swap_objective", "SWAP_SECTIONS", "build_data", "default_sampler", "DEFAULT_SAMPLERS"]

COMPONENT_SECTIONS: dict[str, Registry] = {
    "data": DATASETS, "dynamics": DYNAMICS, "objective": OBJECTIVES, "sampler": SAMPLERS,
}
SETTINGS_SECTIONS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig}
#: the sections a ``compare: {<objective>: {...}}`` block may set (data and eval stay shared)
SWAP_SECTIONS = ("objective", "dynamics", "sampler", "train")
SECTIONS = tuple(COMPONENT_SECTIONS) + tuple(SETTINGS_SECTIONS) + ("compare",)
#: sections every recipe has; ``dynamics`` unless the objective declares ``needs_dynamics = False``
REQUIRED = ("data", "dynamics", "objective")
#: the sampler a recipe without a ``sampler`` section gets: the first of these the objective's
#: flow can serve (an ODE solve of its velocity, else its learned flow map), else the first
#: registered sampler that fits; none for a variational objective (it samples itself)
DEFAULT_SAMPLERS = ("dopri5", "flow_map")

# Arguments flowkit supplies itself; a recipe must not set them.
INJECTED: dict[str, tuple[str, ...]] = {
    "dynamics": ("dim", "shape"),
    "objective": ("dynamics", "shape"),
    "sampler": ("flow", "x", "cond"),
    "data": (),
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; recipes mean a number (YAML 1.2 semantics).

    A key given twice in one mapping is an error (PyYAML silently keeps the last one).
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # PyYAML reports unhashable keys itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {seen[key].line + 1}); "
                        "keep one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """Parse recipe YAML (numbers as YAML 1.2 reads them; duplicate keys refused)."""
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(exc: yaml.YAMLError, one_line: bool = False) -> str:
    """One line: ``line 3, column 5: <problem>`` (just the column for a one-line text)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark or exc.context_mark
        where = "" if mark is None else f"column {mark.column + 1}: " if one_line \
            else f"line {mark.line + 1}, column {mark.column + 1}: "
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}{exc.problem}{context}"
    return " ".join(str(exc).split())


COMMAND_LINE = "command line"


class RecipeError(ValueError):
    """One or more problems in a recipe; ``errors`` holds one line each.

    ``origin`` is ``"recipe"`` (the file ``source``) or :data:`COMMAND_LINE` (the
    overrides given for ``source``), so a message blames what the user must edit.
    """

    def __init__(self, errors: list[str], source: str = "<recipe>", *, origin: str = "recipe") -> None:
        self.errors = errors
        self.source = source
        self.origin = origin
        n = f"{len(errors)} problem{'s' * (len(errors) != 1)}"
        if origin == COMMAND_LINE:
            lines = "\n".join(f"  {COMMAND_LINE}: {e}" for e in errors)
            super().__init__(f"{n} in the command-line overrides (applied to {source}):\n{lines}")
        else:
            lines = "\n".join(f"  {source}: {e}" for e in errors)
            super().__init__(f"{n} in recipe {source}:\n{lines}")


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML recipe (UTF-8) and apply dotted ``key=value`` overrides.

    Raises:
        RecipeError: a missing or unreadable file, text that is not UTF-8, invalid YAML
            (a duplicated key included), a top level that is not a mapping, or an override
            that is not ``key.path=value`` with a YAML value.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(["no such file" if not path.exists() else "not a file"], str(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise RecipeError([f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                           "save the recipe as UTF-8"], str(path)) from None
    except OSError as exc:
        raise RecipeError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    try:
        recipe = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {_yaml_problem(exc)}"], str(path)) from None
    recipe = {} if recipe is None else recipe
    if not isinstance(recipe, dict):
        raise RecipeError(["the top level must be a mapping of sections"], str(path))
    return apply_overrides(recipe, overrides, source=str(path))


def apply_overrides(recipe: dict, overrides: Iterable[str], source: str = "<recipe>") -> dict:
    """``train.steps=200 objective.divergence=hutchinson sampler=rk4`` → new recipe.

    Values are parsed as YAML (``1e-3`` → float, ``[64,64]`` → list). A bare section
    name (``sampler=rk4``) replaces the whole component with ``{name: rk4}``.

    Raises:
        RecipeError: (origin :data:`COMMAND_LINE`) an item without ``=``, a value that is
            not valid YAML, or a path through a non-section.
    """
    recipe = copy.deepcopy(recipe)
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected key.path=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            hint = "" if isinstance(exc, yaml.constructor.ConstructorError) else "; quote text, close brackets"
            errors.append(f"override {item!r}: the value {raw!r} is not valid YAML "
                          f"[{_yaml_problem(exc, one_line=True)}]{hint}")
            continue
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in COMPONENT_SECTIONS and isinstance(value, str):
            recipe[parts[0]] = {"name": value}
            continue
        node = recipe
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                errors.append(f"override {key}: {part} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    if errors:
        raise RecipeError(errors, source, origin=COMMAND_LINE)
    return recipe


def _hints(obj: Callable) -> dict[str, Any]:
    """Resolved annotations of ``obj``'s arguments, ``Annotated`` markers kept."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: no type checks, still signature checks
        return {}


def component_arguments(obj: Callable) -> inspect.Signature:
    return inspect.signature(obj)


def _check_value(path: str, value: Any, hint: Any) -> Optional[str]:
    """``"path: problem"`` if ``value`` breaks its declared type or constraints, else None
    (:func:`flowkit.constraints.check_value`: finite floats, no bools as numbers, lists
    element by element, ``Optional``, ``Literal``, ``Annotated`` markers)."""
    return check_value(path, value, hint)


def _check_rules(section: str, rules: Iterable[Rule], args: Mapping[str, Any], bad: set[str],
                 errors: list[str]) -> None:
    """Run the declared cross-argument ``rules`` whose arguments all passed their own checks."""
    for rule in rules:
        if bad.intersection(rule.keys) or not set(rule.keys) <= set(args):
            continue
        try:
            found = rule.check(args)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            continue  # values a rule cannot read (an argument without a declared type): the constructor decides
        if found is not None:
            errors.append(f"{section}.{found[0]}: {found[1]}")


def _validate_component(section: str, spec: Any, registry: Registry, injected: tuple[str, ...],
                        errors: list[str]) -> None:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        errors.append(f"{section}: expected a mapping with a 'name' key, got {spec!r}")
        return
    if "name" not in spec:
        errors.append(f"{section}.name: missing; choose one of: {', '.join(registry.names())}")
        return
    name = spec["name"]
    if name not in registry:
        errors.append(f"{section}.name: {registry.unknown_message(name)}")
        return
    obj = registry.get(name)
    signature = inspect.signature(obj)
    params = {k: p for k, p in signature.parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k != "self"}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    allowed = [k for k in params if k not in injected]
    hints = _hints(obj)
    nested: Mapping[str, Registry] = getattr(obj, "nested", {})
    bad: set[str] = set()
    for key, value in spec.items():
        if key == "name":
            continue
        path = f"{section}.{key}"
        if key in injected:
            errors.append(f"{path}: set by flowkit, not by the recipe")
        elif key not in params and not takes_any:
            hint = did_you_mean(key, allowed)
            errors.append(f"{path}: unknown argument of {name}{hint}; valid: {', '.join(allowed) or '(none)'}")
        elif key in nested:
            before = len(errors)
            _validate_component(path, value, nested[key], (), errors)
            if len(errors) > before:
                bad.add(key)
        elif key in hints:
            problem = _check_value(path, value, hints[key])
            if problem:
                errors.append(problem)
                bad.add(key)
    for key, p in params.items():
        if p.default is p.empty and key not in injected and key not in spec:
            errors.append(f"{section}.{key}: required argument of {name} is missing")
            bad.add(key)
    args = {k: p.default for k, p in params.items() if p.default is not p.empty and k not in injected}
    args.update((k, v) for k, v in spec.items() if k != "name")
    _check_rules(section, getattr(obj, "argument_rules", ()), args, bad, errors)


def _validate_settings(section: str, spec: Any, cls: type, errors: list[str]) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        errors.append(f"{section}: expected a mapping, got {spec!r}")
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    bad: set[str] = set()
    for key, value in spec.items():
        path = f"{section}.{key}"
        if key not in fields:
            errors.append(f"{path}: unknown setting{did_you_mean(key, list(fields))}; valid: {', '.join(fields)}")
            bad.add(key)
            continue
        problem = _check_value(path, value, hints[key])
        if problem:
            errors.append(problem)
            bad.add(key)
    args = {k: v for k, v in dataclasses.asdict(cls()).items()}
    args.update(spec)
    _check_rules(section, getattr(cls, "argument_rules", ()), args, bad, errors)


#: what a sampler that declares nothing is taken to need: an ODE field
DEFAULT_NEEDS = frozenset({"velocity"})


def _component_name(recipe: Mapping, section: str, registry: Registry) -> Optional[str]:
    spec = recipe.get(section)
    name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name in registry else None


def _needs(name: str) -> frozenset[str]:
    return frozenset(getattr(SAMPLERS.get(name), "needs", DEFAULT_NEEDS))


def _provides(objective: str) -> frozenset[str]:
    return frozenset(getattr(OBJECTIVES.get(objective), "provides", DEFAULT_NEEDS))


def _check_sampler_fits(recipe: Mapping, errors: list[str]) -> None:
    """The sampler's declared ``needs`` must be among the objective's declared ``provides``;
    a variational objective (no flow) takes no ``sampler`` section at all."""
    objective = _component_name(recipe, "objective", OBJECTIVES)
    if objective is None:
        return
    if OBJECTIVES.get(objective).variational:
        if "sampler" in recipe:
            errors.append(f"sampler: objective {objective} defines no flow to sample; it draws from its own "
                          "generate(); remove this section")
        return
    sampler = _component_name(recipe, "sampler", SAMPLERS) if "sampler" in recipe else None
    if sampler is None:  # absent: the default is one that fits (default_sampler); unknown: reported already
        return
    provides, needs = _provides(objective), _needs
    missing = needs(sampler) - provides
    if missing:
        fit = [n for n in SAMPLERS.names() if needs(n) <= provides]
        errors.append(f"sampler.name: {sampler} needs a flow with {', '.join(sorted(needs(sampler)))}; "
                      f"objective {objective} provides {', '.join(sorted(provides))} only (no "
                      f"{', '.join(sorted(missing))}); choose one of: {', '.join(fit)}")


def validate(recipe: Mapping, source: str = "<recipe>") -> None:
    """Check a whole recipe; raise :class:`RecipeError` listing every problem.

    Checks every section and name, every argument against the component's signature
    and declared type/range (:mod:`flowkit.constraints`), each component's
    ``argument_rules``, and that the sampler's ``needs`` are among what the objective's
    flow ``provides`` (an SDE sampler on an objective without a score fails here, not at
    the first sample of a training run).
    """
    errors: list[str] = []
    if not isinstance(recipe, Mapping):
        raise RecipeError(["the top level must be a mapping of sections"], source)
    for key in recipe:
        if key not in SECTIONS:
            errors.append(f"{key}: unknown section{did_you_mean(str(key), SECTIONS)}; valid: {', '.join(SECTIONS)}")
    objective = _component_name(recipe, "objective", OBJECTIVES)
    own_networks = objective is not None and not OBJECTIVES.get(objective).needs_dynamics
    for key in REQUIRED:
        if key not in recipe and not (key == "dynamics" and own_networks):
            errors.append(f"{key}: missing section")
    if own_networks and "dynamics" in recipe:
        errors.append(f"dynamics: objective {objective} builds its own networks and reads no dynamics section; "
                      "remove it")
    for section, registry in COMPONENT_SECTIONS.items():
        if section in recipe:
            _validate_component(section, recipe[section], registry, INJECTED[section], errors)
    for section, cls in SETTINGS_SECTIONS.items():
        _validate_settings(section, recipe.get(section), cls, errors)
    _check_sampler_fits(recipe, errors)
    if not errors and "compare" in recipe:
        _validate_compare(recipe, errors)
    if errors:
        raise RecipeError(errors, source)


def _validate_compare(recipe: Mapping, errors: list[str]) -> None:
    """The ``compare`` blocks: registered objective names, known sections, and a valid
    recipe once each objective is swapped in (:func:`swap_objective`)."""
    blocks = recipe["compare"]
    if not isinstance(blocks, dict):
        errors.append(f"compare: expected a mapping of objective names to settings, got {blocks!r}")
        return
    for name, block in blocks.items():
        if name not in OBJECTIVES:
            errors.append(f"compare.{name}: {OBJECTIVES.unknown_message(name)}")
            continue
        if not isinstance(block, dict):
            errors.append(f"compare.{name}: expected a mapping of sections ({', '.join(SWAP_SECTIONS)}), got {block!r}")
            continue
        bad = [k for k in block if k not in SWAP_SECTIONS]
        for key in bad:
            errors.append(f"compare.{name}.{key}: not a section a comparison may set per objective"
                          f"{did_you_mean(str(key), SWAP_SECTIONS)}; valid: {', '.join(SWAP_SECTIONS)} "
                          "(data and eval are shared by every run)")
        if bad:
            continue
        try:
            validate(swap_objective(recipe, name))
        except RecipeError as exc:
            errors.extend(f"compare.{name} (the recipe with {name} swapped in): {e}" for e in exc.errors)


def _merge_component(current: Any, block: Any, name: Optional[str] = None) -> Any:
    """``block`` over ``current``: kwargs merged when the component stays the same, else replaced."""
    cur = {"name": current} if isinstance(current, str) else dict(current or {})
    new = {"name": block} if isinstance(block, str) else dict(block or {})
    if name is not None:
        new.setdefault("name", name)
    if "name" in new and new["name"] != cur.get("name"):
        return new
    return {**cur, **new}


def swap_objective(recipe: Mapping, name: str) -> dict:
    """The recipe ``flowkit compare --objectives`` trains for objective ``name``.

    Precedence, lowest first, for an objective other than the recipe's own:
    :class:`~flowkit.config.TrainConfig` defaults < the recipe's ``train`` section (written
    for its own objective) < the objective's declared ``training_defaults`` < the recipe's
    ``compare: {name: {...}}`` block; the objective is ``{name: ...}`` with the block's
    ``objective`` arguments. For the recipe's own objective the recipe's ``train`` section
    rules over the declared defaults (it was written for that objective); the block still
    applies. The ``compare`` section itself is dropped. Command-line ``--set`` overrides go
    on top (:func:`flowkit.compare.compare`).

    Example:
        >>> r = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp"},
        ...      "objective": {"name": "ffjord", "end_time": 0.5}, "train": {"lr": 5e-3, "steps": 10},
        ...      "compare": {"cfm": {"train": {"lr": 2e-3}}}}
        >>> swapped = swap_objective(r, "cfm")
        >>> swapped["objective"], swapped["train"]["lr"], swapped["train"]["steps"], "compare" in swapped
        ({'name': 'cfm'}, 0.002, 10, False)
    """
    out = copy.deepcopy(dict(recipe))
    blocks = out.pop("compare", None) or {}
    block = dict(blocks.get(name) or {})
    if _component_name(recipe, "objective", OBJECTIVES) != name:
        out["objective"] = {"name": name}
        declared = dict(getattr(OBJECTIVES.get(name), "training_defaults", {}) or {}) if name in OBJECTIVES else {}
        out["train"] = {**(out.get("train") or {}), **declared}
        if name in OBJECTIVES and not OBJECTIVES.get(name).needs_dynamics:  # builds its own networks
            out.pop("dynamics", None)
        if name in OBJECTIVES and OBJECTIVES.get(name).variational:  # samples itself
            out.pop("sampler", None)
    for section in ("objective", "dynamics", "sampler"):
        if section in block:
            out[section] = _merge_component(out.get(section), block[section],
                                            name if section == "objective" else None)
    if "train" in block:
        out["train"] = {**(out.get("train") or {}), **dict(block["train"] or {})}
    return out


def _plain(value: Any) -> Any:
    """``value`` as YAML writes it (tuples as lists), or ``_NOT_PLAIN`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


_NOT_PLAIN = object()


def _component_defaults(spec: Any, registry: Registry, injected: tuple[str, ...]) -> Any:
    name, kwargs = _split(spec)
    obj = registry.get(name)
    nested: Mapping[str, Registry] = getattr(obj, "nested", {})
    out: dict[str, Any] = {"name": name}
    for key, p in inspect.signature(obj).parameters.items():
        if key == "self" or key in injected or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if key in kwargs:
            value = kwargs[key]
            out[key] = _component_defaults(value, nested[key], ()) if key in nested and isinstance(
                value, (dict, str)) else value
        elif p.default is not p.empty and _plain(p.default) is not _NOT_PLAIN and not (
                key in nested and p.default is None):  # an absent nested component stays absent
            out[key] = _plain(p.default)
    out.update({k: v for k, v in kwargs.items() if k not in out})  # **kwargs of a component that takes any
    return out


def resolve_defaults(recipe: Mapping) -> dict:
    """``recipe`` with every default written out: each component's constructor defaults and
    every ``train`` / ``eval`` setting.

    A run saves this, so a default changed in a later flowkit never silently rebuilds a
    different model from an old run's ``recipe.yaml``. The recipe must be valid.

    Example:
        >>> r = resolve_defaults({"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp"},
        ...                       "objective": {"name": "cfm"}})
        >>> r["train"]["lr"], r["dynamics"]["hidden"], r["sampler"]["name"]
        (0.001, [64, 64, 64], 'dopri5')
    """
    out = copy.deepcopy(dict(recipe))
    for section, registry in COMPONENT_SECTIONS.items():
        spec = default_sampler(recipe) if section == "sampler" else recipe.get(section)
        if spec is not None:
            out[section] = _component_defaults(spec, registry, INJECTED[section])
    for section, cls in SETTINGS_SECTIONS.items():
        given = dict(recipe.get(section) or {})
        settings = dataclasses.asdict(cls(**given))
        out[section] = {k: _plain(v) for k, v in settings.items() if _plain(v) is not _NOT_PLAIN}
    return out


def _split(spec: Any) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    spec = dict(spec)
    return spec.pop("name"), spec


def build_component(registry: Registry, spec: Any, **injected: Any) -> Any:
    """Build ``{name: ..., **kwargs}`` from ``registry``, building nested components first."""
    name, kwargs = _split(spec)
    obj = registry.get(name)
    for key, sub in getattr(obj, "nested", {}).items():
        if key in kwargs and isinstance(kwargs[key], (dict, str)):
            kwargs[key] = build_component(sub, kwargs[key])
    return obj(**kwargs, **injected)


def _bind_sampler(name: str, kwargs: dict) -> Callable:
    """``sampler(flow, x, cond=None, **extra)``: the registered sampler ``name`` with the recipe's
    arguments (``extra`` over them); its ``name`` attribute is the registered name."""
    sampler_fn = SAMPLERS.get(name)

    def sampler(flow, x, cond=None, **extra):
        return sampler_fn(flow, x, cond=cond, **{**kwargs, **extra})

    sampler.name = name  # type: ignore[attr-defined]
    return sampler


@dataclass
class Built:
    """Everything a recipe describes, constructed. ``sampler`` is ``None`` for an objective that
    defines no flow to sample (``variational``: it draws from its own ``generate``)."""

    recipe: dict
    dataset: Any
    objective: Any
    sampler: Optional[Callable]
    train: TrainConfig
    eval: EvalConfig

    @property
    def conditional(self) -> bool:
        """Whether the dynamics take a condition (``num_classes`` or ``cond_dim`` set)."""
        if "dynamics" not in self.recipe:  # an objective that builds its own networks (vae)
            return False
        _, kwargs = _split(self.recipe["dynamics"])
        return bool(kwargs.get("num_classes") or kwargs.get("cond_dim"))


def default_sampler(recipe: Mapping) -> Optional[dict]:
    """The recipe's ``sampler`` section, or the default for its objective: the first of
    :data:`DEFAULT_SAMPLERS` the objective's declared ``provides`` can serve, else the first
    registered sampler that fits; ``None`` for a variational objective (it samples itself) or
    one no sampler fits.

    Example:
        >>> default_sampler({"objective": {"name": "cfm"}}), default_sampler({"objective": {"name": "consistency"}})
        ({'name': 'dopri5'}, {'name': 'flow_map'})
        >>> default_sampler({"objective": {"name": "vae"}}) is None
        True
    """
    if recipe.get("sampler"):
        return dict(recipe["sampler"])
    objective = _component_name(recipe, "objective", OBJECTIVES)
    if objective is None:
        return {"name": DEFAULT_SAMPLERS[0]}
    if OBJECTIVES.get(objective).variational:
        return None
    provides = _provides(objective)
    fit = [n for n in DEFAULT_SAMPLERS if n in SAMPLERS and _needs(n) <= provides]
    fit += [n for n in SAMPLERS.names() if _needs(n) <= provides]
    return {"name": fit[0]} if fit else None


def build_data(recipe: Mapping, source: str = "<recipe>") -> Any:
    """The dataset of a recipe's ``data`` section alone (checked like :func:`validate` checks it;
    the other sections are neither required nor read): ``flowkit nll --data`` scores a model
    brought from elsewhere on it.

    Raises:
        RecipeError: no ``data`` section, or a bad one.
    """
    errors: list[str] = []
    if not isinstance(recipe, Mapping) or "data" not in recipe:
        raise RecipeError(["data: missing section (the dataset to evaluate on)"], source)
    _validate_component("data", recipe["data"], DATASETS, INJECTED["data"], errors)
    if errors:
        raise RecipeError(errors, source)
    return build_component(DATASETS, recipe["data"])


def build(recipe: Mapping, source: str = "<recipe>") -> Built:
    """Validate then construct the dataset, objective (holding its dynamics) and sampler.

    An objective that declares ``needs_teacher`` (``rectified_flow``) is built without its
    teacher: :func:`flowkit.trainer.train` hands it one (:func:`flowkit.teacher.attach_teacher`),
    which loads — or trains — itself at the first batch.
    """
    recipe = copy.deepcopy(dict(recipe))
    validate(recipe, source)
    dataset = build_component(DATASETS, recipe["data"])
    shape = tuple(dataset.shape)
    dyn_name, dyn_kwargs = _split(recipe["dynamics"]) if "dynamics" in recipe else (None, {})

    def make_dynamics(shape: tuple[int, ...] = shape, **overrides: Any):
        """Build the recipe's network (for ``shape``, e.g. one scale of a multiscale CNF)."""
        cls = DYNAMICS.get(dyn_name)
        kwargs = {**dyn_kwargs, **overrides, "dim": math.prod(shape)}
        if "shape" in inspect.signature(cls).parameters:
            kwargs["shape"] = tuple(shape)
        return cls(**kwargs)

    dkw = dyn_kwargs
    if dkw.get("num_classes") and not getattr(dataset, "num_classes", None):
        raise RecipeError([f"dynamics.num_classes: dataset {_split(recipe['data'])[0]} has no labels "
                           "to condition on"], source)
    objective = build_component(OBJECTIVES, recipe["objective"], dynamics=None if dyn_name is None else make_dynamics,
                                shape=shape)
    spec = default_sampler(recipe)
    sampler = None if spec is None else _bind_sampler(*_split(spec))
    return Built(recipe, dataset, objective, sampler,
                 TrainConfig(**(recipe.get("train") or {})), EvalConfig(**(recipe.get("eval") or {})))
