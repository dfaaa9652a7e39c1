"""Atomic, weights-only checkpoints in a run directory.

Layout of a run directory::

    recipe.yaml            the fully resolved recipe
    metrics.jsonl          one JSON object per logged step
    checkpoints/step_0000200.pt
    checkpoints/latest     name of the newest complete checkpoint
    .flowkit.lock          held by the process training into the directory (flowkit.rundir)

A checkpoint is written to a temporary file, flushed to disk and renamed into place
(``os.replace`` is atomic on POSIX); only then is ``latest`` switched, the same way. A
killed process therefore never leaves a half-written file named as the latest.

Checkpoints are safe to open: a file holds tensors and plain data only (the recipe as a
YAML string) and is read with ``torch.load(weights_only=True)``, which refuses any other
object instead of running its pickled code; ``latest`` may only name a ``step_N.pt`` file
inside the run's own ``checkpoints`` directory. Model weights are verified finite before
they are written, and a truncated, empty or unreadable newest checkpoint is skipped for the
newest intact one, with a warning on stderr.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import yaml

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "read_checkpoint", "find_intact_checkpoint", "last_good_checkpoint", "checkpoint_files",
           "checkpoint_step", "non_finite_tensors", "save_recipe", "load_run_recipe",
           "RunDirectoryError", "CheckpointError", "RunWriteError", "NonFiniteState"]

_NAME = re.compile(r"step_(\d+)\.pt")
FORMAT = 2  # 2: recipe stored as a YAML string; 1 (unmarked): recipe as a dict


class RunDirectoryError(FileNotFoundError):
    """A run directory lacks what a command needs, or cannot be used as asked."""


class CheckpointError(RunDirectoryError):
    """No checkpoint of a run can be loaded (unreadable, unsafe or not flowkit's)."""


class RunWriteError(RunDirectoryError):
    """Writing into the run directory failed (disk full, read-only, ...); nothing was corrupted."""


class NonFiniteState(ValueError):
    """Model weights hold NaN or infinite values; such a state is never saved as a checkpoint."""


def _warn(message: str) -> None:
    print(f"flowkit: warning: {message}", file=sys.stderr)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary file and an atomic rename.

    On any failure (a full disk included) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_recipe(run_dir: Path, recipe: dict) -> None:
    """Write the resolved ``recipe`` as ``run_dir/recipe.yaml`` (atomically)."""
    path = Path(run_dir) / "recipe.yaml"
    try:
        atomic_write_bytes(path, yaml.safe_dump(recipe, sort_keys=False).encode())
    except OSError as exc:
        raise RunWriteError(f"could not write {path}: {exc.strerror or exc}") from exc


def load_run_recipe(run_dir: Path) -> dict:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a flowkit run directory (no recipe.yaml)")
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------ finiteness
def _named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def non_finite_tensors(state: dict[str, Any], sections: tuple[str, ...] = ("model", "ema")) -> list[str]:
    """Names of the floating-point tensors of ``state[section]`` holding NaN or ±inf.

    By default the model weights and their EMA, what a checkpoint is trusted for (the
    trainer adds the optimiser state before saving). One reduction per tensor, at save and
    load time only.
    """
    bad = []
    for section in sections:
        for name, tensor in _named_tensors(state.get(section), section):
            if tensor.is_floating_point() or tensor.is_complex():
                if not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    return bad


# ------------------------------------------------------------------------------ writing
def checkpoint_step(path: Path) -> Optional[int]:
    """The step a ``step_N.pt`` file name encodes, else None."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoints/step_N.pt``, by increasing step number."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in ckpt_dir.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2,
                    verify_finite: bool = True) -> Path:
    """Write ``state`` as ``checkpoints/step_{step}.pt`` atomically and point ``latest`` at it.

    ``state["recipe"]`` (a dict) is stored as a YAML string so that the file holds only
    tensors and plain data. With ``keep > 0``, ``keep`` checkpoints stay: the one just
    written and the highest-numbered others (by parsed step number, not by name).

    Raises:
        NonFiniteState: the model or EMA weights are not finite (nothing is written).
        RunWriteError: the disk refused the write; the previous checkpoint and ``latest``
            are intact and no temporary file is left.
    """
    if verify_finite:
        bad = non_finite_tensors(state)
        if bad:
            raise NonFiniteState(f"not saving step {step}: non-finite values in {', '.join(bad[:3])}"
                                 f"{' and more' if len(bad) > 3 else ''}")
    state = dict(state)
    if isinstance(state.get("recipe"), dict):
        state["recipe"] = yaml.safe_dump(state["recipe"], sort_keys=False)
        state["format"] = FORMAT
    ckpt_dir = Path(run_dir) / "checkpoints"
    name = f"step_{step:07d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(ckpt_dir / name, buffer.getvalue())
        atomic_write_bytes(ckpt_dir / "latest", name.encode())
    except OSError as exc:
        try:
            previous = _read_pointer(ckpt_dir)
        except CheckpointError:
            previous = None
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise RunWriteError(f"could not write checkpoint {ckpt_dir / name}: {exc.strerror or exc}; {kept} "
                            "(free space, then continue with --resume)") from exc
    if keep > 0:  # the one just written, and the highest-numbered others up to ``keep``
        others = [p for _, p in checkpoint_files(run_dir) if p.name != name]
        for path in others[:len(others) - (keep - 1)]:
            path.unlink(missing_ok=True)
    return ckpt_dir / name


# ------------------------------------------------------------------------------ reading
def _read_pointer(ckpt_dir: Path) -> Optional[str]:
    """The file name ``checkpoints/latest`` names, checked to be a plain ``step_N.pt``.

    Raises:
        CheckpointError: ``latest`` names a path (``../x``, ``/abs``) — never followed.
    """
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name):
        raise CheckpointError(f"{pointer} names {name!r}, outside the run's checkpoints directory; "
                              "refusing to follow it (latest may only name a step_N.pt file beside it)")
    return name if _NAME.fullmatch(name) else None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, else the highest-numbered one (None if none).

    This is the *newest* file, not necessarily an intact one: see :func:`find_intact_checkpoint`.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    name = _read_pointer(ckpt_dir)
    if name is not None and (ckpt_dir / name).is_file():
        return ckpt_dir / name
    found = checkpoint_files(run_dir)
    return found[-1][1] if found else None


def _unsafe_reason(exc: BaseException) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    what = f" ({match.group(1)})" if match else ""
    return (f"it holds objects other than tensors and plain data{what}; flowkit loads checkpoints "
            "weights-only and never runs code from them (a file from an older flowkit holding such "
            "objects must be re-created)")


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", *,
                    require_finite: bool = True) -> dict:
    """Load one checkpoint file weights-only and check it is a flowkit checkpoint.

    Returns the state with ``state["recipe"]`` as a dict (decoded from the stored YAML;
    checkpoints of the previous format, holding the dict itself, load as well).

    Raises:
        CheckpointError: the file is missing, truncated, empty, not a flowkit checkpoint,
            holds anything but tensors and plain data (no code is run), or (with
            ``require_finite``) holds non-finite weights. The message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (zero bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "Unsupported global" in str(exc):
            raise CheckpointError(f"refusing checkpoint {path}: {_unsafe_reason(exc)}") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: {first[:160]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path} is not a flowkit checkpoint (no model weights and step)")
    recipe = state.get("recipe")
    if isinstance(recipe, str):
        try:
            recipe = yaml.safe_load(recipe)
        except yaml.YAMLError:
            recipe = None
    if not isinstance(recipe, dict):
        raise CheckpointError(f"checkpoint {path} is not a flowkit checkpoint (no readable recipe)")
    state["recipe"] = recipe
    if require_finite:
        bad = non_finite_tensors(state)
        if bad:
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])})")
    return state


def _candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to try, newest (highest step number) first.

    ``latest`` is checked (it may only name a plain ``step_N.pt`` beside it) but the order
    is the step number: a process killed between writing a checkpoint and switching
    ``latest`` leaves a newer, complete file that ``latest`` does not name yet.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    _read_pointer(ckpt_dir)
    order = [p for _, p in reversed(checkpoint_files(run_dir))]
    inside = ckpt_dir.resolve()
    for path in order:
        if path.resolve().parent != inside:  # a symlink out of the run's directory
            raise CheckpointError(f"{path} links outside the run's checkpoints directory; refusing to follow it")
    return order


def find_intact_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu", *,
                           warn: Optional[Callable[[str], None]] = _warn) -> tuple[Path, dict]:
    """The newest checkpoint of ``run_dir`` that loads and holds finite weights, and its state.

    Damaged newer ones are skipped with a warning (``warn``; stderr by default).

    Raises:
        CheckpointError: no checkpoint exists, or none is intact (each one's reason listed).
    """
    run_dir = Path(run_dir)
    candidates = _candidates(run_dir)
    if not candidates:
        raise RunDirectoryError(f"no checkpoint in {run_dir}/checkpoints (has training run?)")
    problems = []
    for path in candidates:
        try:
            state = read_checkpoint(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems and warn is not None:
            for problem in problems:
                warn(f"{problem}; using {path.name} (step {state['step']}) instead")
        return path, state
    raise CheckpointError(f"no intact checkpoint in {run_dir}/checkpoints: " + "; ".join(problems))


def last_good_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that loads and holds finite weights, or None (no warnings)."""
    try:
        return find_intact_checkpoint(run_dir, warn=None)[0]
    except RunDirectoryError:
        return None


def load_checkpoint(run_dir_or_file: Path, map_location: str | torch.device = "cpu") -> dict:
    """The state of a checkpoint file, or of the newest intact checkpoint of a run directory.

    Raises:
        RunDirectoryError: the path does not exist, or no checkpoint is intact
            (:class:`CheckpointError`, which says why).
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        return find_intact_checkpoint(path, map_location)[1]
    if not path.exists():
        raise RunDirectoryError(f"{path} does not exist")
    return read_checkpoint(path, map_location)

