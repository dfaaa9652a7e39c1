"""Few-step samplers on VP score models: the default knots before and after the VP/sub-VP change.

Before: ``schedule="auto"`` picked ``logsnr`` (``karras`` for ``edm_heun``) on VP and sub-VP —
uniform in ``λ`` from ``λ_{t1} = −5`` to ``λ_{t0} = 6.9`` (``t0 = 1e-5``), then a denoising step
to ``σ = 0``. After: ``power`` (``trailing`` for ``edm_heun``), see
:mod:`flowkit.samplers.schedules`. Both are run through the public options (``schedule=...``),
so the "before" rows are exactly what the old default computed.

Parts (all at the samplers' other defaults, ``final="denoise"``):

* ``exact``: FFJORD's 8 Gaussians as an exact float64 mixture under VP and sub-VP (β 0.1 → 20),
  ``n`` prior samples; RMS endpoint error against dopri5 (``rtol = atol = 1e-9``) from the same
  noise, and energy distance to ``n`` draws of the mixture. NFE 2, 4, 8, 16 for ``euler``,
  ``ddim``, ``dpmpp_2m``, ``unipc``, ``edm_heun`` (a Heun step costs 2: the budget is rounded down).
  Plus an ablation of DPM-Solver++(2M)'s knots on VP (which part of the old default costs what).
* ``trained``: ``recipes/score_vp_8gaussians.yaml`` trained by flowkit's trainer (one run per
  seed; reused when the run directory has a checkpoint), then :func:`flowkit.nfe_sweep.nfe_sweep`:
  energy distance to the test set, 2000 samples, noise seeds 0–2, mean ± standard error. And the
  cause on a trained ε-network: the RMS error of its ``x̂₀`` against the exact mixture's along the
  path, and the sweep again with the network's evaluation at ``t1`` replaced by the exact
  ``x̂₀(t1) = E[x_data]`` (a diagnostic, not a sampler).

    python bench/vp_few_step.py                          # both parts; trains 3 runs under bench/results/runs/vp_few_step/
    python bench/vp_few_step.py --part exact --n 500
    python bench/vp_few_step.py --runs RUN1,RUN2,RUN3   # reuse trained runs

Writes ``bench/results/vp_few_step.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402
from flowkit.diffusion import flow_from_score  # noqa: E402
from flowkit.gmm import GaussianMixture, mixture_score_field  # noqa: E402
from flowkit.metrics import energy_distance  # noqa: E402
from flowkit.nfe_sweep import SweepModel, nfe_sweep, steps_for_nfe  # noqa: E402
from flowkit.paths import VP, SubVP  # noqa: E402
from flowkit.samplers.ode_samplers import dopri5  # noqa: E402

F64 = torch.float64
RESULTS = ROOT / "results"
NFES = (2, 4, 8, 16)
SAMPLERS = ("euler", "ddim", "dpmpp_2m", "unipc", "edm_heun")
#: what ``schedule="auto"`` picked on VP / sub-VP before the change
BEFORE = {"ddim": "logsnr", "dpmpp_2m": "logsnr", "unipc": "logsnr", "edm_heun": "karras"}
#: DPM-Solver++(2M)'s knots, one change at a time (options on top of the defaults)
ABLATION = (("logsnr, denoise (old default)", {"schedule": "logsnr"}),
            ("logsnr, final=t0 (no denoising step)", {"schedule": "logsnr", "final": "t0"}),
            ("karras, denoise", {"schedule": "karras"}),
            ("uniform, denoise (steps-1 to t0, then σ=0)", {"schedule": "uniform"}),
            ("trailing, denoise (last knot σ=0)", {"schedule": "trailing"}),
            ("power, final=t0", {"schedule": "power", "final": "t0"}),
            ("power, denoise (new default)", {}))
RECIPE = "recipes/score_vp_8gaussians.yaml"


def eight_gaussians() -> GaussianMixture:
    """FFJORD's 8 Gaussians (``flowkit.data.EightGaussians``) as an exact float64 mixture."""
    angles = torch.arange(8, dtype=F64) * (math.pi / 4)
    means = 4 * torch.stack([angles.cos(), angles.sin()], -1) / 1.414
    std = 0.5 / 1.414
    return GaussianMixture(means, std**2 * torch.eye(2, dtype=F64).expand(8, 2, 2).clone(), torch.ones(8, dtype=F64))


def _variants(name: str) -> list[tuple[str, dict]]:
    if name == "euler":
        return [("", {})]
    return [("before", {"schedule": BEFORE[name]}), ("after", {})]


def _run(flow, name: str, nfe: int, x1: Tensor, options: dict) -> Optional[Any]:
    steps = nfe if name == "euler" else steps_for_nfe(name, flow, nfe, **options)
    if steps is None:
        return None
    return flowkit.SAMPLERS.get(name)(flow, x1, steps=steps, **options)


# ------------------------------------------------------------------------------ exact part
def run_exact(n: int) -> dict:
    gmm = eight_gaussians()
    data = gmm.sample(n, torch.Generator().manual_seed(5))
    out: dict[str, Any] = {"n": n, "paths": {}}
    for label, path in (("VP", VP()), ("sub-VP", SubVP())):
        flow = flow_from_score(mixture_score_field(gmm, path), path, (2,))
        x1 = flow.prior.sample(n, generator=torch.Generator().manual_seed(0), dtype=F64)
        ref = dopri5(flow, x1, rtol=1e-9, atol=1e-9)
        rows = []
        for name in SAMPLERS:
            for variant, options in _variants(name):
                row = {"sampler": name, "variant": variant, "cells": {}}
                for nfe in NFES:
                    res = _run(flow, name, nfe, x1, options)
                    if res is None:
                        continue
                    row["cells"][nfe] = {"nfe": res.nfe, "rms": float((res.x - ref.x).pow(2).sum(1).mean().sqrt()),
                                         "energy": energy_distance(res.x, data)}
                rows.append(row)
                print(f"exact {label:6s} {name:9s} {variant:6s} " + "  ".join(
                    f"{k}:{c['rms']:.3g}/{c['energy']:.3g}" for k, c in row["cells"].items()), flush=True)
        out["paths"][label] = {"rows": rows, "reference_nfe": ref.nfe,
                               "reference_energy": energy_distance(ref.x, data)}
        if label == "VP":
            ablation = []
            for what, options in ABLATION:
                cells = {}
                for nfe in NFES:
                    res = _run(flow, "dpmpp_2m", nfe, x1, options)
                    cells[nfe] = {"nfe": res.nfe, "rms": float((res.x - ref.x).pow(2).sum(1).mean().sqrt()),
                                  "energy": energy_distance(res.x, data)}
                ablation.append({"knots": what, "options": options, "cells": cells})
            out["ablation"] = ablation
    return out


# ---------------------------------------------------------------------------- trained part
def train_runs(runs: list[Path], steps: int) -> dict[str, dict]:
    """Train ``RECIPE`` with seeds 0, 1, … into ``runs`` (a run with a checkpoint is reused)."""
    import yaml

    from flowkit.checkpoint import find_intact_checkpoint

    info = {}
    for seed, run in enumerate(runs):
        try:
            _, state = find_intact_checkpoint(run)
            info[run.name] = {"run": str(run), "reused": True, "step": int(state["step"])}
            continue
        except Exception:  # noqa: BLE001 - no run yet: train it
            pass
        recipe = yaml.safe_load((ROOT.parent / RECIPE).read_text())
        overrides = [f"train.steps={steps}", f"train.seed={seed}", f"train.checkpoint_every={steps}",
                     "train.sample_every=0", "train.eval_every=0", "train.threads=1"]
        start = time.perf_counter()
        flowkit.train(recipe, run, overrides=overrides, overwrite=run.exists(), source=RECIPE, progress=False,
                      log=lambda *_: None)
        info[run.name] = {"run": str(run), "reused": False, "step": steps, "seed": seed,
                          "train_seconds": time.perf_counter() - start}
        print(f"trained {run} ({steps} steps, seed {seed}) in {info[run.name]['train_seconds']:.0f} s", flush=True)
    return info


@dataclasses.dataclass
class ExactAtT1:
    """An objective whose flow is the trained one except at ``t = t1``, where the velocity is that of
    ``x̂₀ = E[x_data] = 0`` (the 8 Gaussians' mean): the diagnostic of the trained part."""

    objective: Any

    @property
    def provides(self) -> Any:
        return self.objective.provides

    def flow(self):
        flow = self.objective.flow()
        path, velocity = flow.path, flow.velocity

        def patched(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
            tt = torch.as_tensor(t, dtype=F64)
            if float(tt.reshape(-1)[0]) == float(path.t1):
                return (path.d_sigma(tt) / path.sigma(tt)).to(x) * x  # v = σ̇/σ x when x̂₀ = 0
            return velocity(t, x, cond)

        return dataclasses.replace(flow, velocity=patched)


def x0_error_along_the_path(objective: Any, times: tuple[float, ...] = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2)) -> dict:
    """RMS of ``x̂₀`` (trained) − ``x̂₀`` (exact mixture) at points of the path ``x_t = α x + σ ε``."""
    from flowkit.samplers.semilinear import DataPrediction

    flow = objective.flow()
    exact = flow_from_score(mixture_score_field(eight_gaussians(), flow.path), flow.path, (2,))
    g = torch.Generator().manual_seed(1)
    x, eps = eight_gaussians().sample(2000, g), torch.randn(2000, 2, generator=g, dtype=F64)
    out = {}
    with torch.no_grad():
        for t in times:
            tt = torch.tensor(t, dtype=F64)
            xt = flow.path.alpha(tt) * x + flow.path.sigma(tt) * eps
            trained = DataPrediction(flow, None, 0.0, "bench")(t, xt.float()).double()
            reference = DataPrediction(exact, None, 0.0, "bench")(t, xt)
            out[t] = {"log_snr": float(torch.log(flow.path.alpha(tt) / flow.path.sigma(tt))),
                      "rms": float((trained - reference).pow(2).sum(1).mean().sqrt())}
    return out


def _sweep(models: dict, samplers: list, nfes: tuple, n: int, seeds: tuple) -> list[dict]:
    res = nfe_sweep(models, samplers, nfes, n=n, seeds=seeds, reference="dopri5")
    return [{"model": r.model, "sampler": r.sampler, "budget": r.budget, "nfe": r.nfe, "status": r.status,
             "energy": r.energy_distance, "energy_se": r.energy_distance_se} for r in res.rows]


def run_trained(runs: list[Path], steps: int, n: int, seeds: int) -> dict:
    torch.set_num_threads(1)
    training = train_runs(runs, steps)
    built = {run.name: flowkit.load_run(run)[0] for run in runs}
    models = {name: SweepModel.from_built(b) for name, b in built.items()}
    samplers: list = []
    for name in SAMPLERS:
        samplers += [{"name": name, **options} for _, options in _variants(name)]
    start = time.perf_counter()
    rows = _sweep(models, samplers, NFES, n, tuple(range(seeds)))
    patched = {f"{name} (exact x̂₀ at t1)": SweepModel(ExactAtT1(m.objective), m.dataset)
               for name, m in models.items()}
    diag_samplers = ["euler", {"name": "dpmpp_2m", "schedule": "logsnr"}, "dpmpp_2m", "unipc"]
    diag = _sweep(patched, diag_samplers, (4, 8), n, tuple(range(seeds)))
    diag += [r for r in _sweep(models, [{"name": "dpmpp_2m", "schedule": "logsnr"}, "dpmpp_2m", "unipc", "euler"],
                               (4, 8), n, tuple(range(seeds)))]
    x0 = {name: x0_error_along_the_path(b.objective) for name, b in built.items()}
    return {"recipe": RECIPE, "training": training, "rows": rows, "diagnostic": diag, "x0_error": x0,
            "n": n, "seeds": list(range(seeds)), "sweep_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------- report
def _label(sampler: str, variant: str) -> str:
    if not variant:
        return f"`{sampler}`"
    schedule = BEFORE[sampler] if variant == "before" else ("trailing" if sampler == "edm_heun" else "power")
    return f"`{sampler}` {variant} (`{schedule}`)"


def _exact_md(exact: dict) -> list[str]:
    lines = []
    for label, part in exact["paths"].items():
        rows = part["rows"]
        euler = next(r for r in rows if r["sampler"] == "euler")["cells"]
        for metric, title in (("rms", "RMS endpoint error against dopri5"),
                              ("energy", "energy distance to the mixture")):
            lines += [f"### {label}: {title} (NFE spent in brackets; ≤ Euler in bold)", "",
                      "| sampler | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                      "|---|" + "---|" * len(NFES)]
            for r in rows:
                cells = []
                for k in NFES:
                    c = r["cells"].get(k)
                    if c is None:
                        cells.append("—")
                        continue
                    text = f"{c[metric]:.3g} ({c['nfe']})"
                    better = r["sampler"] != "euler" and c[metric] <= euler[k][metric]
                    cells.append(f"**{text}**" if better else text)
                lines.append(f"| {_label(r['sampler'], r['variant'])} | " + " | ".join(cells) + " |")
            ref = f"reference: dopri5, {part['reference_nfe']} NFE, energy distance {part['reference_energy']:.4f}"
            lines += ["", ref, ""]
    lines += ["### VP: DPM-Solver++(2M), one change of the knots at a time (RMS error / energy distance)", "",
              "| knots | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
    for a in exact["ablation"]:
        lines.append(f"| {a['knots']} | " + " | ".join(
            f"{a['cells'][k]['rms']:.3g} / {a['cells'][k]['energy']:.3g}" for k in NFES) + " |")
    return lines + [""]


def _trained_md(trained: dict) -> list[str]:
    rows = trained["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"Energy distance to the test set, {trained['n']} samples, noise seeds {trained['seeds']}: "
             "mean ± standard error (NFE spent). Runs: " + ", ".join(
                 f"{k} (step {v['step']}{', reused' if v['reused'] else ''})" for k, v in trained["training"].items()),
             ""]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        ref = next(r for r in mine if r["status"] == "reference")
        euler = {r["budget"]: r["energy"] for r in mine if r["sampler"] == "euler"}
        lines += [f"### {model} (dopri5: {ref['energy']:.4f} ± {ref['energy_se']:.4f}, {ref['nfe']} NFE)", "",
                  "| sampler | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
        for label in dict.fromkeys(r["sampler"] for r in mine if r["status"] != "reference"):
            cells = []
            for k in NFES:
                r = next((r for r in mine if r["sampler"] == label and r["budget"] == k), None)
                if r is None or r["status"] != "ok":
                    cells.append("—")
                    continue
                text = f"{r['energy']:.4f} ± {r['energy_se']:.4f} ({r['nfe']})"
                cells.append(f"**{text}**" if label != "euler" and r["energy"] <= euler[k] else text)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### The cause on a trained ε-network: x̂₀ = (x − σ ε̂)/α near t1", "",
              "RMS of the network's x̂₀ minus the exact mixture's, at x_t = α_t x + σ_t ε (2000 points):", "",
              "| run | " + " | ".join(f"t = {t} (λ {v['log_snr']:.1f})" for t, v in
                                     next(iter(trained["x0_error"].values())).items()) + " |",
              "|---|" + "---|" * len(next(iter(trained["x0_error"].values())))]
    for name, errs in trained["x0_error"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['rms']:.3f}" for v in errs.values()) + " |")
    lines += ["", "Energy distance with the network's evaluation at t1 replaced by the exact x̂₀(t1) = E[x] = 0 "
              "(everything else the trained network):", "",
              "| model | sampler | NFE 4 | NFE 8 |", "|---|---|---|---|"]
    diag = trained["diagnostic"]
    for model in dict.fromkeys(r["model"] for r in diag if r["status"] == "ok"):
        for sampler in dict.fromkeys(r["sampler"] for r in diag if r["model"] == model and r["status"] == "ok"):
            cells = [next((f"{r['energy']:.4f} ± {r['energy_se']:.4f}" for r in diag if r["model"] == model
                           and r["sampler"] == sampler and r["budget"] == k), "—") for k in (4, 8)]
            lines.append(f"| {model} | {sampler} | " + " | ".join(cells) + " |")
    return lines + [""]


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = ["# Few-step samplers on VP score models: default knots before / after (bench/vp_few_step.py)", "",
             f"Machine: {results['machine']} (shared with other jobs; no timings reported). Before: `schedule=auto` "
             "picked `logsnr` (`karras` for `edm_heun`) on VP and sub-VP; after: `power` (`trailing` for "
             "`edm_heun`). `final=denoise` (the default) throughout.", ""]
    if "exact" in results:
        lines += [f"## Exact score: 8 Gaussians, float64, {results['exact']['n']} samples", ""]
        lines += _exact_md(results["exact"])
    if "trained" in results:
        lines += [f"## Trained: `{RECIPE}` (ε-prediction MLP)", ""]
        lines += _trained_md(results["trained"])
    (RESULTS / "vp_few_step.md").write_text("\n".join(lines))
    (RESULTS / "vp_few_step.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {RESULTS / 'vp_few_step.md'}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("exact", "trained", "both"), default="both")
    parser.add_argument("--n", type=int, default=2000, help="samples per cell")
    parser.add_argument("--runs", default=",".join(str(ROOT / f"results/runs/vp_few_step/seed{i}") for i in range(3)),
                        help="run directories (comma-separated), trained with seeds 0, 1, … when absent")
    parser.add_argument("--train-steps", type=int, default=6000,
                        help="training steps of an absent run (the recipe's; at 600 and 1500 the model's own "
                             "dopri5 samples are off the data: energy distance 23 and 2.2)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": cpu_name(), "shared_machine": True, "torch": torch.__version__}
    start = time.perf_counter()
    if args.part in ("exact", "both"):
        results["exact"] = run_exact(args.n)
    if args.part in ("trained", "both"):
        runs = [Path(r) for r in args.runs.split(",") if r]
        results["trained"] = run_trained(runs, args.train_steps, args.n, args.seeds)
    results["wall_seconds"] = time.perf_counter() - start
    write(results)


if __name__ == "__main__":
    main()
