"""What an ODE solve returns and how it fails: the types :mod:`flowkit.solvers` and
:mod:`flowkit.solvers_per_sample` share, so that neither imports the other's caller.

:class:`Solution` (states at the requested times, evaluation counts), :class:`SolverError`
(invalid settings, one ``key: problem`` line each) and :class:`PerSampleTimeField`, the
declaration that a field takes one time per sample. All are re-exported by
:mod:`flowkit.solvers`, their public home.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Solution", "SolverError", "PerSampleTimeField"]


class SolverError(ValueError):
    """Invalid solver settings; ``errors`` holds one ``key: problem`` line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid ODE solver settings: " + "; ".join(self.errors))


@dataclass
class Solution:
    """``ys[i]`` is the state at ``times[i]``; ``nfe`` counts (batched) field evaluations.

    ``sample_evals`` counts evaluations of single samples (the rows of every call, summed:
    ``nfe × batch`` with shared steps); a per-sample solve also reports each sample's
    ``accepted`` and ``rejected`` steps (``[B]``) and ``step_control`` says which control ran.
    ``step_plan`` (a :class:`flowkit.dopri5.StepPlan`, shared-step ``dopri5`` without the adjoint)
    records the accepted steps, to warm-start a later solve of a similar problem.
    """

    ys: Tensor
    nfe: int
    sample_evals: Optional[int] = None
    accepted: Optional[Tensor] = None
    rejected: Optional[Tensor] = None
    step_control: str = "batch"
    step_plan: Optional[Any] = None

    def mean_steps(self) -> Optional[float]:
        """Mean accepted + rejected steps per sample (per-sample solves; ``None`` otherwise)."""
        if self.accepted is None or self.rejected is None:
            return None
        return float((self.accepted + self.rejected).double().mean())


class PerSampleTimeField(nn.Module):
    """Declares that ``fn`` takes one time per sample: ``fn(t, x, rows)``.

    ``t`` is a ``[B']`` tensor of per-sample times, ``x`` the ``[B', ...]`` states and ``rows``
    the ``[B']`` indices (``LongTensor``) of these samples in the batch the solve started with,
    so ``fn`` can slice per-sample constants (Hutchinson probes, a condition). Per-sample step
    control (:mod:`flowkit.solvers_per_sample`) calls it on the unfinished samples only; a solve
    with shared steps calls it with ``t`` expanded to the batch and ``rows = arange(B)``.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor], name: str = "field") -> None:
        super().__init__()
        self.fn = fn
        #: how errors of a solve refer to the field
        self.name = name

    def forward(self, t: Tensor, x: Tensor, rows: Tensor) -> Tensor:
        return self.fn(t, x, rows)

    def shared_time(self) -> nn.Module:
        """This field as ``field(t, x)`` with one time for the batch (for shared-step solvers)."""
        return _SharedTime(self)


class _SharedTime(nn.Module):
    def __init__(self, field: PerSampleTimeField) -> None:
        super().__init__()
        self.field = field

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        rows = torch.arange(x.shape[0], device=x.device)
        return self.field(t.expand(x.shape[0]) if t.dim() == 0 else t, x, rows)
