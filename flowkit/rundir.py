"""Run-directory rules: one writer, no silent reuse, a clean resume.

* **One writer.** :class:`RunLock` takes an exclusive ``fcntl.flock`` on
  ``DIR/.flowkit.lock`` (which records the holder's pid, host and start time). A second
  process fails at once, naming the holder. The kernel drops the lock when its holder
  dies, even by ``kill -9``, so a crashed run never blocks ``--resume``. Under a
  multi-process launch only the main process takes it (see :func:`flowkit.trainer.train`).
* **No silent reuse.** Training into a directory that already holds a run
  (:func:`run_contents`) needs ``--resume`` (continue it) or ``--overwrite``
  (:func:`clear_run` removes flowkit's files of the old run, under the lock).
* **A clean resume.** :func:`truncate_metrics` drops the metrics the killed attempt logged
  after the checkpoint resumed from, :func:`remove_temp_files` the temporary files of
  interrupted writes, and :func:`resume_differences` splits a new recipe's differences
  from the run's into settings that take effect and settings that cannot change.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .checkpoint import (CheckpointError, RunDirectoryError, RunWriteError, atomic_write_bytes, checkpoint_files,
                         find_intact_checkpoint, load_run_recipe, read_checkpoint)
from .config import TrainConfig

__all__ = ["RunLock", "RunDirectoryBusy", "RunExists", "ResumeMismatch", "LOCK_NAME", "run_contents",
           "check_run_dir_path", "refuse_existing_run", "clear_run", "remove_temp_files", "truncate_metrics",
           "set_aside_checkpoints_after", "resume_differences", "resolve_recipe", "prepare_run_dir",
           "FIXED_ON_RESUME", "LaunchError", "launcher_processes"]

LOCK_NAME = ".flowkit.lock"
# What cannot change on --resume: anything that shapes the saved weights or optimiser state,
# or the data they were fitted to, and the seed (random streams are restored from the checkpoint).
# The objective's solver settings (objective.rtol, .method, ...) are the exception: they may change.
FIXED_ON_RESUME = ("data", "dynamics", "objective", "train.optimizer", "train.seed")


def launcher_processes() -> Optional[str]:
    """The environment setting by which a launcher says this is one of several processes."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "LOCAL_RANK"):
        try:
            value = int(os.environ[key])
        except (KeyError, ValueError):
            continue
        if value > (0 if key == "LOCAL_RANK" else 1):
            return f"{key}={value}"
    return None


class LaunchError(RuntimeError):
    """The processes of this run cannot do what it asks: accelerate set up other processes than
    the launcher started, or a teacher recipe cannot train inside this process."""


class RunDirectoryBusy(RunDirectoryError):
    """Another process holds the run directory's lock."""


class RunExists(RunDirectoryError):
    """The directory already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


class ResumeMismatch(RunDirectoryError):
    """``--resume`` with a recipe that differs from the run's in settings that cannot change."""


# --------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive, non-blocking lock on a run directory (``fcntl.flock``).

    Example:
        >>> import tempfile
        >>> with RunLock(tempfile.mkdtemp()) as lock:
        ...     lock.held
        True
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """What the holder recorded (pid, host, started); empty when unreadable."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> "RunLock":
        """Take the lock or fail at once.

        Raises:
            RunDirectoryBusy: another process holds it (its pid is in the message).
            RunDirectoryError: the directory cannot be created or locked.
        """
        check_run_dir_path(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunWriteError(f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(f"cannot lock the run directory {self.run_dir}: {exc.strerror or exc} "
                                        "(a file system without file locks?)") from exc
            info = self.holder()
            who = (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}"
                   if info else "a process that is still starting")
            raise RunDirectoryBusy(f"{self.run_dir} is in use by another flowkit process ({who}); wait for "
                                   "it to finish or stop it — two processes must never write one run directory"
                                   ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as exc:
            self.release()
            raise RunWriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # before unlocking: the next holder writes its own record
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------------------ contents
def check_run_dir_path(run_dir: Path) -> None:
    """Refuse a path that exists but is not a directory.

    Raises:
        RunDirectoryError: ``run_dir`` is a file (or another non-directory).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is a file, not a run directory")


def run_contents(run_dir: Path) -> list[str]:
    """What of a previous run ``run_dir`` holds (empty for a new or empty directory)."""
    run_dir = Path(run_dir)
    found = [name for name in ("recipe.yaml", "metrics.jsonl") if (run_dir / name).exists()]
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        found.append("checkpoints/")
    return found


def refuse_existing_run(run_dir: Path) -> None:
    """Raise :class:`RunExists` when ``run_dir`` already holds a run."""
    found = run_contents(run_dir)
    if found:
        raise RunExists(f"{run_dir} already holds a run ({', '.join(found)}); use --resume to continue it, "
                        "a new --out directory, or --overwrite to replace it")


def clear_run(run_dir: Path) -> list[str]:
    """Remove flowkit's files of a previous run (call it holding the lock).

    Only what flowkit writes goes: ``recipe.yaml``, ``metrics.jsonl``, the checkpoints
    and their pointer and temporary files, the periodic sample pictures. Anything else
    in the directory stays. Returns the removed names.
    """
    run_dir = Path(run_dir)
    removed = []
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if path.name == "latest" or path.name.startswith("step_") or path.name.endswith(".tmp"):
                path.unlink()
                removed.append(f"checkpoints/{path.name}")
        if not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()
    samples = run_dir / "samples"
    if samples.is_dir():
        for path in samples.glob("step_*.png"):
            path.unlink()
            removed.append(f"samples/{path.name}")
        if not any(samples.iterdir()):
            samples.rmdir()
    for name in ("metrics.jsonl", "recipe.yaml"):
        if (run_dir / name).exists():
            (run_dir / name).unlink()
            removed.append(name)
    return removed


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files left by interrupted atomic writes (call it holding the lock)."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob(".*.tmp")) + list(run_dir.glob(".*.tmp"))
    for path in found:
        path.unlink(missing_ok=True)
    return found


def set_aside_checkpoints_after(run_dir: Path, step: int) -> list[Path]:
    """Rename checkpoints numbered above ``step`` (damaged ones a resume skipped) to ``*.damaged``.

    A resume from ``step`` rewrites those steps; the damaged files stay for inspection but
    can no longer be mistaken for the newest checkpoint.
    """
    moved = []
    for number, path in checkpoint_files(run_dir):
        if number > step:
            target = path.with_name(path.name + ".damaged")
            os.replace(path, target)
            moved.append(target)
    return moved


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep only the ``metrics.jsonl`` records of steps ``<= step``; returns how many were dropped.

    Records a killed attempt logged after its last checkpoint (and a half-written last
    line) would otherwise appear twice once the resumed run logs those steps again.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            number = json.loads(line)["step"]
            ok = isinstance(number, int) and number <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        try:
            atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
        except OSError as exc:
            raise RunWriteError(f"could not rewrite {path}: {exc.strerror or exc}") from exc
    return dropped


# ------------------------------------------------------------------------ resume rules
_UNSET = object()


def _flatten(prefix: str, value: Any, flat: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, flat)
    else:
        flat[prefix] = value


def _resolved(recipe: Mapping) -> dict[str, Any]:
    """``recipe`` as dotted keys, with every default written out as a run saves it
    (:func:`flowkit.recipe.resolve_defaults`), so a default and the same value written out
    (a tuple default and its YAML list) are no difference."""
    from .recipe import resolve_defaults
    from .registry import RegistryError

    try:
        recipe = resolve_defaults(recipe)
    except (RegistryError, TypeError, ValueError):  # e.g. a component an older flowkit had: compare what is written
        pass
    flat: dict[str, Any] = {}
    for section, value in recipe.items():
        _flatten(section, value, flat)
    return flat


def _solver_setting(key: str) -> bool:
    """``objective.rtol`` and the like: how the objective integrates, not what it learns."""
    from .solvers import SolverSpec

    section, _, name = key.partition(".")
    return section == "objective" and name in {f.name for f in dataclasses.fields(SolverSpec)}


def _fixed(key: str, old: Any, new: Any) -> bool:
    if _solver_setting(key):  # a tighter solver is the advice given on divergence: it may change
        return False
    if key == "train.ema":  # the decay may change; EMA weights cannot appear or vanish
        return bool(old) != bool(new) if old is not _UNSET and new is not _UNSET else True
    return any(key == f or key.startswith(f"{f}.") for f in FIXED_ON_RESUME)


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else json.dumps(value, default=str)


def resume_differences(saved: Mapping, given: Mapping) -> tuple[list[str], list[str]]:
    """How ``given`` differs from the ``saved`` recipe of a run being resumed.

    Returns ``(changed, refused)``, each a list of ``"key (old → new)"``: ``changed`` take
    effect on resume (learning rate, schedule, steps, clipping, EMA decay, intervals,
    sampler and eval settings), ``refused`` cannot change (:data:`FIXED_ON_RESUME`, and
    switching EMA on or off). Defaults are filled in first, so writing a default out is
    no difference.

    Example:
        >>> base = {"data": {"name": "8gaussians"}, "dynamics": {"name": "mlp"}, "objective": {"name": "cfm"}}
        >>> resume_differences(base, {**base, "train": {"lr": 1.0e-4}})
        (['train.lr (0.001 → 0.0001)'], [])
    """
    old, new = _resolved(saved), _resolved(given)
    keys = sorted(set(old) | set(new))
    # another component (``X.name`` differs): report the name, not each of its arguments
    swapped = [k[:-len("name")] for k in keys if k.endswith(".name") and old.get(k, _UNSET) != new.get(k, _UNSET)]
    changed, refused = [], []
    for key in keys:
        if any(key.startswith(prefix) and key != f"{prefix}name" for prefix in swapped):
            continue
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        try:
            same = a == b
        except Exception:
            same = False
        if same is True:
            continue
        entry = f"{key} ({_show(a)} → {_show(b)})"
        (refused if _fixed(key, a, b) else changed).append(entry)
    return changed, refused


# --------------------------------------------------------------------- putting it together
def resolve_recipe(recipe: dict, run_dir: Path, overrides: Sequence[str], resume: bool,
                   source: str) -> tuple[dict, str, Optional[tuple[Path, dict]], list[str]]:
    """The recipe to run and, on resume, the checkpoint ``(path, state)`` and the changed settings.

    On ``resume`` with a checkpoint, ``recipe`` (the run's saved one when empty) plus
    ``overrides`` is compared with the checkpoint's recipe (:func:`resume_differences`).

    Raises:
        ResumeMismatch: the recipe changes settings that cannot change on resume.
        CheckpointError: checkpoints exist but none is intact.
        flowkit.recipe.RecipeError: the recipe is invalid.
    """
    from .recipe import apply_overrides, validate

    if resume and checkpoint_files(run_dir):
        path, state = find_intact_checkpoint(run_dir)
        saved = state["recipe"]
        if not recipe:  # continue with the run's own recipe
            recipe, source = saved, str(run_dir / "recipe.yaml")
        recipe = apply_overrides(recipe, overrides, source)
        validate(recipe, source)
        changed, refused = resume_differences(saved, recipe)
        steps = (recipe.get("train") or {}).get("steps", TrainConfig.steps)
        if steps < int(state["step"]):
            refused.append(f"train.steps ({steps} is below step {state['step']}, which the run has reached)")
        if refused:
            raise ResumeMismatch(
                f"cannot resume {run_dir} (step {state['step']}) with {source}: {'; '.join(refused)} "
                "cannot change on --resume (they shape the saved model or its data, or are restored from the "
                "checkpoint); train into a new --out directory, or use --overwrite to replace the run")
        return recipe, source, (path, state), changed
    if resume and not recipe and (run_dir / "recipe.yaml").is_file():  # killed before its first checkpoint
        recipe, source = load_run_recipe(run_dir), str(run_dir / "recipe.yaml")
    recipe = apply_overrides(recipe, overrides, source)
    validate(recipe, source)
    return recipe, source, None, []


def prepare_run_dir(lock: RunLock, run_dir: Path, *, resume: bool, overwrite: bool,
                    step: Optional[int], log: Callable[[str], Any]) -> None:
    """Take the lock, then make the directory ready to be written (main process only).

    Refuses a run (unless ``resume`` or ``overwrite``), clears the old one for
    ``overwrite``, removes temporary files; on ``resume`` from checkpoint ``step`` sets
    aside the damaged checkpoints above it and drops the metrics logged after it.
    """
    lock.acquire()
    notes = []
    if overwrite:
        removed = clear_run(run_dir)
        if removed:
            log(f"--overwrite: removed the previous run's {len(removed)} files from {run_dir}")
    elif not resume:
        refuse_existing_run(run_dir)  # again, now that no other process can start one
    if remove_temp_files(run_dir):
        notes.append("removed temporary files of an interrupted write")
    if resume:
        floor = step or 0  # no checkpoint: from step 0
        for number, path in checkpoint_files(run_dir):
            if number > floor:
                try:
                    read_checkpoint(path)
                except CheckpointError:
                    continue  # the damaged one the resume skipped: set aside below
                raise RunDirectoryError(f"{run_dir} gained checkpoint {path.name} while this process was starting; "
                                        "run the command again")
        moved = set_aside_checkpoints_after(run_dir, floor)
        if moved:
            notes.append(f"set aside damaged {', '.join(p.name for p in moved)}")
        dropped = truncate_metrics(run_dir, floor)
        if dropped:
            notes.append(f"dropped {dropped} metrics records logged after step {floor}")
    if notes:
        log(f"{run_dir}: {'; '.join(notes)}")
