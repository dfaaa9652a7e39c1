"""One training loop for every objective, on HF accelerate.

The same recipe runs on a laptop CPU, one GPU, or many GPUs / nodes under
``accelerate launch``: the loop asks ``Accelerator`` for device placement, DDP,
mixed precision and gradient accumulation. ``train.batch_size`` is the *global*
batch: each of ``P`` processes draws ``batch_size / P`` samples per micro-batch.

Per step: draw a batch, ``objective(x, cond)`` → :class:`~flowkit.objectives.base.LossOutput`,
stop cleanly on a non-finite loss (the last good checkpoint stays), backward, clip,
optimiser and LR-schedule step, EMA update. Metrics go to ``metrics.jsonl`` (and to
accelerate's trackers when configured), a progress bar shows loss, NFE and it/s, and
checkpoints are written atomically (:mod:`flowkit.checkpoint`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .allocator import tune_cpu_allocator
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_recipe
from .recipe import Built, apply_overrides, build, validate

__all__ = ["train", "TrainingDiverged", "TrainResult", "Trainer"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_metrics: dict[str, Any]


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


def _schedule(cfg, optimizer):
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        frac = min(1.0, step / max(1, cfg.steps))
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
            cpu=cfg.cpu, log_with=cfg.trackers or None, project_dir=str(self.run_dir))
        acc = self.accelerator
        set_seed(cfg.seed, device_specific=True)
        self.objective = built.objective
        self.optimizer = _optimizer(cfg, [p for p in self.objective.parameters() if p.requires_grad])
        self.scheduler = _schedule(cfg, self.optimizer)
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
        self.step = 0
        self.progress = progress and acc.is_local_main_process
        if acc.num_processes > 1 and cfg.batch_size % acc.num_processes:
            raise ValueError(f"train.batch_size={cfg.batch_size} must divide by the "
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

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "step": self.step,
            "model": acc.unwrap_model(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "recipe": self.built.recipe,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema_state") is not None:
            self.ema.load_state_dict(state["ema_state"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data_generator.set_state(state["rng"]["data"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])

    def save(self) -> Optional[Path]:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:  # written once, whatever the number of processes
            path = save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return path

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
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.cfg.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def fit(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="it", dynamic_ncols=True)
        last: dict[str, Any] = {}
        window_start, window_steps, window_cpu = time.perf_counter(), 0, time.process_time()
        self.model.train()
        while self.step < cfg.steps:
            metrics: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                x, cond = self._batch()
                with (acc.accumulate(self.model) if self._accumulate else nullcontext()):
                    with (acc.autocast() if self._autocast else nullcontext()):
                        out = self.model(x, cond)
                    loss = out.loss
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        ckpt = latest_checkpoint(self.run_dir)
                        kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint had been written yet"
                        raise TrainingDiverged(
                            f"loss became {loss_value} at step {self.step + 1}; training stopped and "
                            f"{kept}. Lower train.lr, add train.grad_clip, or tighten the solver.")
                    self._backward(loss)
                    if out.after_backward is not None:
                        metrics.update(out.after_backward())
                    if acc.sync_gradients and cfg.grad_clip > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                        metrics["grad_norm"] = float(grad_norm)
                    self._step_optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self._step_optimizer.zero_grad(set_to_none=True)
                metrics.update(out.metrics)
                metrics["loss"] = loss_value
            self.step += 1
            window_steps += 1
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
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if acc.num_processes > 1:  # the logged loss is the mean over processes
                    metrics["loss"] = float(acc.reduce(torch.tensor(metrics["loss"], device=acc.device), "mean"))
                now, cpu = time.perf_counter(), time.process_time()
                # CPU seconds of this process per step: on a shared machine this is what the
                # step costs, while wall time also counts other processes' turns on the cores
                record = {"step": self.step, **metrics, "lr": self.scheduler.get_last_lr()[0],
                          "it_per_s": window_steps / max(now - window_start, 1e-9),
                          "cpu_s_per_it": (cpu - window_cpu) / max(window_steps, 1), "time": time.time()}
                self._log(record)
                window_start, window_steps, window_cpu = now, 0, cpu
                last = record
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate_and_log()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.save_samples(self.run_dir / "samples" / f"step_{self.step:07d}.png")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        self.save()
        acc.end_training()
        return TrainResult(self.run_dir, self.step, last)

    def _evaluate_and_log(self) -> None:
        from .evaluate import evaluate_nll
        from dataclasses import replace

        if not self.accelerator.is_main_process:
            return
        ev = replace(self.built.eval, n=min(self.built.eval.n, 2000))
        x, cond = self.built.dataset.test_set(ev.n, seed=ev.seed)
        model = self.eval_objective()
        model.eval()
        res = evaluate_nll(model.flow(), x.to(self.accelerator.device), ev,
                           cond=None, log_scale=self.built.dataset.log_scale,
                           discrete=self.built.dataset.discrete)
        model.train()
        self._log({"step": self.step, "eval_nll": res["nll"], "eval_bpd": res["bpd"], "eval_nfe": res["nfe"]})

    def save_samples(self, path: Path, n: int = 2000) -> None:
        from .evaluate import generate
        from .plotting import plot_samples

        if not self.accelerator.is_main_process or tuple(self.built.dataset.shape) != (2,):
            return
        model = self.eval_objective()
        model.eval()
        res = generate(model.flow(), self.built.sampler, n, seed=0, device=self.accelerator.device)
        model.train()
        data, _ = self.built.dataset.test_set(n, seed=0)
        plot_samples(res.x.cpu(), path, data=data, title=f"step {self.step} (NFE {res.nfe})")


def train(recipe: dict, run_dir: str | Path, *, overrides: Sequence[str] = (), resume: bool = False,
          source: str = "<recipe>", progress: bool = True, log=print) -> TrainResult:
    """Train ``recipe`` (with dotted ``overrides``) into ``run_dir``.

    With ``resume`` and a checkpoint in ``run_dir``, training continues from it with the
    run's saved recipe plus ``overrides`` (e.g. ``train.steps=4000``); model, optimiser,
    schedule, EMA and random states are restored, so the continuation is identical to
    an uninterrupted run.

    Raises:
        flowkit.recipe.RecipeError: the recipe is invalid (nothing is built or written).
        TrainingDiverged: the loss became non-finite.
    """
    run_dir = Path(run_dir)
    state = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt)
            recipe, source = state["recipe"], str(run_dir / "recipe.yaml")
    recipe = apply_overrides(recipe, overrides, source)
    validate(recipe, source)
    from accelerate.utils import set_seed

    set_seed(int((recipe.get("train") or {}).get("seed", 0)))  # network initialisation is seeded too
    built = build(recipe, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(built, run_dir, progress=progress)
    if state is not None:
        trainer.load_state_dict(state)
        if trainer.accelerator.is_main_process:
            log(f"resuming {run_dir} from step {trainer.step} ({ckpt.name})")
    elif resume and trainer.accelerator.is_main_process:
        log(f"no checkpoint in {run_dir}; starting from step 0")
    if trainer.accelerator.is_main_process:
        save_recipe(run_dir, built.recipe)
    return trainer.fit()
