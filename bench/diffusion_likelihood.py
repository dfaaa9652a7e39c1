"""Likelihood of a diffusion model as a CNF: speed, NFE and error against a closed form.

A VP-SDE "model" whose score is the *exact* marginal score of a Gaussian mixture
(:func:`flowkit.gmm.mixture_score_field`) has an exactly known PF-ODE likelihood:
``log p_{t0}(x)``, the mixture carried to ``t0``. With the exact marginal ``p_{t1}`` as the
prior, every error is the ODE solver's (exact trace) or the solver's plus Hutchinson's
estimator noise. Problems: flowkit's ``gmm`` dataset (4 full-covariance components, seed 0) in
2 and 8 dimensions, ``N`` points drawn from ``p_{t0}``; dopri5 at ``rtol = atol = 1e-5``.

Compared, in one run on the same closed-form score ``s(x, t)`` (``t`` a ``[B]`` tensor, as
diffusion code calls it):

* flowkit — :func:`flowkit.score_log_likelihood`, exact trace (one vectorised VJP) and
  Hutchinson (Rademacher; several probes in one batched VJP), with the per-sample error norm
  (flowkit's default) and with torchdiffeq's batch-RMS norm;
* plain — PyTorch + torchdiffeq written here the straightforward way: the PF-ODE
  ``f x − ½ g² s`` and its divergence on a ``[B, D + 1]`` state, the exact trace by ``D``
  backward passes, Hutchinson by one VJP per probe, torchdiffeq's default norm;
* the reference figures measured for score_sde_pytorch's own likelihood function on this
  2-core CPU (one thread, N = 5,000; given in the issue; not run here).

    python bench/diffusion_likelihood.py                       # CPU, one thread, N = 1,000 and 5,000
    python bench/diffusion_likelihood.py --n 5000 --repeats 5 --dims 8
    python bench/diffusion_likelihood.py --device cuda --tag cuda
    python bench/diffusion_likelihood.py --profile             # cProfile of flowkit's 8-D Hutchinson case

Speed ratios are ``reference seconds / flowkit seconds`` (> 1: flowkit is faster). Results:
``bench/results/diffusion_likelihood[_TAG].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this script)
from flowkit.gmm import GaussianMixture, mixture_score_field  # noqa: E402
from flowkit.paths import VP  # noqa: E402

# score_sde_pytorch's likelihood function and a plain torch + torchdiffeq loop on this 2-core
# CPU, one thread, medians of several runs, rtol = atol = 1e-5, N = 5,000 (from the issue).
REFERENCE = {
    "score_sde_pytorch": {"hutchinson": {2: 0.74, 8: 1.31}, "exact": {2: 0.89, 8: 3.65}},
    "plain (issue)": {"hutchinson": {2: 0.45, 8: 0.95}, "exact": {2: 0.65, 8: 3.72}},
}
REFERENCE_N = 5000


# ----------------------------------------------------------------------------- problem
def make_problem(dim: int, n: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The ``gmm`` dataset's mixture, its exact VP score, ``N`` points of ``p_{t0}`` and refs."""
    data = flowkit.DATASETS.build("gmm", dim=dim, components=4, seed=0)
    gmm = GaussianMixture(data.means.to(device, dtype), data.covs.to(device, dtype),
                          data.weights.to(device, dtype))
    path = VP()
    start, end = gmm.marginal(path, path.t0), gmm.marginal(path, path.t1)
    x = start.sample(n, generator=torch.Generator(device=device).manual_seed(seed))
    field = mixture_score_field(gmm, path)

    def score_xt(x: Tensor, t: Tensor) -> Tensor:  # diffusion-codebase order, t of shape [B]
        return field(t, x)

    return path, x, score_xt, end, start.log_prob(x)


# ------------------------------------------------------------------ plain torch baseline
def plain_log_likelihood(score_xt: Callable, x: Tensor, prior, path: VP, *, estimator: str,
                         probes: Optional[Tensor], rtol: float, atol: float) -> tuple[Tensor, int]:
    """PF-ODE likelihood the straightforward way: ``[x, Δ]`` state, torchdiffeq's dopri5.

    ``dx/dt = −½β(t) x − ½β(t) s(x, t)`` (VP: ``f = −β/2``, ``g² = β``; Song et al. 2021,
    eq. 13), ``dΔ/dt = ∇·v``: exact by ``D`` backward passes, one per diagonal entry, or
    Hutchinson ``εᵀ (∂v/∂x) ε`` by one VJP per probe.
    """
    import torchdiffeq

    b, d = x.shape
    nfe = 0

    def func(t: Tensor, state: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            y = state[:, :d].detach().requires_grad_(True)
            beta = path.beta_min + t * (path.beta_max - path.beta_min)
            v = -0.5 * beta * (y + score_xt(y, torch.full((b,), float(t), dtype=y.dtype, device=y.device)))
            if estimator == "exact":
                div = torch.zeros(b, dtype=y.dtype, device=y.device)
                for i in range(d):
                    div = div + torch.autograd.grad(v[:, i].sum(), y, retain_graph=i < d - 1)[0][:, i]
            else:
                div = torch.zeros(b, dtype=y.dtype, device=y.device)
                for k, eps in enumerate(probes):
                    vjp = torch.autograd.grad(v, y, eps, retain_graph=k < len(probes) - 1)[0]
                    div = div + (vjp * eps).sum(1)
                div = div / len(probes)
        return torch.cat([v.detach(), div.detach()[:, None]], 1)

    state = torch.cat([x, x.new_zeros(b, 1)], 1)
    times = torch.tensor([path.t0, path.t1], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        out = torchdiffeq.odeint(func, state, times, rtol=rtol, atol=atol, method="dopri5")[-1]
    return prior.log_prob(out[:, :d]) + out[:, d], nfe


# ------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], tuple[Tensor, int]], repeats: int, device: str) -> tuple[list[float], Tensor, int]:
    times, out, nfe = [], None, 0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out, nfe = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out, nfe


def run_case(impl: str, estimator: str, n_probes: int, per_sample_norm: bool, dim: int, n: int,
             args) -> dict:
    dtype = getattr(torch, args.dtype)
    path, x, score_xt, prior, ref = make_problem(dim, n, dtype, args.device)
    probe_gen = torch.Generator(device=args.device).manual_seed(1)
    probes = None
    if estimator == "hutchinson":
        probes = flowkit.sample_probe(x, "rademacher", n_probes, generator=probe_gen)

    if impl == "flowkit":
        def fn():
            out = flowkit.score_log_likelihood(
                score_xt, x, path, estimator=estimator, n_probes=n_probes, rtol=args.rtol, atol=args.atol,
                per_sample_norm=per_sample_norm, prior=prior,
                generator=torch.Generator(device=args.device).manual_seed(1))
            return out.log_prob, out.nfe
    else:
        def fn():
            return plain_log_likelihood(score_xt, x, prior, path, estimator=estimator, probes=probes,
                                        rtol=args.rtol, atol=args.atol)

    times, log_prob, nfe = timed(fn, args.repeats, args.device)
    err = (log_prob - ref).double()
    return {
        "impl": impl, "estimator": estimator, "n_probes": n_probes if estimator == "hutchinson" else None,
        "norm": "per-sample" if per_sample_norm else "batch RMS", "dim": dim, "n": n,
        "seconds": statistics.median(times), "seconds_all": times, "nfe": nfe,
        "points_per_s": n / statistics.median(times),
        "max_abs_err": float(err.abs().max()), "mean_abs_err": float(err.abs().mean()),
        "mean_err": float(err.mean()), "nll": float(-log_prob.double().mean()), "nll_true": float(-ref.double().mean()),
    }


CASES = [  # (impl, estimator, n_probes, per_sample_norm)
    ("flowkit", "exact", 1, True),
    ("flowkit", "exact", 1, False),
    ("plain", "exact", 1, False),
    ("flowkit", "hutchinson", 1, True),
    ("flowkit", "hutchinson", 1, False),
    ("plain", "hutchinson", 1, False),
    ("flowkit", "hutchinson", 4, False),
    ("plain", "hutchinson", 4, False),
]


def divergence_micro(dim: int, n: int, args) -> dict:
    """Milliseconds per evaluation of ``(v, ∇·v)`` at one time, by strategy (the exact-trace
    design question): flowkit's :func:`flowkit.divergence` (batch replicated ``D`` times, one
    VJP), ``D`` backward passes on one forward, and one forward with one batched backward
    (``is_grads_batched`` over the one-hot basis); Hutchinson's one VJP for scale."""
    dtype = getattr(torch, args.dtype)
    path, x, score_xt, _, _ = make_problem(dim, n, dtype, args.device)
    field = flowkit.diffusion.probability_flow_field(flowkit.diffusion.xt_score_to_field(score_xt), path)
    t = torch.tensor(0.3, dtype=dtype, device=args.device)
    eye = torch.eye(dim, dtype=dtype, device=args.device)

    def replicate():
        return flowkit.divergence(field, t, x).div

    def backward_loop():
        y = x.detach().requires_grad_(True)
        out = field(t, y)
        return sum(torch.autograd.grad(out[:, i].sum(), y, retain_graph=i < dim - 1)[0][:, i] for i in range(dim))

    def batched_backward():
        y = x.detach().requires_grad_(True)
        out = field(t, y)
        rows = torch.autograd.grad(out, y, eye[:, None, :].expand(dim, n, dim), is_grads_batched=True)[0]
        return torch.diagonal(rows, dim1=0, dim2=2).sum(-1)

    probe = flowkit.sample_probe(x, "rademacher", 1)

    def hutchinson():
        return flowkit.divergence(field, t, x, estimator="hutchinson", probe=probe).div

    result = {"dim": dim, "n": n}
    for name, fn in (("flowkit_replicated", replicate), ("backward_loop", backward_loop),
                     ("batched_backward", batched_backward), ("hutchinson_1", hutchinson)):
        fn()
        times, _, _ = timed(lambda: (fn(), 0), max(5, args.repeats), args.device)
        result[name + "_ms"] = 1000 * statistics.median(times)
    return result


def machine(args) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "dtype": args.dtype, "rtol": args.rtol, "atol": args.atol, "repeats": args.repeats,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios(rows: list[dict], cpu: bool) -> list[dict]:
    """Speed of each flowkit case against the in-run plain loop and (on the CPU only) the
    issue's references."""
    out = []
    plain = {(r["estimator"], r["n_probes"], r["dim"], r["n"]): r for r in rows if r["impl"] == "plain"}
    for r in rows:
        if r["impl"] != "flowkit":
            continue
        entry = {k: r[k] for k in ("estimator", "n_probes", "norm", "dim", "n", "seconds")}
        p = plain.get((r["estimator"], r["n_probes"], r["dim"], r["n"]))
        entry["vs_plain_in_run"] = p["seconds"] / r["seconds"] if p else None
        if cpu and r["n"] == REFERENCE_N and (r["estimator"] == "exact" or r["n_probes"] == 1):
            for name, ref in REFERENCE.items():
                entry[f"vs_{name}"] = ref[r["estimator"]][r["dim"]] / r["seconds"]
        out.append(entry)
    return out


def markdown(info: dict, rows: list[dict], speed: list[dict], micro: list[dict]) -> str:
    load = info.get("load_average")
    load = ", load average " + ", ".join(f"{v:.1f}" for v in load) if load else ""
    lines = ["# Diffusion likelihood (PF-ODE of a VP model with the exact GMM score)", "",
             f"Machine: {info['cpu']} ({info['cores']} cores), {info['threads']} torch thread(s), "
             f"device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}, torch {info['torch']}, "
             f"{info['dtype']}, dopri5 rtol = atol = {info['rtol']:g}, median of {info['repeats']} runs"
             f"{load}.",
             "", "| D | N | impl | trace | probes | norm | s | points/s | NFE | max abs err | mean abs err | mean err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['n']} | {r['impl']} | {r['estimator']} | {r['n_probes'] or ''} | {r['norm']} "
                     f"| {r['seconds']:.3f} | {r['points_per_s']:,.0f} | {r['nfe']} | {r['max_abs_err']:.2e} "
                     f"| {r['mean_abs_err']:.2e} | {r['mean_err']:+.2e} |")
    lines += ["", "Speed-up of flowkit (reference seconds / flowkit seconds; > 1 is faster). The "
              "score_sde_pytorch and issue figures were measured at N = 5,000 on a 2-core CPU, one thread.", "",
              "| D | N | trace | probes | norm | flowkit s | vs plain (this run) | vs score_sde_pytorch | vs plain (issue) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in speed:
        def fmt(v):
            return f"{v:.2f}×" if v is not None else "—"
        lines.append(f"| {s['dim']} | {s['n']} | {s['estimator']} | {s['n_probes'] or ''} | {s['norm']} | {s['seconds']:.3f} "
                     f"| {fmt(s['vs_plain_in_run'])} | {fmt(s.get('vs_score_sde_pytorch'))} | {fmt(s.get('vs_plain (issue)'))} |")
    lines += ["", f"One evaluation of (v, ∇·v) at N = {REFERENCE_N} (milliseconds, median): exact trace by "
              "flowkit.divergence (batch replicated D times, one VJP), by D backward passes, and by one "
              "forward + one batched backward (is_grads_batched); Hutchinson with one probe.", "",
              "| D | flowkit replicated | D backward passes | batched backward | Hutchinson |", "|---|---|---|---|---|"]
    for m in micro:
        lines.append(f"| {m['dim']} | {m['flowkit_replicated_ms']:.1f} | {m['backward_loop_ms']:.1f} "
                     f"| {m['batched_backward_ms']:.1f} | {m['hutchinson_1_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def profile(args) -> None:
    import cProfile
    import pstats

    dtype = getattr(torch, args.dtype)
    for estimator in ("hutchinson", "exact"):
        path, x, score_xt, prior, _ = make_problem(args.profile_dim, REFERENCE_N, dtype, args.device)
        for impl in ("flowkit", "plain"):
            print(f"\n==== cProfile: {impl}, {estimator}, D = {args.profile_dim}, N = {REFERENCE_N}, batch-RMS norm ====")
            probes = flowkit.sample_probe(x, "rademacher", 1, generator=torch.Generator().manual_seed(1))

            def solve(points: Tensor) -> None:
                if impl == "flowkit":
                    flowkit.score_log_likelihood(score_xt, points, path, estimator=estimator, rtol=args.rtol,
                                                 atol=args.atol, per_sample_norm=False, prior=prior,
                                                 generator=torch.Generator().manual_seed(1))
                else:
                    plain_log_likelihood(score_xt, points, prior, path, estimator=estimator,
                                         probes=probes[:, : len(points)], rtol=args.rtol, atol=args.atol)

            solve(x[:64])  # warm-up: lazy imports and initialisation are not what we profile
            prof = cProfile.Profile()
            prof.enable()
            solve(x)
            prof.disable()
            stats = pstats.Stats(prof)
            stats.sort_stats("tottime").print_stats(15)
            stats.sort_stats("cumulative").print_stats(r"flowkit/(likelihood|divergence|diffusion|paths|solvers)", 25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    p.add_argument("--n", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--only", choices=["flowkit", "plain"], default=None, help="run one implementation")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--profile", action="store_true", help="cProfile flowkit and plain, then exit")
    p.add_argument("--profile-dim", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return 0
    info = machine(args)
    # warm-up: first calls pay for lazy initialisation (autograd, torchdiffeq tables, CUDA context)
    for impl, est, k, psn in CASES:
        args_warm = argparse.Namespace(**{**vars(args), "repeats": 1})
        run_case(impl, est, k, psn, min(args.dims), 64, args_warm)
    rows = []
    for dim in args.dims:
        for n in args.n:
            for impl, est, k, psn in CASES:
                if args.only and impl != args.only:
                    continue
                r = run_case(impl, est, k, psn, dim, n, args)
                rows.append(r)
                print(f"D={dim} N={n:5d} {impl:8s} {est:10s} probes={str(r['n_probes'] or ''):2s} "
                      f"{r['norm']:10s} {r['seconds']:7.3f} s  {r['points_per_s']:9,.0f} pts/s  NFE {r['nfe']:4d}  "
                      f"max|err| {r['max_abs_err']:.2e}  mean err {r['mean_err']:+.2e}", flush=True)
    speed = ratios(rows, cpu=args.device == "cpu")
    micro = [divergence_micro(dim, REFERENCE_N, args) for dim in args.dims]
    for m in micro:
        print("divergence per evaluation (ms):", {k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "diffusion_likelihood" + (f"_{args.tag}" if args.tag else "")
    reference = {k: {e: {str(d): sec for d, sec in v.items()} for e, v in r.items()} for k, r in REFERENCE.items()}
    result = {"machine": info, "reference": reference, "reference_n": REFERENCE_N, "rows": rows, "speed": speed,
              "divergence_micro": micro}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(info, rows, speed, micro)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
