"""Flow-matching benchmark: flowkit's ``cfm`` objective against TorchCFM, I-CFM and OT-CFM.

Both sides train the same network — a 3×64 SiLU MLP on ``[x, t]`` (flowkit's
``dynamics: {name: mlp, hidden: [64, 64, 64]}``) — from N(0, I) to FFJORD's 8 Gaussians
(flowkit's dataset and sampler for both), batch 256, Adam 1e-3, for ``--steps`` steps in one
process and one thread, and are evaluated by the same flowkit code:

* ms per step: median over 50-step windows, excluding the first two; flowkit runs through its
  own trainer (``flowkit.train``, windows from ``metrics.jsonl``), TorchCFM through a plain
  loop around ``ConditionalFlowMatcher`` / ``ExactOptimalTransportConditionalFlowMatcher``.
  The machine is shared, so the reported figures are medians over ``--timing-rounds`` rounds
  in which the variants run in turn for ``--timing-steps`` steps each;
* energy distance and sliced W2 of 5,000 dopri5 samples (1e-5) against 5,000 test points,
  and the sampler's NFE;
* test NLL (nats) by dopri5 at 1e-5 with the exact divergence, and its NFE per batch.

TorchCFM's model learns ``u(t_fm, x)`` with noise at ``t_fm = 0``; it is evaluated as the
flowkit field ``v(t, x) = −u(1 − t, x)``. TorchCFM is a benchmark-only dependency, installed
without touching torch: ``pip install torchcfm --no-deps && pip install pot``. When it cannot
be imported, the same algorithms are run by an in-run plain-PyTorch loop (POT or SciPy for the
OT plan) and the results say so.

flowkit's trainer uses Adam's fused kernel (``fused=True``) where torch has one; the peer's
loop uses the default Adam as TorchCFM's examples do. Two diagnostic columns isolate where
the time goes: the peer's loop with the fused Adam (like-for-like optimiser, so the
remaining ratio is flowkit's objective and trainer overhead), and the ``cfm`` objective in
a bare PyTorch loop with the default Adam (no trainer).

    python bench/flow_matching.py                        # 2,000 steps, both algorithms
    python bench/flow_matching.py --steps 300 --nll-n 2000 --methods icfm

Results: ``bench/results/flow_matching.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this script)
from flowkit.config import EvalConfig  # noqa: E402
from flowkit.flow import Flow, StandardNormal  # noqa: E402

RECIPES = {"icfm": "cfm_8gaussians", "otcfm": "otcfm_8gaussians"}
# Measured by the issue on this 2-core CPU (TorchCFM and plain PyTorch, 2,000 steps).
REFERENCE = {"icfm": {"ms_per_step": 1.5, "energy_distance": 0.019, "nll": 3.97},
             "otcfm": {"ms_per_step": 9.7, "energy_distance": 0.006, "nll": 3.85, "ot_ms": 6.6}}
WINDOW = 50


# ---------------------------------------------------------------------------- flowkit
def train_flowkit(method: str, steps: int, seed: int, out: Path) -> tuple[Flow, dict]:
    recipe = flowkit.load_recipe(ROOT / f"recipes/{RECIPES[method]}.yaml", [
        f"train.steps={steps}", "train.batch_size=256", "train.lr=1e-3", f"train.seed={seed}",
        f"train.log_every={WINDOW}", "train.checkpoint_every=0", "train.sample_every=0", "train.eval_every=0"])
    run = out / f"flowkit_{method}_seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    flowkit.train(recipe, run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [1000.0 / r["it_per_s"] for r in records[2:]] or [1000.0 / records[-1]["it_per_s"]]
    built, _ = flowkit.load_run(run, ema=False)
    return built.objective.flow(), {"ms_per_step": statistics.median(windows), "final_loss": records[-1]["loss"]}


def bare_flowkit_loop(method: str, steps: int, seed: int) -> dict:
    """The ``cfm`` objective, Adam and the data sampler in a plain loop (no trainer)."""
    torch.manual_seed(seed)
    built = flowkit.build(flowkit.load_recipe(ROOT / f"recipes/{RECIPES[method]}.yaml"))
    obj = built.objective
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)

    def step() -> torch.Tensor:
        x, _ = built.dataset.train_batch(256, gen)
        loss = obj(x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return {"ms_per_step": timed_steps(step, steps)[0]}


def timed_steps(step, steps: int) -> tuple[float, torch.Tensor]:
    """Run ``step()`` ``steps`` times: the median ms per step over windows of ``WINDOW`` steps
    (the first two windows dropped when there are more), and the last step's loss."""
    windows, start = [], time.perf_counter()
    for k in range(1, steps + 1):
        loss = step()
        if k % WINDOW == 0:
            now = time.perf_counter()
            windows.append(1000.0 * (now - start) / WINDOW)
            start = now
    return statistics.median(windows[2:] or windows), loss


# ------------------------------------------------------------------------------- peer
def peer_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip([3, 64, 64], [64, 64, 64]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(64, 2))


def peer_pairing(method: str):
    """``(x0_noise, x1_data) -> (t, x_t, u_t)`` from TorchCFM, or the in-run fallback."""
    try:
        from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                        ExactOptimalTransportConditionalFlowMatcher)

        cls = ConditionalFlowMatcher if method == "icfm" else ExactOptimalTransportConditionalFlowMatcher
        matcher = cls(sigma=0.0)
        return matcher.sample_location_and_conditional_flow, "torchcfm " + _version("torchcfm")
    except ImportError:
        pass

    def plan_pairs(x0, x1):
        cost = torch.cdist(x0, x1).square().double().numpy()
        try:
            import ot

            plan = ot.emd(ot.unif(len(x0)), ot.unif(len(x1)), cost)
            flat = torch.multinomial(torch.from_numpy(plan).flatten(), len(x0), replacement=True)
            return x0[flat // len(x1)], x1[flat % len(x1)]
        except ImportError:
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(cost)
            return x0[rows], x1[cols]

    def pairing(x0, x1):
        if method == "otcfm":
            x0, x1 = plan_pairs(x0, x1)
        t = torch.rand(len(x0))
        return t, (1 - t[:, None]) * x0 + t[:, None] * x1, x1 - x0

    return pairing, "plain PyTorch fallback (torchcfm not importable)"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def train_peer(method: str, steps: int, seed: int, fused: bool = False) -> tuple[Flow, dict]:
    torch.manual_seed(seed)
    net = peer_mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, **({"fused": True} if fused else {}))
    pairing, label = peer_pairing(method)
    data = flowkit.data.get_dataset("8gaussians")
    gen = torch.Generator().manual_seed(seed)

    def step() -> torch.Tensor:
        x1, _ = data.train_batch(256, gen)
        x0 = torch.randn_like(x1)
        t, xt, ut = pairing(x0, x1)
        loss = ((net(torch.cat([xt, t[:, None]], -1)) - ut) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    ms_per_step, loss = timed_steps(step, steps)

    def velocity(t, x, cond=None):  # flowkit time: data at 0, so v(t, x) = −u(1 − t, x)
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return -net(torch.cat([x, 1 - tt], -1))

    return Flow(velocity=velocity, prior=StandardNormal((2,))), {
        "ms_per_step": ms_per_step, "final_loss": float(loss.detach()), "peer": label}


def time_ot(method: str, seed: int, repeats: int = 30) -> dict:
    """Pairing cost alone for one batch of 256: flowkit's coupling (the solver ``auto`` picks,
    and the pure-torch one for reference) vs the peer's."""
    if method != "otcfm":
        return {}
    from flowkit.couplings import ExactOT
    from flowkit.ot import compiled_auction_available

    data = flowkit.data.get_dataset("8gaussians")
    gen = torch.Generator().manual_seed(seed)
    pairing, _ = peer_pairing(method)
    coupling, torch_only = ExactOT(), ExactOT(method="ipm")
    ours, torch_ours, theirs = [], [], []
    for _ in range(repeats):
        x, _ = data.train_batch(256, gen)
        z = torch.randn(256, 2, generator=gen)
        for fn, times in ((lambda: coupling(x, z), ours), (lambda: torch_only(x, z), torch_ours),
                          (lambda: pairing(z, x), theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"flowkit_ot_ms": 1000 * statistics.median(ours), "flowkit_torch_ot_ms": 1000 * statistics.median(torch_ours),
            "peer_pairing_ms": 1000 * statistics.median(theirs),
            "flowkit_ot_solver": "compiled auction (C)" if compiled_auction_available() else "interior point + auction (torch)"}


# ------------------------------------------------------------------------- evaluation
def evaluate(flow: Flow, n_samples: int, nll_n: int) -> dict:
    data = flowkit.data.get_dataset("8gaussians")
    sampler = flowkit.SAMPLERS.get("dopri5")
    res = flowkit.generate(flow, lambda f, x, cond=None: sampler(f, x, rtol=1e-5, atol=1e-5), n_samples, seed=7)
    ref, _ = data.test_set(n_samples, seed=1234)
    quality = flowkit.sample_metrics(res.x, ref)
    x, _ = data.test_set(nll_n, seed=4321)
    ev = EvalConfig(n=nll_n, batch_size=5000, divergence="exact", rtol=1e-5, atol=1e-5, per_sample_norm=True)
    nll = flowkit.evaluate_nll(flow, x, ev)
    return {**quality, "sample_nfe": res.nfe, "nll": nll["nll"], "nll_sem": nll["nll_sem"], "nll_nfe": nll["nfe"]}


# ------------------------------------------------------------------------------- main
def interleaved_timings(method: str, steps: int, rounds: int, seed: int, tmp: Path) -> dict:
    """ms/step of each variant, run in turn ``rounds`` times (medians over rounds), so that
    a change in the machine's load hits all of them alike."""
    variants = {
        "peer": lambda: train_peer(method, steps, seed)[1],
        "peer_fused": lambda: train_peer(method, steps, seed, fused=True)[1],
        "flowkit": lambda: train_flowkit(method, steps, seed, tmp / "timing")[1],
        "bare": lambda: bare_flowkit_loop(method, steps, seed),
    }
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            results[name].append(run()["ms_per_step"])
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--methods", nargs="+", default=["icfm", "otcfm"], choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds of the quality runs (timings use the first)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--nll-n", type=int, default=20000)
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--timing-steps", type=int, nargs=2, default=[400, 200], metavar=("ICFM", "OTCFM"),
                   help="steps per timing run (windows of 50, the first two dropped)")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = flowkit.data.get_dataset("8gaussians")
    x_true, _ = data.test_set(args.nll_n, seed=4321)
    true_nll = float(-data.log_prob(x_true.double()).mean())
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowkit-bench-fm-") as tmp:
        for method in args.methods:
            quality: dict[str, list[dict]] = {"flowkit": [], "peer": []}
            for seed in args.seeds:
                peer_flow, peer = train_peer(method, args.steps, seed)
                fk_flow, fk = train_flowkit(method, args.steps, seed, Path(tmp))
                for side, flow in (("flowkit", fk_flow), ("peer", peer_flow)):
                    quality[side].append(evaluate(flow, args.samples, args.nll_n))
            timing_steps = args.timing_steps[0 if method == "icfm" else 1]
            timed = interleaved_timings(method, timing_steps, args.timing_rounds, args.seeds[0], Path(tmp))
            row = {"method": method, "steps": args.steps, "peer": peer["peer"],
                   "flowkit_ms_per_step": timed["flowkit"], "peer_ms_per_step": timed["peer"],
                   "ratio_ms": timed["flowkit"] / timed["peer"],
                   "bare_objective_ms_per_step": timed["bare"], "peer_fused_adam_ms_per_step": timed["peer_fused"],
                   "ratio_bare": timed["bare"] / timed["peer"], "ratio_to_peer_fused": timed["flowkit"] / timed["peer_fused"],
                   "last_full_run_flowkit_ms_per_step": fk["ms_per_step"],
                   "last_full_run_peer_ms_per_step": peer["ms_per_step"],
                   "timing_steps": timing_steps, "timing_rounds": args.timing_rounds,
                   **time_ot(method, args.seeds[0])}
            for side, runs in quality.items():
                row[f"{side}_per_seed"] = runs
                for key in runs[0]:
                    values = [r[key] for r in runs]
                    row[f"{side}_{key}"] = statistics.mean(values)
                    row[f"{side}_{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["true_nll"] = true_nll
            row["reference"] = REFERENCE[method]
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    meta = {"machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "steps": args.steps, "seeds": args.seeds, "samples": args.samples, "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_start": load_start, "load_average_end": os.getloadavg()}
    (out / "flow_matching.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "flow_matching.md").write_text(report(meta, rows))
    print(report(meta, rows))


SPEED_TARGET = {"icfm": 1.05, "otcfm": 0.5}  # flowkit/peer ms per step, from issue 4


def quality_verdict(row: dict, key: str, seeds: int) -> str:
    """flowkit vs peer on one lower-is-better metric: better / equal (within 2 SE) / worse."""
    ours, theirs = row[f"flowkit_{key}"], row[f"peer_{key}"]
    se = ((row[f"flowkit_{key}_sd"] ** 2 + row[f"peer_{key}_sd"] ** 2) / max(seeds, 1)) ** 0.5
    word = "equal" if abs(ours - theirs) <= 2 * se else ("better" if ours < theirs else "worse")
    return f"{word} ({ours:.4g} vs {theirs:.4g}, difference {ours - theirs:+.2g} ± {se:.2g})"


def report(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Flow-matching benchmark ({meta['date']})", "",
             f"{meta['machine']}, {meta['cores']} cores, {meta['threads']} thread(s), torch {meta['torch']}, "
             f"{meta['steps']} training steps, seeds {meta['seeds']}; load average {meta['load_average_start'][0]:.1f} "
             f"at start, {meta['load_average_end'][0]:.1f} at end (a shared machine: timings are noisy, so ms/step "
             "are medians of interleaved timing runs, see below).", "",
             "| method | side | ms/step | flowkit/peer | energy dist. | sliced W2 | NLL (nats) | NLL NFE "
             "| sample NFE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for side in ("flowkit", "peer"):
            name = "flowkit (own trainer)" if side == "flowkit" else r["peer"]
            ratio = f"{r['ratio_ms']:.2f}" if side == "flowkit" else ""
            lines.append(f"| {r['method']} | {name} | {r[f'{side}_ms_per_step']:.2f} | {ratio} | "
                         f"{r[f'{side}_energy_distance']:.4f} ± {r[f'{side}_energy_distance_sd']:.4f} | "
                         f"{r[f'{side}_sliced_w2']:.3f} ± {r[f'{side}_sliced_w2_sd']:.3f} | "
                         f"{r[f'{side}_nll']:.3f} ± {r[f'{side}_nll_sd']:.3f} | {r[f'{side}_nll_nfe']:.0f} | "
                         f"{r[f'{side}_sample_nfe']:.0f} |")
    lines += ["", f"True NLL (entropy) of the test points: {rows[0]['true_nll']:.3f} nats. Quality columns: "
              f"mean ± sd over {len(meta['seeds'])} training seeds of {meta['steps']} steps per side; energy "
              f"distance and sliced W2 of {meta['samples']:,} dopri5 samples (1e-5), NLL by dopri5 at 1e-5 with "
              "the exact divergence; NFE are means per batch.", "",
              "Where flowkit's time goes (ms/step, medians of "
              f"{rows[0]['timing_rounds']} interleaved rounds; ratio to the peer in brackets):", "",
              "| method | timing steps | peer | peer with fused Adam | flowkit trainer (to peer; to fused peer) | "
              "cfm objective in a bare loop, default Adam | flowkit OT / batch | flowkit torch-only OT / batch "
              "| peer pairing / batch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ot = (f"{r['flowkit_ot_ms']:.2f} ms ({r['flowkit_ot_solver']}) | {r['flowkit_torch_ot_ms']:.2f} ms | "
              f"{r['peer_pairing_ms']:.2f} ms" if "flowkit_ot_ms" in r else "– | – | –")
        lines.append(f"| {r['method']} | {r['timing_steps']} | {r['peer_ms_per_step']:.2f} | "
                     f"{r['peer_fused_adam_ms_per_step']:.2f} | "
                     f"{r['flowkit_ms_per_step']:.2f} ({r['ratio_ms']:.2f}; {r['ratio_to_peer_fused']:.2f}) | "
                     f"{r['bare_objective_ms_per_step']:.2f} ({r['ratio_bare']:.2f}) | {ot} |")
    lines += ["", "Targets (issue 4): I-CFM step ≤ 1.05 × the peer's through flowkit's trainer; OT-CFM step ≤ 0.5 × "
              "the peer's; equal or better quality.", ""]
    for r in rows:
        limit = SPEED_TARGET[r["method"]]
        verdict = "met" if r["ratio_ms"] <= limit else "MISSED"
        quality = [f"{metric} {quality_verdict(r, key, len(meta['seeds']))}"
                   for metric, key in (("energy distance", "energy_distance"), ("sliced W2", "sliced_w2"),
                                       ("NLL", "nll"))]
        lines.append(f"- {r['method']}: step ratio {r['ratio_ms']:.2f} (target ≤ {limit}) — **{verdict}**; "
                     + "; ".join(quality) + ".")
    lines += ["", "Quality verdicts compare seed means (lower is better): *equal* when the difference is "
              "within two standard errors of the difference of means over the training seeds."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
