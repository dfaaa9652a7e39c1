"""Objectives: a loss over (model, batch) and the flow the model defines."""

from typing import Any

from ..flow import FieldError
from .base import LossOutput, Objective, drop_condition
from .ffjord import FFJORD

__all__ = ["Objective", "LossOutput", "drop_condition", "FFJORD", "ScoreMatching", "DiffFlow",
           "CFM", "SBCFM", "RectifiedFlow", "ConsistencyTraining", "ConsistencyDistillation", "MeanFlow",
           "VAE", "NoDensityError", "require_density"]
from .score_matching import ScoreMatching
from .diffflow import DiffFlow
from .flow_matching import CFM, RectifiedFlow, SBCFM
from .consistency import ConsistencyDistillation, ConsistencyTraining
from .meanflow import MeanFlow
from .vae import VAE


class NoDensityError(FieldError):
    """A likelihood was asked of a model that declares ``defines_density = False``.

    A :class:`~flowkit.flow.FieldError`, so the CLI reports it in one line with exit status 2.
    """


def require_density(model: Any, *, by: str) -> None:
    """Refuse, with the reason, a likelihood of a model that declares it defines no density.

    Reads the objective's declaration :attr:`Objective.defines_density` (nothing is probed
    beyond it; an object without the declaration is taken to define one, as flows do).

    Args:
        model: the objective (or anything with ``flow()``).
        by: who asks, for the message (``"flowkit nll"``).

    Raises:
        NoDensityError: ``model.defines_density`` is ``False``.

    Example:
        >>> from flowkit.dynamics.mlp import MLP
        >>> require_density(ConsistencyTraining(lambda: MLP(dim=2, hidden=[4]), (2,)), by="flowkit nll")
        Traceback (most recent call last):
        ...
        flowkit.objectives.NoDensityError: flowkit nll: ConsistencyTraining defines no density ...
    """
    if getattr(type(model), "defines_density", True):  # the class's declaration
        return
    raise NoDensityError(
        f"{by}: {type(model).__name__} defines no density (defines_density = False: it learns a map from "
        "noise to data, not a field whose change of variables gives a likelihood), so there is no NLL to "
        "report; compare it by sample quality instead (flowkit compare, energy distance / sliced W2)")
