"""Likelihood of a diffusion model as a CNF: speed, NFE and error against a closed form.

A VP-SDE "model" whose score is the *exact* marginal score of a Gaussian mixture has an
exactly known PF-ODE likelihood: ``log p_{t0}(x)``, the mixture carried to ``t0``. With the
exact marginal ``p_{t1}`` as the prior, every error is the ODE solver's (exact trace) or the
solver's plus Hutchinson's estimator noise. Problems: flowkit's ``gmm`` dataset (4
full-covariance components, seed 0) in 2 and 8 dimensions, ``N`` points drawn from ``p_{t0}``;
dopri5 at ``rtol = atol = 1e-5``.

The score: the mixture's exact VP marginal score with **one time per sample**
(:func:`vp_mixture_score`, from the eigendecomposition ``Σ_k = U_k Λ_k U_kᵀ``, so
``α²Σ_k + σ²I = U_k (α²Λ_k + σ²) U_kᵀ`` costs no factorisation per time). Every variant calls
this same ``s(x, t)`` (``t`` a ``[B]`` tensor, as diffusion code calls it), so the score costs
every variant the same, as a neural score network's ``[B]`` time input would. It agrees with
:func:`flowkit.gmm.mixture_score_field` to rounding (checked at start-up), which now takes the
same eigen form at distinct times; before, it factorised ``B × K`` covariances per call (the
"distinct t" column of the score-call table of runs made then: 61 ms at D = 8, N = 5,000).

Compared, interleaved (round-robin over the variants, ``--repeats`` rounds), one thread:

* ``flowkit per-sample steps`` — the candidate default: :func:`flowkit.solvers_per_sample.odeint_per_sample`
  (every sample its own time, step and error test; finished samples retire) on the augmented
  PF-ODE ``[x, Δ]`` built here (:func:`per_sample_log_likelihood`: flowkit's
  :func:`flowkit.diffusion.probability_flow_field` and :func:`flowkit.divergence`, exact trace or
  Hutchinson with the probe rows of the active samples). A direct driver: it skips the one-off
  field checks of :func:`flowkit.log_likelihood`, whose cost is measured on its own
  (``checks``: ``score_log_likelihood`` with one Euler step) and added in the ratios
  ("+ checks");
* ``flowkit default`` — :func:`flowkit.score_log_likelihood` as shipped: shared steps with the
  per-sample error norm; ``flowkit batch RMS`` — the same with torchdiffeq's batch-RMS norm;
* ``score_sde_pytorch`` — yang-song/score_sde_pytorch's own ``likelihood.get_likelihood_fn``
  (scipy RK45, one Rademacher probe; Hutchinson only), imported at run time from a snapshot
  written by ``git show`` into ``bench/.peers/`` (ignored by git; ``--peer-git`` names the
  mirror), fed the same score as a continuous-time VP model on ``[B, D, 1, 1]`` "images";
* ``plain`` — PyTorch + torchdiffeq written here the straightforward way (the same algorithm:
  ``[x, Δ]`` state, dopri5 with torchdiffeq's default norm, exact trace by ``D`` backward
  passes, Hutchinson by one VJP): the peer for the exact trace, which score_sde_pytorch lacks.

    python bench/diffusion_likelihood.py                       # CPU, one thread, N = 1,000 and 5,000
    python bench/diffusion_likelihood.py --n 5000 --repeats 5 --dims 8
    python bench/diffusion_likelihood.py --device cuda --tag cuda
    python bench/diffusion_likelihood.py --render-only            # the .md again from the stored .json

Speed ratios are ``peer seconds / flowkit seconds`` (> 1: flowkit is faster). Results:
``bench/results/diffusion_likelihood[_TAG].json`` and ``.md``.
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
from typing import Callable, Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this script)
from flowkit.diffusion import probability_flow_field, xt_score_to_field  # noqa: E402
from flowkit.gmm import GaussianMixture, mixture_score_field  # noqa: E402
from flowkit.paths import VP  # noqa: E402
from flowkit.solvers import PerSampleTimeField, SolverSpec  # noqa: E402
from flowkit.solvers_per_sample import odeint_per_sample  # noqa: E402

PEERS = ROOT / "bench" / ".peers"
PEER_GIT = Path("/work/.mirror/yang-song+score_sde_pytorch/repo")
PEER_FILES = ("likelihood.py", "sde_lib.py", "models/__init__.py", "models/utils.py")
# the issue's table (score_sde_pytorch, N = 5,000, Hutchinson, this 2-core CPU, one thread)
ISSUE = {"score_sde_pytorch": {2: 0.59, 8: 1.05}, "flowkit default": {2: 0.72, 8: 1.29}}


# ----------------------------------------------------------------------------- problem
def vp_mixture_score(gmm: GaussianMixture, path: VP) -> Callable[[Tensor, Tensor], Tensor]:
    r"""The exact score ``∇ log p_t(x)`` of ``gmm`` carried along ``path``, as ``s(x, t)`` with
    ``t`` a ``[B]`` tensor (distinct times allowed).

    ``p_t = Σ_k w_k N(α_t μ_k, α_t² Σ_k + σ_t² I)`` and ``Σ_k = U_k diag(λ_k) U_kᵀ`` give, with
    ``z = U_kᵀ (x − α μ_k)`` and ``v = α² λ_k + σ²``: ``log N = −½ Σ z²/v − ½ Σ log v − D/2 log 2π``
    and ``s = −Σ_k r_k U_k (z / v)``, ``r_k`` the responsibilities.
    """
    lam, vecs = torch.linalg.eigh(gmm.covs.double())
    lam, vecs = lam.to(gmm.covs.dtype), vecs.to(gmm.covs.dtype)
    means, log_w, dim = gmm.means, gmm.weights.log(), gmm.dim

    def score(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        alpha, sigma = path.alpha(t)[:, None, None], path.sigma(t)[:, None, None]
        z = torch.einsum("kji,bkj->bki", vecs, x[:, None, :] - alpha * means)  # [B, K, D]
        var = alpha**2 * lam + sigma**2  # [B, K, D]
        white = z / var
        log_n = -0.5 * (z * white).sum(-1) - 0.5 * var.log().sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        resp = torch.softmax(log_w + log_n, -1)  # [B, K]
        return -torch.einsum("kij,bkj->bi", vecs, resp[..., None] * white)

    return score


def make_problem(dim: int, n: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The ``gmm`` dataset's mixture, its exact VP score, ``N`` points of ``p_{t0}`` and refs."""
    data = flowkit.DATASETS.build("gmm", dim=dim, components=4, seed=0)
    gmm = GaussianMixture(data.means.to(device, dtype), data.covs.to(device, dtype),
                          data.weights.to(device, dtype))
    path = VP()
    start, end = gmm.marginal(path, path.t0), gmm.marginal(path, path.t1)
    x = start.sample(n, generator=torch.Generator(device=device).manual_seed(seed))
    return path, x, vp_mixture_score(gmm, path), end, start.log_prob(x), gmm


def check_score(dim: int, args) -> float:
    """Largest difference between :func:`vp_mixture_score` and flowkit's ``mixture_score_field``
    at distinct times (float64), relative to the score's size."""
    path, x, score_xt, _, _, gmm = make_problem(dim, 512, torch.float64, args.device)
    t = torch.rand(512, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(args.device) * 0.999 + 1e-3
    ref = mixture_score_field(gmm, path)(t, x)
    return float((score_xt(x, t) - ref).abs().max() / ref.abs().max())


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


# --------------------------------------------------------------- flowkit, per-sample steps
def per_sample_log_likelihood(score_xt: Callable, x: Tensor, prior, path: VP, *, estimator: str,
                              probes: Optional[Tensor], rtol: float, atol: float) -> dict:
    """``log p_{t0}(x)`` with per-sample step control: the augmented PF-ODE ``[x, Δ]`` with one
    time per sample, ``d/dt [x, Δ] = [v(t_b, x), ∇·v]`` (Song et al. 2021, eq. 13 and D.2),
    ``v`` flowkit's :func:`~flowkit.diffusion.probability_flow_field` and ``∇·v`` flowkit's
    :func:`~flowkit.divergence`; the Hutchinson probes of the active rows are ``probes[:, rows]``."""
    b, d = x.shape
    velocity = probability_flow_field(xt_score_to_field(score_xt), path)

    def augmented(t: Tensor, state: Tensor, rows: Tensor) -> Tensor:
        y = state[:, :d]
        out = flowkit.divergence(lambda _t, z: velocity(t, z), t, y, estimator=estimator,
                                 probe=None if probes is None else probes[:, rows])
        return torch.cat([out.dx.detach(), out.div.detach()[:, None]], 1)

    spec = SolverSpec("dopri5", rtol=rtol, atol=atol, per_sample_norm=True, step_control="per_sample")
    with torch.no_grad():
        sol = odeint_per_sample(PerSampleTimeField(augmented), torch.cat([x, x.new_zeros(b, 1)], 1),
                                [path.t0, path.t1], spec)
    out = sol.ys[-1]
    steps = (sol.accepted + sol.rejected).double()
    return {"log_prob": prior.log_prob(out[:, :d]) + out[:, d], "nfe": sol.nfe,
            "evals_per_sample": sol.sample_evals / b, "evals_source": "solver", "mean_steps": float(steps.mean()),
            "max_steps": int(steps.max()), "min_steps": int(steps.min())}


# ----------------------------------------------------------------------------- score_sde_pytorch
def load_peer(git_dir: Path):
    """score_sde_pytorch's ``likelihood`` and ``sde_lib`` modules, from ``git show`` of the
    mirror's HEAD into ``bench/.peers/score_sde_pytorch`` (a ``.gitignore`` of ``*`` keeps the
    folder out of git). Returns ``(likelihood, sde_lib, commit)`` or raises with the reason."""
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    dest = PEERS / "score_sde_pytorch"
    (dest / "models").mkdir(parents=True, exist_ok=True)
    (PEERS / ".gitignore").write_text("*\n")
    for name in PEER_FILES:
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (dest / name).write_text(text)
    sys.path.insert(0, str(dest))
    try:
        import likelihood as peer_likelihood  # noqa: WPS433  (score_sde_pytorch/likelihood.py)
        import sde_lib as peer_sde_lib
    finally:
        sys.path.remove(str(dest))
    return peer_likelihood, peer_sde_lib, commit


class _EpsModel(torch.nn.Module):
    """The closed-form score as a score_sde "continuous" VP model: ``model(x, labels)`` with
    ``labels = 999 t`` returns ``−σ_t s(x, t)`` (``get_score_fn`` divides by ``−σ_t``)."""

    def __init__(self, score_xt: Callable, sde) -> None:
        super().__init__()
        self.score_xt, self.sde = score_xt, sde

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        t = labels / 999
        std = self.sde.marginal_prob(torch.zeros_like(x), t)[1]
        return -std[:, None, None, None] * self.score_xt(x.flatten(1), t).reshape(x.shape)


def peer_log_likelihood(peer, score_xt: Callable, x: Tensor, prior, path: VP, *, rtol: float, atol: float) -> dict:
    """score_sde_pytorch's ``likelihood_fn`` (Rademacher Hutchinson, scipy RK45) on ``x`` as
    ``[B, D, 1, 1]``; its bits/dim are turned back into ``Δ = log p − log prior_sde(z)`` and the
    exact prior is used, as for the other variants (its probes: ``torch.manual_seed(1)``)."""
    lik, sde_lib, _ = peer
    sde = sde_lib.VPSDE(beta_min=path.beta_min, beta_max=path.beta_max, N=1000)
    fn = lik.get_likelihood_fn(sde, lambda v: v, hutchinson_type="Rademacher", rtol=rtol, atol=atol,
                               method="RK45", eps=path.t0)
    b, d = x.shape
    torch.manual_seed(1)
    bpd, z, nfe = fn(_EpsModel(score_xt, sde), x.reshape(b, d, 1, 1))
    offset = 7.0 - (-1.0)  # likelihood_fn's "offset = 7 - inverse_scaler(-1)", identity scaler
    log_p_sde = -(bpd.double() - offset) * d * math.log(2)
    delta = log_p_sde - sde.prior_logp(z).double()
    return {"log_prob": prior.log_prob(z.reshape(b, d)).double() + delta, "nfe": int(nfe),
            "evals_per_sample": float(nfe), "evals_source": "shared steps", "mean_steps": None}


# ------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: (name, estimator): the compared variants; ``hutchinson`` uses one Rademacher probe
VARIANTS = [
    ("flowkit per-sample steps", "exact"), ("flowkit default", "exact"), ("flowkit batch RMS", "exact"),
    ("plain", "exact"),
    ("flowkit per-sample steps", "hutchinson"), ("flowkit default", "hutchinson"),
    ("flowkit batch RMS", "hutchinson"), ("plain", "hutchinson"), ("score_sde_pytorch", "hutchinson"),
    ("checks", "hutchinson"), ("checks", "exact"),
]


def likelihood_counts(out, batch: int, *, shared_steps: bool) -> dict:
    """What a :class:`flowkit.likelihood.Likelihood` says the solve did: sample evaluations per
    sample and, for a per-sample solve, each sample's steps (accepted + rejected).

    ``score_log_likelihood`` runs the per-sample solver at its defaults, where the batched
    calls (``nfe``) say nothing about the evaluations per sample; the result carries the
    solver's counts only from the change to :mod:`flowkit.likelihood` that adds
    ``sample_evals`` and ``steps`` to it. Until then they are recorded as unknown (None), never
    replaced by ``nfe`` — except where the settings force shared steps (``shared_steps``: the
    batch-RMS norm, a fixed-step method), whose every call evaluates every sample.
    """
    sample_evals = getattr(out, "sample_evals", None)  # fields of the proposed Likelihood
    steps = getattr(out, "steps", None)
    if sample_evals is None and shared_steps:
        sample_evals, source = out.nfe * batch, "shared steps"
    else:
        source = None if sample_evals is None else "solver"
    counts: dict = {"evals_per_sample": None if sample_evals is None else sample_evals / batch,
                    "evals_source": source, "mean_steps": None}
    if steps is not None:
        steps = steps.double()
        counts.update(mean_steps=float(steps.mean()), min_steps=int(steps.min()), max_steps=int(steps.max()))
    return counts


def variant_fn(name: str, estimator: str, problem, args, peer) -> Callable[[], dict]:
    path, x, score_xt, prior, _, _ = problem
    probes = flowkit.sample_probe(x, "rademacher", 1, generator=torch.Generator(device=args.device).manual_seed(1)) \
        if estimator == "hutchinson" else None
    if name == "flowkit per-sample steps":
        return lambda: per_sample_log_likelihood(score_xt, x, prior, path, estimator=estimator, probes=probes,
                                                 rtol=args.rtol, atol=args.atol)
    if name in ("flowkit default", "flowkit batch RMS", "checks"):
        settings = {"method": "euler", "steps": 1} if name == "checks" else \
            {"rtol": args.rtol, "atol": args.atol, "per_sample_norm": name == "flowkit default"}

        def run() -> dict:
            out = flowkit.score_log_likelihood(score_xt, x, path, estimator=estimator, n_probes=1, prior=prior,
                                               generator=torch.Generator(device=args.device).manual_seed(1),
                                               **settings)
            return {"log_prob": out.log_prob, "nfe": out.nfe,
                    **likelihood_counts(out, x.shape[0], shared_steps=name != "flowkit default")}
        return run
    if name == "plain":
        def run() -> dict:
            lp, nfe = plain_log_likelihood(score_xt, x, prior, path, estimator=estimator, probes=probes,
                                           rtol=args.rtol, atol=args.atol)
            return {"log_prob": lp, "nfe": nfe, "evals_per_sample": float(nfe), "evals_source": "shared steps",
                    "mean_steps": None}
        return run
    if name == "score_sde_pytorch":
        return lambda: peer_log_likelihood(peer, score_xt, x, prior, path, rtol=args.rtol, atol=args.atol)
    raise ValueError(name)


def run_block(dim: int, n: int, args, peer) -> list[dict]:
    """All variants at one (D, N), interleaved: ``repeats`` rounds, each running every variant once."""
    dtype = getattr(torch, args.dtype)
    problem = make_problem(dim, n, dtype, args.device)
    ref = problem[4]
    variants = [v for v in VARIANTS if (peer is not None or v[0] != "score_sde_pytorch")
                and (args.only is None or v[0] in args.only)]
    fns = {v: variant_fn(*v, problem, args, peer) for v in variants}
    times: dict = {v: [] for v in variants}
    last: dict = {}
    for _ in range(args.repeats):
        for v in variants:
            _sync(args.device)
            start = time.perf_counter()
            last[v] = fns[v]()
            _sync(args.device)
            times[v].append(time.perf_counter() - start)
    rows = []
    for (name, est) in variants:
        out = last[(name, est)]
        err = (out["log_prob"].double() - ref.double())
        sec = statistics.median(times[(name, est)])
        row = {"impl": name, "estimator": est, "dim": dim, "n": n, "seconds": sec, "seconds_all": times[(name, est)],
               "nfe": out["nfe"], "evals_per_sample": out["evals_per_sample"], "evals_source": out.get("evals_source"),
               "mean_steps": out.get("mean_steps"),
               "steps_min_max": (out.get("min_steps"), out.get("max_steps")) if out.get("mean_steps") else None,
               "max_abs_err": float(err.abs().max()), "mean_abs_err": float(err.abs().mean()),
               "mean_err": float(err.mean()), "nll": float(-out["log_prob"].double().mean()),
               "nll_true": float(-ref.double().mean()), "load_after": os.getloadavg()}
        rows.append(row)
        if name != "checks":
            steps = f"{row['mean_steps']:6.1f}" if row["mean_steps"] else "     —"
            evals = "     ?" if row["evals_per_sample"] is None else f"{row['evals_per_sample']:6.1f}"
            print(f"D={dim} N={n:5d} {name:25s} {est:10s} {sec:7.3f} s  calls {row['nfe']:4d}  evals/sample "
                  f"{evals}  steps/sample {steps}  max|err| {row['max_abs_err']:.2e}  "
                  f"mean err {row['mean_err']:+.2e}", flush=True)
    return rows


def score_micro(dim: int, n: int, args) -> dict:
    """Milliseconds per score call at N points: this bench's eigen-form score and flowkit's
    ``mixture_score_field``, at one time and at distinct times."""
    dtype = getattr(torch, args.dtype)
    path, x, score_xt, _, _, gmm = make_problem(dim, n, dtype, args.device)
    field = mixture_score_field(gmm, path)
    same = torch.full((n,), 0.3, dtype=dtype, device=args.device)
    distinct = torch.linspace(0.01, 1.0, n, dtype=dtype, device=args.device)
    out = {"dim": dim, "n": n}
    for label, fn in (("eigen", lambda t: score_xt(x, t)), ("mixture_score_field", lambda t: field(t, x))):
        for tl, t in (("same_t", same), ("distinct_t", distinct)):
            fn(t)
            reps = []
            for _ in range(5):
                start = time.perf_counter()
                fn(t)
                reps.append(time.perf_counter() - start)
            out[f"{label}_{tl}_ms"] = 1000 * statistics.median(reps)
    return out


def machine(args) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "dtype": args.dtype, "rtol": args.rtol, "atol": args.atol, "repeats": args.repeats,
            "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios(rows: list[dict]) -> list[dict]:
    """Speed of flowkit's variants against the peers of the same (D, N, estimator): score_sde_pytorch
    (Hutchinson) and the plain loop; the per-sample driver also with the checks' time added."""
    out = []
    by = {(r["impl"], r["estimator"], r["dim"], r["n"]): r for r in rows}
    for r in rows:
        if not r["impl"].startswith("flowkit"):
            continue
        key = (r["estimator"], r["dim"], r["n"])
        entry = {"impl": r["impl"], "estimator": r["estimator"], "dim": r["dim"], "n": r["n"], "seconds": r["seconds"]}
        checks = by.get(("checks", *key))
        if r["impl"] == "flowkit per-sample steps" and checks:
            entry["seconds_with_checks"] = r["seconds"] + checks["seconds"]
        for peer in ("score_sde_pytorch", "plain"):
            p = by.get((peer, *key))
            entry[f"vs_{peer}"] = p["seconds"] / r["seconds"] if p else None
            if p and "seconds_with_checks" in entry:
                entry[f"vs_{peer}_with_checks"] = p["seconds"] / entry["seconds_with_checks"]
        out.append(entry)
    return out


def evals_per_sample(row: dict) -> Optional[float]:
    """A row's sample evaluations per sample, or None where the run did not record them.

    Rows written before ``evals_source`` was recorded stored ``nfe`` there for ``flowkit default``,
    which runs the per-sample solver: that is its batched calls, not a per-sample count."""
    if "evals_source" not in row and row["impl"] == "flowkit default":
        return None
    return row["evals_per_sample"]


def markdown(info: dict, rows: list[dict], speed: list[dict], micro: list[dict], checks: dict) -> str:
    def load(v):
        return ", ".join(f"{x:.1f}" for x in v) if v else "?"

    lines = ["# Diffusion likelihood (PF-ODE of a VP model with the exact GMM score)", "",
             f"Machine: {info['cpu']} ({info['cores']} cores, **shared with other jobs**), {info['threads']} torch "
             f"thread(s), device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}, torch "
             f"{info['torch']}, {info['dtype']}, dopri5 / RK45 rtol = atol = {info['rtol']:g}; variants interleaved "
             f"round-robin, median of {info['repeats']} rounds. Load average (1, 5, 15 min) at the start "
             f"{load(info['load_average_start'])}, at the end {load(info.get('load_average_end'))}.",
             f"score_sde_pytorch: {info.get('peer', 'not run')}.", "",
             "Columns: seconds (median of the rounds; with two rounds their mean) and each round's own; batched "
             "field calls (NFE); sample evaluations per sample, as the solver counted them (= NFE with shared "
             "steps; \"?\": not recorded); per-sample steps (accepted + rejected, per-sample solver: mean "
             "[min–max]); error of log p per point against the closed form (nats).", "",
             "| D | N | impl | trace | s | s per round | NFE (calls) | evals / sample | steps / sample | max abs err "
             "| mean abs err | mean err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    unrecorded = False
    for r in rows:
        if r["impl"] == "checks":
            continue
        evals = evals_per_sample(r)
        unrecorded = unrecorded or evals is None
        steps = f"{r['mean_steps']:.1f} [{r['steps_min_max'][0]}–{r['steps_min_max'][1]}]" if r["mean_steps"] else "—"
        rounds = ", ".join(f"{v:.2f}" for v in r.get("seconds_all", []))
        lines.append(f"| {r['dim']} | {r['n']} | {r['impl']} | {r['estimator']} | {r['seconds']:.3f} | {rounds} "
                     f"| {r['nfe']} | {'?' if evals is None else f'{evals:.1f}'} | {steps} | {r['max_abs_err']:.2e} "
                     f"| {r['mean_abs_err']:.2e} | {r['mean_err']:+.2e} |")
    if unrecorded:
        lines += ["", "\"?\": `flowkit default` is `score_log_likelihood` as shipped, which runs the per-sample "
                  "solver (one time per sample, finished samples retired), so its batched calls are not its "
                  "evaluations per sample; the result object it returns (`flowkit.likelihood.Likelihood`) did not "
                  "carry the solver's per-sample counts in this run, so they were not recorded."]
    lines += ["", "Speed-up of flowkit (peer seconds / flowkit seconds; > 1 is faster). \"+ checks\": the "
              "per-sample driver's time plus the one-off field checks of `flowkit.log_likelihood` "
              "(`score_log_likelihood` with one Euler step: " + ", ".join(
                  f"D={k[0]} N={k[1]} {k[2]}: {v * 1000:.0f} ms" for k, v in checks.items()) + ").", "",
              "| D | N | trace | flowkit variant | s | vs score_sde_pytorch | vs plain | vs score_sde_pytorch + checks "
              "| vs plain + checks |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v):
        return f"{v:.2f}×" if v is not None else "—"

    for s in speed:
        lines.append(f"| {s['dim']} | {s['n']} | {s['estimator']} | {s['impl']} | {s['seconds']:.3f} "
                     f"| {fmt(s.get('vs_score_sde_pytorch'))} | {fmt(s.get('vs_plain'))} "
                     f"| {fmt(s.get('vs_score_sde_pytorch_with_checks'))} | {fmt(s.get('vs_plain_with_checks'))} |")
    lines += ["", "One score call (milliseconds, median of 5): this bench's eigen-form closed-form score and "
              "`flowkit.gmm.mixture_score_field`, all points at one time and at distinct times.", "",
              "| D | N | eigen, one t | eigen, distinct t | mixture_score_field, one t | mixture_score_field, distinct t |",
              "|---|---|---|---|---|---|"]
    for m in micro:
        lines.append(f"| {m['dim']} | {m['n']} | {m['eigen_same_t_ms']:.2f} | {m['eigen_distinct_t_ms']:.2f} "
                     f"| {m['mixture_score_field_same_t_ms']:.2f} | {m['mixture_score_field_distinct_t_ms']:.2f} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (names of VARIANTS)")
    p.add_argument("--peer-git", default=str(PEER_GIT), help="git directory of a score_sde_pytorch mirror")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--render-only", action="store_true",
                   help="re-render the .md from the stored .json (same --out/--tag) without running anything")
    args = p.parse_args(argv)
    if args.render_only:
        return render_only(args)
    torch.set_num_threads(args.threads)
    info = machine(args)
    try:
        peer = load_peer(Path(args.peer_git))
        info["peer"] = f"yang-song/score_sde_pytorch@{peer[2][:12]} (likelihood.py, sde_lib.py, models/utils.py)"
    except Exception as err:  # noqa: BLE001 - the bench reports why the peer did not run
        peer = None
        info["peer"] = f"not run: {type(err).__name__}: {err}"
    print("peer:", info["peer"])
    info["score_check"] = {d: check_score(d, args) for d in args.dims}
    print("eigen-form score vs mixture_score_field (max relative difference):", info["score_check"])
    # warm-up: first calls pay for lazy initialisation (autograd, torchdiffeq tables, scipy)
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    run_block(min(args.dims), 64, warm, peer)
    rows: list[dict] = []
    micro: list[dict] = []
    for dim in args.dims:
        for n in args.n:
            rows += run_block(dim, n, args, peer)
            md = write(args, info, rows, micro, partial=True)  # a run cut short still leaves its blocks
    micro = [score_micro(dim, 5000, args) for dim in args.dims]
    md = write(args, info, rows, micro, partial=False)
    print()
    print(md)
    return 0


def render(result: dict) -> str:
    """The markdown report of a result (what :func:`write` stores as JSON)."""
    rows = result["rows"]
    checks = {(r["dim"], r["n"], r["estimator"]): r["seconds"] for r in rows if r["impl"] == "checks"}
    md = markdown(result["machine"], rows, ratios(rows), result["score_micro"], checks)
    if result["machine"].get("partial"):
        md += "\n**Partial run**: the blocks above only (the run was stopped before the end).\n"
    return md


def result_paths(args) -> tuple[Path, Path]:
    """``bench/results/diffusion_likelihood[_TAG].json`` and ``.md`` (under ``--out``)."""
    stem = Path(args.out) / ("diffusion_likelihood" + (f"_{args.tag}" if args.tag else ""))
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def write(args, info: dict, rows: list[dict], micro: list[dict], *, partial: bool) -> str:
    """Write ``bench/results/diffusion_likelihood[_TAG].{json,md}`` (``partial``: blocks so far)."""
    info = {**info, "load_average_end": os.getloadavg(), "partial": partial}
    result = {"machine": info, "issue_table": ISSUE, "rows": rows, "speed": ratios(rows), "score_micro": micro}
    json_path, md_path = result_paths(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md = render(result)
    md_path.write_text(md)
    return md


def render_only(args) -> int:
    """Re-render the markdown from the stored JSON (no timing run); exit 2 if there is none."""
    json_path, md_path = result_paths(args)
    if not json_path.is_file():
        print(f"--render-only: no results at {json_path}; run the bench first (or pass --out / --tag)",
              file=sys.stderr)
        return 2
    result = json.loads(json_path.read_text())
    md = render(result) + ("\nRe-rendered from the stored JSON by `--render-only` (no timing rerun): the figures "
                           "are those of the run, made with the code of its time.\n")
    md_path.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
