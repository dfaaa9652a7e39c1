"""DiffFlow vs FFJORD vs score matching vs CFM on sharp 2-D densities, at equal parameters and
under one training budget.

The recipes in ``recipes/compare_rings/`` (same data, ~89k parameters each) on
``olympic_rings`` and ``sierpinski``, trained and evaluated by :func:`flowkit.compare.compare`
(flowkit's trainer, one process per run) — each for ``--steps`` optimiser steps or ``--budget``
seconds of training (``train.max_seconds``), whichever comes first; DiffFlow's milestones
scaled to ``--steps`` as in the recipe (1/8 : 5/16 : 5/8), the cosine schedule spanning
``--steps``. ``--threads N`` restricts this process to N CPUs, which flowkit compare hands to
each run as its cores and torch threads.

From flowkit's one evaluator: test NLL by the probability-flow ODE (dopri5, 1e-5, exact trace;
nats), the energy distance against fresh data and the sampler's NFE. What sharp densities need
beside it, on ``--samples`` samples drawn with the recipe's sampler (and their seconds): a
narrow-bandwidth MMD² (Gaussian kernel, σ = 0.05, unbiased) and the fraction of samples on the
support — within 0.02 of a ring (``distance_to_support``; the rings' radial std is 0.001), or
inside the carpet. A PNG grid of samples per dataset.

Per method and dataset this is ``flowkit compare recipes/compare_rings/<method>.yaml --out DIR
--curve-points 0 --set train.steps=S train.max_seconds=B [data=DATASET]
[objective.milestones=[...]]``; the script runs one comparison per recipe because DiffFlow's
milestones are its own override.

    python bench/diffflow_compare.py --steps 8000 --budget 1800
    python bench/diffflow_compare.py --methods score_matching cfm --steps 30000 --budget 600 \\
        --tag @30k --merge          # longer runs of two methods, rows added beside the others
    python bench/diffflow_compare.py --quick                 # small (~5 min)

Results: ``bench/results/diffflow_compare.json`` and ``.md``,
``bench/results/diffflow_compare_<dataset>.png`` (samples kept in
``bench/results/diffflow_compare_samples/`` for ``--merge``), runs in
``bench/results/runs/diffflow_compare/<dataset>/``. Timings on a shared machine are distorted
by other processes' load; the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from diffflow_common import (ROOT, bench_parser, fill_sizes, load_results, machine, mmd, on_support, set_up,
                             size_arguments, true_nll, write_results)

import flowkit  # after diffflow_common, which puts the repository on the path
from flowkit.compare import compare
from flowkit.config import EvalConfig
from flowkit.metrics import energy_distance

RECIPES = ROOT / "recipes" / "compare_rings"
METHODS = ("diffflow", "ffjord", "score_matching", "cfm")
DATASETS = ("olympic_rings", "sierpinski")
TRAINED_BY = "`flowkit.compare` (flowkit's trainer; the time budget is `train.max_seconds`)"


def overrides(method: str, dataset: str, args: argparse.Namespace) -> list[str]:
    """The recipe overrides of one run: caps, data, batch, DiffFlow's milestones."""
    out = [f"train.steps={args.steps}", f"train.max_seconds={args.budget}", "train.log_every=10",
           "train.checkpoint_every=0", "train.sample_every=0"]
    if dataset != "olympic_rings":
        out.append(f"data={dataset}")
    if args.batch:
        out.append(f"train.batch_size={args.batch}")
    if method == "diffflow":
        s = args.steps
        out.append(f"objective.milestones=[{max(1, s // 8)}, {max(2, 5 * s // 16)}, {max(3, 5 * s // 8)}]")
    return out


def training_record(run: Path) -> dict[str, Any]:
    """Steps, training seconds, s/it and the mean logged loss over the last tenth of training,
    from the run's ``metrics.jsonl``."""
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    last = records[-1]
    tail = [r["loss"] for r in records if r["step"] > 0.9 * last["step"]] or [last["loss"]]
    return {"steps": last["step"], "train_seconds": last["train_seconds"],
            "s_per_iter": last["train_seconds"] / last["step"], "final_loss": statistics.mean(tail)}


def sharp_metrics(built, ref: torch.Tensor, n_samples: int) -> tuple[dict[str, Any], torch.Tensor]:
    """On-support fraction and narrow-kernel MMD² of ``n_samples`` samples of the run's sampler
    (the MMD² on the first ``len(ref)`` finite ones against ``ref``), and their seconds."""
    flow = built.objective.flow()
    torch.manual_seed(1)  # a reverse SDE's noise (generate's seed is the prior's)
    start = time.perf_counter()
    with torch.no_grad():
        samples = flowkit.generate(flow, built.sampler, n_samples, seed=0).x.float()
    seconds = time.perf_counter() - start
    ok = torch.isfinite(samples).all(1)
    s2 = samples[ok][: len(ref)]
    return {"sample_seconds": seconds, "finite_fraction": float(ok.float().mean()),
            "on_support": on_support(built.dataset, samples[ok]),
            "mmd_0.05": mmd(s2, ref) if len(s2) > 10 else float("nan")}, samples


def run_compare(args: argparse.Namespace, previous: Optional[dict] = None,
                save: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train and evaluate each method on each dataset; with ``previous`` (``--merge``), rows of
    methods not run now are kept and the sample grid is redrawn from all saved samples."""
    from flowkit.plotting import plot_grid

    methods = [m for m in args.methods if m in flowkit.OBJECTIVES]
    missing = [m for m in args.methods if m not in flowkit.OBJECTIVES]
    res: dict[str, Any] = {"machine_start": machine(args.threads), "steps": args.steps, "budget_s": args.budget,
                           "batch": args.batch, "trained_by": TRAINED_BY, "not_registered": missing,
                           "datasets": {}}
    if previous:  # the header describes the main run; each row records its own caps
        res.update({k: previous[k] for k in ("machine_start", "steps", "budget_s", "batch") if k in previous})
        if "trained_by" not in previous:  # rows of the former private loop: new rows are marked
            del res["trained_by"]
        res["datasets"] = previous.get("datasets", {})
    sample_dir = args.out / "diffflow_compare_samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    ev = EvalConfig(n=args.eval_n, batch_size=min(args.eval_n, 2000), divergence="exact", rtol=1e-5, atol=1e-5)
    for dataset in args.datasets:
        rows: dict[str, Any] = res["datasets"].setdefault(dataset, {})
        data_set = flowkit.DATASETS.build(dataset)
        ref, _ = data_set.test_set(args.samples, seed=5)
        ref2, _ = data_set.test_set(min(args.samples, 2000), seed=77)
        rows["data"] = {"true_nll": true_nll(data_set), "on_support": on_support(data_set, ref),
                        "mmd_0.05": mmd(ref[:len(ref2)], ref2),
                        "energy_distance": energy_distance(ref[:len(ref2)], ref2)}
        runs = args.out / "runs" / "diffflow_compare" / dataset
        for method in methods:
            key = method + args.tag
            [row] = compare([str(RECIPES / f"{method}.yaml")], runs, overrides=overrides(method, dataset, args),
                            jobs=1, curve_points=0, eval_cfg=ev, samples=args.samples, overwrite=True)
            caps = {"method": method, "steps_cap": args.steps, "budget_s": args.budget}
            if row["status"] != "ok":
                rows[key] = {**caps, "status": row["status"]}
                print(f"{dataset} {key}: {row['status']}", flush=True)
                continue
            built, _ = flowkit.load_run(runs / method)
            sharp, samples = sharp_metrics(built, ref2, args.samples)
            torch.save(samples, sample_dir / f"{dataset}_{key}.pt")
            rows[key] = {**caps, "status": "ok", "trainer": "flowkit", "params": row["parameters"],
                         "stopped_by": row.get("stopped_by"), "threads": row.get("threads"),
                         **training_record(runs / method),
                         "nll": row["nll"], "nll_sem": row["nll_sem"], "nll_nfe": row["nll_nfe"],
                         "energy_distance": row["energy_distance"], "sample_nfe": row["sample_nfe"], **sharp}
            if method == "diffflow":
                rows[key]["net_evals_per_sample_step"] = 2  # drift + score per reverse step
            print(f"{dataset} {key}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[key].items()), flush=True)
            if save is not None:
                save(res)
        panels = [("data", ref)]
        for key, r in rows.items():
            path = sample_dir / f"{dataset}_{key}.pt"
            if key not in ("data", "png") and r.get("status", "ok") == "ok" and path.is_file():
                panels.append((f"{key}, {r['steps']} steps (NLL {r['nll']:.2f}, on {r['on_support']:.2f})",
                               torch.load(path)))
        png = args.out / f"diffflow_compare_{dataset}.png"
        plot_grid(panels, png, reference=ref)
        rows["png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    res["machine_end"] = machine(args.threads)
    return res


def markdown(results: dict[str, Any]) -> str:
    """The report of the results file."""
    lines = ["# DiffFlow vs FFJORD vs score matching vs CFM (bench/diffflow_compare.py)", ""]
    c = results["compare"]
    m0 = c["machine_start"]
    trained_by = c.get("trained_by") or ("the private training loop of the former `bench/diffflow_rings.py` (Adam, "
                                         "the recipe's schedule, stopped at the budget), before the trainer had one")
    lines += [f"## Equal parameters, one budget ({c.get('mode', '')})", "",
              f"{m0['cpu']}, {m0['threads']} thread(s), load average {m0['load_average'][0]:.2f} at start. "
              f"Each model: at most {c['steps']} steps or {c['budget_s']:.0f} s of training, whichever first "
              "(no EMA; the cosine schedule spans the step cap; rows with a suffix were run with "
              f"their own cap, given in the row), trained by {trained_by}; "
              "recipes from recipes/compare_rings/. NLL by the probability-flow ODE (dopri5 1e-5, exact "
              "trace). on-support: fraction of samples within 0.02 of a ring / inside the carpet. "
              "MMD²: Gaussian kernel σ = 0.05.", ""]
    if c.get("not_registered"):
        lines += [f"Not registered (skipped): {', '.join(c['not_registered'])}.", ""]
    for dataset, rows in c["datasets"].items():
        d = rows["data"]
        lines += [f"### {dataset}", "",
                  f"Data: true NLL {d['true_nll']:.2f} nats; on-support {d['on_support']:.3f}; "
                  f"MMD² data-vs-data {d['mmd_0.05']:.2e}; energy distance {d['energy_distance']:.2e}.", "",
                  "| method | params | cap (steps / s) | steps | s/it | final loss | NLL (nats) | on-support | MMD² "
                  "| energy dist. | sample NFE | sample s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            if method in ("data", "png"):
                continue
            cap = f"{r.get('steps_cap', c['steps'])} / {r.get('budget_s', c['budget_s']):.0f}"
            if r.get("status", "ok") != "ok":
                lines.append(f"| {method} | | {cap} | {r['status']} | | | | | | | | |")
                continue
            nfe = f"{r['sample_nfe']}" + (" (×2 nets)" if r.get("method", method) == "diffflow" else "")
            mark = " †" if r.get("trainer") and not c.get("trained_by") else ""
            lines.append(f"| {method}{mark} | {r['params']:,} | {cap} | {r['steps']} | {r['s_per_iter']:.3f} | "
                         f"{r['final_loss']:.3f} | {r['nll']:.3f} ± {r['nll_sem']:.3f} | {r['on_support']:.3f} | "
                         f"{r['mmd_0.05']:.2e} | {r['energy_distance']:.2e} | {nfe} | {r['sample_seconds']:.1f} |")
        lines.append("")
        if not c.get("trained_by") and any(isinstance(r, dict) and r.get("trainer") for r in rows.values()):
            lines += [f"† trained by {TRAINED_BY}.", ""]
        if "png" in rows:
            lines += [f"![{dataset}]({Path(rows['png']).name})", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds per model, train.max_seconds (default 1800; 30 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model, train.steps (default 8000; 200 with --quick)")
    size_arguments(parser, "the recipes' 1000")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--merge", action="store_true", help="keep the previous rows of methods not run now")
    parser.add_argument("--tag", default="", help="suffix of the rows' names (e.g. @long)")
    args = parser.parse_args()
    fill_sizes(args, parser, {"budget": (1800.0, 30.0), "steps": (8000, 200)})
    if args.samples < 20:
        parser.error("--samples must be at least 20 (the sample metrics need more than 10 finite samples)")
    if hasattr(os, "sched_setaffinity"):  # flowkit compare gives each run this process's CPUs
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    set_up(args.threads)
    mode = "quick" if args.quick else "full"

    def save(partial: dict) -> None:
        write_results(args.out, "compare", {"compare": {"mode": mode, **partial}}, markdown)

    previous = load_results(args.out, "compare").get("compare") if args.merge else None
    section = {"mode": mode, **run_compare(args, previous, save)}
    print(write_results(args.out, "compare", {"compare": section}, markdown))


if __name__ == "__main__":
    main()
