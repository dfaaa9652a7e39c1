r"""Declared constraints on component arguments and recipe settings.

A constructor (or sampler, or settings dataclass) states what it accepts in its
annotations; :func:`flowkit.recipe.validate` reads them with
``typing.get_type_hints(..., include_extras=True)`` and checks a recipe before anything is
built. Nothing keeps a second list of ranges::

    def __init__(self, dim: int, hidden: Sequence[PositiveInt] = (64, 64),
                 rtol: PositiveFloat = 1e-5, ema: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
                 steps: Optional[PositiveInt] = None): ...

The rules every check follows:

* a ``float`` must be a finite number (NaN and ±inf are refused everywhere); an ``int`` an
  integer; a ``bool`` is neither (``true`` is not 1);
* ``Sequence[X]`` / ``list[X]`` / ``tuple[X, ...]`` need a YAML list, each element an ``X``
  (a scalar where a list is required is an error);
* ``Optional[X]`` also takes ``null``; ``Literal[...]`` one of its values (of the same type);
* the :class:`Constraint` markers inside ``Annotated[...]`` must all hold.

Arguments that only make sense together are declared as :class:`Rule` objects in the
component's ``argument_rules`` (a class attribute, or a sampler function's attribute).

Example:
    >>> from typing import Annotated
    >>> Range(0, 1, hi_open=True).check(1.0)
    False
    >>> Range(0, 1, hi_open=True).describe()
    'in [0, 1)'
    >>> describe_hint(Annotated[float, Positive()])
    'float > 0'
"""

from __future__ import annotations

import collections.abc
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, NamedTuple, Optional, Sequence

from .registry import did_you_mean

__all__ = [
    "Constraint", "Range", "MultipleOf", "NonEmpty", "Rule",
    "Positive", "NonNegative", "AtLeast", "Unbounded", "Odd",
    "PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "FiniteFloat",
    "DropProbability", "Seed",
    "constraints_of", "check_value", "describe_hint", "describe_arguments", "is_finite_number",
    "SEQUENCE_ORIGINS",
]


class Constraint:
    """A condition on one value; ``describe()`` completes "must be ..."."""

    def check(self, value: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _yaml_scalar(value: Any) -> str:
    """A choice as a recipe writes it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range(Constraint):
    """``lo ≤ x ≤ hi`` (either end optional; ``lo_open`` / ``hi_open`` make it strict).

    ``Range()`` with no bound declares "any value of the type" (floats are finite anyway).
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, value: Any) -> bool:
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        if self.hi is not None and not (value < self.hi if self.hi_open else value <= self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.lo is None and self.hi is None:
            return "any value"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class MultipleOf(Constraint):
    """``x ≡ remainder (mod k)`` for integers (``MultipleOf(2, 1)``: odd)."""

    k: int
    remainder: int = 0

    def check(self, value: Any) -> bool:
        return value % self.k == self.remainder

    def describe(self) -> str:
        if self.k == 2:
            return "odd" if self.remainder else "even"
        return f"≡ {self.remainder} mod {self.k}" if self.remainder else f"a multiple of {self.k}"


@dataclass(frozen=True)
class NonEmpty(Constraint):
    """A list with at least one element."""

    def check(self, value: Any) -> bool:
        return len(value) > 0

    def describe(self) -> str:
        return "non-empty"


def Positive() -> Range:  # noqa: N802 - reads as a marker: Annotated[float, Positive()]
    """``x > 0``."""
    return Range(0, lo_open=True)


def NonNegative() -> Range:  # noqa: N802
    """``x ≥ 0``."""
    return Range(0)


def AtLeast(lo: float) -> Range:  # noqa: N802
    """``x ≥ lo``."""
    return Range(lo)


def Unbounded() -> Range:  # noqa: N802
    """Any value of the type, declared on purpose (still finite for floats)."""
    return Range()


def Odd() -> MultipleOf:  # noqa: N802
    """An odd integer."""
    return MultipleOf(2, 1)


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, NonNegative()]
PositiveFloat = Annotated[float, Positive()]
NonNegativeFloat = Annotated[float, NonNegative()]
FiniteFloat = Annotated[float, Unbounded()]
#: probability of dropping a condition (classifier-free guidance training): ``[0, 1)``
DropProbability = Annotated[float, Range(0, 1, hi_open=True)]
#: a random seed: what ``torch``, ``numpy`` and ``accelerate.set_seed`` all accept
Seed = Annotated[int, Range(0, 2**32 - 1)]


@dataclass(frozen=True)
class Rule:
    """A declared condition between several arguments of one component.

    ``holds(args)`` gets every argument (defaults filled in) and says whether the
    combination can work; otherwise ``message.format(**args)`` is reported at
    ``keys[0]``. It runs only when each of ``keys`` passed its own checks.

    Example:
        >>> r = Rule(("steps", "method"), lambda a: a["method"] != "rk4" or a["steps"] is not None,
        ...          "fixed-step method {method!r} needs steps")
        >>> r.check({"method": "rk4", "steps": None})
        ('steps', "fixed-step method 'rk4' needs steps")
    """

    keys: tuple[str, ...]
    holds: Callable[[Mapping[str, Any]], bool]
    message: str

    def check(self, args: Mapping[str, Any]) -> Optional[tuple[str, str]]:
        """``(key, message)`` when the rule fails, else None."""
        if self.holds(args):
            return None
        return self.keys[0], self.message.format(**args)


SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_UNION_ORIGINS = (typing.Union, types.UnionType)


def constraints_of(hint: Any) -> tuple[Any, tuple[Constraint, ...]]:
    """``(base type, constraints)`` of ``Annotated[base, *markers]`` (no markers otherwise)."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        inner, more = constraints_of(base)
        return inner, tuple(more) + tuple(m for m in meta if isinstance(m, Constraint))
    return hint, ()


def describe_hint(hint: Any) -> str:
    """A hint as a user reads it: ``int >= 1``, ``list of int >= 1``, ``float > 0 or null``."""
    base, marks = constraints_of(hint)
    words = [m.describe() for m in marks if m.describe() != "any value"]
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        text = "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                                     for c in typing.get_args(base))
    elif origin in _UNION_ORIGINS:
        args = typing.get_args(base)
        parts = [describe_hint(a) for a in args if a is not type(None)]
        text = " or ".join(parts + (["null"] if type(None) in args else []))
    elif base in SEQUENCE_ORIGINS or origin in SEQUENCE_ORIGINS:
        args = [a for a in typing.get_args(base) if a is not Ellipsis]
        text = " ".join([*words, "list" + (f" of {describe_hint(args[0])}" if len(args) == 1 else "")])
        words = []
    elif base is bool:
        text = "true or false"
    elif isinstance(base, type):
        text = base.__name__
    else:
        text = str(base).replace("typing.", "")
    return " ".join([text, *words])


def describe_arguments(obj: Callable[..., Any], skip: Sequence[str] = ()) -> list[str]:
    """``name: description = default`` for each argument of ``obj`` a recipe may set."""
    import inspect

    target = obj.__init__ if inspect.isclass(obj) else obj
    hints = typing.get_type_hints(target, include_extras=True)
    lines = []
    for name, p in inspect.signature(obj).parameters.items():
        if name in skip or name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        text = describe_hint(hints[name]) if name in hints else "any"
        default = p.default
        factory = getattr(getattr(obj, "__dataclass_fields__", {}).get(name), "default_factory", None)
        if callable(factory):
            default = factory()
        default = "" if default is p.empty else f" = {default!r}"
        lines.append(f"{name}: {text}{default}")
    return lines


class _Problem(NamedTuple):
    where: str      # suffix of the key path (``[2]`` for a list element)
    text: str
    type_ok: bool   # the value had the right type but broke a declared constraint


def _problem(value: Any, hint: Any) -> Optional[_Problem]:
    """What is wrong with ``value`` for the declared ``hint`` (None: nothing)."""
    base, marks = constraints_of(hint)
    origin = typing.get_origin(base)
    if origin in _UNION_ORIGINS:
        args = typing.get_args(base)
        if value is None and type(None) in args:
            return None
        found = [_problem(value, a) for a in args if a is not type(None)]
        if all(p is not None for p in found):
            near = [p for p in found if p.type_ok]
            if near or len(found) == 1:
                return (near or found)[0]
            return _Problem("", f"expected {describe_hint(base)}, got {value!r}", False)
    elif origin is typing.Literal:
        choices = typing.get_args(base)
        if not any(type(c) is type(value) and c == value for c in choices):
            shown = ", ".join(_yaml_scalar(c) for c in choices)
            return _Problem("", f"{value!r} is not one of: {shown}"
                                f"{did_you_mean(str(value), [str(c) for c in choices])}", False)
    elif base is bool:
        if not isinstance(value, bool):
            return _Problem("", f"expected true or false, got {value!r}", False)
    elif base is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return _Problem("", f"expected an integer, got {value!r}", False)
    elif base is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _Problem("", f"expected a number, got {value!r}", False)
        if not math.isfinite(value):
            return _Problem("", f"must be a finite number, got {value!r}", True)
    elif base is str:
        if not isinstance(value, str):
            return _Problem("", f"expected a string, got {value!r}", False)
    elif base in SEQUENCE_ORIGINS or origin in SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            return _Problem("", f"expected a list ({describe_hint(hint)}), got {value!r}", False)
        args = typing.get_args(base)
        if args and Ellipsis not in args and len(args) > 1:  # tuple[int, int]: fixed length
            if len(value) != len(args):
                return _Problem("", f"expected a list of {len(args)} entries, got {value!r}", True)
            items = args
        else:
            items = (args[0] if args else Any,) * len(value)
        for i, (item, item_hint) in enumerate(zip(value, items)):
            p = _problem(item, item_hint)
            if p is not None:
                return _Problem(f"[{i}]{p.where}", p.text, True)
    elif base in (dict, collections.abc.Mapping) or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, collections.abc.Mapping):
            return _Problem("", f"expected a mapping, got {value!r}", False)
    for mark in marks:
        try:
            ok = mark.check(value)
        except TypeError:  # a marker on a type the walker does not check (Any, ...)
            ok = False
        if not ok:
            return _Problem("", f"must be {mark.describe()}, got {value!r}", True)
    return None


def check_value(path: str, value: Any, hint: Any) -> Optional[str]:
    """``"path: problem"`` if ``value`` breaks the declared ``hint``, else None.

    The rules are those of the module docstring. ``path`` names the setting
    (``train.lr``); a bad list element gets its index (``dynamics.hidden[1]``).

    Example:
        >>> check_value("train.lr", float("nan"), PositiveFloat)
        'train.lr: must be a finite number, got nan'
        >>> check_value("dynamics.hidden", [64, 0], Sequence[PositiveInt])
        'dynamics.hidden[1]: must be >= 1, got 0'
        >>> check_value("train.ema", 0.999, Annotated[float, Range(0, 1, hi_open=True)]) is None
        True
    """
    problem = _problem(value, hint)
    return None if problem is None else f"{path}{problem.where}: {problem.text}"


def is_finite_number(value: Any) -> bool:
    """A real number, not a bool, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
