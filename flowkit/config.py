"""Plain settings of the ``train`` and ``eval`` recipe sections.

Every numeric setting declares its range in its annotation (:mod:`flowkit.constraints`);
:func:`flowkit.recipe.validate` checks a recipe against them before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, Optional

from .constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range, Rule, Seed
from .solvers import ODEMethod, SolverSpec, StepCount, Tolerance, fixed_step_needs_steps

__all__ = ["TrainConfig", "EvalConfig"]


@dataclass
class TrainConfig:
    """The ``train`` section. Every objective trains through the same loop.

    Attributes:
        steps: optimiser steps (≥ 1).
        batch_size: samples per step over all processes (≥ 1).
        lr: peak learning rate (> 0); weight_decay (≥ 0).
        schedule, warmup: learning-rate schedule after ``warmup`` (≥ 0) linear warm-up steps.
        grad_clip: clip the gradient norm to this (0: off).
        grad_accum: micro-batches per optimiser step (≥ 1).
        ema: decay of the weights' exponential moving average, in ``[0, 1)`` (0: off).
        seed: random seed (``0 … 2³² − 1``); threads: CPU threads (0: torch's default).
        log_every (≥ 1), eval_every, checkpoint_every, sample_every (0: never): intervals in steps.
        curve_points: periodic evaluations at evenly spaced fractions of the training budget
            (``k / curve_points`` of the budget spent, the trainer's ``budget_progress``), so that
            runs on different budgets give curves of as many points (0: none). With
            ``eval_every`` too, both apply; the last step is evaluated whenever either is set.
        eval_points: test points of each periodic evaluation's NLL (at most ``eval.n``; ≥ 1).
        eval_samples: samples scored at each periodic evaluation by the sample metrics of
            :func:`flowkit.evaluate.sample_metrics` (0: NLL only).
        keep_checkpoints: how many checkpoints to keep (0: all).
        trackers: accelerate trackers (``[tensorboard]``, ...).
        max_seconds: a wall-clock budget (> 0 s) of training, summed over resumes; time spent in
            periodic evaluation, sampling and checkpoints is not counted (None: no budget).
        max_evaluations: a budget of network evaluations of the training loss (forward
            evaluations: an FFJORD step counts its solver's NFE, a flow-matching step 1 per
            micro-batch), summed over resumes (None: no budget). Training ends at whichever of
            ``steps`` and the budgets comes first, within one step of it (the step that spends a
            budget is the last); the learning-rate schedule runs over the budget: its
            progress is the largest spent fraction of ``steps``, ``max_seconds`` and
            ``max_evaluations`` (warm-up counts steps).
    """

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 100
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup: NonNegativeInt = 0
    grad_clip: NonNegativeFloat = 0.0
    grad_accum: PositiveInt = 1
    ema: Annotated[float, Range(0, 1, hi_open=True)] = 0.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Seed = 0
    threads: NonNegativeInt = 0
    tune_allocator: bool = True
    cpu: bool = False
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 0
    curve_points: NonNegativeInt = 0
    eval_points: PositiveInt = 2000
    eval_samples: NonNegativeInt = 0
    checkpoint_every: NonNegativeInt = 200
    sample_every: NonNegativeInt = 0
    keep_checkpoints: NonNegativeInt = 2
    trackers: list[str] = field(default_factory=list)
    max_seconds: Optional[PositiveFloat] = None
    max_evaluations: Optional[PositiveInt] = None


@dataclass
class EvalConfig:
    """The ``eval`` section: how ``flowkit nll`` and periodic evaluation run.

    Attributes:
        n: test points (≥ 1); batch_size: points per solve (≥ 1); seed: as for ``train``.
        divergence, noise, n_probes: exact trace, or Hutchinson's estimate with ``n_probes``
            (≥ 1) probes of the given noise.
        method, rtol, atol, steps, per_sample_norm: the ODE solver of the likelihood solves,
            one :class:`~flowkit.solvers.SolverSpec` (:attr:`solver`, validated when the
            settings are made): a method of :data:`flowkit.solvers.METHODS`, tolerances > 0,
            ``steps`` (≥ 1) for a fixed-step method, per-sample adaptive error norm.
        metrics, metric_samples: sample-quality metrics on ``metric_samples`` (≥ 1) samples.
        iwae_k: importance samples per test point of a variational model's IWAE bound
            (Burda et al. 2016; ``vae``), ≥ 1.
    """

    n: PositiveInt = 20000
    batch_size: PositiveInt = 5000
    seed: Seed = 1234
    divergence: Literal["exact", "hutchinson"] = "exact"
    noise: Literal["rademacher", "gaussian"] = "rademacher"
    n_probes: PositiveInt = 1
    method: ODEMethod = "dopri5"
    rtol: Tolerance = 1e-5
    atol: Tolerance = 1e-5
    steps: Optional[StepCount] = None
    per_sample_norm: bool = True
    metrics: bool = True
    metric_samples: PositiveInt = 2000
    iwae_k: PositiveInt = 100

    argument_rules: ClassVar[tuple[Rule, ...]] = (fixed_step_needs_steps,)

    def __post_init__(self) -> None:
        self.solver  # noqa: B018 - builds the spec: invalid solver settings fail here, not at the first solve

    @property
    def solver(self) -> SolverSpec:
        """The solver settings as one validated spec (what :func:`flowkit.evaluate_nll` solves with)."""
        return SolverSpec(self.method, rtol=self.rtol, atol=self.atol, steps=self.steps,
                          per_sample_norm=self.per_sample_norm)
