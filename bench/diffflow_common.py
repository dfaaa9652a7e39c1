"""What the DiffFlow benches share: the machine record, the sharp-density metrics, the
in-run plain-PyTorch DiffFlow baseline and the results files.

* ``bench/diffflow_timing.py`` — cost of the stochastic adjoint (time, memory, gradients);
* ``bench/diffflow_compare.py`` — DiffFlow vs FFJORD vs score matching vs CFM under one budget;
* ``bench/diffflow_official.py`` — sample quality at the official code's 2-D configuration.

Each writes ``<out>/diffflow_<job>.json`` and ``.md`` (default ``bench/results/``) through
:func:`write_results`, which keeps the sections of the file that this call did not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowkit  # noqa: E402
from benchinfo import cpu_name  # noqa: E402  (bench/benchinfo.py, beside this file)
from flowkit.allocator import tune_cpu_allocator  # noqa: E402
from flowkit.data import Standardized  # noqa: E402
from flowkit.flow import StandardNormal  # noqa: E402

__all__ = ["ROOT", "RESULTS", "machine", "bench_parser", "size_arguments", "fill_sizes", "set_up", "mmd",
           "on_support", "true_nll", "PlainDiffFlow", "load_results", "write_results"]

RESULTS = ROOT / "bench" / "results"


def machine(threads: int) -> dict[str, Any]:
    """CPU, cores, threads, versions and the load average now (the machine is shared)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc`` with ``--quick``, ``--threads``
    and ``--out``, the same in every DiffFlow bench."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a few minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder of the results files and run directories (default bench/results)")
    return parser


def size_arguments(parser: argparse.ArgumentParser, batch: str) -> None:
    """``--batch`` (its default described by ``batch``), ``--eval-n`` and ``--samples``."""
    parser.add_argument("--batch", type=int, default=None, help=f"training batch (default {batch}; 256 with --quick)")
    parser.add_argument("--eval-n", type=int, default=None, help="NLL test points (default 2000; 200 with --quick)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per model (default 5000; 1000 with --quick); the energy distance and MMD² "
                             "use at most 2000 of them")


def fill_sizes(args: argparse.Namespace, parser: argparse.ArgumentParser,
               defaults: dict[str, tuple[Optional[float], Optional[float]]]) -> None:
    """Each option of ``defaults`` (name → (full, ``--quick``) default) left unset takes its
    default; a value set below 1 is refused with the option's name."""
    defaults = {"batch": (None, 256), "eval_n": (2000, 200), "samples": (5000, 1000), **defaults}
    for name, (full, quick) in defaults.items():
        value = getattr(args, name)
        if value is None:
            value = quick if args.quick else full
            setattr(args, name, value)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def set_up(threads: int, tune_allocator: bool = True) -> None:
    """Threads, and glibc's malloc thresholds tuned as flowkit's trainer does by default
    (``train.tune_allocator``, :mod:`flowkit.allocator`)."""
    torch.set_num_threads(threads)
    if tune_allocator:
        tune_cpu_allocator()


# ----------------------------------------------------------------------------- metrics


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 0.05) -> float:
    """Unbiased MMD² with the Gaussian kernel ``exp(−‖a − b‖² / (2σ²))``, σ = ``bandwidth``.

    The bandwidth is narrow on purpose: at σ = 0.05 the kernel sees whether samples sit on a
    ring of width 0.001, which the energy distance (a kernel of global reach) barely does.
    """
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def on_support(dataset, x: torch.Tensor, band: float = 0.02) -> float:
    """Fraction of ``x`` within ``band`` of the support (``distance_to_support``: the rings),
    else where the density is positive (``log_prob`` finite: inside the carpet)."""
    if hasattr(dataset, "distance_to_support"):
        return float((dataset.distance_to_support(x.float()) < band).float().mean())
    return float(torch.isfinite(dataset.log_prob(x.float())).float().mean())


def true_nll(dataset, n: int = 20000) -> Optional[float]:
    """The data's own NLL (nats) on ``n`` test points; None when the dataset has no density."""
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


# ----------------------------------------------------------------------------- the plain baseline


class PlainDiffFlow(torch.nn.Module):
    """The in-run plain-PyTorch baseline of DiffFlow (Zhang & Chen 2021): eq. 15 by naive
    backprop through a plain loop on the time ``grid``, with the prior ``N(0, prior_std² I)``.

    It is the official code's algorithm written the way that code's forward step is, so that
    flowkit's ``diffflow`` objective is measured against it in the same process: the timing
    bench times its step, the official bench trains it the official code's way and samples it
    by its reverse SDE (eq. 9, Euler–Maruyama on the same grid), wrapped as a
    :class:`flowkit.Flow` only to share the likelihood evaluation with flowkit's runs.
    """

    def __init__(self, drift: Callable, score: Callable, grid: torch.Tensor, g: float, prior_std: float = 1.0):
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

    def flow(self) -> flowkit.Flow:
        """The probability-flow ODE ``v = f − g²/2 · s`` between the grid's ends."""
        def velocity(t, x, cond=None):
            return self.drift(t, x) - 0.5 * self.g**2 * self.score(t, x)

        return flowkit.Flow(velocity=velocity, prior=StandardNormal((2,), self.prior_std), t0=float(self.grid[0]),
                            t1=float(self.grid[-1]))


# ----------------------------------------------------------------------------- results files


def load_results(out: Path, job: str) -> dict[str, Any]:
    """The sections of ``<out>/diffflow_<job>.json`` measured so far (empty when none)."""
    path = Path(out) / f"diffflow_{job}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(out: Path, job: str, sections: dict[str, Any],
                  markdown: Callable[[dict[str, Any]], str]) -> str:
    """Merge ``sections`` into ``<out>/diffflow_<job>.json`` (other sections kept), write the
    report ``markdown(results)`` to ``.md`` beside it and return the report. The report is made
    from the file as reloaded, so integer keys read as strings as they do in a later call."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"diffflow_{job}.json"
    results = {**load_results(out, job), **sections}
    path.write_text(json.dumps(results, indent=2))
    text = markdown(json.loads(path.read_text()))
    (out / f"diffflow_{job}.md").write_text(text)
    return text
