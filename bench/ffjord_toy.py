"""FFJORD toy benchmark: seconds per iteration, NFE forward/backward and test NLL.

Trains flowkit's reference recipes (``recipes/ffjord_{8gaussians,checkerboard}.yaml``) for a
fixed number of iterations through flowkit's own trainer, then evaluates the test NLL on
20,000 fresh points with the final weights at tolerance 1e-5 (exact trace, dopri5).

The official FFJORD code is not on PyPI, so — as the project's rules ask — flowkit is
compared against (a) the figures the issue measured for it on this 2-core CPU (one thread)
and (b) an in-run plain PyTorch + torchdiffeq implementation of the same algorithm written
here in the official style (exact trace by D backward passes, adjoint gradients), timed on
the same machine in the same run.

    python bench/ffjord_toy.py                     # 1,000 iterations, both datasets, 1 thread
    python bench/ffjord_toy.py --iters 200 --datasets 8gaussians --baseline-iters 50

**Whole process against the official code** (``--whole-process N --official DIR``): the
official FFJORD toy script (``train_toy.py`` of https://github.com/rtqichen/ffjord, fetched
beside the repository — ``git clone https://github.com/rtqichen/ffjord DIR`` — never vendored)
and ``flowkit train recipes/ffjord_<dataset>.yaml`` are each run as a fresh process for ``N``
iterations, interleaved ``--repeats`` times (the order alternating), one thread each
(``OMP_NUM_THREADS=1``, ``train.threads=1``), timing the whole process: interpreter start,
imports, model building, the training loop with its logging, checkpoints and (official) its
validation every 100 iterations. The official script runs with its own defaults for the toy
model (concatsquash 64-64-64, tanh, T = 0.5 learnt, brute-force trace, dopri5 at 1e-5,
adjoint, batch 100, Adam 1e-3) and ``--viz_freq`` past the end (no figures), and its
post-training trajectory plot — which fails on current matplotlib — is replaced by a no-op
(the training itself is untouched). Results are added to ``ffjord_toy_<dataset>.{json,md}``
(``whole_process``), next to the last full-length (NLL) table, which they leave in place.

    python bench/ffjord_toy.py --datasets 8gaussians --whole-process 300 --official /tmp/ffjord --repeats 2

Results: ``bench/results/ffjord_toy.json`` and ``.md`` (``--tag``: ``ffjord_toy_<tag>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402
from flowkit.config import EvalConfig  # noqa: E402

# Official FFJORD on this 2-core CPU, torch 2.13, one thread, 1,000 iterations (issue #2).
REFERENCE = {
    "8gaussians": {"nll": 3.070, "nll_sd": 0.005, "true_entropy": 2.836, "s_per_iter": 0.235,
                   "nfe_forward": 68, "nfe_backward": 38},
    "checkerboard": {"nll": 3.881, "nll_sd": 0.004, "true_entropy": 3.466, "s_per_iter": 0.235,
                     "nfe_forward": 68, "nfe_backward": 38},
}


def run_flowkit(dataset: str, iters: int, overrides: list[str], out: Path, seed: int) -> dict:
    recipe = flowkit.load_recipe(ROOT / f"recipes/ffjord_{dataset}.yaml", [
        f"train.steps={iters}", "train.log_every=10", "train.checkpoint_every=0",
        "train.sample_every=0", f"train.seed={seed}", *overrides])
    run = out / f"{dataset}_seed{seed}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    start = time.perf_counter()
    flowkit.train(recipe, run, progress=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = [r for r in records if r["step"] > iters - 100]
    # final weights (the EMA of the final step when the recipe keeps one; no best-of selection)
    built, _ = flowkit.load_run(run, ema=True)
    x, _ = built.dataset.test_set(20000, seed=1234)
    ev = EvalConfig(n=20000, batch_size=5000, divergence="exact", rtol=1e-5, atol=1e-5)
    res = flowkit.evaluate_nll(built.objective.flow(), x, ev, progress=True)
    raw = None
    if built.train.ema > 0:
        raw_built, _ = flowkit.load_run(run, ema=False)
        raw = flowkit.evaluate_nll(raw_built.objective.flow(), x, ev)["nll"]
    return {
        "nll": res["nll"], "nll_sem": res["nll_sem"], "eval_nfe": res["nfe"], "nll_raw_weights": raw,
        "s_per_iter_end": statistics.median(1 / r["it_per_s"] for r in tail),
        "cpu_s_per_iter_end": statistics.median(r["cpu_s_per_it"] for r in tail),
        "s_per_iter_mean": wall / iters,
        "nfe_forward": statistics.mean(r["nfe"] for r in tail),
        "nfe_backward": statistics.mean(r["nfe_backward"] for r in tail),
        "end_time": records[-1].get("end_time"),
    }


def run_plain_baseline(dataset: str, iters: int, seed: int) -> dict:
    """Plain PyTorch + torchdiffeq FFJORD in the official style (adjoint, D backward passes)."""
    import torchdiffeq
    from torch import nn

    torch.manual_seed(seed)

    class CSL(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.l, self.g, self.s = nn.Linear(a, b), nn.Linear(1, b), nn.Linear(1, b, bias=False)

        def forward(self, t, x):
            tt = t.reshape(1, 1)
            return self.l(x) * torch.sigmoid(self.g(tt)) + self.s(tt)

    class ODEfunc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([CSL(2, 64), CSL(64, 64), CSL(64, 64), CSL(64, 2)])
            self.nfe = 0

        def forward(self, t, state):
            self.nfe += 1
            x = state[0]
            with torch.enable_grad():
                x = x.requires_grad_(True)
                h = x
                for i, layer in enumerate(self.layers):
                    h = layer(t, h)
                    if i < 3:
                        h = torch.tanh(h)
                div = sum(torch.autograd.grad(h[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2))
            return h, -div.reshape(-1, 1)

    func = ODEfunc()
    t_end = nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.Adam(list(func.parameters()) + [t_end], lr=1e-3)
    data = flowkit.data.get_dataset(dataset)
    gen = torch.Generator().manual_seed(seed)
    times, cpu_times = [], []
    for _ in range(iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        x, _ = data.train_batch(100, gen)
        func.nfe = 0
        z, dlogp = torchdiffeq.odeint_adjoint(func, (x, torch.zeros(100, 1)),
                                             torch.stack([torch.tensor(0.0), t_end]),
                                             rtol=1e-5, atol=1e-5, method="dopri5",
                                             adjoint_params=tuple(func.parameters()) + (t_end,))
        z, dlogp = z[-1], dlogp[-1]
        logp = -0.5 * z.pow(2).sum(1) - torch.log(torch.tensor(2 * torch.pi)) - dlogp.squeeze(1)
        loss = -logp.mean()
        nfe_f = func.nfe
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    tail = times[-max(1, iters // 5):]
    return {"s_per_iter_end": statistics.median(tail), "iters": iters,
            "cpu_s_per_iter_end": statistics.median(cpu_times[-max(1, iters // 5):]), "nfe_forward_last": nfe_f,
            "nfe_backward_last": func.nfe - nfe_f, "loss_last": float(loss)}


# the official toy script, run from its checkout: its post-training trajectory plot (which fails on
# current matplotlib) replaced by a no-op, nothing else touched
_OFFICIAL_RUNNER = ("import runpy, sys; sys.path.insert(0, '.'); import diagnostics.viz_toy as v; "
                    "v.save_trajectory = v.trajectory_to_video = lambda *a, **k: None; "
                    "sys.argv = ['train_toy.py', *sys.argv[1:]]; runpy.run_path('train_toy.py', run_name='__main__')")


def _timed_process(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` to completion with one thread; wall seconds and the child's CPU seconds."""
    import os
    import resource
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_1min_before": load}


def run_whole_process(dataset: str, iters: int, official: Path, repeats: int, out: Path) -> dict:
    """Interleaved whole-process training runs: flowkit's recipe CLI against the official script."""
    import re

    runs = out / "runs" / "whole_process"
    runs.mkdir(parents=True, exist_ok=True)
    flowkit_cmd = [sys.executable, "-m", "flowkit", "train", str(ROOT / f"recipes/ffjord_{dataset}.yaml"),
                   f"train.steps={iters}", "train.threads=1", "--out", str(runs / "flowkit"), "--overwrite",
                   "--no-progress"]
    official_cmd = [sys.executable, "-c", _OFFICIAL_RUNNER, "--data", dataset, "--dims", "64-64-64",
                    "--layer_type", "concatsquash", "--num_blocks", "1", "--time_length", "0.5", "--train_T", "True",
                    "--divergence_fn", "brute_force", "--nonlinearity", "tanh", "--solver", "dopri5",
                    "--atol", "1e-5", "--rtol", "1e-5", "--batch_size", "100", "--niters", str(iters),
                    "--viz_freq", str(iters + 1), "--save", str(runs / "official")]
    results: dict[str, list[dict]] = {"flowkit": [], "official": []}
    for r in range(repeats):
        order = ("flowkit", "official") if r % 2 == 0 else ("official", "flowkit")
        for name in order:
            if name == "flowkit":
                res = _timed_process(flowkit_cmd, ROOT)
                records = [json.loads(line) for line in (runs / "flowkit" / "metrics.jsonl").read_text().splitlines()]
                res["train_loss_last"] = records[-1]["nll"]
                res["nfe_last"] = records[-1]["nfe"]
            else:
                res = _timed_process(official_cmd, official)
                lines = (runs / "official" / "logs").read_text().splitlines()
                last = [ln for ln in lines if "| Loss" in ln and "[TEST]" not in ln][-1]
                res["train_loss_last"] = float(re.search(r"Loss ([-0-9.]+)", last).group(1))
                res["nfe_last"] = float(re.search(r"NFE Forward (\d+)", last).group(1))
            results[name].append(res)
            print(name, json.dumps(res), flush=True)
    summary = {name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                      "cpu_s": statistics.median(r["cpu_s"] for r in rs)} for name, rs in results.items()}
    return {"iters": iters, "repeats": repeats, "runs": results, "median": summary,
            "wall_ratio": summary["flowkit"]["wall_s"] / summary["official"]["wall_s"],
            "cpu_ratio": summary["flowkit"]["cpu_s"] / summary["official"]["cpu_s"]}


def whole_process_lines(wp: dict, dataset: str) -> list[str]:
    lines = [f"## Whole process, {wp['iters']} iterations: `flowkit train` against the official `train_toy.py` "
             f"({dataset})", "",
             f"{wp['repeats']} interleaved repeats, one thread each; wall counts other processes' turns on the shared "
             "cores (1-minute load average before each run in the table), CPU is the process's own.", "",
             "| run | program | wall s | CPU s | load before | last training loss | NFE forward (last) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("flowkit", "official"):
        for i, r in enumerate(wp["runs"][name]):
            lines.append(f"| {i} | {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load_1min_before']:.2f} | "
                         f"{r['train_loss_last']:.3f} | {r['nfe_last']:.0f} |")
    m = wp["median"]
    lines += ["", f"median: flowkit {m['flowkit']['wall_s']:.1f} s wall / {m['flowkit']['cpu_s']:.1f} s CPU, official "
              f"{m['official']['wall_s']:.1f} s wall / {m['official']['cpu_s']:.1f} s CPU: **{wp['wall_ratio']:.2f}× "
              f"wall, {wp['cpu_ratio']:.2f}× CPU** (target ≤ 0.5×)."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--baseline-iters", type=int, default=100,
                   help="iterations of the in-run plain PyTorch baseline (timing only; 0 to skip)")
    p.add_argument("--override", nargs="*", default=[], help="recipe overrides for flowkit's runs")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--tag", default="")
    p.add_argument("--whole-process", type=int, default=0, metavar="N",
                   help="time N-iteration whole-process runs against the official code (needs --official)")
    p.add_argument("--official", default=None, help="a checkout of https://github.com/rtqichen/ffjord")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of --whole-process")
    args = p.parse_args()
    if args.whole_process:
        if not args.official or not (Path(args.official) / "train_toy.py").exists():
            p.error("--whole-process needs --official DIR, a checkout of https://github.com/rtqichen/ffjord "
                    "(git clone https://github.com/rtqichen/ffjord DIR)")
        import os

        out = Path(args.out)
        for dataset in args.datasets:
            wp = run_whole_process(dataset, args.whole_process, Path(args.official), args.repeats, out)
            wp.update(machine=cpu_name(), date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                      load_average_end=os.getloadavg(), shared_machine=True)
            path = out / f"ffjord_toy_{dataset}.json"
            data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
            data["whole_process"] = wp
            path.write_text(json.dumps(data, indent=1))
            md = out / f"ffjord_toy_{dataset}.md"
            previous = md.read_text().split("\n## Whole process")[0].rstrip("\n") if md.exists() else ""
            text = "\n".join([previous, "", *whole_process_lines(wp, dataset),
                              f"", f"machine: {wp['machine']}, torch {wp['torch']}, {wp['date']}; load average at "
                              f"the end {tuple(round(v, 2) for v in wp['load_average_end'])}"]) + "\n"
            md.write_text(text)
            print(text)
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            fk = run_flowkit(dataset, args.iters, args.override, out / "runs" / (args.tag or "default"), seed)
            ref = REFERENCE[dataset]
            row = {"dataset": dataset, "seed": seed, "iters": args.iters, **{f"flowkit_{k}": v for k, v in fk.items()},
                   "official_nll": ref["nll"], "official_s_per_iter": ref["s_per_iter"],
                   "true_entropy": ref["true_entropy"],
                   "speedup_vs_official": ref["s_per_iter"] / fk["s_per_iter_end"],
                   "cpu_speedup_vs_official": ref["s_per_iter"] / fk["cpu_s_per_iter_end"],
                   "nll_minus_official": fk["nll"] - ref["nll"]}
            if args.baseline_iters:
                base = run_plain_baseline(dataset, args.baseline_iters, seed)
                row.update({f"plain_{k}": v for k, v in base.items()})
                row["cpu_speedup_vs_plain"] = base["cpu_s_per_iter_end"] / fk["cpu_s_per_iter_end"]
            rows.append(row)
            print(json.dumps(row, indent=1))
    import os

    meta = {"machine": cpu_name(), "threads": args.threads,
            "load_average_end": os.getloadavg(),
            "torch": torch.__version__, "override": args.override, "tag": args.tag,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    name = "ffjord_toy" + (f"_{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# FFJORD toy benchmark ({meta['date']}, {meta['threads']} thread(s), torch {meta['torch']})", "",
             f"overrides: {args.override}", "",
             f"load average at the end: {meta['load_average_end']} (wall s/it counts other processes' turns on the "
             "cores; CPU s/it is this process's own CPU time per iteration, one thread)", "",
             "| dataset | seed | iters | flowkit NLL | official NLL | true H | flowkit wall s/it (end) | flowkit CPU s/it (end) | official s/it | speed-up (CPU) | NFE f/b | plain PyTorch CPU s/it (end of its run) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['iters']} | {r['flowkit_nll']:.3f} ± {r['flowkit_nll_sem']:.3f} | "
                     f"{r['official_nll']:.3f} | {r['true_entropy']:.3f} | {r['flowkit_s_per_iter_end']:.3f} | "
                     f"{r['flowkit_cpu_s_per_iter_end']:.3f} | "
                     f"{r['official_s_per_iter']:.3f} | {r['cpu_speedup_vs_official']:.2f}× | "
                     f"{r['flowkit_nfe_forward']:.0f}/{r['flowkit_nfe_backward']:.0f} | "
                     f"{r.get('plain_cpu_s_per_iter_end', float('nan')):.3f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
