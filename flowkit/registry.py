"""One registry primitive for every pluggable component.

Dynamics, objectives, samplers, datasets, SDEs and probability paths each own a
:class:`Registry`. Components register under a short name with a decorator; a
recipe names them and :func:`flowkit.recipe.build` turns ``{name: ..., **kwargs}``
into an object. Third-party code registers its own components the same way,
before building a recipe::

    from flowkit import DYNAMICS

    @DYNAMICS.register("my_field")
    class MyField(torch.nn.Module):
        def __init__(self, dim: int, width: int = 32): ...
        def forward(self, t, x, cond=None): ...
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["Registry", "RegistryError", "did_you_mean", "all_registries"]

T = TypeVar("T")

_REGISTRIES: dict[str, "Registry"] = {}


class RegistryError(KeyError):
    """An unknown or duplicate component name."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that.
        return str(self.args[0])


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ``" (did you mean X?)"`` for the closest choice, or ``""``.

    Equally close choices resolve to the one listed first (``dopri`` → ``dopri5``, not
    ``dopri8``).
    """
    close = difflib.get_close_matches(word, list(choices), n=len(choices) or 1, cutoff=0.6)
    if not close:
        return ""
    score = {c: difflib.SequenceMatcher(None, word, c).ratio() for c in close}
    best = max(score.values())
    return f" (did you mean {next(c for c in choices if score.get(c) == best)}?)"


class Registry:
    """A named table of component constructors.

    Args:
        kind: What the registry holds ("dynamics", "objective", ...); used in messages.
    """

    def __init__(self, kind: str) -> None:
        if kind in _REGISTRIES:
            raise RegistryError(f"a registry of {kind!r} already exists")
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._help: dict[str, str] = {}
        _REGISTRIES[kind] = self

    def register(self, name: str, help: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name``.

        Raises:
            RegistryError: if ``name`` is already taken.
        """

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {self._entries[name].__module__}.{self._entries[name].__qualname__})"
                )
            self._entries[name] = obj  # type: ignore[assignment]
            doc = help or inspect.getdoc(obj) or ""
            self._help[name] = doc.strip().splitlines()[0] if doc.strip() else ""
            return obj

        return decorate

    def get(self, name: str) -> Callable[..., Any]:
        """Look up ``name``; an unknown name lists the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        hint = did_you_mean(str(name), self.names()) if isinstance(name, str) else ""
        return (
            f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"
        )

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Construct the component ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self, name: str) -> str:
        """First line of the component's docstring."""
        self.get(name)
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def all_registries() -> dict[str, Registry]:
    """Every registry created so far, keyed by kind."""
    return dict(_REGISTRIES)
