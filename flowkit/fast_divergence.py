"""Fast divergence paths: what a network declares, how wrappers carry it, and the one choice of strategy.

The generic estimators of :mod:`flowkit.trace` need nothing but ``f(t, x)``: the exact trace
by ``D`` vector–Jacobian products, Hutchinson's ``εᵀJε`` by one (Hutchinson 1989; FFJORD
eq. 4). A network that knows its own structure can do better along one of three *paths*:

==============  ================================================  =================================
path            method the network implements                     used for
==============  ================================================  =================================
``jacobian``    ``forward_with_jacobian(t, x, cond=None)``        the exact trace: ``(f, J)`` with
                ``-> (f, J)``, ``J[b, i, j] = ∂f_j/∂x_i``          ``tr J`` read off the diagonal
``jvp``         ``forward_with_jvp(t, x, v, cond=None)``          Hutchinson by forward mode:
                ``-> (f, J v)``                                   ``εᵀ(Jε)``, a first-order backward
``bottleneck``  ``split(t, x, cond=None) -> (h, g)``,             Hutchinson with ε in ``h``'s
                ``f = g(h)``                                      space (FFJORD appendix E)
==============  ================================================  =================================

**Declared, not probed.** A network lists the paths it offers in ``divergence_paths`` (a
``frozenset`` of the names above; a class attribute, narrowed per instance where a
constructor argument decides, e.g. ``bottleneck=True`` or an activation without a
closed-form derivative). Nothing looks for the methods: :func:`declared_paths` reads the
declaration and refuses one that names an unknown path or a method the class does not
implement (:class:`DivergenceDeclarationError`, when the FFJORD objective is built and
before any likelihood solve). A network without the attribute declares none and gets the
generic estimators.

**Wrappers carry the declaration in one place.** A field made from a network by a change of
time and linear maps of the state — FFJORD's learnable end time, a multiscale stage embedded
in the full image — subclasses :class:`FieldWrapper`, which forwards every declared path
the wrapper can carry; the condition is bound once, by :func:`bind`.

**One place chooses the strategy.** :func:`choose_strategy` maps the estimator, the
declared paths and the options to one of :data:`STRATEGIES`; :func:`flowkit.trace.divergence`
dispatches on its answer and the likelihood integrator draws its probes where that answer
says (the bottleneck's space or the data's). A choice made from measurement — the
dimension, the device, forward against reverse mode, a replicated batch — belongs there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol

from torch import Tensor, nn

from .flow import FieldError

__all__ = ["PATHS", "STRATEGIES", "EXACT_TRACE_BY_DIM", "FastDivergence", "FastPaths", "FieldWrapper",
           "DivergenceDeclarationError", "declared_paths", "bind", "choose_strategy"]

#: the fast paths a network may declare, and the method each one names
PATHS: dict[str, str] = {"jacobian": "forward_with_jacobian", "jvp": "forward_with_jvp", "bottleneck": "split"}

#: how :func:`flowkit.trace.divergence` computes ``tr ∂f/∂x`` (see :func:`choose_strategy`)
STRATEGIES = ("finite_difference", "jacobian", "exact", "exact_loop", "bottleneck", "jvp", "hutchinson")

#: The generic exact trace (no declared ``jacobian`` path) by event dimension ``D``, device and use
#: (``"eval"``: the divergence only; ``"train"``: with its graph for a backward pass): rows of
#: ``(largest D, strategy)``, the first row whose bound holds wins (None: any D). ``exact`` takes
#: the ``D`` vector–Jacobian products in one batched backward (``is_grads_batched``),
#: ``exact_loop`` as ``D`` separate backward passes. Measured by ``bench/trace_strategies.py``
#: (``bench/results/trace_strategies.md``: flowkit's ``mlp``, SiLU 64-64-64, batch 1,000, one
#: CPU thread, median of interleaved repeats on a shared 2-core AMD EPYC), where forward mode
#: (``torch.func.jvp`` per basis vector: 2–5× slower at every D), ``vmap`` of ``jacfwd`` /
#: ``jacrev`` (never clearly ahead of the better of these two, and only for fields ``vmap`` can
#: trace) and the ``D``-fold replicated batch (1.9× one batched backward at D = 8 when
#: training, 1.5× when evaluating) lost. Evaluation: from D = 16 on the loop wins in every run
#: (D = 16, 32, 64: 13 / 29 / 59 ms against 17 / 36 / 85); at D ≤ 8 the two are within the
#: run-to-run noise (D = 2: 2.7 against 3.1 ms in the recorded run, 4.7 against 1.9 in an
#: earlier one), so the batched pass stays. Training: the batched backward wins at every D
#: (by 7–23%). No GPU measurement yet: other devices take the batched backward (one launch
#: instead of D).
EXACT_TRACE_BY_DIM: dict[tuple[str, str], tuple[tuple[Optional[int], str], ...]] = {
    ("cpu", "eval"): ((8, "exact"), (None, "exact_loop")),
    ("cpu", "train"): ((None, "exact"),),
}


class DivergenceDeclarationError(FieldError):
    """A network's ``divergence_paths`` names an unknown path or a method it does not implement."""


class FastDivergence(Protocol):
    """A field that declares fast divergence paths (implement the methods of the paths it lists).

    ``forward_with_jacobian(t, x, cond=None) -> (f, J)``, ``forward_with_jvp(t, x, v, cond=None)
    -> (f, J v)`` and ``split(t, x, cond=None) -> (h, g)`` are required only for the paths in
    ``divergence_paths`` (see the module docstring).
    """

    divergence_paths: frozenset[str]

    def __call__(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor: ...


def declared_paths(field: object) -> frozenset[str]:
    """The fast paths ``field`` declares in ``divergence_paths``, checked (none if it declares none).

    Raises:
        DivergenceDeclarationError: the declaration is not a set of path names, names an
            unknown path, or a path whose method the field does not implement.

    Example:
        >>> from flowkit.dynamics import ConcatSquashMLP
        >>> sorted(declared_paths(ConcatSquashMLP(2, bottleneck=True)))
        ['bottleneck', 'jacobian']
        >>> declared_paths(lambda t, x: -x)
        frozenset()
    """
    paths = getattr(field, "divergence_paths", frozenset())  # reading the declaration; absent: none
    name = type(field).__name__
    if isinstance(paths, str) or not isinstance(paths, (set, frozenset, tuple, list)) \
            or not all(isinstance(p, str) for p in paths):
        raise DivergenceDeclarationError(
            f"{name}.divergence_paths: expected a frozenset of path names ({', '.join(PATHS)}), got {paths!r}")
    paths = frozenset(paths)
    unknown = sorted(paths - PATHS.keys())
    if unknown:
        raise DivergenceDeclarationError(
            f"{name}.divergence_paths declares unknown fast divergence path(s) {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(PATHS)}")
    for path in sorted(paths):
        if not callable(inspect.getattr_static(field, PATHS[path], None)):
            raise DivergenceDeclarationError(
                f"{name}.divergence_paths declares the fast divergence path {path!r} but {name} does not implement "
                f"{PATHS[path]}(...); implement it or remove {path!r} from divergence_paths")
    return paths


@dataclass(frozen=True)
class FastPaths:
    """A field's declared paths as callables of ``(t, x)`` (``jvp``: ``(t, x, v)``) with the
    condition bound; None where not declared. Built by :func:`bind`."""

    jacobian: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    jvp: Optional[Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    split: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Callable[[Tensor], Tensor]]]] = None

    @property
    def names(self) -> frozenset[str]:
        """The paths present, as :data:`PATHS` names."""
        present = {"jacobian": self.jacobian, "jvp": self.jvp, "bottleneck": self.split}
        return frozenset(k for k, v in present.items() if v is not None)


def bind(field: object, cond: Optional[Tensor] = None) -> FastPaths:
    """The declared paths of ``field`` (checked by :func:`declared_paths`) with ``cond`` bound.

    The one place a condition is forwarded to a fast path: a field called as ``field(t, x)``
    without a condition gets none passed.
    """
    paths = declared_paths(field)
    extra = () if cond is None else (cond,)
    return FastPaths(
        jacobian=(lambda t, x: field.forward_with_jacobian(t, x, *extra)) if "jacobian" in paths else None,
        jvp=(lambda t, x, v: field.forward_with_jvp(t, x, v, *extra)) if "jvp" in paths else None,
        split=(lambda t, x: field.split(t, x, *extra)) if "bottleneck" in paths else None)


def choose_strategy(estimator: str, paths: frozenset[str] = frozenset(), *, differentiate: str = "autograd",
                    frobenius: bool = False, dim: Optional[int] = None, device: str = "cpu",
                    create_graph: bool = False) -> str:
    """How to compute the divergence: one of :data:`STRATEGIES`.

    * ``finite_difference`` — the field has no usable autograd graph (``differentiate``);
    * exact trace: ``jacobian`` where declared (one forward pass carries ``J``), else the
      measured choice of :data:`EXACT_TRACE_BY_DIM` for ``dim``, ``device`` and the use
      (``create_graph``: training): ``exact`` (``D`` vector–Jacobian products batched in one
      backward) or ``exact_loop`` (``D`` backward passes); ``exact`` when ``dim`` is not given;
    * Hutchinson: ``bottleneck`` where declared (lower variance, FFJORD appendix E), else
      ``jvp`` where declared (forward mode; training needs a first-order backward only),
      else ``hutchinson`` (one vector–Jacobian product per probe).

    Args:
        estimator: ``"exact"`` or ``"hutchinson"``.
        paths: the fast paths available (:func:`declared_paths`, :attr:`FastPaths.names`).
        differentiate: ``"autograd"`` or ``"finite_difference"``.
        frobenius: ``‖J‖²_F`` is wanted too (RNODE), which the bottleneck cannot give.
        dim: the event dimension ``D``.
        device: the device type of the state (``"cpu"``, ``"cuda"``, ...).
        create_graph: the divergence is differentiated afterwards (training).

    Raises:
        ValueError: the Jacobian-norm regulariser with a bottleneck field.

    Example:
        >>> choose_strategy("exact", frozenset({"jacobian"})), choose_strategy("hutchinson", frozenset({"jvp"}))
        ('jacobian', 'jvp')
        >>> choose_strategy("exact", dim=2), choose_strategy("exact", dim=32), choose_strategy("exact", dim=32,
        ...                                                                                   create_graph=True)
        ('exact', 'exact_loop', 'exact')
    """
    if differentiate == "finite_difference":
        return "finite_difference"
    if estimator == "exact":
        if "jacobian" in paths:
            return "jacobian"
        return _exact_by_dim(dim, device, create_graph)
    if "bottleneck" in paths:
        if frobenius:
            raise ValueError("the RNODE Jacobian-norm regulariser needs data-space probes; "
                             "use estimator='hutchinson' on a field without a bottleneck")
        return "bottleneck"
    return "jvp" if "jvp" in paths else "hutchinson"


def _exact_by_dim(dim: Optional[int], device: str, create_graph: bool) -> str:
    """The row of :data:`EXACT_TRACE_BY_DIM` for ``dim`` (``exact`` without a measurement)."""
    rows = EXACT_TRACE_BY_DIM.get((device, "train" if create_graph else "eval"))
    if dim is None or rows is None:
        return "exact"
    return next(way for bound, way in rows if bound is None or dim <= bound)


class FieldWrapper(nn.Module):
    """``F(t, x, cond) = out(f(τ, y, cond))`` with ``(τ, y, out) = enter(t, x)``: a field made from
    the network ``f`` by a change of time and linear maps of the state, carrying ``f``'s fast paths.

    A subclass defines :meth:`enter` (and :meth:`tangent` when the state map is not the
    identity); this class forwards each path ``f`` declares and the wrapper :attr:`carries`:

    * ``jvp``: ``(out(f), out(J_f · tangent(v)))`` — ``out`` and the state map are linear;
    * ``bottleneck``: ``(h, out ∘ g)``;
    * ``jacobian`` (only wrappers whose ``out`` is a scalar multiple and whose state map is the
      identity carry it): ``(out(f), out(J_f))``.

    Args:
        field: the wrapped network (``field(t, y, cond=None)``).
    """

    #: the paths this wrapper can carry; it declares those of the network among them
    carries: ClassVar[frozenset[str]] = frozenset({"jvp", "bottleneck"})

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        #: the wrapped network's declared paths (checked here, once) that this wrapper carries
        self.divergence_paths: frozenset[str] = declared_paths(field) & self.carries

    def enter(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """``(τ, y, out)``: the network's time and state for ``(t, x)`` and the linear map of its
        output back to this field's. The identity here."""
        return t, x, _identity

    def tangent(self, v: Tensor, x: Tensor) -> Tensor:
        """A tangent ``v`` at ``x`` mapped to the network's state space (the linear part of
        :meth:`enter`'s state map). The identity here."""
        return v

    def method(self, path: str) -> Callable:
        """The network's method of a declared ``path`` (a subclass may compile it)."""
        return getattr(self.field, PATHS[path])

    def _offers(self, path: str) -> None:
        if path not in self.divergence_paths:
            raise DivergenceDeclarationError(
                f"{type(self).__name__} around {type(self.field).__name__} does not offer the fast divergence "
                f"path {path!r} (it offers: {', '.join(sorted(self.divergence_paths)) or 'none'})")

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        tau, y, out = self.enter(t, x)
        return out(self.field(tau, y, cond))

    def forward_with_jacobian(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        self._offers("jacobian")
        tau, y, out = self.enter(t, x)
        f, jac = self.method("jacobian")(tau, y, cond)
        return out(f), out(jac)

    def forward_with_jvp(self, t: Tensor, x: Tensor, v: Tensor,
                         cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        self._offers("jvp")
        tau, y, out = self.enter(t, x)
        f, jv = self.method("jvp")(tau, y, self.tangent(v, x), cond)
        return out(f), out(jv)

    def split(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None):
        self._offers("bottleneck")
        tau, y, out = self.enter(t, x)
        h, g = self.method("bottleneck")(tau, y, cond)
        return h, lambda h_: out(g(h_))


def _identity(v: Tensor) -> Tensor:
    return v
