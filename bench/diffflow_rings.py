"""DiffFlow on sharp 2-D densities: cost of the stochastic adjoint, and DiffFlow vs FFJORD vs
score matching (vs CFM when registered) at equal parameters and equal wall-clock.

Two parts:

* ``timing`` — DiffFlow with the official 2-D networks: two ``fourier_mlp`` fields (learned
  Fourier time embedding, 128 channels, 3 hidden layers, GELU; 199,428 parameters in all, the
  official 199k), N = 30, T = 0.05, g = 0.2, Adam: milliseconds per optimiser step with the
  stochastic adjoint and with naive backprop at batch 1,000 (and the adjoint at 5,000), and
  an in-run plain-PyTorch baseline of the same algorithm computed the way the official
  code's forward step is (naive backprop through the unrolled loop; each step evaluates the
  drift at ``x_i`` and drift and score at ``x_{i+1}``, one scalar time per step);
  relative gradient difference adjoint vs backprop (float32, float64); peak memory at batch
  5,000 for N = 10, 30, 100, measured in a fresh process per configuration as the rise of
  the peak resident set size over the process after building the model and batch (whole
  process in brackets), and as the peak bytes of tensors held for backward
  (``saved_tensors_hooks``, parameters excluded). Timed with flowkit's training default
  ``train.tune_allocator`` (``flowkit/allocator.py``) unless ``--default-allocator``; the
  plain baseline runs in the same process, so it gets the same allocator.
* ``compare`` — the recipes in ``recipes/compare_rings/`` (same data, ~89k parameters each)
  on ``olympic_rings`` and ``sierpinski``, each trained for ``--steps`` optimiser steps or
  ``--budget`` seconds, whichever comes first (DiffFlow's milestones scaled to ``--steps``
  as in the recipe, 1/8 : 5/16 : 5/8), then: test NLL by the probability-flow ODE (dopri5,
  1e-5, exact trace; nats), samples with the recipe's sampler (NFE, seconds), energy
  distance, a narrow-bandwidth MMD (Gaussian kernel, σ = 0.05) and the fraction of samples
  on the support — within 0.02 of a ring (``distance_to_support``; the rings' radial std is
  0.001), or inside the carpet. A PNG grid of samples per dataset.
* ``official`` — ``recipes/diffflow_rings_official.yaml`` (the official code's 2-D
  configuration above) trained for 2,000 steps at batch 1,000, the setting of the issue's
  quality figure. Evaluated with the recipe's sampler, the same with noise on the last step
  too (the official sampler's convention), 100 steps, and the PF-ODE: PF-ODE NLL, fraction on
  the rings, and energy distance and narrow-kernel MMD² over ``--draws`` independent draws,
  each scored against its own data set, next to the data-vs-data noise floor computed the
  same way ("at the noise floor": the gap of the means within 2 standard errors). One draw
  against one reference set moves by about one floor sd, and every model scored against the
  same set moves with it, so draws are averaged and, between models, paired. Beside it the
  in-run plain-PyTorch baseline of the same algorithm trained the way the official code
  trains (:class:`PlainDiffFlow`, :data:`OFFICIAL_TRAINING`; weights cached in
  ``bench/results/runs/plain_official.pt``), with per-metric verdicts under both sampler
  conventions (``--no-baseline`` skips it). ``--run DIR`` evaluates a trained run directory
  instead (report and PNG written into ``DIR``), so variants of the recipe can be compared.

Reference (issue): the official DiffFlow code on this 2-core CPU, Olympic rings, N = 30,
T = 0.05, g = 0.2: 557 ms per step at batch 1,000 with its stochastic adjoint (417 ms naive),
2.33 s at batch 5,000; peak memory at batch 5,000: adjoint ≈ 160 MB for N = 10/30/100,
naive 0.7 / 2.0 / 6.6 GB; adjoint gradients equal autograd's to 2e-5 relative.

    python bench/diffflow_rings.py --quick                     # everything, small (~5 min)
    python bench/diffflow_rings.py --part timing               # timing + memory only
    python bench/diffflow_rings.py --part compare --steps 8000 --budget 1800
    python bench/diffflow_rings.py --part official --threads 2   # official config, 2,000 steps
    python bench/diffflow_rings.py --part official --run runs/my_variant   # evaluate a run

Results: ``bench/results/diffflow_rings.json`` and ``.md`` (each part updates its section),
``bench/results/diffflow_rings_<dataset>.png``. Timings on a shared machine are distorted
by other processes' load; the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this script)
from flowkit.allocator import tune_cpu_allocator  # noqa: E402
from flowkit.profiling import SavedTensorBytes  # noqa: E402
from flowkit.config import EvalConfig  # noqa: E402
from flowkit.checkpoint import load_run_recipe  # noqa: E402
from flowkit.data import Standardized  # noqa: E402
from flowkit.metrics import energy_distance  # noqa: E402
from flowkit.recipe import build_component  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REFERENCE = {
    "ms_per_step_adjoint_b1000": 557, "ms_per_step_naive_b1000": 417, "ms_per_step_adjoint_b5000": 2330,
    "peak_mb_b5000": {"adjoint": {10: 160, 30: 160, 100: 160}, "naive": {10: 700, 30: 2000, 100: 6600}},
    "grad_rel_diff": 2e-5, "params": 199_000,
}
TIMING_RECIPE = {
    "data": {"name": "olympic_rings"},
    "dynamics": {"name": "fourier_mlp", "channels": 128, "layers": 3, "activation": "gelu"},
    "objective": {"name": "diffflow", "end_time": 0.05, "g": 0.2, "steps": [30], "beta": 0.9, "grid": "random"},
}
METHODS = ("diffflow", "ffjord", "score_matching", "cfm")
DATASETS = ("olympic_rings", "sierpinski")


# ----------------------------------------------------------------------------- machine


def machine(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


# ----------------------------------------------------------------------------- timing part


def build_timing(n: int, gradient: str, dtype: torch.dtype = torch.float32):
    recipe = json.loads(json.dumps(TIMING_RECIPE))
    recipe["objective"].update(steps=[n], gradient=gradient)
    torch.manual_seed(0)
    built = flowkit.build(recipe)
    return built, built.objective.to(dtype)


def flowkit_stepper(gradient: str, batch: int, n: int):
    """One optimiser step of flowkit's ``diffflow`` objective per call."""
    built, obj = build_timing(n, gradient)
    opt = torch.optim.Adam(obj.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x, _ = built.dataset.train_batch(batch, gen)
        out = obj.loss(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step, sum(p.numel() for p in obj.parameters())


def plain_stepper(batch: int, n: int):
    """The in-run baseline: DiffFlow's eq. 15 by naive backprop through a plain loop, computed
    the way the official code's forward step does it — each step evaluates the drift at
    ``x_i`` (forward move) and drift and score at ``x_{i+1}`` (backward residual), with one
    scalar time per step. Same networks, data, grid, g and optimiser as the flowkit rows."""
    built, obj = build_timing(n, "naive")
    cfg = TIMING_RECIPE["objective"]
    grid = cfg["end_time"] * (torch.arange(n + 1) / n) ** cfg["beta"]
    plain = PlainDiffFlow(obj.drift, obj.score, grid, cfg["g"], prior_std=obj.prior.std)
    opt = torch.optim.Adam(plain.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x, _ = built.dataset.train_batch(batch, gen)
        loss = plain.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in obj.parameters())


def interleaved_step_times(steppers: dict, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """ms per step of each variant, the variants taking turns for ``rounds`` rounds of
    ``per_round`` steps (two warm-up steps each first), so that a drift in the machine's speed
    hits all of them alike; medians over all timed steps."""
    wall: dict[str, list[float]] = {k: [] for k in steppers}
    cpu: dict[str, list[float]] = {k: [] for k in steppers}
    for step, _ in steppers.values():
        step(), step()
    for _ in range(rounds):
        for name, (step, _) in steppers.items():
            for _ in range(per_round):
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: {"median_ms": 1000 * statistics.median(wall[name]), "min_ms": 1000 * min(wall[name]),
                   "cpu_median_ms": 1000 * statistics.median(cpu[name]), "repeats": len(wall[name]),
                   "params": steppers[name][1]} for name in steppers}


def gradient_difference(batch: int, n: int, dtype: torch.dtype) -> float:
    """max |g_adjoint − g_naive| / max |g_naive| over all parameter entries."""
    built, obj = build_timing(n, "adjoint", dtype)
    x, _ = built.dataset.train_batch(batch, torch.Generator().manual_seed(0))
    x = x.to(dtype)
    times = obj.time_grid(n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    noise = torch.randn((n, *x.shape), generator=torch.Generator().manual_seed(2), dtype=dtype)
    grads = []
    for mode in ("adjoint", "naive"):
        obj.zero_grad()
        obj.trajectory_loss(x, times, noise, gradient=mode).loss.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in obj.parameters()]))
    return float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_probe(gradient: str, n: int, batch: int) -> dict[str, float]:
    """Run in a fresh process: the rise of the peak RSS during one training step (Linux: the
    high-water mark reset through ``/proc/self/clear_refs``), then the saved-tensor peak."""
    import gc

    built, obj = build_timing(n, gradient)
    x, _ = built.dataset.train_batch(batch, torch.Generator().manual_seed(0))
    gc.collect()
    base = _proc_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = obj.loss(x)
    out.loss.backward()
    peak = _proc_kb("VmHWM")
    obj.zero_grad(set_to_none=True)
    del out
    with SavedTensorBytes(obj.parameters()) as counter:
        out = obj.loss(x)
        out.loss.backward()
    return {"peak_rss_mb": (peak - base) / 1024, "process_peak_mb": peak / 1024,
            "saved_peak_mb": counter.peak / 2**20}


def run_timing(args) -> dict[str, Any]:
    quick = args.quick
    res: dict[str, Any] = {"machine_start": machine(args.threads)}
    res["allocator_tuned"] = not args.default_allocator
    rounds, per_round = (2, 2) if quick else (5, 3)
    timed = interleaved_step_times({"step_adjoint_b1000": flowkit_stepper("adjoint", 1000, 30),
                                    "step_naive_b1000": flowkit_stepper("naive", 1000, 30),
                                    "step_plain_b1000": plain_stepper(1000, 30)}, rounds, per_round)
    res.update(timed, interleaving={"rounds": rounds, "steps_per_round": per_round})
    print(f"batch 1000 N=30, interleaved: {timed}", flush=True)
    if not quick:
        res["step_adjoint_b5000"] = interleaved_step_times(
            {"adjoint": flowkit_stepper("adjoint", 5000, 30)}, 1, 3)["adjoint"]
        print(f"step adjoint batch 5000 N=30: {res['step_adjoint_b5000']}", flush=True)
    res["grad_rel_diff_f32"] = gradient_difference(1000, 30, torch.float32)
    res["grad_rel_diff_f64"] = gradient_difference(200, 30, torch.float64)
    print(f"gradient difference adjoint vs naive: f32 {res['grad_rel_diff_f32']:.2e}, "
          f"f64 {res['grad_rel_diff_f64']:.2e}", flush=True)
    batch = args.memory_batch
    memory: dict[str, dict[str, Any]] = {"adjoint": {}, "naive": {}}
    for mode in ("adjoint", "naive"):
        for n in (10, 30, 100):
            cmd = [sys.executable, __file__, "--memory-probe", mode, str(n), str(batch),
                   "--threads", str(args.threads), *(["--default-allocator"] if args.default_allocator else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            memory[mode][n] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"memory {mode} N={n} batch {batch}: {memory[mode][n]}", flush=True)
    res["memory"] = {"batch": batch, **memory}
    res["machine_end"] = machine(args.threads)
    return res


# ----------------------------------------------------------------------------- compare part


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.05) -> float:
    """Unbiased MMD² with the Gaussian kernel ``exp(−‖a − b‖² / (2σ²))``."""
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def on_support(dataset, x: torch.Tensor, band: float = 0.02) -> float:
    if hasattr(dataset, "distance_to_support"):
        return float((dataset.distance_to_support(x.float()) < band).float().mean())
    return float(torch.isfinite(dataset.log_prob(x.float())).float().mean())


def true_nll(dataset, n: int = 20000) -> Optional[float]:
    if isinstance(dataset, Standardized):  # change of variables: log p_y = log p_x + Σ log s
        inner = true_nll(dataset.data, n)
        return None if inner is None else inner - dataset.log_std_sum
    x, _ = dataset.test_set(n, seed=999)
    if hasattr(dataset, "distance_to_support"):  # rings: radial Gaussian of std s around radius r
        d = dataset.distance_to_support(x.double())
        s = dataset.radius_std
        r = float(dataset.radii[0])
        k = dataset.num_classes
        logp = -0.5 * (d / s) ** 2 - math.log(math.sqrt(2 * math.pi) * s) - math.log(2 * math.pi * r) - math.log(k)
        return float(-logp.mean())
    lp = dataset.log_prob(x)
    return None if lp is None else float(-lp.double().mean())


def compare_recipe(method: str, dataset: str, steps: int, batch: Optional[int]) -> dict:
    overrides = [f"train.steps={steps}"]
    if dataset != "olympic_rings":
        overrides.append(f"data={dataset}")
    if batch:
        overrides.append(f"train.batch_size={batch}")
    if method == "diffflow":
        overrides.append(f"objective.milestones=[{max(1, steps // 8)}, {max(2, 5 * steps // 16)}, "
                         f"{max(3, 5 * steps // 8)}]")
    return flowkit.load_recipe(ROOT / "recipes" / "compare_rings" / f"{method}.yaml", overrides)


def train_for(recipe: dict, budget: float) -> tuple[Any, dict]:
    """The trainer's loop (Adam, cosine schedule, EMA, after_step) stopped at a time budget."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(int(recipe["train"].get("seed", 0)))
    built = flowkit.build(recipe)
    cfg, obj = built.train, built.objective
    opt = torch.optim.Adam(obj.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))) if cfg.schedule == "cosine" else 1.0)
    ema = AveragedModel(obj, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed * 1000)
    start, step, losses = time.perf_counter(), 0, []
    while step < cfg.steps and time.perf_counter() - start < budget:
        x, _ = built.dataset.train_batch(cfg.batch_size, gen)
        out = obj(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(obj.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        if ema is not None:
            ema.update_parameters(obj)
        obj.after_step(step)
        losses.append(float(out.loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    wall = time.perf_counter() - start
    model = ema.module if ema is not None else obj
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return built, {"model": model, "steps": step, "train_seconds": wall, "s_per_iter": wall / max(step, 1),
                   "final_loss": statistics.mean(tail), "params": sum(p.numel() for p in obj.parameters())}


def evaluate(built, model, n_eval: int, n_samples: int) -> tuple[dict, torch.Tensor]:
    """:func:`evaluate_flow` of a flowkit model with the recipe's sampler."""
    flow = model.flow()

    def sample(n: int) -> tuple[torch.Tensor, int]:
        torch.manual_seed(1)  # a reverse SDE's noise (generate's seed is the prior's)
        with torch.no_grad():
            res = flowkit.generate(flow, built.sampler, n, seed=0)
        return res.x, res.nfe

    return evaluate_flow(built.dataset, flow, sample, n_eval, n_samples)


def evaluate_flow(dataset, flow, sample: Callable[[int], tuple[torch.Tensor, int]], n_eval: int,
                  n_samples: int) -> tuple[dict, torch.Tensor]:
    """PF-ODE NLL of ``flow`` on ``n_eval`` test points; ``sample(n)`` → (samples, NFE) for the
    sample metrics (on-support, and MMD² / energy distance against one reference set)."""
    x, _ = dataset.test_set(n_eval, seed=1234)
    ev = EvalConfig(n=n_eval, batch_size=min(n_eval, 2000), divergence="exact", rtol=1e-5, atol=1e-5)
    start = time.perf_counter()
    try:
        nll = flowkit.evaluate_nll(flow, x, ev)
    except Exception as exc:  # a diverged model: report, keep going
        nll = {"nll": float("nan"), "nll_sem": float("nan"), "nfe": float("nan"), "error": repr(exc)}
    nll_seconds = time.perf_counter() - start
    start = time.perf_counter()
    samples, nfe = sample(n_samples)
    sample_seconds = time.perf_counter() - start
    samples = samples.float()
    ok = torch.isfinite(samples).all(1)
    ref, _ = dataset.test_set(min(n_samples, 2000), seed=77)
    s2 = samples[ok][: len(ref)]
    return {
        "nll": nll["nll"], "nll_sem": nll["nll_sem"], "nll_nfe": nll["nfe"], "nll_seconds": nll_seconds,
        "sample_nfe": nfe, "sample_seconds": sample_seconds, "finite_fraction": float(ok.float().mean()),
        "on_support": on_support(dataset, samples[ok]),
        "mmd_0.05": mmd(s2, ref) if len(s2) > 10 else float("nan"),
        "energy_distance": energy_distance(s2, ref) if len(s2) > 10 else float("nan"),
    }, samples


def run_compare(args, previous: Optional[dict] = None, save=None) -> dict[str, Any]:
    """Train and evaluate each method on each dataset; with ``previous`` (``--merge``), rows of
    methods not run now are kept and the sample grid is redrawn from all saved samples."""
    from flowkit.plotting import plot_grid

    methods = [m for m in args.methods if m in flowkit.OBJECTIVES]
    missing = [m for m in args.methods if m not in flowkit.OBJECTIVES]
    res: dict[str, Any] = {"machine_start": machine(args.threads), "steps": args.steps, "budget_s": args.budget,
                           "batch": args.batch, "not_registered": missing, "datasets": {}}
    if previous:  # the header describes the main run; each row records its own caps
        res.update({k: previous[k] for k in ("machine_start", "steps", "budget_s", "batch") if k in previous})
        res["datasets"] = previous.get("datasets", {})
    sample_dir = RESULTS / "diffflow_rings_samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        rows: dict[str, Any] = res["datasets"].setdefault(dataset, {})
        data_set = flowkit.DATASETS.build(dataset)
        ref, _ = data_set.test_set(args.samples, seed=5)
        ref2, _ = data_set.test_set(min(args.samples, 2000), seed=77)
        rows["data"] = {"true_nll": true_nll(data_set), "on_support": on_support(data_set, ref),
                        "mmd_0.05": mmd(ref[:len(ref2)], ref2), "energy_distance": energy_distance(ref[:len(ref2)], ref2)}
        for method in methods:
            recipe = compare_recipe(method, dataset, args.steps, args.batch)
            built, info = train_for(recipe, args.budget)
            model = info.pop("model")
            metrics, samples = evaluate(built, model, args.eval_n, args.samples)
            key = method + args.tag
            torch.save(samples, sample_dir / f"{dataset}_{key}.pt")
            if method == "diffflow":
                metrics["net_evals_per_sample_step"] = 2  # drift + score per reverse step
            rows[key] = {"method": method, **info, **metrics, "steps_cap": args.steps, "budget_s": args.budget}
            print(f"{dataset} {key}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[key].items()), flush=True)
            if save is not None:
                save(res)
        panels = [("data", ref)]
        for key, r in rows.items():
            path = sample_dir / f"{dataset}_{key}.pt"
            if key not in ("data", "png") and path.is_file():
                panels.append((f"{key}, {r['steps']} steps (NLL {r['nll']:.2f}, on {r['on_support']:.2f})",
                               torch.load(path)))
        png = RESULTS / f"diffflow_rings_{dataset}.png"
        plot_grid(panels, png, reference=ref)
        rows["png"] = str(png.relative_to(ROOT))
    res["machine_end"] = machine(args.threads)
    return res


OFFICIAL_RECIPE = ROOT / "recipes" / "diffflow_rings_official.yaml"


def noise_floor(dataset, n: int, pairs: int = 10) -> dict[str, float]:
    """Energy distance and MMD² between independent data sets of ``n`` points: what a perfect
    model would score, and how much that varies."""
    ed, mm = [], []
    for k in range(pairs):
        a, _ = dataset.test_set(n, seed=10_000 + 2 * k)
        b, _ = dataset.test_set(n, seed=10_001 + 2 * k)
        ed.append(energy_distance(a, b))
        mm.append(mmd(a, b))
    return {"energy_distance_mean": statistics.mean(ed), "energy_distance_sd": statistics.stdev(ed),
            "mmd_mean": statistics.mean(mm), "mmd_sd": statistics.stdev(mm), "pairs": pairs, "n": n,
            "energy_distance_draws": ed, "mmd_draws": mm}


OFFICIAL_SAMPLERS = {
    "reverse SDE, N = 30 (recipe)": [],
    "reverse SDE, N = 30, noisy last step": ["sampler.denoise=false"],
    "reverse SDE, N = 100": ["sampler.steps=100"],
    "probability-flow ODE (dopri5 1e-5)": ["sampler={name: dopri5, rtol: 1.0e-5, atol: 1.0e-5}"],
}


def draw_metrics(sample: Callable[[int, int], torch.Tensor], dataset, draws: int, n: int) -> dict[str, list[float]]:
    """Energy distance and narrow-kernel MMD² of ``draws`` independent sample sets of ``n``
    points, ``sample(n, k)``, each against its own independent data set of ``n`` points: the
    model-side counterpart of :func:`noise_floor`. Draw ``k`` uses the same data set (and prior
    seed) for every model, so two models' draws are paired and compared by their differences."""
    eds, mms = [], []
    for k in range(draws):
        x = sample(n, k).float()
        x = x[torch.isfinite(x).all(1)]
        ref, _ = dataset.test_set(n, seed=30_000 + k)
        eds.append(energy_distance(x, ref) if len(x) > 10 else float("nan"))
        mms.append(mmd(x, ref) if len(x) > 10 else float("nan"))
    return {"energy_distance_draws": eds, "mmd_draws": mms}


def flowkit_draw(built, flow) -> Callable[[int, int], torch.Tensor]:
    """Draw ``k``: prior from seed ``50_000 + k``, the reverse SDE's noise from ``60_000 + k``."""
    def sample(n: int, k: int) -> torch.Tensor:
        torch.manual_seed(60_000 + k)
        with torch.no_grad():
            return flowkit.generate(flow, built.sampler, n, seed=50_000 + k).x
    return sample


# The official code's training settings (its 2-D configuration files), for the plain baseline:
# Adam 1e-2 on both networks, gradient norm clipped to 1, the learning rate times 0.95 every
# two epochs of its 500,000-point training set (every 1,000 steps at batch 1,000), the
# standard-normal prior, and its time grid: t_i = (a + (b − a) i/N)^(1/0.9) with a = 0.001^0.9,
# b = 0.05^0.9 — the L_β with β = 1/0.9, starting at t = 0.001 (finer steps near the data).
OFFICIAL_TRAINING = {"lr": 1e-2, "clip": 1.0, "gamma": 0.95, "every": 1000, "t_start": 0.001, "exp": 0.9}


def official_grid(n: int, t_start: float, end: float, exp: float) -> torch.Tensor:
    return torch.linspace(t_start**exp, end**exp, n + 1) ** (1.0 / exp)


class PlainDiffFlow(torch.nn.Module):
    """The in-run plain-PyTorch baseline: DiffFlow's eq. 15 by naive backprop through a plain
    loop on the time ``grid``, with the prior ``N(0, prior_std² I)`` — the timing part's
    official-style step (:func:`plain_stepper`) and, trained with :data:`OFFICIAL_TRAINING`,
    the quality comparison's baseline, sampled by its reverse SDE (eq. 9, Euler–Maruyama on the
    same grid) and wrapped as a :class:`flowkit.Flow` only to share the evaluation (PF-ODE NLL)
    with flowkit's runs."""

    def __init__(self, drift, score, grid: torch.Tensor, g: float, prior_std: float = 1.0):
        super().__init__()
        self.drift, self.score, self.g, self.prior_std = drift, score, g, float(prior_std)
        self.register_buffer("grid", grid)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 15 computed the way the official code's forward step does: each step evaluates
        the drift at ``x_i`` (forward move) and drift and score at ``x_{i+1}`` (backward
        residual), one scalar time per step; the prior term up to a constant."""
        g, grid = self.g, self.grid
        total = torch.zeros(x.shape[0])
        for i in range(len(grid) - 1):
            dt = grid[i + 1] - grid[i]
            x_next = x + self.drift(grid[i], x) * dt + g * dt.sqrt() * torch.randn_like(x)
            back = self.drift(grid[i + 1], x_next) - g * g * self.score(grid[i + 1], x_next)
            total = total + 0.5 * ((x - x_next + back * dt) / (g * dt.sqrt())).pow(2).sum(1)
            x = x_next
        return (total + 0.5 * (x / self.prior_std).pow(2).sum(1)).mean()

    @torch.no_grad()
    def sample(self, n: int, seed: int, noise_seed: int, quiet_last: bool) -> torch.Tensor:
        """Prior from ``seed`` (as ``flowkit.generate`` draws it), step noise from
        ``noise_seed``; ``quiet_last`` takes the last step without noise, as flowkit's
        ``euler_maruyama`` does by default for a model without a denoiser (the official
        sampler adds noise on every step)."""
        x = self.prior_std * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(noise_seed)
        g, grid = self.g, self.grid
        for i in range(len(grid) - 1, 0, -1):
            dt = grid[i] - grid[i - 1]
            back = self.drift(grid[i], x) - g * g * self.score(grid[i], x)
            x = x - back * dt
            if not (quiet_last and i == 1):
                x = x + g * dt.sqrt() * torch.randn_like(x)
        return x

    def flow(self) -> "flowkit.Flow":
        from flowkit.flow import StandardNormal

        def velocity(t, x, cond=None):
            return self.drift(t, x) - 0.5 * self.g**2 * self.score(t, x)

        return flowkit.Flow(velocity=velocity, prior=StandardNormal((2,), self.prior_std), t0=float(self.grid[0]),
                            t1=float(self.grid[-1]))


def train_plain_official(recipe: dict, steps: int, path: Path) -> tuple[PlainDiffFlow, dict]:
    """Train (or reload, when ``path`` holds the same configuration) :class:`PlainDiffFlow` on
    the recipe's data and networks with the official code's training settings. The cache key is
    the configuration, not the code: delete ``path`` after changing how the baseline trains."""
    obj, o = recipe["objective"], OFFICIAL_TRAINING
    cfg = {"steps": steps, "batch": recipe["train"]["batch_size"], "data": recipe["data"],
           "dynamics": recipe["dynamics"], "n": obj["steps"][-1], "end_time": obj["end_time"], "g": obj["g"],
           **o}
    torch.manual_seed(0)
    built = flowkit.build(recipe)
    grid = official_grid(cfg["n"], o["t_start"], cfg["end_time"], o["exp"])
    model = PlainDiffFlow(built.objective.drift, built.objective.score, grid, cfg["g"])
    if path.is_file():
        saved = torch.load(path)
        if saved["config"] == cfg:
            model.load_state_dict(saved["model"])
            return model, {**saved["info"], "dataset": built.dataset}
    opt = torch.optim.Adam(model.parameters(), o["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o["every"], gamma=o["gamma"])
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        x, _ = built.dataset.train_batch(cfg["batch"], gen)
        loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"])
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            print(f"plain official-style baseline: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    info = {"steps": steps, "s_per_iter": (time.perf_counter() - start) / steps}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"config": cfg, "model": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return model, {**info, "dataset": built.dataset}


def evaluate_plain(model: PlainDiffFlow, dataset, args, quiet_last: bool) -> tuple[dict[str, Any], torch.Tensor]:
    """The official part's metrics for the plain baseline, with the test sets, prior seeds and
    reference sets of :func:`evaluate` and :func:`draw_metrics` (so its draws pair with
    flowkit's); ``quiet_last`` as in :meth:`PlainDiffFlow.sample`."""
    steps = len(model.grid) - 1
    metrics, samples = evaluate_flow(
        dataset, model.flow(), lambda n: (model.sample(n, seed=0, noise_seed=1, quiet_last=quiet_last), steps),
        args.eval_n, args.samples)
    metrics.update(draw_metrics(
        lambda m, k: model.sample(m, seed=50_000 + k, noise_seed=60_000 + k, quiet_last=quiet_last),
        dataset, args.draws, min(args.samples, 2000)))
    return metrics, samples


def evaluate_official_run(run: Path, args, png: Optional[Path] = None,
                          extra: Optional[dict[str, tuple[dict, torch.Tensor]]] = None) -> dict[str, Any]:
    """The official part's metrics for a trained run directory: each sampler of
    ``OFFICIAL_SAMPLERS`` with the compare part's metrics plus the energy distance over
    ``--draws`` independent draws, next to the data-vs-data noise floor of the same size;
    ``extra`` rows (label → metrics, samples) are reported and drawn after them."""
    from flowkit.plotting import plot_grid

    recipe = load_run_recipe(run)
    n = min(args.samples, 2000)
    floor = noise_floor(build_component(flowkit.DATASETS, recipe["data"]), n, pairs=args.draws)
    rows: dict[str, Any] = {}
    panels = []
    for weights in ("raw", "ema") if recipe["train"].get("ema") else ("raw",):
        for label, sampler in OFFICIAL_SAMPLERS.items():
            built, step = flowkit.load_run(run, sampler, ema=weights == "ema")
            metrics, samples = evaluate(built, built.objective, args.eval_n, args.samples)
            metrics.update(draw_metrics(flowkit_draw(built, built.objective.flow()), built.dataset, args.draws, n))
            rows[f"{weights} weights, {label}"] = metrics
            panels.append((f"{weights}, {label.split(' (')[0]}: on {metrics['on_support']:.2f}", samples))
            print(f"{run.name}, {weights} weights, {label}: {metrics}", flush=True)
    for label, (metrics, samples) in (extra or {}).items():
        rows[label] = metrics
        panels.append((f"{label.split(' (')[0]}: on {metrics['on_support']:.2f}", samples))
    ref, _ = built.dataset.test_set(args.samples, seed=5)
    png = png or RESULTS / "diffflow_rings_official.png"
    plot_grid([("data", ref), *panels], png, reference=ref)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    s_per_iter = statistics.median(1.0 / r["it_per_s"] for r in records[1:] or records)
    return {"steps": step, "batch": recipe["train"]["batch_size"], "ema": recipe["train"].get("ema", 0.0),
            "grad_clip": recipe["train"].get("grad_clip", 0.0), "schedule": recipe["train"].get("schedule"),
            "data": recipe["data"], "params": sum(p.numel() for p in built.objective.parameters()),
            "s_per_iter": s_per_iter, "rows": rows, "noise_floor": floor, "samples": args.samples,
            "eval_n": args.eval_n,
            "data_on_support": on_support(built.dataset, ref), "true_nll": true_nll(built.dataset),
            "png": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
            "machine": machine(args.threads)}


def run_official(args) -> dict[str, Any]:
    """The official code's 2-D configuration trained by flowkit's trainer for as many steps as
    the issue's quality figure (2,000 at batch 1,000), into a resumable run directory, then
    :func:`evaluate_official_run`. With ``--run DIR`` an existing run is evaluated instead."""
    if args.run:
        run = Path(args.run)
        return {**evaluate_official_run(run, args, run / "official_eval.png"), "recipe": str(run)}
    steps = args.steps if args.quick else 2000
    overrides = [f"train.steps={steps}", "train.sample_every=0", f"train.threads={args.threads}"]
    if args.quick and args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    recipe = flowkit.load_recipe(OFFICIAL_RECIPE, overrides)
    run = RESULTS / "runs" / ("diffflow_official" + ("_quick" if args.quick else ""))
    resume = (run / "checkpoints").is_dir()
    if resume and load_run_recipe(run) != recipe:
        import shutil

        shutil.rmtree(run)  # a run of another recipe: start afresh
        resume = False
    start = time.perf_counter()
    flowkit.train(recipe, run, resume=resume, progress=False, log=lambda *a: None)
    wall = time.perf_counter() - start
    extra, baseline = {}, None
    if not args.no_baseline:
        suffix = "_quick" if args.quick else ""
        plain, info = train_plain_official(recipe, steps, RESULTS / "runs" / f"plain_official{suffix}.pt")
        dataset = info.pop("dataset")
        for label, quiet in ((PLAIN_LABEL, True), (PLAIN_LABEL_NOISY, False)):
            metrics, samples = evaluate_plain(plain, dataset, args, quiet_last=quiet)
            print(f"{label}: {metrics}", flush=True)
            extra[label] = (metrics, samples)
        baseline = {**info, "settings": OFFICIAL_TRAINING}
    return {**evaluate_official_run(run, args, extra=extra), "train_seconds_this_call": wall,
            "recipe": str(OFFICIAL_RECIPE.relative_to(ROOT)), "baseline": baseline}


PLAIN_LABEL = "plain PyTorch, official training (reverse SDE, its grid, N = 30)"
PLAIN_LABEL_NOISY = "plain PyTorch, official training, noisy last step (the official sampler)"
FLOWKIT_NOISY = "raw weights, reverse SDE, N = 30, noisy last step"


# ----------------------------------------------------------------------------- report


def timing_markdown(t: dict) -> list[str]:
    lines: list[str] = []
    m0, m1 = t["machine_start"], t["machine_end"]
    allocator = ("glibc malloc thresholds tuned as flowkit's trainer does (`train.tune_allocator`)"
                 if t.get("allocator_tuned") else "default glibc malloc settings")
    lines += [f"## Stochastic adjoint: cost ({t.get('mode', '')}, {m0['threads']} thread(s))", "",
              f"{m0['cpu']}, {m0['cores']} cores, **{m0['threads']} thread(s)**, torch {m0['torch']}, {allocator}; "
              f"load average {m0['load_average'][0]:.2f} at start, {m1['load_average'][0]:.2f} at end.", "",
              f"DiffFlow with the official 2-D networks (two `fourier_mlp`, 128 channels, 3 layers, GELU): "
              f"{t['step_adjoint_b1000']['params']:,} parameters (official: {REFERENCE['params']:,}), "
              "N = 30, T = 0.05, g = 0.2, Adam. *plain* is the in-run plain-PyTorch baseline written like "
              "the official code's forward step (naive backprop; drift at x_i, drift and score at x_{i+1}).", "",
              "| per optimiser step | flowkit wall, median (min) | process CPU time | official (wall, issue) | "
              "official / flowkit |",
              "|---|---|---|---|---|"]
    for key, ref in (("step_adjoint_b1000", "ms_per_step_adjoint_b1000"),
                     ("step_naive_b1000", "ms_per_step_naive_b1000"),
                     ("step_plain_b1000", "ms_per_step_naive_b1000"),
                     ("step_adjoint_b5000", "ms_per_step_adjoint_b5000")):
        if key in t:
            name = key.replace("step_", "").replace("_b", ", batch ")
            name = name.replace("plain,", "plain PyTorch (naive),")
            lines.append(f"| {name} | {t[key]['median_ms']:.0f} ms ({t[key]['min_ms']:.0f}) | "
                         f"{t[key]['cpu_median_ms']:.0f} ms | {REFERENCE[ref]} ms | "
                         f"{REFERENCE[ref] / t[key]['median_ms']:.2f}× |")
    if "interleaving" in t:
        lines += ["", f"The three batch-1,000 variants took turns ({t['interleaving']['rounds']} rounds of "
                      f"{t['interleaving']['steps_per_round']} steps each, medians): this machine's speed drifts "
                      "by tens of percent over minutes, so only in-run ratios are comparable between rows."]
    if "step_plain_b1000" in t:
        lines += ["", f"Target: adjoint ≤ {REFERENCE['ms_per_step_naive_b1000']} ms (the official naive step). "
                      f"flowkit adjoint / in-run plain naive: "
                      f"{t['step_adjoint_b1000']['median_ms'] / t['step_plain_b1000']['median_ms']:.2f}×."]
    lines += ["", f"Adjoint vs backprop gradients, max relative difference: "
                  f"{t['grad_rel_diff_f32']:.1e} (float32; official 2e-5), {t['grad_rel_diff_f64']:.1e} (float64).", "",
              f"Peak memory of one step at batch {t['memory']['batch']}: rise of the peak RSS over the "
              "built model in a fresh process [whole-process peak] (peak of tensors held for backward):", "",
              "| N | adjoint | naive | official adjoint | official naive |", "|---|---|---|---|---|"]
    for n in ("10", "30", "100"):
        a, b = t["memory"]["adjoint"][n], t["memory"]["naive"][n]
        lines.append(f"| {n} | {a['peak_rss_mb']:.0f} MB [{a['process_peak_mb']:.0f}] ({a['saved_peak_mb']:.0f}) | "
                     f"{b['peak_rss_mb']:.0f} MB [{b['process_peak_mb']:.0f}] ({b['saved_peak_mb']:.0f}) | "
                     f"{REFERENCE['peak_mb_b5000']['adjoint'][int(n)]} MB | "
                     f"{REFERENCE['peak_mb_b5000']['naive'][int(n)]} MB |")
    lines.append("")
    return lines


def _gap(model: list[float], floor: list[float]) -> tuple[float, float]:
    """Mean of the model's draws minus the floor's mean, and its standard error (the two sets of
    draws are independent: the floor's data sets are not the model's reference sets)."""
    gap = statistics.mean(model) - statistics.mean(floor)
    return gap, math.sqrt(statistics.variance(model) / len(model) + statistics.variance(floor) / len(floor))


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences ``a_k − b_k`` (draw ``k`` of both models
    shares its reference set and prior seed)."""
    d = [x - y for x, y in zip(a, b)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def _verdict(diff: float, se: float, lower_is_better: bool = True) -> str:
    if abs(diff) <= 2 * se:
        return "equal"
    return "better" if (diff < 0) == lower_is_better else "worse"


def official_markdown(o: dict) -> list[str]:
    f = o["noise_floor"]
    draws = f["pairs"]
    settings = f"EMA {o['ema']}, grad clip {o.get('grad_clip', 0.0)}, {o.get('schedule') or 'constant'} LR"
    lines = [f"## Sample quality at the official configuration ({o.get('mode', '')})", "",
             f"`{o['recipe']}` trained by `flowkit train`: {o['params']:,} parameters, {o['steps']} steps at "
             f"batch {o['batch']} ({settings}), {o['s_per_iter']:.3f} s/it ({o['machine']['threads']} "
             "thread(s)). The issue: after 2,000 steps the official code's energy distance is at the "
             "metric's noise floor (±7e-4).", "",
             f"NLL: probability-flow ODE (dopri5 1e-5, exact trace) on {o.get('eval_n', 2000)} test points, nats in "
             f"the standardised units the model is trained in (true value in the last row). on-support: "
             f"fraction of {o.get('samples', 5000)} samples within 0.02 of a ring (in the rings' own units). "
             f"Energy distance and MMD² (Gaussian kernel, σ = 0.05): mean ± sd over {draws} independent draws "
             f"of {f['n']} samples, each scored against its own data set of {f['n']}; draw k of every model uses "
             "the same data set and prior seed. The last row is the noise floor: the same with a second "
             "data set in place of the model. gap: model mean − floor mean ± its standard error; "
             "**at the noise floor** when the gap is within 2 standard errors of zero.", "",
             "| weights, sampler | NLL (nats) | on-support | MMD² | MMD² gap | energy distance | ED gap | NFE |",
             "|---|---|---|---|---|---|---|---|"]
    gaps = {}
    for label, r in o["rows"].items():
        eds, mms = r["energy_distance_draws"], r["mmd_draws"]
        ge, se_e = _gap(eds, f["energy_distance_draws"])
        gm, se_m = _gap(mms, f["mmd_draws"])
        gaps[label] = (ge, se_e, gm, se_m)
        lines.append(f"| {label} | {r['nll']:.3f} ± {r['nll_sem']:.3f} | {r['on_support']:.3f} | "
                     f"{statistics.mean(mms):.1e} ± {statistics.stdev(mms):.1e} | {gm:+.1e} ± {se_m:.1e} | "
                     f"{statistics.mean(eds):.1e} ± {statistics.stdev(eds):.1e} | {ge:+.1e} ± {se_e:.1e} | "
                     f"{r['sample_nfe']} |")
    lines += [f"| data vs data ({draws} pairs of {f['n']}) | {o['true_nll']:.3f} (true) | "
              f"{o['data_on_support']:.3f} | {f['mmd_mean']:.1e} ± {f['mmd_sd']:.1e} | | "
              f"{f['energy_distance_mean']:.1e} ± {f['energy_distance_sd']:.1e} | | |", ""]
    first_label = next(iter(o["rows"]))
    ge, se_e, gm, se_m = gaps[first_label]
    at = lambda g, se: "**at the noise floor**" if abs(g) <= 2 * se else "**not at the noise floor**"  # noqa: E731
    lines += [f"Recipe's sampler: energy distance {at(ge, se_e)} (gap {ge:+.1e} ± {se_e:.1e}; this many draws "
              f"detect a gap of about {2 * se_e:.1e}, {2 * se_e / f['energy_distance_sd']:.2f} sd of one "
              f"data-vs-data draw); narrow-kernel MMD² {at(gm, se_m)} (gap {gm:+.1e} ± {se_m:.1e}). "
              f"Data: `{json.dumps(o.get('data', {}))}`.", ""]
    pairs = [(first_label, PLAIN_LABEL, "last step without noise (flowkit's default)"),
             (FLOWKIT_NOISY, PLAIN_LABEL_NOISY, "noise on every step (the official sampler)")]
    if all(a in o["rows"] and b in o["rows"] for a, b, _ in pairs):
        b = o["baseline"]
        st = b["settings"]
        lines += [f"Against the in-run plain-PyTorch baseline trained the official code's way ({b['steps']} steps "
                  f"at batch {o['batch']}; Adam {st['lr']}, gradient norm clipped to {st['clip']}, LR × "
                  f"{st['gamma']} every {st['every']} steps — every two epochs of the official 500k-point set "
                  f"at this batch —, standard-normal prior, its time grid from t = {st['t_start']}; not "
                  f"reproduced: its EMA of 0.999 and default batch of 5,000; {b['s_per_iter']:.3f} s/it "
                  "when it was trained), each with the same sampler convention. NLL and on-support: better / "
                  "worse beyond 2 standard errors of these test points and samples; energy distance and MMD²: "
                  "the same on the paired per-draw differences. These verdicts are about these two sets of "
                  "weights: training seeds move the recipe's NLL by about 0.08 nats (seed 0 −0.384, seed 1 "
                  "−0.304).", ""]
        for a, base, convention in pairs:
            lines.append(f"- {convention}: " + "; ".join(compare_rows(o["rows"][a], o["rows"][base],
                                                                     o.get("samples", 5000))) + ".")
        lines.append("")
    lines += [f"![official]({Path(o['png']).name})", ""]
    return lines


def compare_rows(a: dict, b: dict, n_samples: int) -> list[str]:
    """Per-metric verdicts of row ``a`` (flowkit) against row ``b`` (baseline)."""
    out = []
    d, se = a["nll"] - b["nll"], math.hypot(a["nll_sem"], b["nll_sem"])  # same test points: conservative
    out.append(f"NLL {a['nll']:.3f} vs {b['nll']:.3f} ({_verdict(d, se)})")
    pa, pb = a["on_support"], b["on_support"]
    se = math.sqrt(pa * (1 - pa) / n_samples + pb * (1 - pb) / n_samples)
    out.append(f"on-support {pa:.3f} vs {pb:.3f} ({_verdict(pa - pb, se, lower_is_better=False)})")
    for name, key in (("energy distance", "energy_distance_draws"), ("MMD²", "mmd_draws")):
        d, se = _paired(a[key], b[key])
        out.append(f"{name} {statistics.mean(a[key]):.1e} vs {statistics.mean(b[key]):.1e} "
                   f"(paired difference {d:+.1e} ± {se:.1e}: {_verdict(d, se)})")
    return out


def markdown(results: dict) -> str:
    lines = ["# DiffFlow benchmark (bench/diffflow_rings.py)", ""]
    for key in sorted(k for k in results if k.startswith("timing")):
        lines += timing_markdown(results[key])
    if results.get("official"):
        lines += official_markdown(results["official"])
    c = results.get("compare")
    if c:
        m0 = c["machine_start"]
        lines += [f"## DiffFlow vs FFJORD vs score matching ({c.get('mode', '')})", "",
                  f"{m0['cpu']}, {m0['threads']} thread(s), load average {m0['load_average'][0]:.2f} at start. "
                  f"Each model: at most {c['steps']} steps or {c['budget_s']:.0f} s of training, whichever first "
                  "(no EMA; the cosine schedule spans the step cap; rows with a suffix were run with "
                  "their own cap, given in the row); "
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
                      "| method | params | cap (steps / s) | steps | s/it | final loss | NLL (nats) | on-support | MMD² | energy dist. | sample NFE | sample s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for method, r in rows.items():
                if method in ("data", "png"):
                    continue
                nfe = f"{r['sample_nfe']}" + (" (×2 nets)" if r.get("method", method) == "diffflow" else "")
                cap = f"{r.get('steps_cap', c['steps'])} / {r.get('budget_s', c['budget_s']):.0f}"
                lines.append(f"| {method} | {r['params']:,} | {cap} | {r['steps']} | {r['s_per_iter']:.3f} | "
                             f"{r['final_loss']:.3f} | {r['nll']:.3f} ± {r['nll_sem']:.3f} | {r['on_support']:.3f} | "
                             f"{r['mmd_0.05']:.2e} | {r['energy_distance']:.2e} | {nfe} | {r['sample_seconds']:.1f} |")
            lines += ["", f"![{dataset}]({Path(rows['png']).name})", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "timing", "compare", "official"), default="all")
    parser.add_argument("--quick", action="store_true", help="small everything (a few minutes)")
    parser.add_argument("--budget", type=float, default=None, help="training seconds per model (compare)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (compare)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the recipes')")
    parser.add_argument("--eval-n", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--memory-batch", type=int, default=None)
    parser.add_argument("--draws", type=int, default=None,
                        help="official: independent sample sets for the energy distance (default 20)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="official: skip the plain-PyTorch baseline trained the official code's way")
    parser.add_argument("--run", default=None,
                        help="official: evaluate this trained run directory instead of training the recipe")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-allocator", action="store_true",
                        help="timing: leave glibc's malloc thresholds alone (flowkit's trainer tunes them)")
    parser.add_argument("--merge", action="store_true",
                        help="compare: keep the previous rows of methods not run now")
    parser.add_argument("--tag", default="", help="compare: suffix of the rows' names (e.g. @long)")
    parser.add_argument("--memory-probe", nargs=3, metavar=("GRADIENT", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        tune_cpu_allocator()
    if args.memory_probe:
        mode, n, batch = args.memory_probe
        print(json.dumps(memory_probe(mode, int(n), int(batch))))
        return
    q = args.quick
    args.budget = args.budget if args.budget is not None else (30.0 if q else 1800.0)
    args.steps = args.steps if args.steps is not None else (200 if q else 8000)
    args.batch = args.batch if args.batch is not None else (256 if q else None)
    args.eval_n = args.eval_n if args.eval_n is not None else (200 if q else 2000)
    args.samples = args.samples if args.samples is not None else (1000 if q else 5000)
    args.draws = args.draws if args.draws is not None else (3 if q else 20)
    if args.draws < 2:
        parser.error("--draws must be at least 2 (the report gives standard deviations over draws)")
    args.memory_batch = args.memory_batch if args.memory_batch is not None else (1000 if q else 5000)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "diffflow_rings.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    mode = "quick" if q else "full"
    if args.run:  # evaluate a run directory: the report goes next to it, the bench results stay
        run = Path(args.run)
        report = {"mode": "run", **run_official(args)}
        (run / "official_eval.json").write_text(json.dumps(report, indent=2))
        text = "\n".join(official_markdown(report)) + "\n"
        (run / "official_eval.md").write_text(text)
        print(text)
        return
    if args.part in ("all", "timing"):
        key = ("timing" if args.threads == 1 else f"timing_threads{args.threads}") + \
            ("_default_allocator" if args.default_allocator else "")
        results[key] = {"mode": mode, **run_timing(args)}
        path.write_text(json.dumps(results, indent=2))
    if args.part in ("all", "official"):
        results["official"] = {"mode": mode, **run_official(args)}
        path.write_text(json.dumps(results, indent=2))
    if args.part in ("all", "compare"):
        def save(partial: dict) -> None:
            path.write_text(json.dumps({**results, "compare": {"mode": mode, **partial}}, indent=2))

        previous = results.get("compare") if args.merge else None
        results["compare"] = {"mode": mode, **run_compare(args, previous, save)}
    path.write_text(json.dumps(results, indent=2))
    results = json.loads(path.read_text())  # integer keys become strings, as in a reloaded file
    (RESULTS / "diffflow_rings.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
