"""One training loop for every objective, on HF accelerate.

The same recipe runs on a laptop CPU, one GPU, or many GPUs / nodes under
``accelerate launch``: the loop asks ``Accelerator`` for device placement, DDP,
mixed precision and gradient accumulation. ``train.batch_size`` is the *global*
batch: each of ``P`` processes draws ``batch_size / P`` samples per micro-batch.

Per step: draw a batch, ``objective(x, cond)`` → :class:`~flowkit.objectives.base.LossOutput`,
backward, clip, optimiser and LR-schedule step, EMA update. Metrics go to ``metrics.jsonl``
(and to accelerate's trackers when configured), a progress bar shows loss, NFE and it/s, and
checkpoints are written atomically (:mod:`flowkit.checkpoint`).

Training stops with :class:`TrainingDiverged` (exit status 3 from the CLI) when the loss or
a gradient is NaN/inf (checked every step: the loss is read anyway, the gradients by one fused
kernel before the optimiser step, or through the norm ``train.grad_clip`` computes), when
the parameters are (checked at every logged step and before every checkpoint, which is
never written with non-finite weights), or when the ODE solver gives up (torchdiffeq's
``underflow in dt``). The message names the last checkpoint verified finite.

A run directory has one writer (:mod:`flowkit.rundir`): :func:`train` locks it, refuses one
that holds a run unless asked to ``resume`` or ``overwrite`` it, and on resume applies the
changed settings that can change and refuses the others.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .allocator import tune_cpu_allocator
from .checkpoint import (CheckpointError, RunDirectoryError, RunWriteError, last_good_checkpoint,
                         non_finite_tensors, save_checkpoint, save_recipe)
from .recipe import Built, build, resolve_defaults
from .teacher import attach_teacher
from .rundir import (LaunchError, RunLock, check_run_dir_path, launcher_processes, prepare_run_dir,
                     refuse_existing_run, resolve_recipe)

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["train", "TrainingDiverged", "LaunchError", "TrainResult", "Trainer", "describe_processes",
           "check_launch"]


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a parameter became NaN/inf, or the ODE solver failed.

    Training stops before the bad update is used or saved; the last checkpoint verified
    finite is kept and named in the message.
    """


# torchdiffeq / torchsde report a solve that cannot continue by these (AssertionError mostly)
_SOLVER_FAILURES = ("underflow in dt", "max_num_steps exceeded", "non-finite values in state",
                    "Reached maximum number of iterations")


def _solver_failure(exc: BaseException) -> Optional[str]:
    """The first line of ``exc`` when it is an ODE/SDE solver giving up, else None."""
    text = str(exc)
    if any(m in text for m in _SOLVER_FAILURES):
        return text.splitlines()[0]
    if isinstance(exc, AssertionError):
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        filename = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if "torchdiffeq" in filename or "torchsde" in filename:
            return (text.splitlines() or ["assertion failed"])[0]
    return None


def _cpu_job() -> bool:
    """Several launched processes and no GPU: they form one CPU job (gloo).

    ``accelerate launch --multi_gpu --num_processes 2`` is how accelerate 1.x starts several
    processes (its ``--cpu`` flag starts one); on a machine without a GPU, accelerate joins
    them only when asked for the CPU, so flowkit asks for it rather than let each process
    train alone.
    """
    return launcher_processes() is not None and not torch.cuda.is_available()


def check_launch(accelerator: "Accelerator") -> None:
    """Refuse a launch whose processes accelerate did not join into one job.

    A launcher may start several processes (``WORLD_SIZE`` > 1) that accelerate leaves as
    independent single-process runs (``DistributedType.NO``) — on a machine whose accelerator
    accelerate cannot join, for instance: they would all write one run directory.

    Raises:
        LaunchError: the launcher started several processes but this one runs alone.
    """
    evidence = launcher_processes()
    if accelerator.num_processes == 1 and evidence is not None:
        raise LaunchError(
            f"the launcher started several processes ({evidence}) but accelerate set up a single one "
            f"({accelerator.distributed_type}): `accelerate launch --multi_gpu` on a machine without a GPU "
            "needs train.cpu=true; otherwise independent trainings would all write the same run directory")


def describe_processes(accelerator: "Accelerator") -> str:
    """``"1 process (cpu)"``, ``"2 processes (cpu, gloo)"``: what ``accelerator`` runs on."""
    n = accelerator.num_processes
    parts = [accelerator.device.type]
    backend = getattr(accelerator.state, "backend", None)
    if n > 1 and backend:
        parts.append(str(backend))
    return f"{n} process{'es' if n != 1 else ''} ({', '.join(parts)})"


@dataclass
class TrainResult:
    """Where a training ended: ``stopped_by`` is ``"steps"``, ``"max_seconds"`` or ``"max_evaluations"``."""

    run_dir: Path
    step: int
    last_metrics: dict[str, Any]
    stopped_by: str = "steps"


def _optimizer(cfg, params):
    """Adam/AdamW, fused (one kernel over all parameters) where torch supports it for these
    parameters: on CPU that is ~20% of a small model's step (bench/flow_matching.py)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
    params = list(params)
    if params and all(p.is_floating_point() for p in params):
        try:
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError):  # a device or dtype without a fused kernel
            pass
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg, optimizer, spent: Callable[[], float] = lambda: 0.0):
    """The LR schedule; its progress is the larger of ``step / cfg.steps`` and ``spent()`` (the
    spent fraction of a time or evaluation budget), so a budgeted run anneals over its budget."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        frac = min(1.0, max(step / max(1, cfg.steps), spent()))
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * frac))
        if cfg.schedule == "linear":
            return warm * (1 - frac)
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Holds the accelerate state of one run. Use :func:`train` unless you need the parts."""

    def __init__(self, built: Built, run_dir: Path, *, progress: bool = True) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.built = built
        self.cfg = cfg = built.train
        self.run_dir = Path(run_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.tune_allocator:
            tune_cpu_allocator()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
            cpu=cfg.cpu or _cpu_job(), log_with=cfg.trackers or None, project_dir=str(self.run_dir))
        acc = self.accelerator
        check_launch(acc)
        set_seed(cfg.seed, device_specific=True)
        self.objective = built.objective
        self.step = 0
        self.train_seconds = 0.0  # budgets' counters, carried over resumes in the checkpoint
        self.evaluations = 0
        self._curve_done = 0  # periodic evaluations made of train.curve_points
        self.optimizer = _optimizer(cfg, [p for p in self.objective.parameters() if p.requires_grad])
        self.scheduler = _schedule(cfg, self.optimizer, self._budget_spent)
        self.ema = (AveragedModel(self.objective, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
                    if cfg.ema > 0 else None)
        # The schedule is stepped by us once per optimiser step (train.batch_size is global),
        # so it is not handed to accelerate, which would step it once per process.
        self.model, self.optimizer = acc.prepare(self.objective, self.optimizer)
        if self.ema is not None:
            self.ema.to(acc.device)
        # Every process draws the same global batch and keeps its own slice, so P processes
        # see exactly the data one process would with the same global batch.
        self.data_generator = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
        self.stopped_by = "steps"
        self.progress = progress and acc.is_local_main_process
        if acc.num_processes > 1 and cfg.batch_size % acc.num_processes:
            raise LaunchError(f"train.batch_size={cfg.batch_size} must divide by the "
                              f"{acc.num_processes} processes")
        self.local_batch = cfg.batch_size // acc.num_processes
        # accelerate's contexts cost ~0.5 ms per step; enter them only when they do something
        self._accumulate = cfg.grad_accum > 1 or acc.num_processes > 1
        self._autocast = cfg.mixed_precision != "no"
        # Plain single-process fp32/bf16 training: step the wrapped optimiser directly
        # (accelerate's wrapper probes installed packages on every step).
        plain = not self._accumulate and cfg.mixed_precision != "fp16"  # no DDP, no loss scaling
        self._step_optimizer = self.optimizer.optimizer if plain else self.optimizer
        self._backward = (lambda loss: loss.backward()) if plain else acc.backward
        self.unwrapped = acc.unwrap_model(self.model)
        self._params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        # fp16 gradients are loss-scaled: inf there is the scaler's business (it skips the step)
        self._check_grads = cfg.mixed_precision != "fp16"
        device = self._params[0].device if self._params else acc.device
        self._found_inf = torch.zeros(1, device=device)
        self._one = torch.ones(1, device=device)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "evaluations": self.evaluations,
            "model": acc.unwrap_model(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "recipe": self.built.recipe,
            # FFJORD's warm-started step plans: the main process's, and with several processes every
            # process's in process order (absent from older checkpoints: a cold start)
            **self._solver_states(),
        }

    def _solver_states(self) -> dict[str, Any]:
        """``solver``: the main process's :meth:`~flowkit.objectives.base.Objective.solver_state`;
        with several processes also ``solver_by_process``, each process's in process order (a
        collective: :meth:`save` runs on every process), so that each resumes with its own."""
        own = self.accelerator.unwrap_model(self.model).solver_state()
        if self.accelerator.num_processes == 1:
            return {"solver": own}
        from accelerate.utils import gather_object

        every = list(gather_object([own]))
        return {"solver": every[0], "solver_by_process": every}

    def _own_solver_state(self, state: dict[str, Any]) -> Any:
        """This process's solver state in a checkpoint: its own entry when the run resumes with as
        many processes as wrote it, else the main process's (none in an older checkpoint)."""
        every = state.get("solver_by_process")
        if isinstance(every, list) and len(every) == self.accelerator.num_processes:
            return every[self.accelerator.process_index]
        return state.get("solver", {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state, then apply this run's settings (learning rate, weight
        decay; schedule, EMA decay and the rest are read from ``cfg`` as training goes).

        Raises:
            CheckpointError: the saved weights do not fit the model this recipe builds.
        """
        try:
            self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.accelerator.unwrap_model(self.model).load_solver_state(self._own_solver_state(state))
            if self.ema is not None and state.get("ema_state") is not None:
                self.ema.load_state_dict(state["ema_state"])
            torch.set_rng_state(state["rng"]["torch"])
            self.data_generator.set_state(state["rng"]["data"])
            if state["rng"].get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"the checkpoint does not fit the model this recipe builds ({first[:200]}); "
                                  "train into a new --out directory") from None
        self._apply_settings()
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.evaluations = int(state.get("evaluations", 0))
        self._curve_done = int(self.budget_progress * self.cfg.curve_points + 1e-9)

    def _apply_settings(self) -> None:
        """Make ``cfg.lr`` / ``cfg.weight_decay`` rule after a restored optimiser and schedule.

        A restored ``LambdaLR`` keeps the old ``base_lrs`` and the optimiser the old rates;
        both are reset so that ``train.lr=... --resume`` takes effect. Unchanged settings
        give back exactly the restored rates (same formula), so a plain resume is identical
        to an uninterrupted run.
        """
        cfg, scheduler = self.cfg, self.scheduler
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [cfg.lr for _ in groups]
        factor = scheduler.lr_lambdas[0]
        for group in groups:
            group["initial_lr"] = cfg.lr
            group["weight_decay"] = cfg.weight_decay
            group["lr"] = cfg.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]

    def save(self) -> Optional[Path]:
        """Write a checkpoint (main process), after every process verified the weights, their EMA
        and the optimiser's moments finite (so all processes stop together when they are not).

        Raises:
            TrainingDiverged: the weights are not finite (nothing is written).
            RunWriteError: the disk refused the write (the previous checkpoint is intact).
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        state = self.state_dict()
        bad = non_finite_tensors(state, ("model", "ema", "optimizer"))  # the same on every process
        if bad:
            raise self._diverged(f"non-finite weights ({', '.join(bad[:3])}) at the checkpoint", self.step)
        path = None
        if acc.is_main_process:  # written once, whatever the number of processes
            path = save_checkpoint(self.run_dir, self.step, state, keep=self.cfg.keep_checkpoints,
                                   verify_finite=False)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------ divergence
    def _all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """One fused kernel over ``tensors`` (~5 µs for the gradients of a 3×64 MLP on CPU)."""
        if not tensors:
            return True
        self._found_inf.zero_()
        try:  # multiplies by 1 (exact) and raises the flag on any NaN/inf, as GradScaler does
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, self._found_inf, self._one)
        except (RuntimeError, TypeError):  # tensors on several devices or of mixed kinds
            return all(bool(torch.isfinite(t).all()) for t in tensors)
        return not bool(self._found_inf.item())

    def _grads_finite(self) -> bool:
        return self._all_finite([p.grad for p in self._params if p.grad is not None])

    def _params_finite(self) -> bool:
        return self._all_finite([p.detach() for p in self._params])  # detached: outside autograd

    def _diverged(self, reason: str, step: Optional[int] = None) -> TrainingDiverged:
        """The error to raise, naming the newest checkpoint verified to load with finite weights."""
        if "parameter" not in reason and not self._params_finite():
            reason += " (the parameters are already non-finite)"
        advice = (f"a lower train.lr (now {self.cfg.lr:g}), a train.grad_clip, or a tighter solver "
                  "(objective.rtol / objective.atol / objective.steps)")
        good = last_good_checkpoint(self.run_dir)  # loaded and checked: only ever on failure
        if good is not None:
            kept = f"the last good checkpoint is {good} (verified finite); continue from it with --resume and {advice}"
        else:
            kept = f"no good checkpoint had been written; start again with {advice}"
        step = self.step + 1 if step is None else step
        return TrainingDiverged(f"training diverged at step {step}: {reason}. Training stopped; {kept}.")

    def eval_objective(self) -> nn.Module:
        """The weights used for sampling and evaluation: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ loop
    def _batch(self):
        x, cond = self.built.dataset.train_batch(self.cfg.batch_size, self.data_generator)
        acc = self.accelerator
        if acc.num_processes > 1:
            part = slice(acc.process_index * self.local_batch, (acc.process_index + 1) * self.local_batch)
            x, cond = x[part], (cond[part] if cond is not None else None)
        x = x.to(acc.device)
        if cond is None or not self.built.conditional:
            return x, None
        return x, cond.to(self.accelerator.device)

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            path = self.run_dir / "metrics.jsonl"
            try:
                with open(path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise RunWriteError(f"could not append to {path}: {exc.strerror or exc}; the checkpoints are "
                                    "intact (free space, then continue with --resume)") from exc
        if self.cfg.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def fit(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="it", dynamic_ncols=True)
        self.model.train()
        try:
            last = self._loop(bar)
        except TrainingDiverged:
            raise
        except (AssertionError, RuntimeError) as exc:
            failure = _solver_failure(exc)
            if failure is None:
                raise
            raise self._diverged(f"the ODE solver failed ({failure})") from None
        if bar is not None:
            bar.close()
        self.save()
        acc.end_training()
        return TrainResult(self.run_dir, self.step, last, self.stopped_by)

    def _loop(self, bar: Any) -> dict[str, Any]:
        """Steps until ``cfg.steps``; returns the last logged record."""
        cfg, acc = self.cfg, self.accelerator
        last: dict[str, Any] = {}
        window_start, window_steps, window_cpu = time.perf_counter(), 0, time.process_time()
        budgeted = cfg.max_seconds is not None or cfg.max_evaluations is not None
        while self.step < cfg.steps:
            step_start = time.perf_counter()
            metrics: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                x, cond = self._batch()
                with (acc.accumulate(self.model) if self._accumulate else nullcontext()):
                    with (acc.autocast() if self._autocast else nullcontext()):
                        out = self.model(x, cond)
                    loss = out.loss
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise self._diverged(f"the loss became {loss_value}")
                    self._backward(loss)
                    if out.after_backward is not None:
                        metrics.update(out.after_backward())
                    if acc.sync_gradients:
                        if cfg.grad_clip > 0:
                            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                            metrics["grad_norm"] = grad_norm
                            finite = math.isfinite(grad_norm) or not self._check_grads
                        else:
                            finite = not self._check_grads or self._grads_finite()
                        if not finite:
                            raise self._diverged("a gradient became non-finite (loss "
                                                 f"{loss_value:.6g}); the update was not applied")
                    self._step_optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self._step_optimizer.zero_grad(set_to_none=True)
                metrics.update(out.metrics)
                metrics["loss"] = loss_value
                self.evaluations += int(out.metrics.get("nfe", 1))
            self.step += 1
            window_steps += 1
            self.train_seconds += time.perf_counter() - step_start
            out_of_budget = budgeted and self._out_of_budget()
            if self.ema is not None:
                self.ema.update_parameters(self.unwrapped)
            self.unwrapped.after_step(self.step)
            if bar is not None:
                if self.step % 10 == 0 or self.step == cfg.steps:  # formatting costs ~0.1 ms
                    shown = {"loss": f"{metrics['loss']:.4f}"}
                    if "nfe" in metrics:
                        shown["nfe"] = int(metrics["nfe"])
                    bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_budget:
                if not self._params_finite():
                    raise self._diverged("a parameter became non-finite in the optimiser step", self.step)
                if acc.num_processes > 1:  # the logged loss is the mean over processes
                    metrics["loss"] = float(acc.reduce(torch.tensor(metrics["loss"], device=acc.device), "mean"))
                now, cpu = time.perf_counter(), time.process_time()
                # CPU seconds of this process per step: on a shared machine this is what the
                # step costs, while wall time also counts other processes' turns on the cores
                record = {"step": self.step, **metrics, "lr": self.scheduler.get_last_lr()[0],
                          "it_per_s": window_steps / max(now - window_start, 1e-9),
                          "cpu_s_per_it": (cpu - window_cpu) / max(window_steps, 1), "time": time.time(),
                          "train_seconds": self.train_seconds, "evaluations": self.evaluations}
                self._log(record)
                window_start, window_steps, window_cpu = now, 0, cpu
                last = record
            if self._evaluation_due(last=out_of_budget or self.step >= cfg.steps):
                self._evaluate_and_log()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.save_samples(self.run_dir / "samples" / f"step_{self.step:07d}.png")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if out_of_budget:
                break
        return last

    def _budget_spent(self) -> float:
        """The spent fraction of the time and evaluation budgets (the larger; 0 without them)."""
        cfg, spent = self.cfg, 0.0
        if cfg.max_seconds is not None:
            spent = self.train_seconds / cfg.max_seconds
        if cfg.max_evaluations is not None:
            spent = max(spent, self.evaluations / cfg.max_evaluations)
        return min(1.0, spent)

    @property
    def budget_progress(self) -> float:
        """The spent fraction of the training budget, in ``[0, 1]``: the largest of
        ``step / train.steps``, ``train_seconds / train.max_seconds`` and
        ``evaluations / train.max_evaluations`` (what the LR schedule and
        ``train.curve_points`` follow)."""
        return min(1.0, max(self.step / max(1, self.cfg.steps), self._budget_spent()))

    def _evaluation_due(self, last: bool) -> bool:
        """Whether a periodic evaluation is due after this step (``eval_every``, ``curve_points``,
        and the last step whenever either is set)."""
        cfg = self.cfg
        due = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
        if cfg.curve_points:
            k = min(cfg.curve_points, int(self.budget_progress * cfg.curve_points + 1e-9))
            if k > self._curve_done:
                self._curve_done, due = k, True
        return due or (last and bool(cfg.eval_every or cfg.curve_points))

    def _out_of_budget(self) -> bool:
        """Whether a budget is spent; with several processes, all of them agree (any one's view)."""
        cfg, acc = self.cfg, self.accelerator
        spent = None
        if cfg.max_seconds is not None and self.train_seconds >= cfg.max_seconds:
            spent = "max_seconds"
        if cfg.max_evaluations is not None and self.evaluations >= cfg.max_evaluations:
            spent = "max_evaluations"
        if acc.num_processes > 1:  # stop together, or the others wait forever in the next all-reduce
            code = torch.tensor([{None: 0, "max_seconds": 1, "max_evaluations": 2}[spent]], device=acc.device)
            code = int(acc.reduce(code, "max").item())
            spent = {0: None, 1: "max_seconds", 2: "max_evaluations"}[code]
        if spent is not None:
            self.stopped_by = spent
        return spent is not None

    def _evaluate_and_log(self) -> None:
        """Test NLL (``train.eval_points`` points) and, with ``train.eval_samples``, sample
        metrics, by the one evaluator in data units; logged with the budget counters
        (``train_seconds``, ``evaluations``) so that quality can be drawn against either."""
        from .evaluate import evaluate_model
        from .flow import NonFiniteFieldError
        from dataclasses import replace

        if not self.accelerator.is_main_process:
            return
        cfg = self.cfg
        model = self.eval_objective()
        # a model without a density (declared) is evaluated by its samples alone: always draw some
        samples = cfg.eval_samples or (0 if getattr(type(model), "defines_density", True) else cfg.eval_points)
        ev = replace(self.built.eval, n=min(self.built.eval.n, cfg.eval_points), metrics=samples > 0,
                     metric_samples=max(1, samples))
        model.eval()
        start = time.perf_counter()
        try:
            res = evaluate_model(model, self.built.dataset, self.built.sampler, ev,
                                 conditional=self.built.conditional, device=self.accelerator.device).metrics
        except NonFiniteFieldError as exc:  # the model itself went non-finite: not a user error
            raise self._diverged(f"the periodic evaluation found the model non-finite ({exc})") from None
        model.train()
        record = {"step": self.step, "train_seconds": self.train_seconds, "evaluations": self.evaluations,
                  "eval_nll": res["nll"], "eval_bpd": res["bpd"], "eval_nfe": res["nfe"]}
        record.update({f"eval_{k}": res[k] for k in ("energy_distance", "mmd", "sliced_w2", "feature_fd") if k in res})
        if getattr(type(model), "variational", False):  # nll is the IWAE bound; the ELBO beside it
            record.update(eval_neg_elbo=res["neg_elbo"], eval_iwae_k=res["iwae_k"])
        record["eval_seconds"] = time.perf_counter() - start
        self._log(record)

    def save_samples(self, path: Path, n: int = 2000) -> None:
        """Pictures of the model at this step: 2-D samples over the data, or, for a variational
        model of images, prior samples and ``<stem>_reconstructions.png``."""
        from .evaluate import generate
        from .plotting import plot_samples

        if not self.accelerator.is_main_process:
            return
        model = self.eval_objective()
        if getattr(type(model), "variational", False):  # declared: it draws its own samples, no flow
            if len(tuple(self.built.dataset.shape)) == 3:
                from .evaluate import variational_pictures
                from .plotting import plot_image_grid

                samples, pairs = variational_pictures(model, self.built.dataset, 64)
                dataset = self.built.dataset
                plot_image_grid(samples, path, dataset=dataset)
                plot_image_grid(pairs, path.with_name(f"{path.stem}_reconstructions{path.suffix}"), dataset=dataset)
            return
        if tuple(self.built.dataset.shape) != (2,):
            return
        model.eval()
        res = generate(model.flow(), self.built.sampler, n, seed=0, device=self.accelerator.device)
        model.train()
        data, _ = self.built.dataset.test_set(n, seed=0)
        plot_samples(res.x.cpu(), path, data=data, title=f"step {self.step} (NFE {res.nfe})")


def _on_main(accelerator: "Accelerator", fn: Callable[[], Any]) -> None:
    """Run ``fn`` on the main process only; if it fails, every process fails with its message
    (the others would otherwise wait forever for a main process that has left)."""
    error: Optional[BaseException] = None
    if accelerator.is_main_process:
        try:
            fn()
        except Exception as exc:  # broadcast, then re-raised as is on the main process
            error = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [None if error is None else str(error)]
        broadcast_object_list(box, from_process=0)
        if box[0] is not None and error is None:
            raise RunDirectoryError(box[0])
    if error is not None:
        raise error


def train(recipe: dict, run_dir: str | Path, *, overrides: Sequence[str] = (), resume: bool = False,
          overwrite: bool = False, source: str = "<recipe>", progress: bool = True, log=print) -> TrainResult:
    """Train ``recipe`` (with dotted ``overrides``) into ``run_dir``.

    A directory that already holds a run is refused unless ``resume`` (continue it) or
    ``overwrite`` (replace it) is given, and one process at a time may write it (a lock).

    With ``resume`` and a checkpoint in ``run_dir``, training continues from the newest
    intact checkpoint with ``recipe`` (the run's saved one when ``recipe`` is empty) plus
    ``overrides`` (e.g. ``train.steps=4000``); model, optimiser, schedule, EMA and random
    states are restored, so the continuation is identical to an uninterrupted run. Changed
    settings take effect (learning rate, schedule, steps, clipping, EMA decay, intervals);
    a change to the model, objective, data, optimiser type or seed is refused. Metrics the
    interrupted attempt logged after that checkpoint are dropped.

    Raises:
        flowkit.recipe.RecipeError: the recipe is invalid (nothing is built or written).
        flowkit.checkpoint.RunDirectoryError: the directory holds a run (and neither
            ``resume`` nor ``overwrite``), is in use by another process, is a file, has no
            intact checkpoint to resume, or cannot be written; or the resume changes a
            setting that cannot change.
        LaunchError: the launcher and accelerate disagree on the number of processes.
        TrainingDiverged: the loss, a gradient or a parameter became non-finite, or the
            ODE solver failed.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirectoryError("--resume and --overwrite exclude each other: continue the run or replace it")
    check_run_dir_path(run_dir)
    if not resume and not overwrite:
        refuse_existing_run(run_dir)  # before anything is built
    recipe, source, found, changed = resolve_recipe(recipe, run_dir, overrides, resume, source)
    from accelerate.utils import set_seed

    recipe = resolve_defaults(recipe)  # saved with every default written out: an old run rebuilds as it was
    set_seed(int((recipe.get("train") or {}).get("seed", 0)))  # network initialisation is seeded too
    built = build(recipe, source)
    if built.objective.needs_teacher:  # declared (rectified_flow): loads, or trains, at its first batch
        attach_teacher(built.objective, train=train)
    trainer = Trainer(built, run_dir, progress=progress)
    acc = trainer.accelerator
    main = acc.is_main_process
    if main:
        log(f"flowkit train: {describe_processes(acc)}")
    state = found[1] if found else None
    lock = RunLock(run_dir)  # taken by the main process only: one job, one writer
    try:
        _on_main(acc, lambda: prepare_run_dir(lock, run_dir, resume=resume, overwrite=overwrite,
                                              step=None if state is None else int(state["step"]), log=log))
        if state is not None:
            trainer.load_state_dict(state)
            if main:
                change = f"; changed: {', '.join(changed)}" if changed else ""
                log(f"resuming {run_dir} from step {trainer.step} ({found[0].name}){change}")
        elif resume and main:
            log(f"no checkpoint in {run_dir}; starting from step 0")
        _on_main(acc, lambda: save_recipe(run_dir, built.recipe))  # what actually runs
        return trainer.fit()
    finally:
        lock.release()
