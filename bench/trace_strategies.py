"""Ways of taking the exact trace ``tr ∂f/∂x`` of a field without a declared fast path, by dimension.

For flowkit's ``mlp`` field (SiLU, hidden 64-64-64) at ``D`` = 2, 8, 32, 64, batch 1,000, one
thread, the ways :func:`flowkit.fast_divergence.choose_strategy` can choose among:

* ``vjp_loop`` — ``D`` separate backward passes (``autograd.grad`` per basis vector; the
  official FFJORD code's ``divergence_bf``);
* ``vjp_batched`` — the ``D`` vector–Jacobian products in one batched backward
  (``is_grads_batched``, vmap over the backward; flowkit's ``exact`` strategy);
* ``jvp_loop`` — forward mode, ``torch.func.jvp`` per basis vector (``D`` forward passes);
* ``jacfwd`` / ``jacrev`` — ``vmap`` over samples of ``torch.func.jacfwd`` / ``jacrev``;
* ``replicated`` — the batch replicated ``D`` times, one forward and one backward.

Two uses: ``eval`` (the divergence only, no graph; likelihood evaluation) and ``train`` (the
divergence with its graph, then ``backward`` of ``Σ div + Σ f`` to the parameters; FFJORD
training by direct backpropagation). Every way is checked against ``vjp_loop`` first. Ways
alternate within each repeat (interleaved); the median over repeats is reported.

    python bench/trace_strategies.py                  # ~2 min on 2 cores
    python bench/trace_strategies.py --dims 2 8 --repeats 3

Results: ``bench/results/trace_strategies.json`` and ``.md``; the table
:data:`flowkit.fast_divergence.EXACT_TRACE_BY_DIM` cites them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowkit.dynamics import MLP  # noqa: E402
from benchinfo import cpu_name  # noqa: E402


def vjp_loop(f, t, x, create_graph):
    x = x.requires_grad_(True)
    out = f(t, x)
    div = sum(torch.autograd.grad(out[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0][:, i]
              for i in range(x.shape[1]))
    return out, div


def vjp_batched(f, t, x, create_graph):
    x = x.requires_grad_(True)
    out = f(t, x)
    dim = x.shape[1]
    basis = torch.eye(dim, dtype=x.dtype)[:, None, :].expand(dim, x.shape[0], dim)
    rows = torch.autograd.grad(out, x, basis, create_graph=create_graph, is_grads_batched=True)[0]
    return out, torch.diagonal(rows, dim1=0, dim2=2).sum(-1)


def jvp_loop(f, t, x, create_graph):
    dim = x.shape[1]
    div, out = 0, None
    for i in range(dim):
        e = torch.zeros_like(x)
        e[:, i] = 1
        out, jv = torch.func.jvp(lambda y: f(t, y), (x,), (e,))
        div = div + jv[:, i]
    return out, div


def _per_sample(f, t):
    return lambda xi: f(t, xi.unsqueeze(0)).squeeze(0)


def jacfwd(f, t, x, create_graph):
    jac = torch.func.vmap(torch.func.jacfwd(_per_sample(f, t)))(x)
    return f(t, x), torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)


def jacrev(f, t, x, create_graph):
    jac = torch.func.vmap(torch.func.jacrev(_per_sample(f, t)))(x)
    return f(t, x), torch.diagonal(jac, dim1=-2, dim2=-1).sum(-1)


def replicated(f, t, x, create_graph):
    batch, dim = x.shape
    xr = x.detach().repeat(dim, 1).requires_grad_(True)
    out = f(t, xr)
    basis = torch.eye(dim, dtype=x.dtype).repeat_interleave(batch, 0)
    g = torch.autograd.grad(out, xr, basis, create_graph=create_graph)[0]
    div = (g * basis).sum(-1).reshape(dim, batch).sum(0)
    return out[:batch], div


WAYS = {"vjp_loop": vjp_loop, "vjp_batched": vjp_batched, "jvp_loop": jvp_loop, "jacfwd": jacfwd,
        "jacrev": jacrev, "replicated": replicated}


def one(way, net, t, x, mode: str) -> float:
    start = time.perf_counter()
    if mode == "eval":
        out, div = WAYS[way](net, t, x.clone(), False)
    else:
        net.zero_grad(set_to_none=True)
        out, div = WAYS[way](net, t, x.clone(), True)
        (div.sum() + out.sum()).backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        torch.manual_seed(dim)
        net = MLP(dim, (64, 64, 64), activation="silu")
        x = torch.randn(args.batch, dim)
        t = torch.tensor(0.3)
        _, ref = vjp_loop(net, t, x.clone(), False)
        for way in WAYS:  # correctness first, and a warm-up
            _, div = WAYS[way](net, t, x.clone(), False)
            err = float((div - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            if err > 1e-4:
                raise RuntimeError(f"{way} at D={dim}: relative error {err:.1e} against vjp_loop")
        for mode in ("eval", "train"):
            times = {w: [] for w in WAYS}
            for r in range(args.repeats):
                order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
                for way in order:
                    times[way].append(one(way, net, t, x, mode))
            med = {w: statistics.median(v) * 1e3 for w, v in times.items()}
            best = min(med, key=med.get)
            row = {"dim": dim, "mode": mode, "batch": args.batch, "ms": med, "best": best}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__, "batch": args.batch,
            "repeats": args.repeats, "load_average_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "shared_machine": True}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace_strategies.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Exact trace of a field without a fast path, by dimension ({meta['date']})", "",
             f"flowkit `mlp` (SiLU, 64-64-64), batch {args.batch}, {args.threads} thread(s), torch {meta['torch']}, "
             f"{meta['machine']}; median ms of {args.repeats} interleaved repeats per call (eval: divergence only; "
             "train: with its graph, then backward to the parameters). The machine was shared with other jobs; "
             f"load average at the end {tuple(round(v, 2) for v in meta['load_average_end'])}.", "",
             "| D | use | " + " | ".join(WAYS) + " | fastest |", "|---|---|" + "---|" * (len(WAYS) + 1)]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['mode']} | " + " | ".join(f"{r['ms'][w]:.1f}" for w in WAYS)
                     + f" | {r['best']} |")
    (out / "trace_strategies.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
