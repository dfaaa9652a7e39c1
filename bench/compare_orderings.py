"""The paper orderings as comparisons: ``flowkit compare`` on ``recipes/compare_rings/`` and
``recipes/compare_digits/`` at equal wall-clock budgets with several seeds.

The DiffFlow paper (Zhang & Chen 2021, §5.1 and Fig. 3) reports that DiffFlow captures sharp
2-D densities (rings) better than FFJORD; this runs every recipe of each directory on the
same budget of training seconds, seeds ``0 … N−1``, through :func:`flowkit.compare.compare`
(one evaluator, paired tests, curves), copies its tables and pictures to
``bench/results/compare_rings/`` and ``bench/results/compare_digits/``, and writes the verdict —
DiffFlow against FFJORD per metric, with the paired t-test over seeds — to
``bench/results/compare_orderings.{md,json}``.

The digits are evaluated with a fixed-step likelihood solver (rk4, 8 steps; Hutchinson, 4
probes) so that short runs' stiff fields do not make evaluation dominate: the NLL is then an
approximation, the same for every run. Timings are wall-clock seconds of training steps; on a machine shared with other jobs every
run is slowed by their load (recorded), so the budgets here buy fewer steps than on an idle
machine. Run directories (checkpoints) go to ``--work`` and are not kept in the results.

    python bench/compare_orderings.py --seconds 30 --seeds 3            # both, ~10 min on 2 cores
    python bench/compare_orderings.py --only rings --seconds 600 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchinfo import cpu_name  # noqa: E402
from flowkit.compare import METRICS, Budget, compare  # noqa: E402
from flowkit.stats import mean_se, paired_t_test  # noqa: E402

#: what the tables alone do not say (read with samples.png and the curves)
NOTES = {
    "rings": "The DiffFlow paper's claim is about sharp 2-D densities. At short budgets no model draws the rings yet "
             "(samples.png: blobs); the ordering then says how far each got in the same time, and FFJORD (an adaptive "
             "ODE solve with exact trace per step) makes the fewest steps.",
    "digits": "The DiffFlow paper reports no digits result; DiffFlow against FFJORD is shown for completeness. DiffFlow's "
              "step (two U-Nets, N = 5 → 30 SDE steps with the stochastic adjoint) is the slowest here, so short "
              "budgets leave it the least trained.",
}
COPIED = ("compare.md", "compare.csv", "compare_summary.csv", "compare.json", "curves_time.png",
          "curves_evaluations.png", "samples.png")


def verdict(rows: list[dict], better: str, worse: str) -> list[dict]:
    """``better`` against ``worse`` per metric: means, the paired test over shared seeds."""
    out = []
    for key, heading in METRICS:
        a = {r["seed"]: r.get(key) for r in rows if r["run"] == better and r.get("status") == "ok"}
        b = {r["seed"]: r.get(key) for r in rows if r["run"] == worse and r.get("status") == "ok"}
        seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
        if not seeds:
            continue
        test = paired_t_test([a[s] for s in seeds], [b[s] for s in seeds])
        ma, sa = mean_se([a[s] for s in seeds])
        mb, sb = mean_se([b[s] for s in seeds])
        holds = ma <= mb
        out.append({"metric": key, "heading": heading, better: ma, f"{better}_se": sa, worse: mb, f"{worse}_se": sb,
                    "seeds": seeds, "mean_diff": test.mean_diff, "se": test.se, "t": test.t, "p": test.p,
                    "ordering_holds": holds, "significant": test.p == test.p and test.p < 0.05})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="training seconds per run (both comparisons)")
    p.add_argument("--digits-seconds", type=float, default=None, help="override --seconds for the digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--curve-points", type=int, default=4)
    p.add_argument("--only", choices=["rings", "digits"], default=None)
    p.add_argument("--work", default=str(ROOT / "runs/bench_compare_orderings"))
    args = p.parse_args()
    results_dir = ROOT / "bench/results"
    summary_path = results_dir / "compare_orderings.json"
    report = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cases = {"rings": ("compare_rings", ["eval.n=2000"], 2000, args.seconds),
             "digits": ("compare_digits", ["eval.method=rk4", "eval.steps=8"], 359, args.digits_seconds or args.seconds)}
    for case, (folder, overrides, samples, seconds) in cases.items():
        if args.only and case != args.only:
            continue
        os.chdir(ROOT)  # recipes named relative to the repository in the tables
        recipes = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / folder).glob("*.yaml"))
        work = Path(args.work) / folder
        if work.exists():
            shutil.rmtree(work)
        load_start = os.getloadavg()[0]
        start = time.perf_counter()
        rows = compare(recipes, work, overrides=overrides, budget=Budget("seconds", seconds), seeds=args.seeds,
                       jobs=args.jobs, curve_points=args.curve_points, samples=samples)
        wall = time.perf_counter() - start
        dest = results_dir / folder
        dest.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (work / name).is_file():
                shutil.copy(work / name, dest / name)
        context = json.loads((work / "compare.json").read_text())
        report[case] = {"recipes": recipes, "budget_seconds": seconds,
                        "seeds": args.seeds, "jobs": context["jobs"], "threads_per_run": context["threads"],
                        "wall_seconds": round(wall, 1), "load_average_start": load_start,
                        "load_average_end": os.getloadavg()[0], "cpu": cpu_name(), "cores": os.cpu_count(),
                        "torch": torch.__version__, "overrides": overrides,
                        "diffflow_vs_ffjord": verdict(rows, "diffflow", "ffjord")}
        print(json.dumps(report[case]["diffflow_vs_ffjord"], indent=1))
    summary_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = ["# The paper orderings under `flowkit compare` (bench/compare_orderings.py)", ""]
    for case, r in report.items():
        lines += [f"## {case}: {', '.join(r['recipes'])}", "",
                  f"{r['cpu']}, {r['cores']} cores **shared with other jobs** (load average {r['load_average_start']:.1f} "
                  f"at start, {r['load_average_end']:.1f} at end), torch {r['torch']}. Budget: **{r['budget_seconds']:g} s of "
                  f"training per run** (wall-clock of training steps), seeds 0..{r['seeds'] - 1}, {r['jobs']} runs at a "
                  f"time with {r['threads_per_run']} core(s) each; {r['wall_seconds']:.0f} s in all. Overrides: "
                  f"{', '.join(r['overrides']) or 'none'}. Full table, curves and samples: "
                  f"[compare_{case}/compare.md](compare_{case}/compare.md).", "",
                  NOTES.get(case, ""), "",
                  "DiffFlow ≥ FFJORD (lower is better), paired over seeds:", "",
                  "| metric | DiffFlow | FFJORD | difference ± SE | p (paired t) | ordering holds |", "|---|---|---|---|---|---|"]
        for v in r["diffflow_vs_ffjord"]:
            se = lambda x: "" if x is None else f" ± {x:.2g}"  # noqa: E731
            p = "" if v["p"] != v["p"] else f"{v['p']:.3g}"
            holds = ("yes" if v["ordering_holds"] else "no") + (" (significant)" if v["significant"] else " (not significant)")
            lines.append(f"| {v['heading']} | {v['diffflow']:.4g}{se(v['diffflow_se'])} | {v['ffjord']:.4g}{se(v['ffjord_se'])} "
                         f"| {v['mean_diff']:+.3g}{se(v['se'])} | {p} | {holds} |")
        lines.append("")
    (results_dir / "compare_orderings.md").write_text("\n".join(lines))
    print((results_dir / "compare_orderings.md").read_text())


if __name__ == "__main__":
    main()
