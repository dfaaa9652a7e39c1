"""Few-step samplers: flowkit's semi-linear solvers against diffusers and k-diffusion.

Part ``trained`` (``--part trained``): six models trained on FFJORD's 8 Gaussians by flowkit's
trainer for the same number of steps (score matching on VP, I-CFM, OT-CFM with the exact minibatch
coupling, 2-rectified flow of the CFM run, consistency training, MeanFlow; their recipes under
``recipes/`` with ``train.steps`` overridden), then :func:`flowkit.nfe_sweep.nfe_sweep`: energy
distance and sliced W2 to the test set at NFE 1, 2, 4, 8, 16 for every applicable sampler
(``euler``, ``ddim``, ``dpmpp_2m``, ``unipc``, ``edm_heun``, ``flow_map`` with and without
renoising) and the dopri5 reference, mean ± standard error over seeds; plus the issue's check:
the one-step models at NFE 1 and 2 against DPM-Solver++(2M) on the CFM model. Writes
``bench/results/few_step_trained.{md,csv,json,png}``.

Part ``exact``: the exact data prediction of a 2-D Gaussian mixture under the VP diffusion (β 0.1 → 20,
``t0 = 1e-3``, ``t1 = 1``), the same initial noise for every solver, and the same knots: Karras
ρ = 7 spacing of ``σ̃ = σ/α`` between ``σ̃(t1)`` and ``σ̃(t0)``, every solver stopping at ``t0``
(flowkit's ``final="t0"``: the last noise level). Reported at NFE 4, 6, 8, 10, 16, 20:

* endpoint error against dopri5 (rtol = atol = 1e-10, float64) from the same noise: max and RMS
  over the samples;
* the mixture's log-density ``log p_{t0}`` of the samples (mean), and the reference's;
* wall time per step (ms; median over interleaved rounds, all solvers calling the same model).

Pairs (flowkit ↔ peer): ``ddim`` ↔ diffusers ``EulerDiscreteScheduler`` (Euler in ``σ̃`` is DDIM);
``dpmpp_2m`` ↔ diffusers ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2) and k-diffusion
``sample_dpmpp_2m``; ``dpmpp_3m`` (default ``third_order="published"``) ↔ diffusers
``DPMSolverMultistepScheduler`` (order 3); ``dpmpp_3m third_order=exact`` (the exact-quadratic
variant) is listed unpaired;
``unipc`` ↔ diffusers ``UniPCMultistepScheduler`` (bh2, order 2); ``edm_heun`` ↔ k-diffusion
``sample_heun`` (2 NFE a step, so NFE/2 steps).

How each peer sees the model. k-diffusion: the denoiser ``D(x̃, σ̃) = x̂₀(α x̃, t(σ̃))`` in the
VE-equivalent scale ``x̃ = x/α``, started from ``x̃ = x₁/α(t1)``. diffusers: an ε-model
``ε̂(x, τ)`` whose discrete timestep label ``τ`` is mapped to continuous VP time; the
scheduler is built with ``trained_betas`` making ``ᾱ_i = α((i + 1)/1000)²``, then, after
``set_timesteps``, its ``sigmas`` / ``timesteps`` are set to the shared knots (labels = the
continuous times) so that it steps through exactly the same noise levels; ``lower_order_final``
is off and ``final_sigmas_type="sigma_min"`` (the knots stop at ``σ̃(t0) > 0``; with the default
"zero" diffusers takes a first-order last step). Peers are installed for the bench only, never
pulling torch: ``pip install --no-deps diffusers k-diffusion``; k-diffusion's package
``__init__`` imports torchvision and more, so its ``sampling`` module is loaded by file path with
a stub ``utils`` providing the one helper it uses (``append_dims``).

    python bench/few_step.py                 # --part exact, 2000 samples
    python bench/few_step.py --n 500 --rounds 1
    python bench/few_step.py --part trained  # trains into runs/few_step (reused), ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402
from flowkit.flow import Flow  # noqa: E402
from flowkit.gmm import GaussianMixture  # noqa: E402
from flowkit.paths import VP  # noqa: E402
from flowkit.samplers.ode_samplers import dopri5  # noqa: E402
from flowkit.samplers.schedules import sampling_grid  # noqa: E402

F64 = torch.float64
NFES = (4, 6, 8, 10, 16, 20)
RESULTS = ROOT / "results"


# --------------------------------------------------------------------------- the problem
def mixture() -> GaussianMixture:
    """Five components of different shapes and weights in 2-D."""
    g = torch.Generator().manual_seed(0)
    means = 1.6 * torch.randn(5, 2, generator=g, dtype=F64)
    a = torch.randn(5, 2, 2, generator=g, dtype=F64) / 2**0.5
    covs = 0.12 * a @ a.mT + 0.04 * torch.eye(2, dtype=F64)
    return GaussianMixture(means, covs, torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=F64))


class Posterior:
    """``E[x_data | x_t]`` of the mixture under ``path`` in closed form, counting calls."""

    def __init__(self, gmm: GaussianMixture, path: VP) -> None:
        self.gmm, self.path, self.calls = gmm, path, 0

    def x0(self, t: float, x: Tensor) -> Tensor:
        self.calls += 1
        tt = torch.tensor(float(t), dtype=F64)
        a, s = self.path.alpha(tt), self.path.sigma(tt)
        covs = a**2 * self.gmm.covs + s**2 * torch.eye(2, dtype=F64)
        diff = x[:, None, :] - a * self.gmm.means
        solved = torch.linalg.solve(covs, diff.unsqueeze(-1)).squeeze(-1)
        resp = torch.softmax(self.gmm.weights.log() - 0.5 * (diff * solved).sum(-1) - 0.5 * torch.logdet(covs), -1)
        post = self.gmm.means + a * torch.einsum("kij,nkj->nki", self.gmm.covs, solved)
        return (resp[..., None] * post).sum(1)

    def velocity(self, t: Tensor, x: Tensor, cond=None) -> Tensor:
        tt = torch.as_tensor(t, dtype=F64)
        a, s, da, ds = self.path.alpha(tt), self.path.sigma(tt), self.path.d_alpha(tt), self.path.d_sigma(tt)
        x0 = self.x0(float(t), x)
        return da * x0 + ds * (x - a * x0) / s


def time_of_ratio(path: VP, ratio: float) -> float:
    """VP time with ``σ/α = ratio``: ``B(t) = log(1 + ratio²)``, a quadratic in ``t``."""
    b = math.log1p(ratio**2)
    qa, qb = 0.5 * (path.beta_max - path.beta_min) / path.t1, path.beta_min
    return (-qb + math.sqrt(qb**2 + 4 * qa * b)) / (2 * qa)


# ------------------------------------------------------------------------------ solvers
def flowkit_solver(name: str, flow: Flow, **options) -> Callable[[Tensor, int], Tensor]:
    sampler = flowkit.SAMPLERS.get(name)
    return lambda x1, steps: sampler(flow, x1, steps=steps, schedule="karras", final="t0", **options).x


def k_diffusion_module():
    """k-diffusion's ``sampling`` module, loaded by path (its package imports torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    folder = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("kd_stub")
    package.__path__ = []  # type: ignore[attr-defined]
    utils = types.ModuleType("kd_stub.utils")

    def append_dims(x: Tensor, target_dims: int) -> Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims  # type: ignore[attr-defined]
    sys.modules.update({"kd_stub": package, "kd_stub.utils": utils})
    module_spec = importlib.util.spec_from_file_location("kd_stub.sampling", folder / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["kd_stub.sampling"] = module
    module_spec.loader.exec_module(module)
    return module


def k_diffusion_solver(kind: str, post: Posterior, path: VP, knots: Callable[[int], list[float]]):
    sampling = k_diffusion_module()
    fn = {"dpmpp_2m": sampling.sample_dpmpp_2m, "heun": sampling.sample_heun}[kind]
    times: dict[float, float] = {}

    def denoiser(x_tilde: Tensor, sigma: Tensor) -> Tensor:
        ratio = float(sigma.reshape(-1)[0])
        t = times.get(ratio)
        if t is None:
            t = times[ratio] = time_of_ratio(path, ratio)
        alpha = float(path.alpha(torch.tensor(t, dtype=F64)))
        return post.x0(t, alpha * x_tilde)

    def run(x1: Tensor, steps: int) -> Tensor:
        ts = knots(steps)
        ratios = [float(path.sigma(torch.tensor(t, dtype=F64)) / path.alpha(torch.tensor(t, dtype=F64))) for t in ts]
        times.update(zip(ratios, ts))
        a1, a0 = (float(path.alpha(torch.tensor(t, dtype=F64))) for t in (ts[0], ts[-1]))
        x_tilde = fn(denoiser, x1 / a1, torch.tensor(ratios, dtype=F64), disable=True)
        return a0 * x_tilde

    return run


def diffusers_solver(kind: str, post: Posterior, path: VP, knots: Callable[[int], list[float]], order: int = 2):
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    grid = torch.arange(1, 1001, dtype=F64) / 1000
    abar = path.alpha(grid) ** 2
    betas = (1 - abar / torch.cat([torch.ones(1, dtype=F64), abar[:-1]])).numpy()
    common = dict(num_train_timesteps=1000, trained_betas=np.asarray(betas), prediction_type="epsilon")
    if kind == "euler":
        scheduler = EulerDiscreteScheduler(**common)
    elif kind == "dpmpp":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=order,
                                                solver_type="midpoint", lower_order_final=False,
                                                final_sigmas_type="sigma_min",
                                                euler_at_final=False)
    else:
        scheduler = UniPCMultistepScheduler(**common, solver_order=order, solver_type="bh2", predict_x0=True,
                                            lower_order_final=False)

    def run(x1: Tensor, steps: int) -> Tensor:
        ts = knots(steps)
        scheduler.set_timesteps(steps)
        ratios = [float(path.sigma(torch.tensor(t, dtype=F64)) / path.alpha(torch.tensor(t, dtype=F64))) for t in ts]
        scheduler.sigmas = torch.tensor(ratios, dtype=F64)
        scheduler.timesteps = torch.tensor(ts[:-1], dtype=F64)
        a1, a0 = (float(path.alpha(torch.tensor(t, dtype=F64))) for t in (ts[0], ts[-1]))
        sample = x1 / a1 if kind == "euler" else x1.clone()  # Euler works on x̃ = x/α
        for label in scheduler.timesteps:
            t = float(label)
            model_in = scheduler.scale_model_input(sample, label) if kind == "euler" else sample
            alpha = float(path.alpha(torch.tensor(t, dtype=F64)))
            sigma = float(path.sigma(torch.tensor(t, dtype=F64)))
            eps = (model_in - alpha * post.x0(t, model_in)) / sigma
            sample = scheduler.step(eps, label, sample).prev_sample
        return a0 * sample if kind == "euler" else sample

    return run


# ------------------------------------------------------------------------------- the run
def run_exact(n: int, rounds: int, quick: bool) -> dict:
    torch.set_num_threads(1)
    torch.set_default_dtype(F64)
    gmm, path = mixture(), VP(t0=1e-3)
    post = Posterior(gmm, path)
    flow = Flow(velocity=post.velocity, prior=path.prior((2,)), t0=path.t0, t1=path.t1, path=path)
    x1 = flow.prior.sample(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = dopri5(flow, x1, rtol=1e-10, atol=1e-10)
    marginal = gmm.marginal(path, path.t0)

    def knots(steps: int) -> list[float]:
        return list(sampling_grid(path, steps, "karras", final="t0").t)

    solvers: dict[str, tuple[Callable, int]] = {  # name: (run(x1, steps), NFE per step)
        "flowkit ddim": (flowkit_solver("ddim", flow), 1),
        "flowkit dpmpp_2m": (flowkit_solver("dpmpp_2m", flow), 1),
        "flowkit dpmpp_3m": (flowkit_solver("dpmpp_3m", flow), 1),
        "flowkit dpmpp_3m third_order=exact": (flowkit_solver("dpmpp_3m", flow, third_order="exact"), 1),
        "flowkit unipc": (flowkit_solver("unipc", flow), 1),
        "flowkit edm_heun": (flowkit_solver("edm_heun", flow), 2),
    }
    peers = {
        "diffusers Euler": lambda: diffusers_solver("euler", post, path, knots),
        "diffusers DPMSolver++ 2M": lambda: diffusers_solver("dpmpp", post, path, knots, 2),
        "diffusers DPMSolver++ 3M": lambda: diffusers_solver("dpmpp", post, path, knots, 3),
        "diffusers UniPC bh2": lambda: diffusers_solver("unipc", post, path, knots, 2),
        "k-diffusion dpmpp_2m": lambda: k_diffusion_solver("dpmpp_2m", post, path, knots),
        "k-diffusion heun": lambda: k_diffusion_solver("heun", post, path, knots),
    }
    unavailable: dict[str, str] = {}
    for name, make in peers.items():
        try:
            solvers[name] = (make(), 2 if name.endswith("heun") else 1)
        except Exception as err:  # a peer that cannot run is reported, not hidden
            unavailable[name] = f"{type(err).__name__}: {err}"
    pairs = {"flowkit ddim": ["diffusers Euler"],
             "flowkit dpmpp_2m": ["diffusers DPMSolver++ 2M", "k-diffusion dpmpp_2m"],
             "flowkit dpmpp_3m": ["diffusers DPMSolver++ 3M"],
             "flowkit unipc": ["diffusers UniPC bh2"],
             "flowkit edm_heun": ["k-diffusion heun"]}

    rows: dict[str, dict[int, dict]] = {name: {} for name in solvers}
    samples: dict[tuple[str, int], Tensor] = {}
    for nfe in NFES:
        for name, (run, per_step) in solvers.items():
            steps = nfe // per_step
            post.calls = 0
            x = run(x1, steps)
            calls = post.calls
            samples[name, nfe] = x
            err = (x - ref.x).norm(dim=1)
            rows[name][nfe] = {"steps": steps, "nfe": calls, "max_error": float(err.max()),
                               "rms_error": float(err.pow(2).mean().sqrt()),
                               "log_density": float(marginal.log_prob(x).mean()), "ms_per_step": []}
    # the same method in two libraries gives the same samples up to rounding
    same = {f"{mine} | {peer}": {nfe: float((samples[mine, nfe] - samples[peer, nfe]).abs().max()) for nfe in NFES}
            for mine, theirs in pairs.items() for peer in theirs if peer in rows}
    # timing: interleaved rounds, the same model for everyone
    timing_nfe = (8,) if quick else (8, 20)
    for _ in range(rounds):
        for nfe in timing_nfe:
            for name, (run, per_step) in solvers.items():
                steps = nfe // per_step
                start = time.perf_counter()
                run(x1, steps)
                rows[name][nfe]["ms_per_step"].append(1e3 * (time.perf_counter() - start) / steps)
    for name in rows:
        for nfe in rows[name]:
            times = rows[name][nfe].pop("ms_per_step")
            rows[name][nfe]["ms_per_step"] = statistics.median(times) if times else None
    return {"machine": cpu_name(), "shared_machine": True, "n_samples": n, "timing_rounds": rounds,
            "problem": "2-D 5-component Gaussian mixture, exact x̂₀; VP β 0.1→20, t0 = 1e-3; Karras ρ=7 knots",
            "reference": {"solver": "dopri5 rtol=atol=1e-10", "nfe": ref.nfe,
                          "log_density": float(marginal.log_prob(ref.x).mean())},
            "nfes": list(NFES), "rows": rows, "pairs": pairs, "max_sample_difference": same,
            "unavailable": unavailable,
            "versions": _versions()}


# --------------------------------------------------------------------- part "trained"
#: the trained models: name → (recipe, overrides); every one trained for the same number of steps
TRAINED = {
    "score VP": ("recipes/score_vp_8gaussians.yaml", []),
    "CFM": ("recipes/cfm_8gaussians.yaml", []),
    "OT-CFM": ("recipes/otcfm_8gaussians.yaml", []),
    "rectified flow": ("recipes/reflow_8gaussians.yaml", ["objective.teacher={runs}/cfm"]),
    "consistency": ("recipes/consistency_8gaussians.yaml", ["objective.curriculum_steps={steps}"]),
    "MeanFlow": ("recipes/meanflow_8gaussians.yaml", []),
}


def _run_name(model: str) -> str:
    return model.lower().replace(" ", "_").replace("-", "")


def train_models(runs: Path, steps: int, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train every model of :data:`TRAINED` through flowkit's trainer into ``runs/<name>`` (a run
    that already has a checkpoint there is kept); returns the wall time and overrides of each."""
    import yaml

    from flowkit.checkpoint import find_intact_checkpoint

    info = {}
    for model, (recipe_file, extra) in TRAINED.items():
        run = runs / _run_name(model)
        overrides = [f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.sample_every=0",
                     "train.eval_every=0", "train.log_every=500", "train.threads=1"]
        overrides += [o.format(runs=runs, steps=steps) for o in extra]
        try:
            find_intact_checkpoint(run)
            log(f"{model}: reusing {run}")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            seconds = max((r["train_seconds"] for r in records if "train_seconds" in r), default=None)
            info[model] = {"run": str(run), "recipe": recipe_file, "overrides": overrides, "train_seconds": seconds,
                           "reused": True}
            continue
        except Exception:  # noqa: BLE001 - no run yet: train it
            pass
        recipe = yaml.safe_load((ROOT.parent / recipe_file).read_text())
        start = time.perf_counter()
        flowkit.train(recipe, run, overrides=overrides, overwrite=run.exists(), source=recipe_file,
                      progress=False, log=lambda *_: None)
        seconds = time.perf_counter() - start
        log(f"{model}: trained {steps} steps in {seconds:.0f} s -> {run}")
        info[model] = {"run": str(run), "recipe": recipe_file, "overrides": overrides, "train_seconds": seconds,
                       "reused": False}
    return info


#: the samplers of the trained part (NFE budgets set ``steps``; defaults otherwise: ``schedule="auto"``)
TRAINED_SAMPLERS = ("euler", "ddim", "dpmpp_2m", "unipc", "edm_heun", "flow_map", {"name": "flow_map", "renoise": True})
TRAINED_NFES = (1, 2, 4, 8, 16)


def run_trained(runs: Path, steps: int, n: int, seeds: int) -> dict:
    """Train (or reuse) the models, then :func:`flowkit.nfe_sweep.nfe_sweep` over them."""
    from flowkit.nfe_sweep import SweepModel, nfe_sweep

    torch.set_num_threads(1)
    start = time.perf_counter()
    training = train_models(runs, steps)
    train_wall = time.perf_counter() - start
    models = {name: SweepModel.from_built(flowkit.load_run(info["run"])[0]) for name, info in training.items()}
    start = time.perf_counter()
    sweep = nfe_sweep(models, TRAINED_SAMPLERS, TRAINED_NFES, n=n, seeds=tuple(range(seeds)), log=print)
    return {"machine": cpu_name(), "shared_machine": True, "steps": steps, "training": training,
            "train_wall_seconds": train_wall, "sweep_wall_seconds": time.perf_counter() - start, "sweep": sweep}


def _one_step_check(sweep) -> list[str]:
    """The issue's check: one-step models at NFE 1 and 2 against DPM-Solver++(2M) on the CFM model,
    and how close they come to the dopri5 reference."""
    def row(model: str, sampler: str, budget: Optional[int]):
        return next((r for r in sweep.rows if (r.model, r.sampler, r.budget) == (model, sampler, budget)
                     and r.status in ("ok", "reference")), None)

    lines = ["| NFE | model · sampler | energy distance | vs CFM · dpmpp_2m (difference / its SE) | "
             "× CFM dopri5 | × own dopri5 | beats DPM-Solver++? |", "|---" * 7 + "|"]
    cfm_ref = row("CFM", "dopri5", None)
    for budget in (1, 2):
        dpm = row("CFM", "dpmpp_2m", budget)
        for model in ("consistency", "MeanFlow"):
            for sampler in ("flow_map", "flow_map renoise=True"):
                r = row(model, sampler, budget)
                if r is None or dpm is None:
                    continue
                own = row(model, "dopri5", None)
                se = math.hypot(r.energy_distance_se, dpm.energy_distance_se)
                lines.append(
                    f"| {budget} | {model} · {sampler} | {r.energy_distance:.4f} ± {r.energy_distance_se:.4f} | "
                    f"{r.energy_distance - dpm.energy_distance:+.4f} "
                    f"({(r.energy_distance - dpm.energy_distance) / se:+.0f} SE; "
                    f"CFM · dpmpp_2m {dpm.energy_distance:.4f}) | "
                    f"{r.energy_distance / cfm_ref.energy_distance:.1f} | "
                    f"{'—' if own is None else f'{r.energy_distance / own.energy_distance:.1f}'} | "
                    f"{'yes' if r.energy_distance + 2 * se < dpm.energy_distance else 'no'} |")
    return lines


def write_trained(results: dict) -> None:
    sweep = results.pop("sweep")
    prefix = RESULTS / "few_step_trained"
    sweep.write(prefix, title="Few-step sampling of trained 2-D models (bench/few_step.py --part trained)")
    table = prefix.with_suffix(".md").read_text()
    head = ["# Few-step sampling of trained 2-D models (bench/few_step.py --part trained)", "",
            f"Machine: {results['machine']}, 2 cores shared with other jobs (timings indicative). "
            f"FFJORD's 8 Gaussians; every model trained by flowkit's trainer for {results['steps']} steps "
            f"(its recipe otherwise: `{'`, `'.join(sorted({v['recipe'] for v in results['training'].values()}))}`; "
            "rectified flow = 2-rectified flow of the CFM run, i.e. CFM steps + its own). "
            "Training seconds (trainer's own clock; rectified flow's includes its RK4 teacher solves, not the "
            "CFM teacher's training): " + ", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in results["training"].items()
                                                   if v.get("train_seconds") is not None)
            + f"; sweep {results['sweep_wall_seconds']:.0f} s. "
            "Samplers at their defaults (semi-linear solvers: `schedule=auto`, uniform knots on the straight "
            "cond_ot path, power knots on VP; EDM Heun: trailing knots on VP; `final=denoise`), NFE counted exactly "
            "(a Heun step costs 2; the budget is rounded down where a sampler cannot meet it). "
            "Seeds vary the prior noise and the test draw (one trained model each).", "",
            "## The one-step check", "",
            "One-step models at NFE 1 and 2 against DPM-Solver++(2M) at the same NFE on the CFM model of the same "
            "training budget (energy distance, mean ± SE over seeds; 'yes' when smaller by more than 2 SE of the "
            "difference), and the ratio to the dopri5 reference:", ""]
    head += _one_step_check(sweep) + [""]
    body = table.split("\n", 2)[2]  # the sweep's own title replaced by ours
    prefix.with_suffix(".md").write_text("\n".join(head) + "\n" + body)
    data = json.loads(prefix.with_suffix(".json").read_text())
    data.update({k: v for k, v in results.items()})
    prefix.with_suffix(".json").write_text(json.dumps(data, indent=1))


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "k_diffusion"):
        try:
            from importlib.metadata import version
            out[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "few_step_exact.json").write_text(json.dumps(results, indent=1))
    rows, nfes = results["rows"], results["nfes"]
    lines = ["# Few-step samplers, exact mixture score (bench/few_step.py --part exact)", "",
             f"Machine: {results['machine']} (shared with other jobs: timings are indicative). "
             f"{results['n_samples']} samples, float64, one thread. {results['problem']}. "
             f"Reference: {results['reference']['solver']} ({results['reference']['nfe']} NFE), "
             f"mean log p_t0 of its samples {results['reference']['log_density']:.4f}.", "",
             "## RMS endpoint error against the reference, by NFE", "",
             "| solver | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]['rms_error']:.2e}" for n in nfes) + " |")
    lines += ["", "## Max endpoint error", "", "| solver | " + " | ".join(str(n) for n in nfes) + " |",
              "|---" * (len(nfes) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]['max_error']:.2e}" for n in nfes) + " |")
    lines += ["", f"## Mean mixture log-density log p_t0 of the samples (reference "
              f"{results['reference']['log_density']:.4f})", "",
              "| solver | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[n]['log_density']:.4f}" for n in nfes) + " |")
    lines += ["", "## flowkit / peer: RMS error ratio by NFE (≤ 1: flowkit at least as accurate), and ms per step",
              "", "| flowkit | peer | " + " | ".join(str(n) for n in nfes) + " | ms/step flowkit | ms/step peer | "
              "time ratio |", "|---" * (len(nfes) + 5) + "|"]
    for mine, peers in results["pairs"].items():
        for peer in peers:
            if peer not in rows:
                continue
            ratios = [rows[mine][n]["rms_error"] / rows[peer][n]["rms_error"] for n in nfes]
            tm, tp = rows[mine][8]["ms_per_step"], rows[peer][8]["ms_per_step"]
            lines.append(f"| {mine} | {peer} | " + " | ".join(f"{r:.3f}" for r in ratios)
                         + f" | {tm:.2f} | {tp:.2f} | {tm / tp:.2f} |")
    lines += ["", "## Max |flowkit − peer| over the samples, by NFE (the same method: equal up to rounding)", "",
              "| pair | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for pair, diffs in results.get("max_sample_difference", {}).items():
        lines.append(f"| {pair} | " + " | ".join(f"{diffs[n]:.1e}" for n in nfes) + " |")
    lines += ["", "NFE counted by calls to the model (a Heun step costs two). ms per step at NFE 8, median of "
              f"{results['timing_rounds']} interleaved rounds; every solver calls the same closed-form model, "
              "so the time ratio is the solvers' own overhead plus the shared model time."]
    if results["unavailable"]:
        lines += ["", "## Peers that could not run", ""]
        lines += [f"- {k}: {v}" for k, v in results["unavailable"].items()]
    lines += ["", f"Versions: {results['versions']}"]
    (RESULTS / "few_step_exact.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("exact", "trained"), default="exact")
    parser.add_argument("--n", type=int, default=2000, help="samples")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="time at NFE 8 only")
    parser.add_argument("--runs", type=Path, default=ROOT.parent / "runs" / "few_step",
                        help="trained part: where the runs are trained (kept and reused)")
    parser.add_argument("--steps", type=int, default=6000, help="trained part: training steps of every model")
    parser.add_argument("--seeds", type=int, default=3, help="trained part: sampling seeds")
    args = parser.parse_args(argv)
    if args.part == "trained":
        write_trained(run_trained(args.runs, args.steps, args.n, args.seeds))
        print((RESULTS / "few_step_trained.md").read_text())
        return
    results = run_exact(args.n, args.rounds, args.quick)
    write(results)
    print((RESULTS / "few_step_exact.md").read_text())


if __name__ == "__main__":
    main()
