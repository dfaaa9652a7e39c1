r"""The reflow teacher: turn a ``rectified_flow`` objective's ``teacher`` setting into a map.

Rectified flow (Liu et al. 2023) trains on the pairs ``(teacher(ε), ε)`` of a trained flow,
where ``teacher(ε)`` solves the teacher's probability-flow ODE from its prior time down to
its data time, starting at ``ε`` scaled by the prior's standard deviation. The objective
(:class:`~flowkit.objectives.flow_matching.RectifiedFlow`) only *names* its teacher
(:class:`~flowkit.objectives.flow_matching.TeacherSpec`) and its coupling
(:class:`~flowkit.couplings.Teacher`) only *calls* a map; this module, part of the
application, builds the map:

- from a built :class:`~flowkit.flow.Flow` you hand over (:func:`flow_transport`), or
- from the objective's ``teacher:`` setting (:class:`LazyTeacher`), on the first batch:
  a **run directory** is loaded with :func:`flowkit.run.load_run` (EMA weights when kept);
  a **recipe** ``.yaml`` is first trained *in this process* by the training function the
  application hands in (:func:`flowkit.trainer.train` passes itself; ``train.steps`` from ``teacher_steps`` when given; no checkpoints, samples or evaluation
  on the way) into a temporary run directory, then loaded, with a warning, so one command
  reproduces the whole pipeline. The random, thread and accelerate state of the caller is
  restored afterwards, so a student run draws the same numbers whether its teacher was
  trained here or loaded. A multi-process run cannot train a teacher in-process: train it
  first and pass the run directory.

Loading waits for the first batch, so building a student (``flowkit check``,
``flowkit sample``) never touches its teacher. :func:`flowkit.trainer.train` attaches a
:class:`LazyTeacher` to every objective that declares ``needs_teacher``
(:func:`attach_teacher`); code that builds a student itself calls :func:`attach_teacher`.

References:
    Liu, Gong, Liu (2023). Flow Straight and Fast: Learning to Generate and Transfer Data
    with Rectified Flow. ICLR.

Example:
    >>> import flowkit
    >>> from flowkit.dynamics.mlp import MLP
    >>> from flowkit.objectives.flow_matching import RectifiedFlow
    >>> teacher = flowkit.Flow(velocity=lambda t, x, cond=None: -x, prior=flowkit.StandardNormal((2,)))
    >>> student = RectifiedFlow(lambda: MLP(dim=2, hidden=[8]), (2,), teacher="a flow", method="rk4", steps=8)
    >>> attach_teacher(student, teacher)
    >>> data, noise = student.coupling(torch.zeros(4, 2), torch.ones(4, 2))
    >>> [round(v, 4) for v in data[0].tolist()]  # dx/dt = -x from t=1 to t=0 multiplies by e
    [2.7183, 2.7183]
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .checkpoint import RunDirectoryError
from .config import TrainConfig
from .couplings import TeacherMap
from .flow import Flow
from .objectives.flow_matching import TeacherSpec
from .recipe import Built, load_recipe
from .run import load_run
from .samplers.ode_samplers import integrate_flow
from .rundir import LaunchError, launcher_processes

#: ``train(recipe, run_dir, *, source, progress, log)``: :func:`flowkit.trainer.train`
TrainFunction = Callable[..., Any]

__all__ = ["attach_teacher", "flow_transport", "FlowTransport", "load_teacher", "LazyTeacher"]


def flow_transport(flow: Flow, spec: TeacherSpec, *, conditional: bool = False) -> "FlowTransport":
    """The map ``noise, cond -> data`` of ``flow``'s ODE with ``spec``'s solver.

    ``noise`` is scaled by the prior's standard deviation (``flow.prior.std`` where the
    prior has one) and integrated from ``flow.t1`` to ``flow.t0`` through every segment.

    Args:
        flow: the trained teacher.
        spec: its ``solver`` (a :class:`~flowkit.solvers.SolverSpec`) and ``guidance``.
        conditional: whether the teacher takes the batch's condition (otherwise it gets
            ``None``).

    Returns:
        The map (a :class:`FlowTransport`), returning detached samples shaped like ``noise``.
    """
    return FlowTransport(flow, spec, conditional=conditional)


class FlowTransport:
    """The map ``noise, cond -> data`` of a built flow (:func:`flow_transport`).

    Also hands over the flow itself (:meth:`teacher_flow`) to objectives that step the
    teacher's ODE themselves (consistency distillation).
    """

    def __init__(self, flow: Flow, spec: TeacherSpec, *, conditional: bool = False) -> None:
        self.flow, self.spec, self.conditional = flow, spec, conditional

    def __call__(self, noise: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        std = getattr(self.flow.prior, "std", 1.0)
        res = integrate_flow(self.flow, noise * std, solver=self.spec.solver,
                             cond=cond if self.conditional else None, guidance=self.spec.guidance)
        return res.x.detach()

    def teacher_flow(self, device: torch.device) -> tuple[Flow, bool]:
        """The teacher's flow and whether it takes the batch's condition."""
        return self.flow, self.conditional


def attach_teacher(objective: Any, flow: Optional[Flow] = None, *, conditional: bool = False,
                   train: Optional[TrainFunction] = None) -> None:
    """Hand a ``needs_teacher`` objective its teacher map.

    Args:
        objective: e.g. a :class:`~flowkit.objectives.flow_matching.RectifiedFlow`; its
            ``teacher_spec`` gives the solver (and, without ``flow``, the teacher to load).
        flow: a built teacher flow; ``None`` loads (or trains) the one the objective names,
            at the first batch (:class:`LazyTeacher`).
        conditional: with ``flow``: whether it takes the batch's condition.
        train: the function that trains a teacher recipe (:func:`flowkit.trainer.train`, which
            passes itself); needed only when the objective names a recipe.
    """
    spec: TeacherSpec = objective.teacher_spec
    if flow is not None:
        objective.attach_teacher(flow_transport(flow, spec, conditional=conditional))
    else:
        objective.attach_teacher(LazyTeacher(spec, train=train))


class LazyTeacher:
    """The map of the teacher a :class:`~flowkit.objectives.flow_matching.TeacherSpec` names, loaded (or trained) on first call.

    The loaded teacher is frozen (eval mode, no gradients) and moved to each batch's
    device. Copies share it (the trainer's EMA copy of the student does not load a second).

    Args:
        spec: the teacher and its solver.
    """

    def __init__(self, spec: TeacherSpec, *, train: Optional[TrainFunction] = None) -> None:
        self.spec = spec
        self.train = train
        self._built: Optional[Built] = None

    def __repr__(self) -> str:
        return f"LazyTeacher({self.spec.source!r}, loaded={self._built is not None})"

    def __deepcopy__(self, memo: dict[int, Any]) -> "LazyTeacher":
        return self

    def load(self) -> Built:
        """The teacher's :class:`~flowkit.recipe.Built` parts (trained first for a recipe)."""
        if self._built is None:
            self._built = load_teacher(self.spec.source, train_steps=self.spec.train_steps, train=self.train)
        return self._built

    def teacher_flow(self, device: torch.device) -> tuple[Flow, bool]:
        """The loaded teacher's flow on ``device`` and whether it takes the batch's condition."""
        built = self.load()
        model = built.objective
        if next(iter(model.parameters()), torch.empty(0)).device != torch.device(device):
            model.to(device)
        return model.flow(), built.conditional

    def __call__(self, noise: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        built = self.load()
        model = built.objective
        if next(iter(model.parameters()), noise.new_empty(0)).device != noise.device:
            model.to(noise.device)
        return flow_transport(model.flow(), self.spec, conditional=built.conditional)(noise, cond)


def load_teacher(source: str | Path, *, train_steps: Optional[int] = None,
                 train: Optional[TrainFunction] = None) -> Built:
    """Load the teacher ``source`` names: a run directory, or a recipe trained here first.

    Args:
        source: a run directory (``flowkit train ... --out RUN``), or a recipe ``.yaml``
            (relative paths from the working directory).
        train_steps: ``train.steps`` for a recipe (default: the recipe's own).
        train: the function that trains a recipe (:func:`flowkit.trainer.train`); the
            application hands it in, so this module does not import the trainer.

    Returns:
        The teacher's built parts, frozen (eval mode, no gradients), on the CPU.

    Raises:
        flowkit.checkpoint.RunDirectoryError: no such run directory or recipe file (or a
            run without an intact checkpoint).
        flowkit.trainer.LaunchError: a recipe teacher asked of a multi-process run, or of a
            run whose accelerate settings (``mixed_precision``, ``cpu``) differ.
        flowkit.recipe.RecipeError: the teacher recipe is invalid.
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RunDirectoryError(f"teacher recipe {path} not found (relative paths are taken from the "
                                    f"working directory {os.getcwd()})")
        with tempfile.TemporaryDirectory(prefix="flowkit-teacher-") as tmp:
            if train is None:
                raise LaunchError(f"teacher recipe {path}: nothing to train it with; pass train=flowkit.train "
                                  "(flowkit train does), or train it first and name the run directory")
            _train_in_process(path, Path(tmp) / "run", train_steps, train)
            built, _ = load_run(Path(tmp) / "run")
    else:
        if not path.is_dir():
            raise RunDirectoryError(f"teacher run directory {path} not found; train one with "
                                    f"`flowkit train RECIPE --out {path}` or give a recipe .yaml")
        built, _ = load_run(path)
    built.objective.eval().requires_grad_(False)
    return built


def _train_in_process(recipe_path: Path, out: Path, train_steps: Optional[int], train: TrainFunction) -> None:
    """Train the teacher recipe into ``out`` with :func:`flowkit.trainer.train`, state restored."""
    overrides = ["train.checkpoint_every=0", "train.sample_every=0", "train.eval_every=0",
                 f"train.threads={torch.get_num_threads()}"]
    if train_steps is not None:
        overrides.append(f"train.steps={train_steps}")
    recipe = load_recipe(recipe_path, overrides)
    _check_can_train_here(recipe_path, recipe)
    warnings.warn(f"training the reflow teacher {recipe_path} first, in this process "
                  f"(flowkit train {recipe_path} {' '.join(overrides)}); pass a run directory as the "
                  "teacher to reuse one", stacklevel=4)
    with _caller_state_restored():
        train(recipe, out, source=str(recipe_path), progress=False, log=lambda *args, **kwargs: None)


def _check_can_train_here(path: Path, recipe: dict) -> None:
    """A recipe teacher trains in this process: refuse what that cannot do, with the fix."""
    fix = f"train it first (`flowkit train {path} --out RUN`) and pass objective.teacher=RUN"
    if launcher_processes() is not None or (
            torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise LaunchError(f"objective.teacher={path}: a multi-process run cannot train its teacher recipe "
                    f"in-process; {fix}")
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():  # no accelerator in this process yet: nothing to clash with
        return
    state = AcceleratorState()
    cfg = TrainConfig(**{k: v for k, v in (recipe.get("train") or {}).items()
                         if k in ("mixed_precision", "cpu")})
    if cfg.mixed_precision != state.mixed_precision or (cfg.cpu and state.device.type != "cpu"):
        raise LaunchError(f"objective.teacher={path}: the teacher recipe trains with train.mixed_precision="
                    f"{cfg.mixed_precision}, cpu={cfg.cpu}, which this process's accelerator (mixed_precision="
                    f"{state.mixed_precision}, on {state.device.type}) cannot change; {fix}")


@contextlib.contextmanager
def _caller_state_restored() -> Iterator[None]:
    """Restore what training changes in the process: random states, threads, gradient accumulation."""
    import numpy as np
    from accelerate.state import GradientState, is_initialized

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    threads = torch.get_num_threads()
    # accelerate's GradientState is one per process (shared by every Accelerator): the
    # teacher's would leave its gradient-accumulation settings to the caller's
    gradient = GradientState() if is_initialized() else None
    saved = {k: copy.copy(v) for k, v in vars(gradient).items()} if gradient is not None else {}
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        torch.set_num_threads(threads)
        if gradient is not None:
            vars(gradient).update(saved)
