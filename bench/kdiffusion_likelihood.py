r"""A random diffusers ``UNet2DModel`` on the 8×8 digits: flowkit's bits/dim against k-diffusion's.

The check of issue 15: the *same* network, scored by flowkit and by k-diffusion's
``sampling.log_likelihood``, gives the same log-likelihood per point to the solver tolerance.

The model. A randomly initialised ``UNet2DModel`` (1 channel, 8×8, ``block_out_channels =
(8, 16)``, fixed seed, float64) with a ``DDPMScheduler`` config (1,000 linear-β timesteps,
``prediction_type = "epsilon"``): a DDPM ε-model ``ε̂(x_vp, τ)``.

The same model in k-diffusion's convention. k-diffusion wants a VE denoiser ``D(x, σ)``
(``x = y + σ n``). A VP state is ``x_vp = α x_ve`` with ``σ_ve = σ_vp/α``, so
(Karras et al. 2022, eq. 4 with ``s(t) = α_t``; Ho et al. 2020, eq. 4)

.. math::  D(x, \sigma) = x - \sigma\, \hat\varepsilon\Big(\frac{x}{\sqrt{1+\sigma^2}},\, \tau(\sigma)\Big),
           \qquad \frac{1 - \bar\alpha(\tau)}{\bar\alpha(\tau)} = \sigma^2 ,

with ``τ(σ)`` the fractional timestep at which flowkit's :class:`~flowkit.adapters.DDPMPath`
(the continuous ``ᾱ`` through the scheduler's discrete ``ᾱ_n``) has ``log ᾱ = −log(1 + σ²)``,
found on its monotone interpolant (knot interval, then Newton: :class:`TimestepOfSigma`). So
the ε-network is fed exactly the ``(x_vp, τ)`` that :func:`flowkit.adapters.from_diffusers` feeds
it along the same trajectory: one continuous model, not two discretisations of it.

Three routes, one ODE. With ``σ_min = σ_ve(t0 = 1/N) = sqrt(β_0/(1 − β_0))`` and ``σ_max =
σ_ve(t1 = 1) = sqrt((1 − ᾱ_{N−1})/ᾱ_{N−1})`` — the σ range of the DDPM's own timesteps —

* ``k-diffusion``: ``log_likelihood(D, x, σ_min, σ_max, atol, rtol)``: the EDM ODE
  ``dx/dσ = (x − D)/σ`` in σ, torchdiffeq dopri5 (its default error norm: RMS over the whole batch, the larger
  of the ``x`` and ``Δ`` parts), **Hutchinson with one
  Rademacher probe drawn from torch's global generator** (it has no exact trace), prior
  ``N(0, σ_max² I)``;
* ``flowkit EDM``: :func:`flowkit.adapters.from_edm` of the same ``D`` over the same
  ``[σ_min, σ_max]`` (geometric clock ``σ_t = σ_min (σ_max/σ_min)^t``, same prior) — the same
  model and the same ODE as k-diffusion: **the comparison of the check**;
* ``flowkit VP``: :func:`flowkit.adapters.from_diffusers` of the UNet and scheduler, the
  probability-flow ODE of ``x_vp`` in VP time ``t ∈ [1/N, 1]``. ``x_ve = x_vp/α_t`` maps its
  trajectories onto the EDM ones; the divergence picks up ``D α̇/α`` (exactly, for a Rademacher
  probe too: ``vᵀ(A + cI)v = vᵀAv + cD``), which integrates to ``D log(α_1/α_0)``; the data
  model ``α_0^D p_{t0}(α_0 x)`` (:mod:`flowkit.dequantise`) cancels the ``α_0`` and its prior
  ``N(0, I)`` on ``x_vp`` is ``N(0, (1 + σ_max²) I)`` on ``x_ve``. So VP = EDM with the prior
  ``N(0, (1 + σ_max²) I)``; the analytic prior difference (evaluated at the EDM route's latent)
  is added before comparing. Over any other σ range the two routes are different ODE
  segments and do not agree.

All three use the same dequantised points (uniform dequantisation of the digits' 17 levels,
bins centred on ``−1 + 2k/16``: :class:`flowkit.dequantise.Quantisation.centred`) and the
**same probe**: flowkit's :func:`~flowkit.dequantise.discrete_log_likelihood` draws the
dequantisation noise and then the probe from one generator; k-diffusion's global generator is
set to that generator's state after the noise, so its ``torch.randint_like(x, 2) * 2 − 1`` is
the same probe (checked). The difference per point is then the solvers' alone. Tolerance
``rtol = atol`` (default 1e-6) on both sides, float64.

Also reported: flowkit's exact trace (``--exact-points`` points; k-diffusion cannot), against
the Hutchinson mean of ``--draws`` probe draws per point of k-diffusion (mean ± standard error
over draws) — unbiased, so they agree within a few standard errors.

The random UNet's sinusoidal timestep embedding has frequencies ``1, 0.1, 0.01, 0.001`` per
timestep; untrained, the output oscillates in τ with a period of ``2π`` timesteps, and an
adaptive solver needs thousands of steps to follow it (a trained model is smooth in τ). The
bench zeroes, at initialisation, the time-MLP weights reading the two fastest frequencies
(``--keep-fast-time`` keeps them): still a random ``UNet2DModel`` called the diffusers way, and
the same network on both sides. (diffusers computes the timestep embedding in float32, so the
network is a function of ``τ`` rounded to float32 on every route alike.)

Timing: the three routes run interleaved (``--repeats`` extra rounds), one thread; NFE is
k-diffusion's ``fevals`` and flowkit's ``nfe``.

    python bench/kdiffusion_likelihood.py               # 32 points, rtol = atol = 1e-6, ~3 min
    python bench/kdiffusion_likelihood.py --points 64 --tol 1e-5

Results: ``bench/results/kdiffusion_likelihood.{md,json}``.

References:
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS. (k-diffusion: github.com/crowsonkb/k-diffusion.)
    Ho, Jain, Abbeel (2020). Denoising Diffusion Probabilistic Models. NeurIPS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchinfo import cpu_name  # noqa: E402

from flowkit.adapters import DDPMPath, from_diffusers, from_edm  # noqa: E402
from flowkit.data_real import Digits  # noqa: E402
from flowkit.dequantise import Quantisation, discrete_log_likelihood  # noqa: E402
from flowkit.trace import sample_probe  # noqa: E402

F64 = torch.float64
RESULTS = Path(__file__).resolve().parent / "results"
LN2 = math.log(2.0)
COMPARISONS = ("flowkit EDM vs k-diffusion (same ODE, same prior, same probe)",
               "flowkit VP vs flowkit EDM (EDM prior shifted to N(0, 1+σ_max²))",
               "flowkit VP vs k-diffusion (prior shifted)")


# ----------------------------------------------------------------------------- k-diffusion
def load_kdiffusion_sampling() -> types.ModuleType:
    """``k_diffusion/sampling.py`` loaded by file path.

    The package's ``__init__`` imports torchvision (absent here), so a stub package with the
    one helper ``sampling.py`` takes from ``k_diffusion.utils`` (``append_dims``) is put in
    ``sys.modules`` first; the sampling module itself is k-diffusion's file, unmodified.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("k-diffusion is not installed: pip install --no-deps k-diffusion")
    root = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x: Tensor, target_dims: int) -> Tensor:
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    file_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", root / "sampling.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules["k_diffusion.sampling"] = module
    file_spec.loader.exec_module(module)
    return module


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------- the model
def random_unet(seed: int, keep_fast_time: bool) -> Any:
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    if not keep_fast_time:
        # positional embedding of width 8, flip_sin_to_cos: columns [cos f_0..f_3, sin f_0..f_3],
        # f_i = 10000^(−i/4) = 1, 0.1, 0.01, 0.001 per timestep; drop the two fastest
        with torch.no_grad():
            w = unet.time_embedding.linear_1.weight
            half = w.shape[1] // 2
            for i in (0, 1):
                w[:, i] = 0.0
                w[:, half + i] = 0.0
    return unet.to(F64).eval().requires_grad_(False)


def scheduler_config() -> dict[str, Any]:
    return {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "epsilon"}


class TimestepOfSigma:
    """Fractional timestep ``τ`` with ``log ᾱ(t) = −log(1 + σ²)`` on the path's monotone
    interpolant: the knot interval by binary search, linear interpolation inside it, then Newton
    steps on the cubic (``d log ᾱ/dt = −β(t)``), float64; one solve per distinct σ in the batch."""

    def __init__(self, path: DDPMPath, newton_steps: int = 4) -> None:
        self.path, self.newton_steps = path, newton_steps
        self.grid = torch.linspace(0.0, 1.0, path.num_train_timesteps + 1, dtype=F64)
        self.neg_log_abar = -path.log_alpha_bar(self.grid)  # increasing in t

    def __call__(self, sigma: Tensor) -> Tensor:
        values, inverse = torch.unique(sigma.detach().to(F64), return_inverse=True)
        target = torch.log1p(values * values)  # = −log ᾱ at the wanted time
        i = torch.searchsorted(self.neg_log_abar, target).clamp(1, self.grid.numel() - 1)
        lo, hi = self.neg_log_abar[i - 1], self.neg_log_abar[i]
        t = self.grid[i - 1] + (self.grid[i] - self.grid[i - 1]) * (target - lo) / (hi - lo)
        for _ in range(self.newton_steps):
            t = t - (-self.path.log_alpha_bar(t) - target) / self.path.beta(t)
        return self.path.timestep(t)[inverse]


def edm_denoiser(unet: Any, path: DDPMPath) -> Callable[[Tensor, Tensor], Tensor]:
    """``D(x, σ) = x − σ ε̂(x/sqrt(1+σ²), τ(σ))``: the ε-model in k-diffusion's VE convention."""

    timestep_of_sigma = TimestepOfSigma(path)

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.to(x.dtype)
        tau = timestep_of_sigma(sigma)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return x - s * unet(x / torch.sqrt(1 + s * s), tau).sample

    return denoise


# ----------------------------------------------------------------------------- routes
def prior_shift(z: Tensor, var_from: float, var_to: float) -> Tensor:
    """``log N(z; 0, var_to I) − log N(z; 0, var_from I)`` per sample."""
    sq, d = z.flatten(1).pow(2).sum(1), z[0].numel()
    return -0.5 * sq * (1 / var_to - 1 / var_from) - 0.5 * d * math.log(var_to / var_from)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=32, help="digits test points (same-probe comparison)")
    parser.add_argument("--tol", type=float, default=1e-6, help="rtol = atol of both solvers")
    parser.add_argument("--repeats", type=int, default=1, help="extra interleaved timing rounds")
    parser.add_argument("--exact-points", type=int, default=2, help="points for flowkit's exact trace")
    parser.add_argument("--draws", type=int, default=64, help="k-diffusion probe draws per exact-trace point")
    parser.add_argument("--tight-points", type=int, default=4, help="points rerun at tol/100 (convergence)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-fast-time", action="store_true",
                        help="keep the random UNet's fastest timestep frequencies (thousands of steps)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kdiffusion_likelihood")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kd = load_kdiffusion_sampling()

    unet = random_unet(args.seed, args.keep_fast_time)
    cfg = scheduler_config()
    flow_vp = from_diffusers(unet, cfg)
    path = flow_vp.path
    ends = torch.tensor([flow_vp.t0, flow_vp.t1], dtype=F64)
    sigma_min, sigma_max = (path.sigma(ends) / path.alpha(ends)).tolist()
    denoiser = edm_denoiser(unet, path)
    flow_edm = from_edm(denoiser, (1, 8, 8), sigma_min=sigma_min, sigma_max=sigma_max)

    # the wrap is the same model: D at σ(t) equals x − σ ε̂ of the VP flow's own call
    check_x = torch.randn(3, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    t_mid = torch.tensor(0.37, dtype=F64)
    a_mid, s_mid = float(path.alpha(t_mid)), float(path.sigma(t_mid))
    sig = torch.full((3,), s_mid / a_mid, dtype=F64)
    with torch.no_grad():
        d_wrapped = denoiser(check_x / a_mid, sig)
        eps_vp = unet(check_x, path.timestep(t_mid).expand(3)).sample
    wrap_error = float((d_wrapped - (check_x / a_mid - sig[0] * eps_vp)).abs().max())
    tau_grid = torch.linspace(0.0011, 1.0, 997, dtype=F64)
    tau_error = float((TimestepOfSigma(path)(path.sigma(tau_grid) / path.alpha(tau_grid))
                       - path.timestep(tau_grid)).abs().max())

    digits = Digits().test
    k = digits[: args.points].long()
    quant = Quantisation.centred(17, -1.0, 1.0)
    dim = k[0].numel()
    log_w = math.log(quant.width)
    dequant_seed = args.seed + 100
    routes = {"k-diffusion": None, "flowkit EDM": flow_edm, "flowkit VP": flow_vp}

    def points(kk: Tensor) -> tuple[Tensor, Tensor, bool]:
        """The dequantised points and the generator state after them (where the probe comes from),
        drawn as :func:`~flowkit.dequantise.discrete_log_likelihood` draws them."""
        gen = torch.Generator().manual_seed(dequant_seed)
        xx = quant.uniform(kk, gen)
        state = gen.get_state()
        torch.default_generator.set_state(state)
        kd_probe = torch.randint_like(xx, 2) * 2 - 1  # what k-diffusion's log_likelihood draws
        same = bool(torch.equal(kd_probe, sample_probe(xx, generator=torch.Generator().set_state(state))[0]))
        return xx, state, same

    def run(name: str, kk: Tensor, tol: float) -> tuple[Tensor, int, float, Tensor]:
        """(log P bound per point in nats, NFE, seconds, latent) of one route, Hutchinson, same probe."""
        flow = routes[name]
        if flow is None:
            xx, state, _ = points(kk)
            torch.default_generator.set_state(state)
            start = time.perf_counter()
            ll, info = kd.log_likelihood(denoiser, xx, sigma_min, sigma_max, atol=tol, rtol=tol)
            seconds = time.perf_counter() - start
            return ll.detach() + dim * log_w, int(info["fevals"]), seconds, torch.empty(0)
        start = time.perf_counter()
        out = discrete_log_likelihood(flow, kk, quant, estimator="hutchinson",
                                      generator=torch.Generator().manual_seed(dequant_seed), rtol=tol, atol=tol)
        seconds = time.perf_counter() - start
        return out.log_prob, int(out.nfe.max()), seconds, out.z

    x, _, same_probe = points(k)
    results: dict[str, dict[str, Any]] = {name: {"seconds": [], "nfe": []} for name in routes}
    values: dict[str, Tensor] = {}
    latents: dict[str, Tensor] = {}
    for _ in range(1 + args.repeats):  # interleaved rounds
        for name in routes:
            v, nfe, sec, z = run(name, k, args.tol)
            values[name], latents[name] = v, z
            results[name]["seconds"].append(sec)
            results[name]["nfe"].append(nfe)
            print(f"{name:12s} {sec:7.2f} s  NFE {nfe:5d}  bpd {float(-v.mean() / (dim * LN2)):.6f}", flush=True)

    def shift_of(z: Tensor) -> Tensor:
        """The VP route's prior is N(0, (1 + σ_max²) I) in the EDM space: the change to the EDM
        and k-diffusion values (at the EDM route's latent) that makes them the VP route's ODE."""
        return prior_shift(z.reshape(z.shape[0], -1), sigma_max**2, 1 + sigma_max**2)

    def compare(a: Tensor, b: Tensor) -> dict[str, float]:
        diff = (a - b).abs()
        return {"max_nats": float(diff.max()), "mean_nats": float(diff.mean()),
                "max_bpd": float(diff.max() / (dim * LN2)), "mean_bpd": float(diff.mean() / (dim * LN2)),
                "max_relative": float((diff / b.abs()).max())}

    def comparisons_of(vals: dict[str, Tensor], shift: Tensor) -> dict[str, dict[str, float]]:
        return {COMPARISONS[0]: compare(vals["flowkit EDM"], vals["k-diffusion"]),
                COMPARISONS[1]: compare(vals["flowkit VP"], vals["flowkit EDM"] + shift),
                COMPARISONS[2]: compare(vals["flowkit VP"], vals["k-diffusion"] + shift)}

    shift = shift_of(latents["flowkit EDM"])
    comparisons = comparisons_of(values, shift)
    for name, c in comparisons.items():
        print(f"{name}: max {c['max_nats']:.3g} nats ({c['max_bpd']:.3g} bpd), mean {c['mean_nats']:.3g} nats, "
              f"max rel {c['max_relative']:.3g}")

    # convergence: on the first points, each route at the tolerance and at 1/100 of it (same probe)
    tight: dict[str, Any] = {}
    if args.tight_points > 0:
        kt = k[: args.tight_points]
        runs = {tol: {name: run(name, kt, tol) for name in routes} for tol in (args.tol, args.tol / 100)}
        loose, fine = ({n: r[0] for n, r in runs[tol].items()} for tol in (args.tol, args.tol / 100))
        tight = {"points": args.tight_points, "tol": args.tol / 100,
                 "nfe": {n: r[1] for n, r in runs[args.tol / 100].items()},
                 "comparisons": comparisons_of(fine, shift_of(runs[args.tol / 100]["flowkit EDM"][3])),
                 "loose_comparisons_same_points": comparisons_of(loose, shift_of(runs[args.tol]["flowkit EDM"][3])),
                 "loose_error_vs_tight": {n: compare(loose[n], fine[n]) for n in routes}}
        for name, c in tight["comparisons"].items():
            print(f"{name}: max {tight['loose_comparisons_same_points'][name]['max_nats']:.3g} nats at tol "
                  f"{args.tol:g}, {c['max_nats']:.3g} at {args.tol / 100:g}")
        for name, c in tight["loose_error_vs_tight"].items():
            print(f"{name} at tol {args.tol:g} vs itself at {args.tol / 100:g}: max {c['max_nats']:.3g} nats")

    # exact trace (flowkit) against the Hutchinson mean over probe draws (k-diffusion)
    exact: dict[str, Any] = {}
    if args.exact_points > 0:
        ke, xe = k[: args.exact_points], x[: args.exact_points]
        start = time.perf_counter()
        out = discrete_log_likelihood(flow_edm, ke, quant, estimator="exact",
                                      generator=torch.Generator().manual_seed(dequant_seed),
                                      rtol=args.tol, atol=args.tol)
        exact_seconds = time.perf_counter() - start
        torch.manual_seed(args.seed + 7)  # k-diffusion's probes: one per row of the repeated batch
        start = time.perf_counter()
        ll, info = kd.log_likelihood(denoiser, xe.repeat(args.draws, 1, 1, 1), sigma_min, sigma_max,
                                     atol=args.tol, rtol=args.tol)
        kd_seconds = time.perf_counter() - start
        stack = ll.detach().reshape(args.draws, args.exact_points) + dim * log_w
        mean, se = stack.mean(0), stack.std(0) / math.sqrt(args.draws)
        z_score = (out.log_prob - mean) / se
        exact = {"points": args.exact_points, "draws": args.draws, "flowkit_exact_nats": out.log_prob.tolist(),
                 "kdiffusion_mean_nats": mean.tolist(), "kdiffusion_se_nats": se.tolist(), "z": z_score.tolist(),
                 "flowkit_exact_seconds": exact_seconds, "flowkit_exact_nfe": int(out.nfe.max()),
                 "kdiffusion_seconds": kd_seconds, "kdiffusion_nfe": int(info["fevals"])}
        for i in range(args.exact_points):
            print(f"point {i}: flowkit exact {float(out.log_prob[i]):.4f} nats, k-diffusion Hutchinson mean "
                  f"{float(mean[i]):.4f} ± {float(se[i]):.4f} (z = {float(z_score[i]):+.2f})")

    summary = {
        "machine": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": package_version("diffusers"), "k_diffusion": package_version("k-diffusion"),
        "threads": 1, "shared_machine": True,
        "points": len(k), "dim": dim, "tol": args.tol, "seed": args.seed, "keep_fast_time": args.keep_fast_time,
        "sigma_min": sigma_min, "sigma_max": sigma_max, "same_probe": same_probe,
        "wrap_check_max_abs": wrap_error, "timestep_inversion_error": tau_error,
        "tolerance_scale_nats": args.tol * (1 + float(values["k-diffusion"].abs().mean())),
        "prior_shift_nats": {"max_abs": float(shift.abs().max()), "mean": float(shift.mean())},
        "bpd": {name: float(-values[name].mean() / (dim * LN2)) for name in routes},
        "bpd_se_points": {name: float(values[name].std() / math.sqrt(len(k)) / (dim * LN2)) for name in routes},
        "timing": results, "comparisons": comparisons, "tight": tight, "exact_vs_hutchinson_mean": exact,
        "command": " ".join(["python", *sys.argv]),
    }
    same_ode = comparisons[COMPARISONS[0]]["max_nats"]
    summary["check"] = {"same_ode_max_nats": same_ode, "tolerance_scale_nats": summary["tolerance_scale_nats"],
                        "passed": bool(same_probe and wrap_error < 1e-10
                                       and same_ode <= summary["tolerance_scale_nats"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(f"wrote {args.out.with_suffix('.json')} and .md")
    verdict = "PASSED" if summary["check"]["passed"] else "FAILED"
    print(f"check {verdict}: flowkit EDM vs k-diffusion max |Δ log p| = {same_ode:.3g} nats, tolerance scale "
          f"{summary['tolerance_scale_nats']:.3g} nats")
    if not summary["check"]["passed"]:
        raise SystemExit(1)


def markdown(r: dict[str, Any]) -> str:
    """The results as a short report."""
    lines = [
        "# flowkit vs k-diffusion: log-likelihood of a random diffusers UNet2DModel on the 8×8 digits", "",
        f"Machine: {r['machine']} (shared with other jobs), one thread; Python {r['python']}, torch {r['torch']}, "
        f"diffusers {r['diffusers']}, k-diffusion {r['k_diffusion']}. Command: `{r['command']}`.", "",
        f"Model: random `UNet2DModel` (8×8×1, block_out_channels (8, 16), seed {r['seed']}, float64"
        + ("" if r["keep_fast_time"] else "; time-MLP weights of the two fastest timestep frequencies zeroed")
        + "), DDPM ε-prediction, 1,000 linear-β timesteps. "
        f"{r['points']} digits test points, uniform dequantisation of 17 levels (bins centred on −1 + 2k/16), "
        f"D = {r['dim']}. σ range of the DDPM's timesteps: σ_min = {r['sigma_min']:.6g}, "
        f"σ_max = {r['sigma_max']:.6g}. dopri5, rtol = atol = {r['tol']:g}, Hutchinson with the **same** "
        f"Rademacher probe on every route (checked: {r['same_probe']}). Wrapped D vs the VP call: "
        f"max |Δ| = {r['wrap_check_max_abs']:.2g}; timestep inversion error {r['timestep_inversion_error']:.2g}.", "",
        "| route | bits/dim (± se over points) | seconds | NFE |", "|---|---|---|---|"]
    for name, bpd in r["bpd"].items():
        t = r["timing"][name]
        secs = ", ".join(f"{s:.2f}" for s in t["seconds"])
        nfe = ", ".join(str(n) for n in t["nfe"])
        lines.append(f"| {name} | {bpd:.6f} ± {r['bpd_se_points'][name]:.3f} | {secs} | {nfe} |")
    lines += ["", "Per point |Δ log p| (tolerance scale atol + rtol·|log p| ≈ "
              f"{r['tolerance_scale_nats']:.2g} nats; prior shift VP↔EDM: "
              f"max {r['prior_shift_nats']['max_abs']:.2g} nats):",
              "", "| comparison | max nats | mean nats | max bits/dim | mean bits/dim | max relative |",
              "|---|---|---|---|---|---|"]
    for name, c in r["comparisons"].items():
        lines.append(f"| {name} | {c['max_nats']:.3g} | {c['mean_nats']:.3g} | {c['max_bpd']:.3g} | "
                     f"{c['mean_bpd']:.3g} | {c['max_relative']:.3g} |")
    c0 = r["comparisons"][COMPARISONS[0]]
    lines += ["", f"**Check {'passed' if r['check']['passed'] else 'FAILED'}**: on the same model, the same ODE "
              f"(σ ∈ [σ_min, σ_max]), the same prior N(0, σ_max² I) and the same probe, flowkit and k-diffusion "
              f"differ by at most {c0['max_nats']:.2g} nats ({c0['max_bpd']:.2g} bits/dim) per point, below the "
              f"tolerance scale {r['tolerance_scale_nats']:.2g} nats, and the difference shrinks with the "
              "tolerance (below). The VP route (flowkit's `from_diffusers`, VP time) is the same ODE after "
              "x_ve = x_vp/α_t, σ = σ_t/α_t, with the prior N(0, I) on x_vp = N(0, (1 + σ_max²) I) on x_ve; "
              "its residual difference is its own solver error (VP time is the less even clock: its error at "
              "the tolerance is the largest of the three and falls with it). Timing is one thread on a shared "
              "machine; flowkit's per-sample error norm takes more steps than k-diffusion's batch norm "
              "(torchdiffeq's default: RMS over the whole batch), which lets single points carry more error."]
    if r["tight"]:
        t = r["tight"]
        lines += ["", f"Convergence, first {t['points']} points: the same comparisons at rtol = atol = {t['tol']:g} "
                  f"(NFE {', '.join(f'{n} {v}' for n, v in t['nfe'].items())}), and each route's error at "
                  f"{r['tol']:g} measured against itself at {t['tol']:g}:", "",
                  f"| comparison | max nats at {r['tol']:g} | max nats at {t['tol']:g} |", "|---|---|---|"]
        for name, c in t["comparisons"].items():
            lines.append(f"| {name} | {t['loose_comparisons_same_points'][name]['max_nats']:.3g} | "
                         f"{c['max_nats']:.3g} |")
        for name, c in t["loose_error_vs_tight"].items():
            lines.append(f"| {name} at {r['tol']:g} vs itself at {t['tol']:g} | {c['max_nats']:.3g} | — |")
    if r["exact_vs_hutchinson_mean"]:
        e = r["exact_vs_hutchinson_mean"]
        lines += ["", f"Exact trace (flowkit EDM route; {e['flowkit_exact_seconds']:.1f} s, NFE "
                  f"{e['flowkit_exact_nfe']}) against the mean of k-diffusion's Hutchinson estimate over "
                  f"{e['draws']} probe draws per point ({e['kdiffusion_seconds']:.1f} s, NFE {e['kdiffusion_nfe']}); "
                  "k-diffusion has no exact trace:", "",
                  "| point | flowkit exact (nats) | k-diffusion mean ± se (nats) | z |", "|---|---|---|---|"]
        for i in range(e["points"]):
            lines.append(f"| {i} | {e['flowkit_exact_nats'][i]:.4f} | {e['kdiffusion_mean_nats'][i]:.4f} ± "
                         f"{e['kdiffusion_se_nats'][i]:.4f} | {e['z'][i]:+.2f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
