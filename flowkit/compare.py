"""``flowkit compare``: train several recipes on the same data and evaluate them alike.

Each run trains in its own process (a crash or a diverged run is reported in the table,
not fatal); then one evaluator — the same likelihood settings, test points and sample
metrics for every model — scores all of them. Outputs in ``--out``: ``compare.md``,
``compare.csv``, ``compare.json`` and ``samples.png`` (samples side by side, 2-D data).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence


from .config import EvalConfig
from .recipe import COMMAND_LINE, RecipeError, load_recipe

__all__ = ["expand_runs", "compare"]


def expand_runs(recipes: Sequence[str], objectives: Optional[str] = None) -> list[tuple[str, Path, list[str]]]:
    """``(name, recipe file, overrides)`` per run: each recipe, or one base recipe per objective."""
    if objectives:
        if len(recipes) != 1:
            raise ValueError("--objectives takes exactly one base recipe")
        base = Path(recipes[0])
        return [(obj, base, [f"objective={obj}"]) for obj in objectives.split(",") if obj]
    return [(Path(r).stem, Path(r), []) for r in recipes]


def compare(recipes: Sequence[str], out: str | Path, *, overrides: Sequence[str] = (),
            objectives: Optional[str] = None, eval_cfg: Optional[EvalConfig] = None,
            samples: int = 2000, overwrite: bool = False, log=print) -> list[dict]:
    """Train every run, evaluate all with one evaluator, write the table and picture.

    Each run trains into ``out/<name>``; where one of them already holds a run, nothing is
    trained unless ``overwrite`` (then each run replaces its own directory).

    Raises:
        flowkit.recipe.RecipeError: a recipe is invalid (nothing is trained).
        flowkit.rundir.RunExists: ``out`` already holds runs of these names.
    """
    import flowkit
    from .plotting import plot_grid
    from .rundir import RunExists, check_run_dir_path, run_contents

    out = Path(out)
    check_run_dir_path(out)
    runs = expand_runs(recipes, objectives)
    names = [name for name, _, _ in runs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise RecipeError([f"two runs would be named {', '.join(twice)} (each run is named for its recipe file or "
                           "objective, and trains into out/<name>); give each recipe its own file name"],
                          ", ".join(map(str, recipes)), origin=COMMAND_LINE)
    for name, path, extra in runs:  # fail fast on invalid recipes, before any training
        flowkit.validate(load_recipe(path, [*extra, *overrides]), str(path))
    taken = [name for name, _, _ in runs if run_contents(out / name)]
    if taken and not overwrite:
        raise RunExists(f"{out} already holds the runs {', '.join(taken)}; use a new --out directory, "
                        "or --overwrite to train them again")
    out.mkdir(parents=True, exist_ok=True)
    rows, panels, reference = [], [], None
    for name, path, extra in runs:
        run_dir = out / name
        log(f"[compare] training {name} ({path})")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flowkit.cli", "train", str(path), *extra, *overrides,
                               "--out", str(run_dir), "--no-progress", *(["--overwrite"] if overwrite else [])],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        row: dict = {"run": name, "recipe": str(path), "train_seconds": round(seconds, 1)}
        if proc.returncode != 0:
            message = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            row.update(status=f"failed (exit {proc.returncode}): {message[:200]}")
            rows.append(row)
            panels.append((f"{name}\nfailed", None))
            log(f"[compare] {name} failed: {message}")
            continue
        try:
            built, step = flowkit.load_run(run_dir)
            cfg = replace(eval_cfg or built.eval, metric_samples=samples)
            ev = flowkit.evaluate_model(built.objective, built.dataset, built.sampler, cfg,
                                        conditional=built.conditional)
            res = ev.metrics
            row.update(status="ok", step=step, nll=round(res["nll"], 4), nll_sem=round(res["nll_sem"], 4),
                       bpd=None if res["bpd"] is None else round(res["bpd"], 4), nll_nfe=round(res["nfe"], 1),
                       sample_nfe=res.get("sample_nfe"), sampler=getattr(built.sampler, "name", "?"),
                       parameters=sum(p.numel() for p in built.objective.parameters()))
            row.update({k: round(res[k], 5) for k in ("energy_distance", "sliced_w2") if k in res})
            if ev.samples is not None and ev.samples[0].numel() == 2:
                panels.append((f"{name}\nNLL {res['nll']:.3f}", ev.samples))
                reference = ev.reference if reference is None else reference
        except Exception as exc:  # report, do not abort the comparison
            row.update(status=f"evaluation failed: {exc}")
            panels.append((f"{name}\nfailed", None))
        rows.append(row)
        log(f"[compare] {name}: {row}")
    _write(out, rows)
    if panels and any(p[1] is not None for p in panels):
        plot_grid(panels, out / "samples.png", reference=reference)
    return rows


COLUMNS = ["run", "status", "nll", "nll_sem", "bpd", "energy_distance", "sliced_w2", "nll_nfe", "sample_nfe",
           "sampler", "train_seconds", "parameters", "step", "recipe"]


def _write(out: Path, rows: list[dict]) -> None:
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    with open(out / "compare.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in COLUMNS[:-1]) + " |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
