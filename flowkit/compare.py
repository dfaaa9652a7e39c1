"""``flowkit compare``: train several configurations alike, on equal budgets and several seeds,
and evaluate them with one evaluator.

A *configuration* is a recipe file, or one objective swapped into a base recipe
(``--objectives``: :func:`flowkit.recipe.swap_objective` gives it the objective's declared
``training_defaults`` and the recipe's ``compare: {<objective>: ...}`` block). Every
configuration gets

* the same **budget** (``--budget steps=N | seconds=S | evaluations=E``: optimiser steps,
  seconds of training, or network evaluations of the training loss — an FFJORD step counts
  its solver's NFE, a flow-matching step one), applied through ``train.steps`` /
  ``train.max_seconds`` / ``train.max_evaluations``; a time or evaluation budget lifts the
  step limit, and the learning-rate schedule follows the budget;
* the same **seeds** (``--seeds N``: ``train.seed = 0 … N−1``; runs of one seed share the
  initialisation seed and the stream of training batches);
* periodic evaluation at ``--curve-points`` evenly spaced fractions of the budget
  (``train.curve_points``), drawn as **curves** of quality against training time and
  against evaluations, mean ± standard error over seeds;
* one **evaluator**: the first configuration's ``eval`` settings, the same test points and
  as many samples for every run (:func:`flowkit.evaluate.evaluate_model`).

Each run trains in its own process (``python -m flowkit.compare --worker``), ``--jobs`` at a
time, each pinned to its own share of this process's CPUs (``os.sched_setaffinity``,
``torch.set_num_threads`` and ``train.threads`` = its share), so a crash, a divergence or
a failed evaluation is a row of the table, never the end of the comparison.

The table gives mean ± standard error over seeds and marks, per metric, the runs worse than
the best by a two-sided paired t-test over seeds (:mod:`flowkit.stats`; Holm-corrected over
the runs compared with the best, p < 0.05). Outputs in ``--out``: ``compare.md``,
``compare.csv`` (one row per run and seed), ``compare_summary.csv`` (one row per
configuration), ``compare.json`` (both, the tests and the curves), ``curves_time.png``,
``curves_evaluations.png`` and, for 2-D data, ``samples.png``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import EvalConfig
from .recipe import COMMAND_LINE, RecipeError, apply_overrides, load_recipe, swap_objective
from .stats import holm, mean_se, paired_t_test

__all__ = ["Budget", "parse_budget", "expand_runs", "compare", "run_one", "summarise", "METRICS",
           "UNLIMITED_STEPS"]

#: ``train.steps`` of a run on a time or evaluation budget: the budget ends it, not the steps
UNLIMITED_STEPS = 10 ** 9
#: the metrics the table reports, lower is better for each: (key, heading)
METRICS: tuple[tuple[str, str], ...] = (
    ("nll", "NLL (nats)"), ("bpd", "bits/dim"), ("neg_elbo", "negative ELBO (nats)"),
    ("energy_distance", "energy distance"), ("mmd", "MMD"), ("sliced_w2", "sliced W2"), ("feature_fd", "feature FD"))
#: significance level of the marks in the table
ALPHA = 0.05
#: the directory holding this flowkit, so that a worker imports the same one
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class Budget:
    """One budget for every run: ``kind`` is ``steps``, ``seconds`` or ``evaluations``."""

    kind: str
    amount: float

    def overrides(self) -> list[str]:
        """The ``train`` overrides that impose it (the other limits lifted)."""
        if self.kind == "steps":
            return [f"train.steps={int(self.amount)}", "train.max_seconds=", "train.max_evaluations="]
        if self.kind == "seconds":
            return [f"train.steps={UNLIMITED_STEPS}", f"train.max_seconds={self.amount!r}", "train.max_evaluations="]
        return [f"train.steps={UNLIMITED_STEPS}", "train.max_seconds=", f"train.max_evaluations={int(self.amount)}"]

    def __str__(self) -> str:
        unit = {"steps": "optimiser steps", "seconds": "seconds of training", "evaluations": "network evaluations"}
        amount = f"{self.amount:g}" if self.kind == "seconds" else f"{int(self.amount):,}"
        return f"{amount} {unit[self.kind]} per run"


def parse_budget(text: str) -> Budget:
    """``steps=N``, ``seconds=S`` or ``evaluations=E`` (positive) → :class:`Budget`.

    Raises:
        ValueError: anything else (the message names ``--budget`` and the accepted forms).

    Example:
        >>> parse_budget("seconds=30")
        Budget(kind='seconds', amount=30.0)
    """
    kind, _, value = text.partition("=")
    kind = kind.strip()
    accepted = "steps=N, seconds=S or evaluations=E"
    if kind not in ("steps", "seconds", "evaluations") or not value:
        raise ValueError(f"--budget {text}: expected {accepted}")
    try:
        amount = float(value) if kind == "seconds" else int(value)
    except ValueError:
        raise ValueError(f"--budget {text}: {kind} must be a {'number' if kind == 'seconds' else 'whole number'}"
                         ) from None
    if not (math.isfinite(amount) and amount > 0):
        raise ValueError(f"--budget {text}: the amount must be positive and finite")
    return Budget(kind, float(amount))


def expand_runs(recipes: Sequence[str], objectives: Optional[str] = None) -> list[tuple[str, Path, dict]]:
    """``(name, recipe file, recipe)`` per configuration: each recipe file, or one base recipe
    with each objective swapped in (:func:`flowkit.recipe.swap_objective`).

    Raises:
        RecipeError: a recipe cannot be read, or ``--objectives`` with other than one recipe.
    """
    if objectives:
        if len(recipes) != 1:
            raise RecipeError([f"--objectives takes exactly one base recipe, got {len(recipes)}"],
                              ", ".join(map(str, recipes)), origin=COMMAND_LINE)
        base = Path(recipes[0])
        recipe = load_recipe(base)
        return [(obj, base, swap_objective(recipe, obj)) for obj in objectives.split(",") if obj]
    out = []
    for r in recipes:
        recipe = load_recipe(r)
        recipe.pop("compare", None)
        out.append((Path(r).stem, Path(r), recipe))
    return out


# ------------------------------------------------------------------------------ one run


def _read_curve(run_dir: Path) -> list[dict]:
    """The periodic evaluation records of a run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "eval_nll" in record:
            rows.append({k: v for k, v in record.items() if k in ("step", "train_seconds", "evaluations")
                         or k.startswith("eval_")})
    return rows


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


def run_one(spec: dict) -> dict:
    """Train one run of ``spec`` and evaluate it; never raises — a failure is the row's ``status``.

    ``spec``: ``name``, ``seed``, ``source``, ``recipe`` (complete, overrides applied),
    ``run_dir``, ``eval`` (the shared :class:`EvalConfig` as a dict), ``overwrite``.
    """
    import torch

    import flowkit
    from .trainer import TrainingDiverged

    run_dir = Path(spec["run_dir"])
    train_cfg = dict(spec["recipe"].get("train") or {})
    row: dict[str, Any] = {"run": spec["name"], "seed": spec["seed"], "recipe": spec["source"],
                           "objective": (spec["recipe"].get("objective") or {}).get("name"),
                           "lr": train_cfg.get("lr"), "batch_size": train_cfg.get("batch_size"),
                           "ema": train_cfg.get("ema", 0.0), "run_dir": str(run_dir)}
    started = time.perf_counter()
    try:
        result = flowkit.train(spec["recipe"], run_dir, overwrite=spec.get("overwrite", False),
                               source=spec["source"], progress=False, log=lambda *a, **k: None)
    except TrainingDiverged as exc:
        row["status"] = f"diverged: {_first_line(exc)}"
    except Exception as exc:  # any failure is this run's row, not the comparison's end
        row["status"] = f"failed: {type(exc).__name__}: {_first_line(exc)}"
    else:
        state = result.last_metrics
        row.update(status="ok", step=result.step, stopped_by=result.stopped_by,
                   train_seconds=round(float(state.get("train_seconds", 0.0)), 2),
                   evaluations=int(state.get("evaluations", 0)))
        try:
            built, _ = flowkit.load_run(run_dir)
            cfg = EvalConfig(**spec["eval"])
            ev = flowkit.evaluate_model(built.objective, built.dataset, built.sampler, cfg,
                                        conditional=built.conditional)
            res = ev.metrics
            row.update(nll=res["nll"], nll_sem=res["nll_sem"], bpd=res["bpd"], nll_nfe=res["nfe"],
                       sample_nfe=res.get("sample_nfe"), sampler=getattr(built.sampler, "name", "?"),
                       parameters=sum(p.numel() for p in built.objective.parameters()))
            row.update({k: res[k] for k in ("energy_distance", "mmd", "mmd_bandwidth", "sliced_w2", "feature_fd")
                        if k in res})
            # a variational model (vae): nll is its IWAE bound, the negative ELBO beside it
            row.update({k: res[k] for k in ("neg_elbo", "neg_elbo_sem", "iwae_k") if k in res})
            if ev.samples is not None and ev.reference is not None and ev.samples[0].numel() == 2:
                torch.save({"samples": ev.samples[:2000].float(), "reference": ev.reference[:2000].float()},
                           run_dir / "compare_samples.pt")
            bad = [k for k, _ in METRICS if isinstance(row.get(k), float) and not math.isfinite(row[k])]
            if bad:
                row["status"] = f"diverged: non-finite {', '.join(bad)} at evaluation"
        except Exception as exc:  # report, do not abort the comparison
            row["status"] = f"evaluation failed: {type(exc).__name__}: {_first_line(exc)}"
    row["wall_seconds"] = round(time.perf_counter() - started, 2)
    row["curve"] = _read_curve(run_dir)
    return row


def _worker(spec_path: str, result_path: str) -> int:
    """``python -m flowkit.compare --worker SPEC RESULT``: pin to the spec's cores, run, write."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    cores = spec.get("cores") or []
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(max(1, len(cores) or 1))
    start = time.time()
    row = run_one(spec)
    row.update(pid=os.getpid(), started=start, finished=time.time(),
               cores=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores,
               threads=torch.get_num_threads())
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, result_path)
    return 0


# ------------------------------------------------------------------------- scheduling


def _core_slots(jobs: int) -> list[list[int]]:
    """``jobs`` disjoint shares of this process's CPUs (shared round-robin when there are fewer)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if jobs >= len(cores):
        return [[cores[i % len(cores)]] for i in range(jobs)]
    per = len(cores) // jobs
    return [cores[i * per:(i + 1) * per] for i in range(jobs)]


def default_jobs() -> int:
    """One job per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_all(specs: list[dict], jobs: int, isolate: bool, work: Path, log: Callable) -> list[dict]:
    """Run every spec, ``jobs`` at a time, each in its own pinned process when ``isolate``."""
    slots = _core_slots(jobs)
    results: dict[int, dict] = {}
    if not isolate:
        for i, spec in enumerate(specs):
            results[i] = run_one({**spec, "cores": slots[0]})
            log(f"[compare] {_label(specs[i])}: {results[i]['status']}")
        return [results[i] for i in range(len(specs))]
    work.mkdir(parents=True, exist_ok=True)
    pending = list(range(len(specs)))
    running: dict[int, tuple[subprocess.Popen, int, Path, Path, Any]] = {}
    free = list(range(len(slots)))
    try:
        while pending or running:
            while pending and free:
                i, slot = pending.pop(0), free.pop(0)
                stem = f"{specs[i]['name']}" + ("" if specs[i]["seed"] is None else f"_seed{specs[i]['seed']}")
                spec_file, result_file, log_file = work / f"{stem}.json", work / f"{stem}.result.json", work / f"{stem}.log"
                result_file.unlink(missing_ok=True)
                spec_file.write_text(json.dumps({**specs[i], "cores": slots[slot]}))
                threads = str(len(slots[slot]))
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
                fh = open(log_file, "w")
                proc = subprocess.Popen([sys.executable, "-m", "flowkit.compare", "--worker", str(spec_file),
                                         str(result_file)], stdout=fh, stderr=subprocess.STDOUT, env=env)
                running[i] = (proc, slot, result_file, log_file, fh)
                log(f"[compare] started {_label(specs[i])} (pid {proc.pid}, cores {slots[slot]})")
            time.sleep(0.05)
            for i in [i for i, r in running.items() if r[0].poll() is not None]:
                proc, slot, result_file, log_file, fh = running.pop(i)
                fh.close()
                free.append(slot)
                if result_file.is_file():
                    results[i] = json.loads(result_file.read_text())
                else:  # the process died before writing its row
                    tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
                    results[i] = {"run": specs[i]["name"], "seed": specs[i]["seed"], "recipe": specs[i]["source"],
                                  "status": f"failed (exit {proc.returncode}): {(tail or ['no output'])[-1][:300]}",
                                  "curve": [], "pid": proc.pid}
                log(f"[compare] {_label(specs[i])}: {results[i]['status']}")
    finally:
        for proc, *_rest, fh in running.values():  # interrupted: stop the runs this call started
            proc.terminate()
            fh.close()
    return [results[i] for i in range(len(specs))]


def _label(spec: dict) -> str:
    return spec["name"] + ("" if spec["seed"] is None else f" seed {spec['seed']}")


# ------------------------------------------------------------------------- aggregation


def summarise(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Per-configuration summary (mean ± SE over ok seeds) and the paired tests against the best.

    For each metric the best configuration is the one with the lowest mean; every other
    configuration is tested against it by :func:`flowkit.stats.paired_t_test` over the
    seeds both have, and the p-values are Holm-corrected over those comparisons. A
    configuration is marked ``worse`` when the corrected p is below :data:`ALPHA`.

    Returns:
        ``(summary, tests)``: one dict per configuration (``<metric>_mean``, ``<metric>_se``,
        ``<metric>_n``, ``<metric>_mark``), one dict per test.
    """
    names = list(dict.fromkeys(r["run"] for r in rows))
    by_name = {n: [r for r in rows if r["run"] == n] for n in names}
    summary, tests = [], []
    for name in names:
        runs = by_name[name]
        ok = [r for r in runs if r.get("status") == "ok"]
        failed = [r for r in runs if r.get("status") != "ok"]
        if not failed:
            status = "ok"
        elif ok:
            status = f"{len(ok)}/{len(runs)} ok; " + "; ".join(f"seed {r.get('seed')}: {r['status']}" for r in failed)
        else:
            status = "; ".join((f"seed {r.get('seed')}: " if r.get("seed") is not None else "") + r["status"]
                               for r in failed)
        first = (ok or runs)[0]
        entry: dict[str, Any] = {"run": name, "status": status, "seeds": len(runs), "ok": len(ok),
                                 "objective": first.get("objective"), "lr": first.get("lr"),
                                 "batch_size": first.get("batch_size"), "ema": first.get("ema"),
                                 "sampler": first.get("sampler"), "parameters": first.get("parameters"),
                                 "recipe": first.get("recipe"),
                                 "stopped_by": ",".join(sorted({str(r.get("stopped_by")) for r in ok})) or None}
        for key in ("step", "train_seconds", "evaluations"):
            values = [float(r[key]) for r in ok if r.get(key) is not None]
            entry[key] = round(mean_se(values)[0], 2) if values else None
        for key, _ in METRICS:
            values = [float(r[key]) for r in ok if r.get(key) is not None and math.isfinite(float(r[key]))]
            mean, se = mean_se(values) if values else (None, None)
            entry.update({f"{key}_mean": mean, f"{key}_se": se, f"{key}_n": len(values), f"{key}_mark": ""})
        summary.append(entry)
    for key, _ in METRICS:
        scored = [s for s in summary if s[f"{key}_mean"] is not None]
        if len(scored) < 2:
            continue
        best = min(scored, key=lambda s: s[f"{key}_mean"])
        best["_best_" + key] = True
        best_values = {r.get("seed"): r.get(key) for r in by_name[best["run"]] if r.get("status") == "ok"}
        batch = []
        for s in scored:
            if s is best:
                continue
            values = {r.get("seed"): r.get(key) for r in by_name[s["run"]] if r.get("status") == "ok"}
            seeds = sorted((k for k in values if k in best_values and k is not None), key=int)
            test = paired_t_test([values[k] for k in seeds], [best_values[k] for k in seeds])
            batch.append((s, test, seeds))
        adjusted = holm([t.p for _, t, _ in batch])
        for (s, test, seeds), p_holm in zip(batch, adjusted):
            worse = not math.isnan(p_holm) and p_holm < ALPHA
            s[f"{key}_mark"] = "worse" if worse else ""
            tests.append({"metric": key, "run": s["run"], "best": best["run"], "seeds": seeds, "n": test.n,
                          "mean_diff": test.mean_diff, "se": test.se, "t": test.t, "df": test.df, "p": test.p,
                          "p_holm": p_holm, "significant": worse})
    return summary, tests


# ------------------------------------------------------------------------------ output


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _mean_cell(s: dict, key: str) -> str:
    mean, se = s.get(f"{key}_mean"), s.get(f"{key}_se")
    if mean is None:
        return ""
    text = _fmt(mean) + (f" ± {_fmt(se, 2)}" if se is not None else "")
    if s.get("_best_" + key):
        text = f"**{text}**"
    if s.get(f"{key}_mark") == "worse":
        text += " †"
    return text


RUN_COLUMNS = ["run", "seed", "status", "nll", "nll_sem", "bpd", "neg_elbo", "neg_elbo_sem", "iwae_k",
               "energy_distance", "mmd", "mmd_bandwidth", "sliced_w2", "feature_fd", "nll_nfe", "sample_nfe", "sampler", "objective", "lr", "batch_size",
               "ema", "step", "stopped_by", "train_seconds", "evaluations", "wall_seconds", "parameters", "pid",
               "cores", "recipe"]
SUMMARY_COLUMNS = ["run", "status", "seeds", "ok", *[f"{k}_{s}" for k, _ in METRICS for s in ("mean", "se", "mark")],
                   "objective", "lr", "batch_size", "ema", "step", "train_seconds", "evaluations", "stopped_by",
                   "sampler", "parameters", "recipe"]


def _write(out: Path, rows: list[dict], summary: list[dict], tests: list[dict], context: dict) -> None:
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    (out / "compare.json").write_text(json.dumps(
        {**context, "summary": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summary],
         "tests": tests, "runs": rows}, indent=1, default=str))
    for name, columns, data in (("compare.csv", RUN_COLUMNS, flat), ("compare_summary.csv", SUMMARY_COLUMNS, summary)):
        with open(out / name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(data)
    shown = [(k, h) for k, h in METRICS if any(s.get(f"{k}_mean") is not None for s in summary)]
    lines = ["# flowkit compare", "", f"Budget: {context['budget']}. Seeds: {context['seeds_text']}. "
             f"{context['jobs_text']}", "", f"Evaluator (every run alike): {context['evaluator']}", ""]
    lines += ["| run | status | " + " | ".join(h for _, h in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for s in summary:
        lines.append(f"| {s['run']} | {s['status']} | " + " | ".join(_mean_cell(s, k) for k, _ in shown) + " |")
    lines += ["", "Mean ± standard error over seeds (lower is better for every column); **bold**: the best mean; "
              f"†: worse than the best by a two-sided paired t-test over seeds (pairs share the seed, hence the "
              f"training batches, and all runs share the test points), Holm-corrected over the runs compared with "
              f"the best, p < {ALPHA}. Energy distance and MMD are V-statistics (≥ 0, biased upward alike for "
              "every run: the same numbers of samples); see flowkit/metrics.py.", "",
              "## What each run used", "",
              "| run | objective | lr | batch | EMA | steps | train seconds | evaluations | stopped by | sampler | "
              "parameters | recipe |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['run']} | {_fmt(s['objective'])} | {_fmt(s['lr'])} | {_fmt(s['batch_size'])} | "
                     f"{_fmt(s['ema'])} | {_fmt(s['step'], 6)} | {_fmt(s['train_seconds'])} | "
                     f"{_fmt(s['evaluations'], 8)} | {_fmt(s['stopped_by'])} | {_fmt(s['sampler'])} | "
                     f"{_fmt(s['parameters'], 8)} | {_fmt(s['recipe'])} |")
    lines += ["", "Steps, seconds and evaluations are means over the seeds that trained; seconds count training "
              "steps only (not periodic evaluation or checkpoints)."]
    if tests:
        lines += ["", "## Paired tests against the best", "",
                  "| metric | run | best | mean difference ± SE | t | df | p | p (Holm) |", "|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['metric']} | {t['run']} | {t['best']} | {_fmt(t['mean_diff'])} ± {_fmt(t['se'], 2)} | "
                         f"{_fmt(t['t'], 3)} | {t['df']} | {_fmt(t['p'], 3)} | {_fmt(t['p_holm'], 3)} |")
    run_cols = ["run", "seed", "status", *[k for k, _ in shown], "step", "train_seconds", "evaluations", "pid"]
    lines += ["", "## Runs", "", "| " + " | ".join(run_cols) + " |", "|" + "---|" * len(run_cols)]
    for r in flat:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in run_cols) + " |")
    pictures = [p for p in ("curves_time.png", "curves_evaluations.png", "samples.png") if (out / p).is_file()]
    if pictures:
        lines += [""] + [f"![{p[:-4]}]({p})" for p in pictures]
    for note in context.get("notes", []):
        lines += ["", f"Note: {note}"]
    (out / "compare.md").write_text("\n".join(lines) + "\n")


def _pictures(out: Path, rows: list[dict], names: list[str], log: Callable) -> None:
    from .plotting import plot_curves, plot_grid

    curves = {n: [r.get("curve") or [] for r in rows if r["run"] == n and r.get("curve")] for n in names}
    if any(curves.values()):
        for x_key, file in (("train_seconds", "curves_time.png"), ("evaluations", "curves_evaluations.png")):
            plot_curves(curves, x_key, out / file)
    panels, reference = [], None
    for name in names:
        done = [r for r in rows if r["run"] == name and r.get("status") == "ok" and r.get("run_dir")]
        path = Path(done[0]["run_dir"]) / "compare_samples.pt" if done else None
        if path is not None and path.is_file():
            import torch

            saved = torch.load(path, weights_only=True)
            title = f"{name}" + ("" if done[0].get("seed") is None else f" (seed {done[0]['seed']})")
            nll = done[0].get("nll")  # None for a model without a density (consistency)
            panels.append((f"{title}\n" + ("no NLL" if nll is None else f"NLL {nll:.3f}"), saved["samples"]))
            reference = saved["reference"] if reference is None else reference
        else:
            panels.append((f"{name}\nfailed" if not done else name, None))
    if any(p[1] is not None for p in panels):
        plot_grid(panels, out / "samples.png", reference=reference)


def compare(recipes: Sequence[str], out: str | Path, *, overrides: Sequence[str] = (),
            objectives: Optional[str] = None, budget: Optional[Budget] = None, seeds: Optional[int] = None,
            jobs: Optional[int] = None, curve_points: int = 8, eval_cfg: Optional[EvalConfig] = None,
            samples: int = 2000, overwrite: bool = False, isolate: bool = True, log=print) -> list[dict]:
    """Train every configuration on ``seeds`` seeds and the same budget, evaluate all alike,
    write the tables and pictures; returns one row per run (configuration and seed).

    Args:
        recipes: recipe files, or one base recipe with ``objectives``.
        out: directory of the comparison; configuration ``c`` trains into ``out/c`` (one
            seed: the recipe's own) or ``out/c/seed<s>`` (``seeds``).
        overrides: dotted overrides for every run (``--set``), over the swapped recipes.
        objectives: comma-separated objectives to swap into the one base recipe.
        budget: the budget of every run (None: each recipe's ``train.steps`` and budgets).
        seeds: train every configuration with ``train.seed = 0 … seeds − 1``.
        jobs: runs at a time (default: one per CPU of this process); each gets its share of
            the CPUs.
        curve_points: periodic evaluations per run (``train.curve_points``; 0: the recipes' own).
        eval_cfg: the evaluator's settings (default: the first configuration's ``eval``).
        samples: samples drawn per run for the sample metrics (and as many test points).
        overwrite: train again runs that ``out`` already holds.
        isolate: train each run in its own process (False: one after another in this one).

    Raises:
        flowkit.recipe.RecipeError: a recipe is invalid (nothing is trained).
        flowkit.rundir.RunExists: ``out`` already holds runs of these names.
        ValueError: ``seeds``, ``jobs``, ``samples`` or ``curve_points`` out of range.
    """
    import flowkit
    from .recipe import resolve_defaults
    from .rundir import RunExists, check_run_dir_path, run_contents

    for label, value, low in (("--seeds", seeds, 1), ("--jobs", jobs, 1), ("--samples", samples, 1),
                              ("--curve-points", curve_points, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    out = Path(out)
    check_run_dir_path(out)
    configs = expand_runs(recipes, objectives)
    names = [name for name, _, _ in configs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise RecipeError([f"two runs would be named {', '.join(twice)} (each run is named for its recipe file or "
                           "objective, and trains into out/<name>); give each recipe its own file name"],
                          ", ".join(map(str, recipes)), origin=COMMAND_LINE)
    jobs = jobs or default_jobs()
    seed_list: list[Optional[int]] = list(range(seeds)) if seeds else [None]
    n_runs = len(configs) * len(seed_list)
    jobs = min(jobs, n_runs)
    threads = len(_core_slots(jobs)[0])
    curve = [f"train.curve_points={curve_points}", "train.eval_points=1000", f"train.eval_samples={min(samples, 500)}"] \
        if curve_points else []
    specs, resolved = [], []
    for name, path, recipe in configs:
        try:
            recipe = apply_overrides(recipe, [*curve, *overrides], source=str(path))
            pinned = [f"train.threads={threads}"] if isolate else []  # a run's share of the cores
            recipe = apply_overrides(recipe, [*(budget.overrides() if budget else []), *pinned], source=str(path))
        except RecipeError as exc:
            raise RecipeError(exc.errors, f"{path} ({name})", origin=COMMAND_LINE) from None
        flowkit.validate(recipe, f"{path}" + (f" with objective {name} swapped in" if objectives else ""))
        resolved.append(resolve_defaults(recipe))
        for seed in seed_list:
            run_recipe = copy.deepcopy(recipe) if seed is None else apply_overrides(recipe, [f"train.seed={seed}"])
            run_dir = out / name if seed is None else out / name / f"seed{seed}"
            specs.append({"name": name, "seed": seed, "source": str(path), "recipe": run_recipe,
                          "run_dir": str(run_dir), "overwrite": overwrite})
    taken = [spec["run_dir"] for spec in specs if run_contents(Path(spec["run_dir"]))]
    if taken and not overwrite:
        shown = sorted({str(Path(t).relative_to(out)) for t in taken})
        raise RunExists(f"{out} already holds the runs {', '.join(shown)}; use a new --out directory, "
                        "or --overwrite to train them again")
    notes = []
    evaluator = eval_cfg or EvalConfig(**resolved[0]["eval"])
    evaluator = replace(evaluator, metric_samples=samples, metrics=True)
    if any(r["eval"] != resolved[0]["eval"] for r in resolved[1:]):
        notes.append(f"the recipes' eval sections differ; every run was evaluated with {names[0]}'s")
    if any(r["data"] != resolved[0]["data"] for r in resolved[1:]):
        notes.append("the runs train on different data: their metrics are not comparable")
    from .components import OBJECTIVES

    kinds = [OBJECTIVES.get(r["objective"]["name"]) for r in resolved]
    if any(k.variational for k in kinds):
        notes.append(f"a variational model's NLL is its importance-weighted bound (IWAE, k = {evaluator.iwae_k} "
                     "samples per test point), its negative ELBO beside it")
    if any(not k.defines_density and not k.variational for k in kinds):
        notes.append("a model that defines no density (e.g. a consistency model) has no NLL: it is compared by "
                     "its samples alone")
    for spec in specs:
        spec["eval"] = asdict(evaluator)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[compare] {len(configs)} configuration(s) x {len(seed_list)} seed(s) = {n_runs} runs, "
        f"{jobs} at a time, {threads} thread(s) each" + (f"; budget {budget}" if budget else ""))
    rows = _run_all(specs, jobs, isolate, out / "jobs", log)
    summary, tests = summarise(rows)
    _pictures(out, rows, names, log)
    context = {
        "budget": str(budget) if budget else "each recipe's own (train.steps, max_seconds, max_evaluations)",
        "seeds_text": ", ".join(map(str, seed_list)) if seeds else "one run each, the recipe's train.seed",
        "jobs_text": (f"{jobs} run(s) at a time in separate processes, {threads} core(s) and torch thread(s) each, "
                      f"of the {len(_core_slots(1)[0])} this process may use" if isolate else "one run at a time in this process"),
        "evaluator": (f"NLL on {evaluator.n} test points ({evaluator.method}, "
                      + (f"{evaluator.steps} steps" if evaluator.steps else
                         f"rtol={evaluator.rtol:g}, atol={evaluator.atol:g}")
                      + f", {evaluator.divergence} trace"
                      + (f", {evaluator.n_probes} probes" if evaluator.divergence == "hutchinson" else "")
                      + f"); {samples} samples per run against as many test points, seeded alike"),
        "notes": notes, "objectives": objectives, "recipes": [str(r) for r in recipes],
        "overrides": list(overrides), "budget_spec": asdict(budget) if budget else None,
        "seeds": seed_list, "jobs": jobs, "threads": threads, "curve_points": curve_points,
    }
    _write(out, rows, summary, tests, context)
    return rows


if __name__ == "__main__":  # the worker of one run: python -m flowkit.compare --worker SPEC RESULT
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m flowkit.compare --worker SPEC.json RESULT.json (flowkit compare starts it)")
