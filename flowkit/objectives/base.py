"""What an objective is: a loss over (model, batch) and the flow it has learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
from torch import Tensor, nn

from ..constraints import Rule
from ..flow import Flow
from ..registry import Registry

__all__ = ["Objective", "LossOutput", "DynamicsFactory", "drop_condition", "per_sample_times", "as_column"]

DynamicsFactory = Callable[..., nn.Module]


@dataclass
class LossOutput:
    """A scalar ``loss`` to minimise and float ``metrics`` to log (``nfe`` among them)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    after_backward: Optional[Callable[[], dict[str, float]]] = None


class Objective(nn.Module):
    """Base class of objectives.

    An objective owns its networks (built from the ``dynamics`` factory the recipe
    passes in) so that its ``state_dict`` is the whole model. Subclasses implement

    * :meth:`loss` — ``LossOutput`` for a batch ``x`` (data at flowkit time ``t0``) and
      optional condition ``cond``;
    * :meth:`flow` — the :class:`~flowkit.flow.Flow` the model defines, used by every
      sampler and by the likelihood code.

    ``nested`` maps constructor arguments that are themselves components
    (``{sde: {name: vp}}``) to the registry they come from.

    Declarations read by :func:`flowkit.recipe.validate` (nothing is probed):

    * ``provides`` — the parts of :data:`~flowkit.samplers.base.FLOW_PARTS` that
      :meth:`flow` fills in (a contract test builds every objective and compares); a
      sampler whose ``needs`` are not among them is refused before training;
    * ``defines_density`` — whether :meth:`flow`'s ``velocity`` is a field whose
      instantaneous change of variables gives the model's density (a CNF, a diffusion's
      probability-flow ODE). ``False`` for models that only learn a map (a consistency
      model): ``flowkit nll`` then refuses with a clear message instead of printing a number
      that looks like a likelihood;
    * ``variational`` — a latent-variable model evaluated by bounds, not by a flow: it
      provides nothing, and the application calls its ``evaluate_elbo(x, k)`` (negative ELBO
      and IWAE bound, each with its standard error), ``reconstruct(x)`` and
      ``generate(n, generator)`` instead of :meth:`flow` (``vae``);
    * ``needs_dynamics`` — whether the objective builds its networks from the recipe's
      ``dynamics`` section; ``False`` (``vae``: it builds its own encoder, decoder and
      posterior) makes :func:`flowkit.recipe.validate` refuse a ``dynamics`` section;
    * ``argument_rules`` — declared :class:`~flowkit.constraints.Rule` objects: constructor
      arguments that cannot work together;
    * ``training_defaults`` — ``train`` settings (:class:`~flowkit.config.TrainConfig`
      fields: ``lr``, ``batch_size``, ``ema``, ``grad_clip``, ...) the objective needs to
      train well, from its paper. ``flowkit compare --objectives`` gives them to a run it
      swaps the objective into, over the base recipe's ``train`` section (written for
      another objective) and under the recipe's ``compare: {<objective>: {train: ...}}``
      block (:func:`flowkit.recipe.swap_objective`); a contract test checks that they are
      valid settings;
    * the constructor's annotations — types and ranges (:mod:`flowkit.constraints`).
    """

    nested: ClassVar[Mapping[str, Registry]] = {}
    provides: ClassVar[frozenset[str]] = frozenset({"velocity"})
    #: whether the objective learns from a teacher model that the application hands it
    #: (:func:`flowkit.teacher.attach_teacher`; ``rectified_flow``)
    needs_teacher: ClassVar[bool] = False
    defines_density: ClassVar[bool] = True
    variational: ClassVar[bool] = False
    needs_dynamics: ClassVar[bool] = True
    argument_rules: ClassVar[tuple[Rule, ...]] = ()
    training_defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        # The trainer calls the module (not .loss) so DDP can synchronise gradients.
        return self.loss(x, cond)

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def flow(self) -> Flow:  # pragma: no cover
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Hook run by the trainer after each optimiser step (progressive schedules)."""

    def solver_state(self) -> dict[str, Tensor]:
        """What the training solves carry from one step to the next that is not a weight
        (FFJORD's warm-started step plans), as tensors: the trainer writes it into every
        checkpoint so that a resumed run continues as the uninterrupted one would. None here."""
        return {}

    def load_solver_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`solver_state` (a checkpoint written before it existed passes ``{}``)."""


def drop_condition(cond: Optional[Tensor], p: float) -> Optional[Tensor]:
    """Replace each condition by the null condition with probability ``p`` (classifier-free
    guidance training, Ho & Salimans 2022): label ``-1``, or NaNs for vectors."""
    if cond is None or p <= 0.0:
        return cond
    from ..flow import null_cond_like

    drop = torch.rand(cond.shape[0], device=cond.device) < p
    drop = drop.reshape(-1, *([1] * (cond.dim() - 1)))
    return torch.where(drop, null_cond_like(cond), cond)


def per_sample_times(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as one time per sample of ``x`` (``[B]``, in ``x``'s dtype and device); a scalar is expanded."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def as_column(c: Tensor, x: Tensor) -> Tensor:
    """A per-sample coefficient ``[B]`` shaped ``[B, 1, ..., 1]`` to scale ``x``; other shapes pass through."""
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() == 1 else c
