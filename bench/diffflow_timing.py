"""DiffFlow's stochastic adjoint: time per step, gradient difference and peak memory against
naive backprop and an in-run plain-PyTorch baseline.

DiffFlow with the official 2-D networks: two ``fourier_mlp`` fields (learned Fourier time
embedding, 128 channels, 3 hidden layers, GELU; 199,428 parameters in all, the official 199k),
N = 30, T = 0.05, g = 0.2, Adam. Measured:

* milliseconds per optimiser step with the stochastic adjoint and with naive backprop at
  batch 1,000 (and the adjoint at 5,000), and of the in-run plain-PyTorch baseline of the same
  algorithm computed the way the official code's forward step is
  (:class:`diffflow_common.PlainDiffFlow`: naive backprop through the unrolled loop; each step
  evaluates the drift at ``x_i`` and drift and score at ``x_{i+1}``, one scalar time per
  step). The batch-1,000 variants take turns, so a drift of the machine's speed hits all alike;
* the relative gradient difference adjoint vs backprop (float32, float64);
* peak memory at batch 5,000 for N = 10, 30, 100, measured in a fresh process per
  configuration as the rise of the peak resident set size over the process after building the
  model and batch (whole process in brackets), and as the peak bytes of tensors held for
  backward (``saved_tensors_hooks``, parameters excluded).

Timed with flowkit's training default ``train.tune_allocator`` (``flowkit/allocator.py``)
unless ``--default-allocator``; the plain baseline runs in the same process, so it gets the
same allocator.

Reference (issue): the official DiffFlow code on this 2-core CPU, Olympic rings, N = 30,
T = 0.05, g = 0.2: 557 ms per step at batch 1,000 with its stochastic adjoint (417 ms naive),
2.33 s at batch 5,000; peak memory at batch 5,000: adjoint ≈ 160 MB for N = 10/30/100,
naive 0.7 / 2.0 / 6.6 GB; adjoint gradients equal autograd's to 2e-5 relative.

    python bench/diffflow_timing.py                  # 1 thread (~5 min)
    python bench/diffflow_timing.py --threads 2      # its own section of the results
    python bench/diffflow_timing.py --quick          # small (~1 min)

Results: ``bench/results/diffflow_timing.json`` and ``.md``, one section per thread count and
allocator setting. Timings on a shared machine are distorted by other processes' load; the
load average is recorded with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from diffflow_common import PlainDiffFlow, bench_parser, machine, set_up, write_results

import flowkit  # after diffflow_common, which puts the repository on the path
from flowkit.profiling import SavedTensorBytes

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
Stepper = tuple[Callable[[], None], int]


def build_timing(n: int, gradient: str, dtype: torch.dtype = torch.float32):
    """The timing recipe with N = ``n`` and the given ``gradient`` ("adjoint" or "naive")."""
    recipe = json.loads(json.dumps(TIMING_RECIPE))
    recipe["objective"].update(steps=[n], gradient=gradient)
    torch.manual_seed(0)
    built = flowkit.build(recipe)
    return built, built.objective.to(dtype)


def _stepper(built, loss: Callable[[torch.Tensor], torch.Tensor], params, batch: int) -> Stepper:
    """One Adam step (lr 1e-2) of ``loss`` on a fresh training batch per call, and the number
    of parameters of the built objective's networks."""
    opt = torch.optim.Adam(params, 1e-2)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x, _ = built.dataset.train_batch(batch, gen)
        value = loss(x)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    return step, sum(p.numel() for p in built.objective.parameters())


def flowkit_stepper(gradient: str, batch: int, n: int) -> Stepper:
    """One optimiser step of flowkit's ``diffflow`` objective per call."""
    built, obj = build_timing(n, gradient)
    return _stepper(built, lambda x: obj.loss(x).loss, obj.parameters(), batch)


def plain_stepper(batch: int, n: int) -> Stepper:
    """One optimiser step of the in-run plain baseline: same networks, data, grid, g and
    optimiser as the flowkit rows."""
    built, obj = build_timing(n, "naive")
    cfg = TIMING_RECIPE["objective"]
    grid = cfg["end_time"] * (torch.arange(n + 1) / n) ** cfg["beta"]
    plain = PlainDiffFlow(obj.drift, obj.score, grid, cfg["g"], prior_std=obj.prior.std)
    return _stepper(built, plain.loss, plain.parameters(), batch)


def interleaved_step_times(steppers: dict[str, Stepper], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
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
    """max |g_adjoint − g_naive| / max |g_naive| over all parameter entries, same noise."""
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


def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    """Step times (interleaved), gradient differences and memory (one process per probe)."""
    res: dict[str, Any] = {"machine_start": machine(args.threads), "allocator_tuned": not args.default_allocator}
    rounds, per_round = (2, 2) if args.quick else (5, 3)
    timed = interleaved_step_times({"step_adjoint_b1000": flowkit_stepper("adjoint", 1000, 30),
                                    "step_naive_b1000": flowkit_stepper("naive", 1000, 30),
                                    "step_plain_b1000": plain_stepper(1000, 30)}, rounds, per_round)
    res.update(timed, interleaving={"rounds": rounds, "steps_per_round": per_round})
    print(f"batch 1000 N=30, interleaved: {timed}", flush=True)
    if not args.quick:
        res["step_adjoint_b5000"] = interleaved_step_times(
            {"adjoint": flowkit_stepper("adjoint", 5000, 30)}, 1, 3)["adjoint"]
        print(f"step adjoint batch 5000 N=30: {res['step_adjoint_b5000']}", flush=True)
    res["grad_rel_diff_f32"] = gradient_difference(1000, 30, torch.float32)
    res["grad_rel_diff_f64"] = gradient_difference(200, 30, torch.float64)
    print(f"gradient difference adjoint vs naive: f32 {res['grad_rel_diff_f32']:.2e}, "
          f"f64 {res['grad_rel_diff_f64']:.2e}", flush=True)
    batch = args.memory_batch
    memory: dict[str, dict[int, Any]] = {"adjoint": {}, "naive": {}}
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


def timing_markdown(t: dict[str, Any]) -> list[str]:
    """One section of the report: a thread count and allocator setting."""
    m0, m1 = t["machine_start"], t["machine_end"]
    allocator = ("glibc malloc thresholds tuned as flowkit's trainer does (`train.tune_allocator`)"
                 if t.get("allocator_tuned") else "default glibc malloc settings")
    lines = [f"## Stochastic adjoint: cost ({t.get('mode', '')}, {m0['threads']} thread(s))", "",
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
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    """The report: every section measured so far, 1 thread first."""
    lines = ["# DiffFlow: cost of the stochastic adjoint (bench/diffflow_timing.py)", ""]
    for key in sorted(results):
        lines += timing_markdown(results[key])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--memory-batch", type=int, default=None,
                        help="batch of the memory probes (default 5000; 1000 with --quick)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (flowkit's trainer tunes them)")
    parser.add_argument("--memory-probe", nargs=3, metavar=("GRADIENT", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_batch is not None and args.memory_batch < 2:
        parser.error("--memory-batch must be at least 2")
    set_up(args.threads, tune_allocator=not args.default_allocator)
    if args.memory_probe:
        mode, n, batch = args.memory_probe
        print(json.dumps(memory_probe(mode, int(n), int(batch))))
        return
    if args.memory_batch is None:
        args.memory_batch = 1000 if args.quick else 5000
    key = ("timing" if args.threads == 1 else f"timing_threads{args.threads}") + \
        ("_default_allocator" if args.default_allocator else "")
    section = {"mode": "quick" if args.quick else "full", **run_timing(args)}
    print(write_results(args.out, "timing", {key: section}, markdown))


if __name__ == "__main__":
    main()
