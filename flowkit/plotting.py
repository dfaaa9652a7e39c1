"""PNG pictures of 2-D samples, densities and trajectories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["plot_samples", "plot_density", "plot_grid", "plot_image_grid", "plot_curves", "CURVE_METRICS"]

#: the periodic-evaluation records' metrics drawn by :func:`plot_curves`: (key, label, log scale)
CURVE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("eval_bpd", "test bits/dim", False), ("eval_nll", "test NLL (nats)", False),
    ("eval_energy_distance", "energy distance (V-stat.)", True), ("eval_mmd", "MMD (multi-scale RBF)", True),
    ("eval_feature_fd", "feature Fréchet distance", True))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _limits(x: Tensor, pad: float = 0.05) -> tuple[float, float]:
    lo, hi = torch.quantile(x.flatten().float(), torch.tensor([0.002, 0.998])).tolist()
    span = hi - lo
    return lo - pad * span, hi + pad * span


def _hist(ax, x: Tensor, bins: int = 200, lim: Optional[tuple[float, float]] = None) -> None:
    x = x.detach().cpu().float()
    lim = lim or _limits(x)
    ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=bins, range=[lim, lim], cmap="inferno")
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(samples: Tensor, path: str | Path, *, data: Optional[Tensor] = None,
                 title: str = "", trajectories: Optional[Tensor] = None) -> Path:
    """2-D histogram of samples (beside the data when given); lines for trajectories
    ``[T, B, 2]``."""
    plt = _plt()
    panels = 2 if data is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4), squeeze=False)
    lim = _limits(data.detach().cpu() if data is not None else samples.detach().cpu())
    if data is not None:
        _hist(axes[0, 0], data, lim=lim)
        axes[0, 0].set_title("data")
    ax = axes[0, -1]
    _hist(ax, samples, lim=lim)
    if trajectories is not None:
        tr = trajectories.detach().cpu()[:, :64]
        for b in range(tr.shape[1]):
            ax.plot(tr[:, b, 0], tr[:, b, 1], color="cyan", lw=0.5, alpha=0.6)
    ax.set_title(title or "samples")
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_density(log_density: Tensor, extent: tuple[float, float], path: str | Path, title: str = "") -> Path:
    """Image of ``exp(log_density)`` on a square grid ``[n, n]`` spanning ``extent``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(log_density.exp().detach().cpu().T.numpy(), origin="lower", cmap="inferno",
              extent=[*extent, *extent])
    ax.set_title(title or "density")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_grid(panels: Sequence[tuple[str, Optional[Tensor]]], path: str | Path,
              reference: Optional[Tensor] = None) -> Path:
    """Side-by-side sample histograms (``None`` panels show "failed")."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    lim = _limits(reference.detach().cpu()) if reference is not None else None
    for ax, (title, x) in zip(axes[0], panels):
        if x is None:
            ax.text(0.5, 0.5, "failed", ha="center", va="center")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            _hist(ax, x, lim=lim or _limits(x.detach().cpu()))
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_image_grid(x: Tensor, path: str | Path, *, dataset=None, columns: int = 8) -> Path:
    """Samples ``[N, C, H, W]`` (model space) as a grid of images; ``dataset.to_images`` maps
    them back to ``[0, 1]`` when the data were transformed (logit)."""
    plt = _plt()
    images = dataset.to_images(x) if dataset is not None and hasattr(dataset, "to_images") else x.clamp(0, 1)
    images = images.detach().cpu().float()
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
    fig.tight_layout(pad=0.1)
    return _save(plt, fig, path, dpi=80)


def _band(curves: Sequence[Sequence[dict]], x_key: str, y_key: str):
    """Mean x, mean y and its standard error over seeds, point by point (the k-th periodic
    evaluation of every seed is at the same fraction of the budget); seeds without the
    metric are left out, and the curve is as long as the shortest seed's."""
    import math

    runs = [[r for r in c if r.get(y_key) is not None and r.get(x_key) is not None] for c in curves]
    runs = [c for c in runs if c]
    if not runs:
        return None
    length = min(len(c) for c in runs)
    xs, ys, ses = [], [], []
    for k in range(length):
        x = [float(c[k][x_key]) for c in runs]
        y = [float(c[k][y_key]) for c in runs]
        mean = sum(y) / len(y)
        se = math.sqrt(sum((v - mean) ** 2 for v in y) / (len(y) - 1) / len(y)) if len(y) > 1 else 0.0
        xs.append(sum(x) / len(x))
        ys.append(mean)
        ses.append(se)
    return xs, ys, ses


def plot_curves(curves: dict[str, Sequence[Sequence[dict]]], x_key: str, path: str | Path) -> Path:
    """Quality against ``x_key`` (``train_seconds`` or ``evaluations``) for every run: one panel
    per metric of :data:`CURVE_METRICS` that some run logged (bits/dim replaces NLL for
    discrete data), the mean over seeds with a ±1 standard-error band.

    Args:
        curves: run name → one list of periodic-evaluation records per seed (the trainer's
            ``metrics.jsonl`` rows holding ``eval_nll``).
        x_key: the record field on the horizontal axis.
        path: the PNG to write.
    """
    plt = _plt()
    present = {k for runs in curves.values() for c in runs for r in c for k, v in r.items() if v is not None}
    metrics = [m for m in CURVE_METRICS if m[0] in present]
    if any(m[0] == "eval_bpd" for m in metrics):
        metrics = [m for m in metrics if m[0] != "eval_nll"]
    metrics = metrics or [CURVE_METRICS[1]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    xlabel = {"train_seconds": "training time (s, steps only)", "evaluations": "network evaluations"}.get(x_key, x_key)
    for ax, (key, label, log) in zip(axes[0], metrics):
        for name, runs in curves.items():
            band = _band(runs, x_key, key)
            if band is None:
                continue
            xs, ys, ses = band
            seeds = sum(1 for c in runs if any(r.get(key) is not None for r in c))
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({seeds} seed{'s' * (seeds != 1)})")
            ax.fill_between(xs, [y - e for y, e in zip(ys, ses)], [y + e for y, e in zip(ys, ses)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if x_key == "evaluations":
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("mean ± standard error over seeds", fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (its directory made if missing) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
