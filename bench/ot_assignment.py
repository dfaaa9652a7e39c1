"""Exact minibatch-OT assignment: flowkit.ot's solvers against SciPy's ``linear_sum_assignment``.

The reason flowkit keeps a compiled solver (``flowkit/ot/_auction.c``) is that it beats the
standard CPU solver on the problems OT-CFM solves every step: square costs
``C_ij = ‖x_i − ε_j‖²`` between a batch of FFJORD's 8 Gaussians (clustered 2-D data) and
a batch of N(0, I) noise. This script measures that claim at batch 256 (flowkit's OT-CFM
recipe) and 1024:

* ``compiled`` — :func:`flowkit.ot.optimal_assignment` with ``method="compiled"`` (the
  sequential ε-scaling auction in C, what ``exact_ot`` uses on the CPU),
* ``ipm`` and ``auction`` — the torch solvers (what ``exact_ot`` uses on an accelerator),
* ``scipy`` — ``scipy.optimize.linear_sum_assignment`` (shortest augmenting paths,
  Crouse 2016) on the same float64 cost.

Every repeat draws a fresh batch and runs all solvers on it in turn (interleaved, in a
rotating order), so the load of a shared machine falls on all of them alike; the report
gives the median time per solver and the median of the per-batch ratios to ``compiled``.
Each solution is checked against SciPy's optimum: flowkit's solvers guarantee a total
within ``tol · (max C − min C)`` of it (``tol = 1e-7``). One thread (``--threads``), as in
the other benches; cost construction is not timed.

    python bench/ot_assignment.py                      # 256: 50 repeats, 1024: 10 repeats
    python bench/ot_assignment.py --sizes 256 --repeats 20

Results: ``bench/results/ot_assignment.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this script)
from flowkit.ot import compiled_auction_available, optimal_assignment, squared_distances  # noqa: E402

try:
    from scipy.optimize import linear_sum_assignment
except ImportError:  # pragma: no cover - scipy is in the test extra
    sys.exit("bench/ot_assignment.py needs scipy (pip install -e '.[test]')")

TOL = 1e-7
SOLVERS = ("compiled", "ipm", "auction", "scipy")


def solvers(torch_auction: bool) -> dict[str, Callable[[torch.Tensor, np.ndarray], np.ndarray]]:
    """Each solver: (cost tensor, the same cost as numpy) -> column of each row."""
    table = {}
    if compiled_auction_available():
        table["compiled"] = lambda cost, _: optimal_assignment(cost, tol=TOL, method="compiled").numpy()
    table["ipm"] = lambda cost, _: optimal_assignment(cost, tol=TOL, method="ipm").numpy()
    if torch_auction:
        table["auction"] = lambda cost, _: optimal_assignment(cost, tol=TOL, method="auction").numpy()
    table["scipy"] = lambda _, cost: linear_sum_assignment(cost)[1]
    return table


def measure(n: int, repeats: int, seed: int, torch_auction: bool) -> dict:
    data = flowkit.data.get_dataset("8gaussians")
    gen = torch.Generator().manual_seed(seed)
    table = solvers(torch_auction)
    names = list(table)
    times: dict[str, list[float]] = {k: [] for k in names}
    worst_excess = {k: 0.0 for k in names}
    for rep in range(repeats + 1):  # the first round warms up and is not kept
        x, _ = data.train_batch(n, gen)
        cost = squared_distances(x, torch.randn(n, 2, generator=gen)).contiguous()  # float64
        host = cost.numpy()
        span = float(cost.max() - cost.min())
        rows = np.arange(n)
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        totals = {}
        for name in order:
            start = time.perf_counter()
            cols = table[name](cost, host)
            elapsed = time.perf_counter() - start
            if rep:
                times[name].append(elapsed)
            totals[name] = float(host[rows, cols].sum())
            if sorted(cols.tolist()) != list(range(n)):
                raise AssertionError(f"{name} returned no permutation at n={n}")
        optimum = totals["scipy"]
        for name, total in totals.items():
            excess = (total - optimum) / span
            if excess > TOL + 1e-12:
                raise AssertionError(f"{name} at n={n}: total {total!r} exceeds the optimum {optimum!r} "
                                     f"by {excess:.3g} spans (> tol {TOL})")
            worst_excess[name] = max(worst_excess[name], excess)
    base = "compiled" if "compiled" in times else "scipy"
    row = {"n": n, "repeats": repeats, "base": base}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[base])]
        row[name] = {"median_ms": 1000 * statistics.median(times[name]),
                     "min_ms": 1000 * min(times[name]),
                     f"ratio_to_{base}": statistics.median(ratios),
                     "worst_excess_over_optimum_in_spans": worst_excess[name]}
    return row


def report(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Exact OT assignment: flowkit.ot vs SciPy ({meta['date']})", "",
             f"{meta['machine']}, {meta['cores']} cores, {meta['threads']} thread(s), torch {meta['torch']}, "
             f"scipy {meta['scipy']}; load average {meta['load_average_start'][0]:.1f} at start, "
             f"{meta['load_average_end'][0]:.1f} at end.", "",
             "Costs: squared Euclidean distances between a batch of 8 Gaussians (FFJORD's) and a batch of "
             "N(0, I) noise in 2-D, float64, a fresh batch per repeat; solvers interleaved in a rotating "
             "order. Times: median ms per solve (min in brackets); ratio: median over batches of "
             "(solver time / compiled time). Every solution is within tol·span of SciPy's optimum "
             f"(tol = {TOL:g}; checked).", "",
             "| n | repeats | " + " | ".join(SOLVERS) + " | scipy / compiled |",
             "|---|---|" + "---|" * len(SOLVERS) + "---|"]
    for row in rows:
        cells = []
        for name in SOLVERS:
            if name not in row:
                cells.append("–")
                continue
            r = row[name]
            ratio = r[f"ratio_to_{row['base']}"]
            suffix = "" if name == row["base"] else f" ×{ratio:.1f}"
            cells.append(f"{r['median_ms']:.2f} ({r['min_ms']:.2f}){suffix}")
        headline = f"{row['scipy']['ratio_to_compiled']:.1f}×" if row["base"] == "compiled" else "–"
        lines.append(f"| {row['n']} | {row['repeats']} | " + " | ".join(cells) + f" | {headline} |")
    lines += ["", "×r after a time: that solver's median ratio to `compiled` (> 1: slower than the compiled auction)."]
    if not meta["compiled"]:
        lines += ["", "The compiled auction is not built on this machine (no C compiler at install)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, nargs="+", default=None,
                        help="repeats per size (default 50 at 256, 10 above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch-auction", action="store_true",
                        help="skip the vectorised torch auction (slow on clustered batches)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or [50 if n <= 256 else 10 for n in args.sizes]
    if len(repeats) == 1:
        repeats = repeats * len(args.sizes)
    import scipy

    meta = {"machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "scipy": scipy.__version__, "compiled": compiled_auction_available(), "tol": TOL, "seed": args.seed,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_start": list(os.getloadavg())}
    rows = []
    for n, reps in zip(args.sizes, repeats):
        row = measure(n, reps, args.seed, torch_auction=not args.no_torch_auction)
        rows.append(row)
        print(f"n={n}: " + ", ".join(f"{k} {row[k]['median_ms']:.2f} ms" for k in SOLVERS if k in row), flush=True)
    meta["load_average_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ot_assignment.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = report(meta, rows)
    (args.out / "ot_assignment.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
