"""GPU speed of FFJORD's image CNF dynamics (``concat_conv``) and of the 2-D toy CNF.

Part 1 — time per function evaluation (NFE) of FFJORD's MNIST field: ``concat_conv`` with
``hidden=[64, 64, 64]``, 3×3 kernels, softplus, on a batch of 200 images of 1×28×28,
evaluated together with its divergence by Hutchinson's estimator (one Rademacher probe):

* ``eval``  — ``f`` and ``εᵀ(∂f/∂x)ε`` (a likelihood evaluation step, no graph kept);
* ``train`` — the same with ``create_graph=True``, then the gradient of a scalar of
  ``(f, div)`` with respect to the parameters and the state: the work of one NFE of the
  adjoint's backward solve (or of direct backpropagation), the dearer kind of NFE in training.

Variants: the time channel concatenated to the input (``concat``, the structure of the
official code) or fused into a bias map (``fused``, flowkit's default); NCHW or
``channels_last``; fp32 (cuDNN's default TF32 convolutions) or bf16 autocast; eager,
``torch.compile``, ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and a CUDA graph
captured by hand around the eager function. The ``concat``/``fused`` rows take ``εᵀJ`` by a
reverse-mode vector–Jacobian product (flowkit's ``divergence``; compiled variants trace the
same computation written with ``torch.func.vjp``), so training differentiates through a
double backward; the ``jvp`` rows take ``Jε`` by the network's forward-mode
``forward_with_jvp`` and need a first-order backward only.

Part 2 — the average over FFJORD's multiscale MNIST model: the ``train`` time of each of
its five stage shapes (1×28×28, 4×14×14, 2×14×14, 8×7×7, 4×7×7; two blocks each), which is
what the official per-NFE figure averages over.

Part 3 — bf16 accuracy: the change in log-likelihood ``Δ = ∫ tr ∂f/∂x dt`` of a short solve
(rk4, 8 steps on [0, 1], same probes) in bf16 autocast against fp32, next to the fp32
solver's own error against dopri5 at 1e-5 (randomly initialised network, uniform images).

Part 4 — the 2-D toy model (``recipes/ffjord_8gaussians.yaml`` through flowkit's FFJORD
objective): seconds per training iteration on the GPU and on the CPU (one thread), with
and without the objective's ``compile`` option.

Reference (the issue, one H100): the official FFJORD MNIST model, batch 200, ≈ 5 ms per NFE
(2.88 s/iter at ≈ 575 NFE); its 2-D toy model 0.46 s/iter on the H100, ≈ 0.23 s/iter on a
2-core CPU. Targets: ≤ 1/3 of the official time per NFE; the 2-D CNF faster on GPU than CPU.

    python bench/ffjord_mnist_gpu.py             # on a GPU machine (about 5 minutes)
    python bench/ffjord_mnist_gpu.py --quick     # tiny check that everything runs (CPU is fine)

Results: ``bench/results/ffjord_mnist_gpu.json`` and ``.md`` (``--quick``:
``ffjord_mnist_gpu_quick.*``), naming the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from flowkit.trace import divergence, sample_probe  # noqa: E402
from flowkit.dynamics.conv import ConcatConvNet  # noqa: E402
from flowkit.dynamics.multiscale import multiscale_views  # noqa: E402
from flowkit.likelihood import log_likelihood  # noqa: E402
from flowkit.flow import StandardNormal  # noqa: E402

REFERENCE = {"ms_per_nfe": 2.88 / 575 * 1e3, "toy_s_per_iter_gpu": 0.46, "toy_s_per_iter_cpu": 0.23}
TARGET_MS = REFERENCE["ms_per_nfe"] / 3

# name: (fused, channels_last, bf16, mode). mode: eager / compile / reduce-overhead / graph use the
# vector–Jacobian product through autograd (flowkit's ``divergence``); jvp-* use the network's
# forward-mode ``forward_with_jvp`` (div = ε · Jε; training then needs a first-order backward only).
VARIANTS = {
    "concat fp32 eager": (False, False, False, "eager"),
    "fused fp32 eager": (True, False, False, "eager"),
    "fused channels_last fp32 eager": (True, True, False, "eager"),
    "fused bf16 eager": (True, False, True, "eager"),
    "fused channels_last bf16 eager": (True, True, True, "eager"),
    "fused fp32 compile": (True, False, False, "compile"),
    "fused channels_last bf16 compile": (True, True, True, "compile"),
    "fused channels_last bf16 reduce-overhead": (True, True, True, "reduce-overhead"),
    "fused channels_last bf16 cuda-graph": (True, True, True, "graph"),
    "jvp fp32 eager": (True, False, False, "jvp-eager"),
    "jvp channels_last fp32 eager": (True, True, False, "jvp-eager"),
    "jvp channels_last bf16 eager": (True, True, True, "jvp-eager"),
    "jvp fp32 compile": (True, False, False, "jvp-compile"),
    "jvp channels_last bf16 reduce-overhead": (True, True, True, "jvp-reduce-overhead"),
    "jvp fp32 cuda-graph": (True, False, False, "jvp-graph"),
    "jvp channels_last fp32 cuda-graph": (True, True, False, "jvp-graph"),
    "jvp channels_last bf16 cuda-graph": (True, True, True, "jvp-graph"),
}
QUICK_VARIANTS = ("concat fp32 eager", "fused fp32 eager", "fused channels_last bf16 eager",
                  "fused fp32 compile", "jvp fp32 eager", "jvp fp32 compile")
MULTISCALE_VARIANTS = ("fused fp32 eager", "jvp fp32 eager", "jvp fp32 cuda-graph",
                       "jvp channels_last bf16 cuda-graph")
CUDA_ONLY = ("graph", "reduce-overhead", "jvp-graph", "jvp-reduce-overhead")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_net(shape, hidden, fused: bool, channels_last: bool, device) -> ConcatConvNet:
    torch.manual_seed(0)
    return ConcatConvNet(dim=math.prod(shape), shape=shape, hidden=hidden, fused=fused,
                         channels_last=channels_last).to(device)


# --------------------------------------------------------------------------- one NFE


def eager_eval(net):
    def fe(t, x, eps):
        out = divergence(lambda t_, x_: net(t_, x_), t, x.detach(), estimator="hutchinson", probe=eps)
        return out.dx.detach(), out.div.detach()
    return fe


def eager_train(net):
    params = [p for p in net.parameters()]

    def fe(t, x, eps, a, b):
        xr = x.detach().requires_grad_(True)
        out = divergence(lambda t_, x_: net(t_, x_), t, xr, estimator="hutchinson", probe=eps,
                         create_graph=True)
        obj = (out.dx.float() * a).sum() + (out.div.float() * b).sum()
        return torch.autograd.grad(obj, [xr, *params])
    return fe


def func_fe(net):
    """The same NFE through ``torch.func.vjp`` (traceable by ``torch.compile`` as one graph)."""
    def fe(t, x, eps):
        out, vjp_fn = torch.func.vjp(lambda x_: net(t, x_), x)
        (g,) = vjp_fn(eps.to(out.dtype))
        return out, (g.float() * eps).flatten(1).sum(1)
    return fe


def jvp_fe(net):
    """One NFE by forward mode: ``f`` and ``div = ε · (∂f/∂x) ε`` from ``forward_with_jvp``."""
    def fe(t, x, eps):
        out, jv = net.forward_with_jvp(t, x, eps)
        return out, (jv.float() * eps).flatten(1).sum(1)
    return fe


def build_nfe(net, mode: str, bf16: bool, kind: str, inputs: tuple, device):
    """A zero-argument callable running one NFE of ``kind`` (eval/train) on the static
    ``inputs = (t, x, probe, a, b)``; ``a``, ``b`` weight ``f`` and ``div`` in the train scalar."""
    t, x, eps, a, b = inputs
    params = list(net.parameters())
    if mode.startswith("jvp-"):
        return build_jvp_nfe(net, mode[4:], bf16, kind, inputs, device)
    if mode == "eager" or mode == "graph":
        fe = eager_eval(net) if kind == "eval" else eager_train(net)
        args = (t, x, eps) if kind == "eval" else (t, x, eps, a, b)

        def call():
            with autocast(device, bf16):
                return fe(*args)
        if mode == "eager":
            return call
        return cuda_graph(call, device)
    fe = func_fe(net)
    compiled = torch.compile(fe, mode="reduce-overhead" if mode == "reduce-overhead" else None)
    if kind == "eval":
        def call():
            with torch.no_grad(), autocast(device, bf16):
                out, div = compiled(t, x, eps)
            return out, div
        return call

    def call_train():
        xr = x.detach().requires_grad_(True)
        with autocast(device, bf16):
            out, div = compiled(t, xr, eps)
        obj = (out.float() * a).sum() + (div * b).sum()
        return torch.autograd.grad(obj, [xr, *params])
    return call_train


def build_jvp_nfe(net, mode: str, bf16: bool, kind: str, inputs: tuple, device):
    t, x, eps, a, b = inputs
    params = list(net.parameters())
    fe = jvp_fe(net)
    if mode in ("compile", "reduce-overhead"):
        fe = torch.compile(fe, mode="reduce-overhead" if mode == "reduce-overhead" else None)

    def call_eval():
        with torch.no_grad(), autocast(device, bf16):
            return fe(t, x, eps)

    def call_train():
        xr = x.detach().requires_grad_(True)
        with autocast(device, bf16):
            out, div = fe(t, xr, eps)
        obj = (out.float() * a).sum() + (div * b).sum()
        return torch.autograd.grad(obj, [xr, *params])

    call = call_eval if kind == "eval" else call_train
    return cuda_graph(call, device) if mode == "graph" else call


def profile_nfe(args, device, variant: str) -> str:
    """The top kernels of one variant's ``train`` NFE (torch.profiler)."""
    fused, channels_last, bf16, mode = VARIANTS[variant]
    net = make_net((1, 28, 28), args.hidden, fused, channels_last, device)
    inputs = make_inputs(args.batch, (1, 28, 28), channels_last, device)
    fn = build_nfe(net, mode, bf16, "train", inputs, device)
    for _ in range(3):
        fn()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return f"profile of {variant} (train, 5 NFE):\n" + prof.key_averages().table(sort_by=key, row_limit=18,
                                                                                  max_name_column_width=70)


def make_inputs(batch: int, shape, channels_last: bool, device) -> tuple:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *shape, device=device, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps = sample_probe(x, "rademacher", generator=g)[0]
    a = torch.randn(batch, *shape, device=device, generator=g)
    b = torch.randn(batch, device=device, generator=g)
    return torch.tensor(0.5, device=device), x, eps, a, b


def cuda_graph(call: Callable[[], object], device):
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def check_against_eager(net, bf16: bool, inputs: tuple, device) -> float:
    """Relative error of this variant's ``f`` against fp32 on NCHW input."""
    t, x = inputs[:2]
    with torch.no_grad():
        ref = net(t, x.contiguous()).float()
        with autocast(device, bf16):
            out = net(t, x).float()
    return ((out - ref).norm() / ref.norm()).item()


def bench_nfe(args, device) -> list[dict]:
    shape = (1, 28, 28)
    hidden = args.hidden
    names = tuple(args.variants) if args.variants else QUICK_VARIANTS if args.quick else tuple(VARIANTS)
    if device.type != "cuda":
        names = tuple(n for n in names if VARIANTS[n][3] not in CUDA_ONLY)
    if args.skip_compile:
        names = tuple(n for n in names if "compile" not in VARIANTS[n][3] and "overhead" not in VARIANTS[n][3])
    rows = []
    for name in names:
        fused, channels_last, bf16, mode = VARIANTS[name]
        net = make_net(shape, hidden, fused, channels_last, device)
        inputs = make_inputs(args.batch, shape, channels_last, device)
        row = {"variant": name, "fused": fused, "channels_last": channels_last, "bf16": bf16, "mode": mode}
        try:
            row["rel_err_f_vs_fp32"] = check_against_eager(net, bf16, inputs, device)
        except Exception as exc:  # noqa: BLE001
            row["rel_err_f_vs_fp32"] = f"{type(exc).__name__}: {exc}"
        for kind in ("eval", "train"):
            try:
                t0 = time.perf_counter()
                fn = build_nfe(net, mode, bf16, kind, inputs, device)
                fn()
                sync(device)
                row[f"setup_s_{kind}"] = time.perf_counter() - t0
                row[f"ms_{kind}"] = timeit(fn, device, args.warmup, args.reps)
            except Exception as exc:  # noqa: BLE001  (a failing variant is a result, not a crash)
                row[f"ms_{kind}"] = None
                row[f"error_{kind}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                traceback.print_exc()
        print(json.dumps(row))
        rows.append(row)
        torch._dynamo.reset()
    return rows


def bench_multiscale(args, device, variant: str) -> dict:
    """Mean ``train`` ms per NFE over the 10 blocks of FFJORD's multiscale MNIST model."""
    fused, channels_last, bf16, mode = VARIANTS[variant]
    per_stage = []
    for view in multiscale_views((1, 28, 28)):
        net = make_net(view.shape, args.hidden, fused, channels_last, device)
        inputs = make_inputs(args.batch, view.shape, channels_last, device)
        fn = build_nfe(net, mode, bf16, "train", inputs, device)
        per_stage.append({"shape": list(view.shape), "ms_train": timeit(fn, device, args.warmup, args.reps)})
        torch._dynamo.reset()
    mean = statistics.mean(s["ms_train"] for s in per_stage)  # two blocks per stage: same mean
    return {"variant": variant, "stages": per_stage, "mean_ms_train_per_nfe": mean}


# --------------------------------------------------------------------------- bf16 accuracy


def bench_bf16_accuracy(args, device) -> dict:
    shape = (1, 28, 28)
    net = make_net(shape, args.hidden, True, True, device)
    x = torch.rand(args.batch, *shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
    prior = StandardNormal(shape)

    def delta(bf16: bool, **opts) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(2)
        with autocast(device, bf16):
            res = log_likelihood(net, x, prior, estimator="hutchinson", generator=gen, **opts)
        return res.delta.float()

    rk4 = dict(method="rk4", steps=args.accuracy_steps)
    fp32, bf16 = delta(False, **rk4), delta(True, **rk4)
    truth = delta(False, method="dopri5", rtol=1e-5, atol=1e-5)
    diff = (bf16 - fp32).abs()
    return {
        "solve": f"rk4, {args.accuracy_steps} steps on [0, 1], same Rademacher probe; batch {args.batch}",
        "delta_fp32_mean": fp32.mean().item(), "delta_abs_max": fp32.abs().max().item(),
        "bf16_vs_fp32_max_abs": diff.max().item(), "bf16_vs_fp32_mean_abs": diff.mean().item(),
        "bf16_vs_fp32_max_abs_bits_per_dim": diff.max().item() / (math.prod(shape) * math.log(2)),
        "fp32_rk4_vs_dopri5_1e-5_max_abs": (fp32 - truth).abs().max().item(),
        "dopri5_tolerance_scale": 1e-5 + 1e-5 * fp32.abs().max().item(),
    }


# --------------------------------------------------------------------------- 2-D toy


def bench_toy(args, device, compile_: str) -> dict:
    """``compile_``: "" (eager), or the objective's ``compile`` mode ("default",
    "reduce-overhead": the compiled field replayed as CUDA graphs)."""
    overrides = [f"objective.compile={compile_}"] if compile_ else []
    recipe = flowkit.load_recipe(ROOT / "recipes/ffjord_8gaussians.yaml", overrides)
    torch.manual_seed(0)
    built = flowkit.build(recipe)
    model = built.objective.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=built.train.lr)
    gen = torch.Generator().manual_seed(0)
    times, nfes = [], []
    iters = args.toy_iters + args.toy_warmup
    for i in range(iters):
        x, _ = built.dataset.train_batch(built.train.batch_size, gen)
        sync(device)
        t0 = time.perf_counter()
        out = model.loss(x.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sync(device)
        if i >= args.toy_warmup:
            times.append(time.perf_counter() - t0)
            nfes.append(out.metrics["nfe"])
    return {"device": str(device), "compile": compile_ or "no", "threads": torch.get_num_threads(),
            "s_per_iter": statistics.median(times), "nfe_forward": statistics.mean(nfes), "iters": len(times)}


# --------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fmt(v, spec=".3f") -> str:
    return "—" if v is None else format(v, spec)


def write_report(result: dict, out: Path) -> str:
    meta = result["meta"]
    lines = [f"# FFJORD image CNF speed ({meta['date']}) — {meta['device']}", "",
             f"torch {meta['torch']}, cuDNN TF32 {meta['tf32']}, cudnn.benchmark {meta['cudnn_benchmark']}; "
             f"concat_conv hidden {meta['hidden']}, batch {meta['batch']}, 1×28×28, Rademacher Hutchinson"
             + (" — **quick mode: tiny sizes, timings meaningless**" if meta["quick"] else ""), "",
             f"Official FFJORD MNIST on one H100: {REFERENCE['ms_per_nfe']:.2f} ms per NFE (training mix); "
             f"target ≤ {TARGET_MS:.2f} ms.", "",
             "eval = f and its Hutchinson divergence (a likelihood NFE); train = the same kept for "
             "differentiation plus the gradient to parameters and state (one NFE of direct backprop, "
             "or of the adjoint's backward solve: the dearer kind). vjp rows (concat/fused) "
             "differentiate through a double backward; jvp rows use forward mode.", "",
             "| variant | eval ms/NFE | train ms/NFE | speed-up vs official (train) | rel. err. of f vs fp32 | compile s |",
             "|---|---|---|---|---|---|"]
    for r in result.get("nfe", []):
        tr = r.get("ms_train")
        ratio = f"{REFERENCE['ms_per_nfe'] / tr:.1f}×" if tr else r.get("error_train", "—")[:60]
        err = r["rel_err_f_vs_fp32"]
        err = f"{err:.1e}" if isinstance(err, float) else str(err)[:40]
        setup = r.get("setup_s_train")
        lines.append(f"| {r['variant']} | {fmt(r.get('ms_eval'))} | {fmt(tr)} | {ratio} | {err} | "
                     f"{fmt(setup, '.1f') if r['mode'].endswith(('compile', 'overhead', 'graph')) else ''} |")
    if result.get("multiscale"):
        lines += ["", "Multiscale MNIST model (10 blocks, 2 per stage), train ms per NFE by stage:", "",
                  "| variant | " + " | ".join("×".join(map(str, s["shape"])) for s in result["multiscale"][0]["stages"])
                  + " | mean per NFE | speed-up vs official |",
                  "|---|" + "---|" * (len(result["multiscale"][0]["stages"]) + 2)]
        for m in result["multiscale"]:
            lines.append(f"| {m['variant']} | " + " | ".join(f"{s['ms_train']:.3f}" for s in m["stages"])
                         + f" | {m['mean_ms_train_per_nfe']:.3f} | "
                         f"{REFERENCE['ms_per_nfe'] / m['mean_ms_train_per_nfe']:.1f}× |")
    acc = result.get("bf16_accuracy")
    if acc:
        lines += ["", f"bf16 accuracy ({acc['solve']}): max |Δ_bf16 − Δ_fp32| = {acc['bf16_vs_fp32_max_abs']:.3g} nats "
                  f"({acc['bf16_vs_fp32_max_abs_bits_per_dim']:.2g} bits/dim), mean {acc['bf16_vs_fp32_mean_abs']:.3g}; "
                  f"|Δ| up to {acc['delta_abs_max']:.3g}; fp32 rk4 vs dopri5(1e-5) max {acc['fp32_rk4_vs_dopri5_1e-5_max_abs']:.3g}; "
                  f"dopri5 tolerance scale atol + rtol·|Δ| = {acc['dopri5_tolerance_scale']:.3g}."]
    if result.get("toy"):
        lines += ["", f"2-D toy (recipes/ffjord_8gaussians.yaml, flowkit FFJORD objective); official: "
                  f"{REFERENCE['toy_s_per_iter_gpu']} s/it on H100, {REFERENCE['toy_s_per_iter_cpu']} s/it on 2-core CPU:", "",
                  "| device | compile | threads | s/iter | forward NFE | ms/iter per forward NFE (official: "
                  f"{REFERENCE['toy_s_per_iter_gpu'] / 68 * 1e3:.1f} GPU, {REFERENCE['toy_s_per_iter_cpu'] / 68 * 1e3:.1f} CPU at 68) |",
                  "|---|---|---|---|---|---|"]
        for r in result["toy"]:
            if "error" in r:
                lines.append(f"| {r['device']} | {r['compile']} | — | {r['error'][:60]} | — | — |")
            else:
                lines.append(f"| {r['device']} | {r['compile']} | {r['threads']} | {r['s_per_iter']:.3f} | "
                             f"{r['nfe_forward']:.0f} | {r['s_per_iter'] / r['nfe_forward'] * 1e3:.2f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a couple of repetitions (works on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--accuracy-steps", type=int, default=8)
    p.add_argument("--toy-iters", type=int, default=None)
    p.add_argument("--toy-warmup", type=int, default=None)
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS), metavar="VARIANT",
                   help="time only these NFE variants")
    p.add_argument("--profile", nargs="*", default=[], choices=list(VARIANTS), metavar="VARIANT",
                   help="print the top kernels of these variants' train NFE")
    p.add_argument("--skip", nargs="*", default=[], choices=["nfe", "multiscale", "accuracy", "toy"])
    p.add_argument("--out", default=None, help="results path without suffix")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    args.batch = args.batch or (2 if quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10)
    args.reps = args.reps or (2 if quick else 50)
    args.toy_iters = args.toy_iters or (2 if quick else 20)
    args.toy_warmup = args.toy_warmup if args.toy_warmup is not None else (1 if quick else 5)
    if quick:
        args.accuracy_steps = min(args.accuracy_steps, 2)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out) if args.out else ROOT / "bench/results" / ("ffjord_mnist_gpu" + ("_quick" if quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {
        "device": device_name(device), "torch": torch.__version__, "quick": quick, "batch": args.batch,
        "hidden": args.hidden, "tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": True,
        "date": time.strftime("%Y-%m-%d %H:%M"), "reference": REFERENCE}}
    for variant in args.profile:
        print(profile_nfe(args, device, variant))
    if "nfe" not in args.skip:
        result["nfe"] = bench_nfe(args, device)
        write_report(result, out)
    if "multiscale" not in args.skip:
        result["multiscale"] = []
        for variant in MULTISCALE_VARIANTS:
            if (quick and variant not in QUICK_VARIANTS) or (
                    device.type != "cuda" and VARIANTS[variant][3] in CUDA_ONLY):
                continue
            try:
                result["multiscale"].append(bench_multiscale(args, device, variant))
            except Exception:  # noqa: BLE001
                traceback.print_exc()
        write_report(result, out)
    if "accuracy" not in args.skip:
        result["bf16_accuracy"] = bench_bf16_accuracy(args, device)
        print(json.dumps(result["bf16_accuracy"]))
        write_report(result, out)
    if "toy" not in args.skip:
        result["toy"] = []
        devices = [device] + ([torch.device("cpu")] if device.type == "cuda" else [])
        for dev in devices:
            threads = torch.get_num_threads()
            if dev.type == "cpu":
                torch.set_num_threads(1)
            modes = ("",) if args.skip_compile else ("", "default") + (
                ("reduce-overhead",) if dev.type == "cuda" else ())
            for compile_ in modes:
                try:
                    result["toy"].append(bench_toy(args, dev, compile_))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    result["toy"].append({"device": str(dev), "compile": compile_ or "no", "error": repr(exc)[:300]})
                print(json.dumps(result["toy"][-1]))
                torch._dynamo.reset()
            torch.set_num_threads(threads)
    print(write_report(result, out))


if __name__ == "__main__":
    main()
