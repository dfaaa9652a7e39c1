"""Rebuild a trained model from its run directory alone."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import CheckpointError, RunDirectoryError, find_intact_checkpoint
from .recipe import Built, apply_overrides, build

__all__ = ["load_run"]


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), *, ema: bool = True,
             device: str | torch.device = "cpu") -> tuple[Built, int]:
    """Build the recipe saved in the newest intact checkpoint of ``run_dir`` and load its weights.

    A damaged newest checkpoint (truncated, empty, unreadable, non-finite) is skipped for the
    newest intact one with a warning on stderr; checkpoints are read weights-only, so
    opening one never runs code (:mod:`flowkit.checkpoint`).

    Returns the :class:`~flowkit.recipe.Built` parts (objective in eval mode, EMA weights
    when the run kept them and ``ema`` is true) and the checkpoint's step.

    Raises:
        flowkit.checkpoint.RunDirectoryError: ``run_dir`` is missing or not a directory, or
            holds no intact checkpoint (:class:`~flowkit.checkpoint.CheckpointError`), or
            ``overrides`` change the model so that the saved weights do not fit.
        flowkit.recipe.RecipeError: the saved recipe with ``overrides`` is invalid.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunDirectoryError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is a file, not a run directory")
    path, state = find_intact_checkpoint(run_dir, map_location=device)
    recipe = apply_overrides(state["recipe"], overrides, str(run_dir / "recipe.yaml"))
    built = build(recipe, str(run_dir / "recipe.yaml"))
    weights = state["ema"] if ema and state.get("ema") is not None else state["model"]
    try:
        built.objective.load_state_dict(weights)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["mismatch"])[0]
        hint = " (do the overrides change the model?)" if overrides else ""
        raise CheckpointError(f"{path} does not fit the model its recipe builds{hint}: {first[:200]}") from None
    built.objective.to(device).eval()
    return built, int(state["step"])
