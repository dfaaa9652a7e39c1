r"""Couplings: how a batch of data is paired with a batch of noise before flow matching.

Conditional flow matching regresses a network on the velocity of a path between a data
point and a noise sample drawn *jointly* from a coupling ``q(x_data, ε)`` whose marginals
are the data and the prior (Tong et al. 2024, Sec. 3; Liu et al. 2023). The independent
coupling gives I-CFM (Lipman et al. 2023); a coupling close to optimal transport makes the
learned trajectories straighter and cheaper to integrate.

A coupling is a callable ``coupling(x_data, noise, cond=None) -> (x_data', noise')`` on one
minibatch. Every coupling here **keeps the data in place and reorders or resamples the
noise**, so labels (``cond``) stay aligned with ``x_data``. With integer class labels the
optimal-transport couplings pair only data and noise *of the same label*: noise slot ``j``
is given the label of data point ``j`` (a uniformly random partition of i.i.d. noise) and
pairs across labels are forbidden by a large cost. This keeps the noise paired with each
class distributed as the prior, which a class-conditional model (and classifier-free
guidance) needs; a global OT plan would hand each class the noise nearest to it. Vector
conditions cannot be grouped and are ignored by the couplings.

=================  ============================================================================
name               pairing
=================  ============================================================================
``independent``    as drawn (I-CFM)
``exact_ot``       minimum total squared distance over all permutations (OT-CFM), solved by
                   :func:`flowkit.ot.optimal_assignment` (a compiled auction on the CPU, torch
                   on an accelerator, so the batch stays on its device); no pair is repeated
``sinkhorn``       each data point draws its noise from its row of the entropic OT plan
                   (:func:`flowkit.ot.sinkhorn_potentials`); with ``reg = 2σ²`` the static
                   Schrödinger bridge of SB-CFM
=================  ============================================================================

:class:`Teacher` (used by the ``rectified_flow`` objective) pairs each noise with the sample
a trained flow maps it to (reflow). It is handed that map, ``teacher(noise, cond) -> data``;
loading or training the teacher is the application's job (:mod:`flowkit.teacher`).

The solvers live in :mod:`flowkit.ot`; this module only pairs batches.

References:
    Tong, Fatras, Malkin, Huguet, Zhang, Rector-Brooks, Wolf, Bengio (2024). Improving and
    Generalizing Flow-Based Generative Models with Minibatch Optimal Transport. TMLR.
    Pooladian, Ben-Hamu, Domingo-Enrich, Amos, Lipman, Chen (2023). Multisample Flow
    Matching: Straightening Flows with Minibatch Couplings. ICML.
    Liu, Gong, Liu (2023). Flow Straight and Fast: Learning to Generate and Transfer Data
    with Rectified Flow. ICLR.

Example:
    >>> from flowkit.ot import squared_distances
    >>> x, z = torch.randn(64, 2), torch.randn(64, 2)
    >>> x2, z2 = ExactOT()(x, z)
    >>> bool((x2 == x).all()) and sorted(z2[:, 0].tolist()) == sorted(z[:, 0].tolist())
    True
    >>> bool(squared_distances(x2, z2).diagonal().sum() <= squared_distances(x, z).diagonal().sum())
    True
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor

from .components import COUPLINGS
from .constraints import PositiveFloat, PositiveInt
from .ot import ASSIGNMENT_METHODS, group_penalty, optimal_assignment, sinkhorn_potentials, squared_distances

__all__ = ["Coupling", "Independent", "ExactOT", "Sinkhorn", "Teacher", "TeacherMap"]

#: a trained flow's transport of noise to data: ``teacher(noise, cond) -> data``
TeacherMap = Callable[[Tensor, Optional[Tensor]], Tensor]


def _labels(cond: Optional[Tensor]) -> Optional[Tensor]:
    """Integer class labels to couple within, or ``None`` (no condition, or vectors)."""
    if cond is None or cond.is_floating_point() or cond.dim() != 1:
        return None
    return cond


def _check_batch(x_data: Tensor, noise: Tensor) -> None:
    if x_data.shape != noise.shape:
        raise ValueError(f"data and noise batches differ in shape: {tuple(x_data.shape)} "
                         f"vs {tuple(noise.shape)}")


class Coupling:
    """Base class: ``coupling(x_data, noise, cond=None) -> (x_data', noise')``.

    ``cond`` is the batch's condition (aligned with ``x_data``) or ``None``; the returned
    data must stay aligned with it.
    """

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@COUPLINGS.register("independent")
class Independent(Coupling):
    """Data and noise as drawn: the independent coupling of I-CFM (Lipman et al. 2023)."""

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        return x_data, noise


@COUPLINGS.register("exact_ot")
class ExactOT(Coupling):
    r"""Minibatch optimal transport (OT-CFM, Tong et al. 2024): noise permuted by an exact assignment.

    The permutation minimises ``Σ_i ‖x_i − ε_π(i)‖²`` exactly
    (:func:`flowkit.ot.optimal_assignment`: by default the compiled auction for a CPU batch,
    the torch solvers on an accelerator).

    Every noise sample is used exactly once (a permutation, not pairs drawn from the plan
    with replacement). With integer labels the permutation stays within each label.

    Args:
        tol: optimality tolerance relative to the cost span (see
            :func:`flowkit.ot.optimal_assignment`).
        method: assignment solver: ``auto``, ``compiled`` (sequential auction in C, on the
            CPU), ``ipm`` (interior point, then auction, in torch) or ``auction`` (vectorised
            ε-scaling auction in torch).
    """

    def __init__(self, tol: PositiveFloat = 1e-7,
                 method: Literal["auto", "compiled", "ipm", "auction"] = "auto") -> None:
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        if method not in ASSIGNMENT_METHODS:
            raise ValueError(f"unknown method {method!r}; choose {', '.join(ASSIGNMENT_METHODS)}")
        self.tol, self.method = float(tol), method

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        _check_batch(x_data, noise)
        perm = optimal_assignment(squared_distances(x_data, noise), tol=self.tol, method=self.method,
                                  groups=_labels(cond))
        return x_data, noise[perm]


@COUPLINGS.register("sinkhorn")
class Sinkhorn(Coupling):
    r"""Entropic OT coupling (Sinkhorn): each data point draws its noise from its row of the plan.

    Data point ``i`` takes noise ``j`` with probability ``P_ij / P_i·`` under the Sinkhorn plan
    of ``C_ij = ‖x_i − ε_j‖²`` (Gumbel-max sampling; :func:`flowkit.ot.sinkhorn_potentials`).

    Each data point is used once and the pairs follow the plan exactly on the data side; a
    noise sample may be drawn several times or not at all. With ``reg = 2σ²`` the plan is the
    static Schrödinger bridge for a Brownian reference of variance ``σ²`` per unit time,
    the coupling of SB-CFM (Tong et al. 2024, Prop. 3.4); small ``reg`` approaches OT-CFM.

    Args:
        reg: entropic regularisation ``ε``, in squared data units (> 0).
        max_iter, tol: Sinkhorn stopping rule (see :func:`flowkit.ot.sinkhorn_potentials`).
    """

    def __init__(self, reg: PositiveFloat = 0.5, max_iter: PositiveInt = 500, tol: PositiveFloat = 1e-4) -> None:
        if not reg > 0:
            raise ValueError(f"reg must be positive, got {reg}")
        if max_iter < 1 or not tol > 0:
            raise ValueError(f"need max_iter >= 1 and tol > 0, got {max_iter}, {tol}")
        self.reg, self.max_iter, self.tol = float(reg), int(max_iter), float(tol)

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        _check_batch(x_data, noise)
        cost = squared_distances(x_data, noise)
        cost = group_penalty(cost, _labels(cond), float(cost.max() - cost.min()))
        _, g, _ = sinkhorn_potentials(cost, self.reg, max_iter=self.max_iter, tol=self.tol)
        u = torch.rand(cost.shape, dtype=cost.dtype, device=cost.device).clamp_(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(u))
        choice = ((g[None, :] - cost) / self.reg + gumbel).argmax(1)
        return x_data, noise[choice]


class Teacher(Coupling):
    """Pairs each noise with the sample a trained flow maps it to (reflow; Liu et al. 2023).

    ``x_data`` is ignored except for its dtype: the returned data are ``teacher(noise,
    cond)``, so ``(teacher(ε), ε)`` is a deterministic coupling whose straight
    interpolations cross less than independent ones.

    The coupling is *handed* the map: :func:`flowkit.teacher.attach_teacher` builds it from
    a trained flow (or the run or recipe named by the ``rectified_flow`` objective) and the
    objective's solver settings. It is not part of the model: no parameters, and copies of
    the coupling (the trainer's EMA copy) share one map.

    Args:
        transport: the map ``teacher(noise, cond) -> data``, or ``None`` to attach later
            (:meth:`attach`).
        source: what the teacher is, for messages (e.g. the run directory).

    Example:
        >>> pairs = Teacher(lambda noise, cond: 2 * noise, source="doubling")
        >>> x, z = pairs(torch.zeros(3, 2), torch.ones(3, 2))
        >>> x.tolist() == (2 * z).tolist()
        True
    """

    def __init__(self, transport: Optional[TeacherMap] = None, *, source: str = "a trained flow") -> None:
        self.source = str(source)
        self._transport = transport

    @property
    def attached(self) -> bool:
        """Whether a map has been handed over."""
        return self._transport is not None

    def attach(self, transport: TeacherMap) -> None:
        """Hand over the map ``teacher(noise, cond) -> data`` (replacing any earlier one)."""
        if not callable(transport):
            raise TypeError(f"the teacher must be a callable (noise, cond) -> data, got {type(transport).__name__}")
        self._transport = transport

    def __call__(self, x_data: Tensor, noise: Tensor,
                 cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if self._transport is None:
            raise RuntimeError(
                f"the reflow teacher {self.source} is not attached: build the objective from a recipe "
                "(flowkit.build, `flowkit train`), or call flowkit.teacher.attach_teacher(objective[, flow])")
        data = self._transport(noise, cond)
        return data.to(x_data.dtype).detach(), noise

    def __deepcopy__(self, memo: dict[int, Any]) -> "Teacher":
        # the map is a frozen model (or loads one): copies share it rather than clone the teacher
        return copy.copy(self)
