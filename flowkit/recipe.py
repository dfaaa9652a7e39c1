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
(``inspect.signature(...).bind``), ``Literal`` choices — and reports **all** problems at
once, each with the file and full key path. :func:`build` then constructs the parts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import yaml

from .components import DATASETS, DYNAMICS, OBJECTIVES, SAMPLERS
from .config import EvalConfig, TrainConfig
from .registry import Registry, RegistryError, did_you_mean

__all__ = ["RecipeError", "load_recipe", "apply_overrides", "validate", "build", "Built",
           "SECTIONS", "component_arguments"]

COMPONENT_SECTIONS: dict[str, Registry] = {
    "data": DATASETS, "dynamics": DYNAMICS, "objective": OBJECTIVES, "sampler": SAMPLERS,
}
SETTINGS_SECTIONS: dict[str, type] = {"train": TrainConfig, "eval": EvalConfig}
SECTIONS = tuple(COMPONENT_SECTIONS) + tuple(SETTINGS_SECTIONS)
REQUIRED = ("data", "dynamics", "objective")

# Arguments flowkit supplies itself; a recipe must not set them.
INJECTED: dict[str, tuple[str, ...]] = {
    "dynamics": ("dim", "shape"),
    "objective": ("dynamics", "shape"),
    "sampler": ("flow", "x", "cond"),
    "data": (),
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; recipes mean a number (YAML 1.2 semantics)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """One or more problems in a recipe; ``errors`` holds one line each."""

    def __init__(self, errors: list[str], source: str = "<recipe>") -> None:
        self.errors = errors
        self.source = source
        lines = "\n".join(f"  {source}: {e}" for e in errors)
        super().__init__(f"{len(errors)} problem{'s' * (len(errors) != 1)} in recipe {source}:\n{lines}")


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML recipe and apply dotted ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"no such file"], str(path))
    try:
        recipe = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(recipe, dict):
        raise RecipeError(["the top level must be a mapping of sections"], str(path))
    return apply_overrides(recipe, overrides, source=str(path))


def apply_overrides(recipe: dict, overrides: Iterable[str], source: str = "<recipe>") -> dict:
    """``train.steps=200 objective.divergence=hutchinson sampler=rk4`` → new recipe.

    Values are parsed as YAML (``1e-3`` → float, ``[64,64]`` → list). A bare section
    name (``sampler=rk4``) replaces the whole component with ``{name: rk4}``.
    """
    recipe = copy.deepcopy(recipe)
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected key.path=value")
            continue
        key, raw = item.split("=", 1)
        value = parse_yaml(raw) if raw != "" else None
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
        raise RecipeError(errors, source)
    return recipe


def _hints(obj: Callable) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: no type checks, still signature checks
        return {}


def component_arguments(obj: Callable) -> inspect.Signature:
    return inspect.signature(obj)


def _yaml_scalar(value: Any) -> str:
    """A choice as a recipe writes it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_value(path: str, value: Any, hint: Any) -> Optional[str]:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            shown = ", ".join(_yaml_scalar(c) for c in choices)
            return f"{path}: {value!r} is not one of: {shown}{did_you_mean(str(value), [str(c) for c in choices])}"
    if hint in (int,) and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{path}: expected an integer, got {value!r}"
    if hint in (float,) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{path}: expected a number, got {value!r}"
    if hint in (bool,) and not isinstance(value, bool):
        return f"{path}: expected true or false, got {value!r}"
    return None


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
            _validate_component(path, value, nested[key], (), errors)
        elif key in hints:
            problem = _check_value(path, value, hints[key])
            if problem:
                errors.append(problem)
    for key, p in params.items():
        if p.default is p.empty and key not in injected and key not in spec:
            errors.append(f"{section}.{key}: required argument of {name} is missing")


def _validate_settings(section: str, spec: Any, cls: type, errors: list[str]) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        errors.append(f"{section}: expected a mapping, got {spec!r}")
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in spec.items():
        path = f"{section}.{key}"
        if key not in fields:
            errors.append(f"{path}: unknown setting{did_you_mean(key, list(fields))}; valid: {', '.join(fields)}")
            continue
        problem = _check_value(path, value, hints[key])
        if problem:
            errors.append(problem)


def validate(recipe: Mapping, source: str = "<recipe>") -> None:
    """Check a whole recipe; raise :class:`RecipeError` listing every problem."""
    errors: list[str] = []
    if not isinstance(recipe, Mapping):
        raise RecipeError(["the top level must be a mapping of sections"], source)
    for key in recipe:
        if key not in SECTIONS:
            errors.append(f"{key}: unknown section{did_you_mean(str(key), SECTIONS)}; valid: {', '.join(SECTIONS)}")
    for key in REQUIRED:
        if key not in recipe:
            errors.append(f"{key}: missing section")
    for section, registry in COMPONENT_SECTIONS.items():
        if section in recipe:
            _validate_component(section, recipe[section], registry, INJECTED[section], errors)
    for section, cls in SETTINGS_SECTIONS.items():
        _validate_settings(section, recipe.get(section), cls, errors)
    if errors:
        raise RecipeError(errors, source)


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


@dataclass
class Built:
    """Everything a recipe describes, constructed."""

    recipe: dict
    dataset: Any
    objective: Any
    sampler: Callable
    train: TrainConfig
    eval: EvalConfig

    @property
    def conditional(self) -> bool:
        """Whether the dynamics take a condition (``num_classes`` or ``cond_dim`` set)."""
        _, kwargs = _split(self.recipe["dynamics"])
        return bool(kwargs.get("num_classes") or kwargs.get("cond_dim"))


def default_sampler(recipe: Mapping) -> dict:
    return dict(recipe.get("sampler") or {"name": "dopri5"})


def build(recipe: Mapping, source: str = "<recipe>") -> Built:
    """Validate then construct the dataset, objective (holding its dynamics) and sampler."""
    recipe = copy.deepcopy(dict(recipe))
    validate(recipe, source)
    dataset = build_component(DATASETS, recipe["data"])
    shape = tuple(dataset.shape)
    dyn_name, dyn_kwargs = _split(recipe["dynamics"])

    def make_dynamics(shape: tuple[int, ...] = shape, **overrides: Any):
        """Build the recipe's network (for ``shape``, e.g. one scale of a multiscale CNF)."""
        cls = DYNAMICS.get(dyn_name)
        kwargs = {**dyn_kwargs, **overrides, "dim": math.prod(shape)}
        if "shape" in inspect.signature(cls).parameters:
            kwargs["shape"] = tuple(shape)
        return cls(**kwargs)

    _, dkw = _split(recipe["dynamics"])
    if dkw.get("num_classes") and not getattr(dataset, "num_classes", None):
        raise RecipeError([f"dynamics.num_classes: dataset {_split(recipe['data'])[0]} has no labels "
                           "to condition on"], source)
    objective = build_component(OBJECTIVES, recipe["objective"], dynamics=make_dynamics, shape=shape)
    sampler_name, sampler_kwargs = _split(default_sampler(recipe))
    sampler_fn = SAMPLERS.get(sampler_name)

    def sampler(flow, x, cond=None, **extra):
        return sampler_fn(flow, x, cond=cond, **{**sampler_kwargs, **extra})

    sampler.name = sampler_name  # type: ignore[attr-defined]
    return Built(recipe, dataset, objective, sampler,
                 TrainConfig(**(recipe.get("train") or {})), EvalConfig(**(recipe.get("eval") or {})))
