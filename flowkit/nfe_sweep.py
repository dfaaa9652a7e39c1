r"""Sample quality against the number of network evaluations (NFE), for trained models.

:func:`nfe_sweep` samples every named model with every sampler that applies to it, at each NFE
budget, over several seeds, and scores the samples against the model's test set by the energy
distance and the sliced Wasserstein-2 distance (:mod:`flowkit.metrics`). One
:class:`SweepResult` holds the rows; :meth:`SweepResult.write` writes them as one table
(``.md``, ``.csv``, ``.json``) and one plot (``.png``: quality against NFE, one line per
model × sampler, the adaptive reference as a dashed line per model).

What applies. A sampler applies to a model when the parts of a flow it declares in ``needs``
are among those the model's objective declares in ``provides``; otherwise the table says
``skipped: needs …`` (a one-step consistency model has no velocity, so no ODE solver runs on
it; a flow-matching model has no flow map).

NFE budgets. A budget ``B`` becomes the largest ``steps`` whose exact NFE is at most ``B``
(:func:`steps_for_nfe`); where the sampler cannot spend ``B`` exactly the budget is rounded
down, and the table reports the NFE actually spent (checked against the sampler's own count).
What ``steps`` cost (:func:`nfe_of_steps`) is not tabled here: each sampler declares it
(``evaluations`` of :func:`flowkit.samplers.base.declare`; one a step for ``ddim``, ``rk4``'s
four, ``edm_heun``'s count from its grid, the reverse-SDE samplers' Tweedie step …), and a
sampler without a step count declares itself adaptive (``dopri5``, ``probability_flow`` with
an adaptive method): it has no budget, and the ``reference`` sampler (``dopri5`` by default)
is run once per model and seed at its own NFE.

Example:
    >>> from flowkit.paths import VP, CondOT
    >>> from flowkit.flow import Flow, StandardNormal
    >>> flow = Flow(velocity=lambda t, x, cond=None: -x, prior=StandardNormal((2,)), path=CondOT())
    >>> [steps_for_nfe("heun", flow, b) for b in (1, 2, 5)], steps_for_nfe("rk4", flow, 8)
    ([None, 1, 2], 2)
    >>> steps_for_nfe("edm_heun", flow, 8), nfe_of_steps("edm_heun", flow, 5)  # 1 + 2·3 + 1
    (5, 8)
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .components import SAMPLERS
from .flow import Flow
from .metrics import energy_distance, sliced_wasserstein
from .samplers.base import declared_nfe

__all__ = ["SweepModel", "SweepRow", "SweepResult", "nfe_of_steps", "steps_for_nfe", "nfe_sweep",
           "sweep_runs", "parse_nfes", "parse_samplers", "sampler_label", "METRICS"]

#: the sample-quality metrics of a sweep (smaller is better)
METRICS = ("energy_distance", "sliced_w2")
#: the most steps :func:`steps_for_nfe` considers (a budget above this is refused)
MAX_STEPS = 100_000


@dataclass
class SweepModel:
    """A trained model for :func:`nfe_sweep`: its objective (``flow()``, declared ``provides``)
    and its dataset (``test_set``); :meth:`from_built` takes :func:`flowkit.load_run`'s parts."""

    objective: Any
    dataset: Any

    @classmethod
    def from_built(cls, built: Any) -> "SweepModel":
        return cls(built.objective, built.dataset)


@dataclass
class SweepRow:
    """One cell of the table: a model, a sampler (with its options), a budget.

    ``status`` is ``"ok"``, ``"reference"`` (the adaptive reference, no budget) or a reason the
    cell is empty (``skipped: …``). ``nfe`` is the NFE actually spent; the metrics are means over
    the seeds with their standard errors (``…_se``, ``nan`` for one seed)."""

    model: str
    sampler: str
    budget: Optional[int]
    status: str
    steps: Optional[int] = None
    nfe: Optional[int] = None
    seeds: int = 0
    energy_distance: float = math.nan
    energy_distance_se: float = math.nan
    sliced_w2: float = math.nan
    sliced_w2_se: float = math.nan
    values: dict[str, list[float]] = field(default_factory=dict)


# --------------------------------------------------------------------------------- budgets
def _options_of(sampler: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(sampler, str):
        return sampler, {}
    if "name" not in sampler:
        raise ValueError(f"a sampler is a name or a {{name: ..., **options}} mapping, got {dict(sampler)!r}")
    options = dict(sampler)
    return str(options.pop("name")), options


def sampler_label(sampler: str | Mapping[str, Any]) -> str:
    """``"dpmpp_2m"`` or ``"dpmpp_2m schedule=karras"``: the name and its options."""
    name, options = _options_of(sampler)
    return " ".join([name] + [f"{k}={v}" for k, v in sorted(options.items())])


def nfe_of_steps(name: str, flow: Flow, steps: int, **options: Any) -> Optional[int]:
    """The exact network evaluations of sampler ``name`` run with ``steps`` steps and ``options``
    on ``flow``, as the sampler declares them (:func:`flowkit.samplers.base.declared_nfe`);
    ``None`` for an adaptive sampler."""
    return declared_nfe(SAMPLERS.get(name), flow, steps, **options)


def steps_for_nfe(name: str, flow: Flow, budget: int, **options: Any) -> Optional[int]:
    """The most ``steps`` whose NFE (:func:`nfe_of_steps`) is at most ``budget``; ``None`` where
    even one step costs more (``heun`` at ``budget = 1``) or the sampler has no step count.

    NFE grows with ``steps`` for every sampler, so the answer is found by bisection.
    """
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"an NFE budget must be an integer >= 1, got {budget!r}")
    cost = nfe_of_steps(name, flow, 1, **options)
    if cost is None or cost > budget:
        return None
    lo, hi = 1, min(int(budget), MAX_STEPS)  # every step costs at least one evaluation
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if nfe_of_steps(name, flow, mid, **options) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------- sweep
def _score(samples: Tensor, reference: Tensor, seed: int) -> dict[str, float]:
    return {"energy_distance": energy_distance(samples, reference),
            "sliced_w2": sliced_wasserstein(samples, reference, seed=seed)}


def _summarise(row: SweepRow) -> SweepRow:
    for metric in METRICS:
        values = row.values.get(metric, [])
        row.seeds = len(values)
        if values:
            t = torch.tensor(values, dtype=torch.float64)
            setattr(row, metric, float(t.mean()))
            setattr(row, f"{metric}_se", float(t.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan)
    return row


def _draw(flow: Flow, name: str, options: dict[str, Any], n: int, seed: int, device: str) -> tuple[Tensor, int]:
    sampler = SAMPLERS.get(name)
    if "seed" in inspect.signature(sampler).parameters and "seed" not in options:
        options = {**options, "seed": seed + 1}
    generator = torch.Generator(device=device).manual_seed(seed)
    z = flow.prior.sample(n, generator=generator, device=device)
    res = sampler(flow, z, **options)
    return res.x.detach(), int(res.nfe)


def nfe_sweep(models: Mapping[str, SweepModel | Any], samplers: Sequence[str | Mapping[str, Any]],
              nfes: Sequence[int], *, n: int = 2000, seeds: Sequence[int] = (0, 1, 2),
              reference: Optional[str | Mapping[str, Any]] = "dopri5", device: str = "cpu",
              log: Any = None) -> "SweepResult":
    """Sample quality of every model with every applicable sampler at every NFE budget.

    Args:
        models: name → :class:`SweepModel` (or anything with ``objective`` and ``dataset``,
            e.g. the ``Built`` of :func:`flowkit.load_run`).
        samplers: names, or ``{name: ..., **options}`` mappings (``steps`` is set from the
            budget; other options pass through).
        nfes: NFE budgets (integers ≥ 1).
        n: samples per (model, sampler, budget, seed), scored against ``n`` test points.
        seeds: one draw of prior noise and of test points (``test_set(n, seed=1234 + s)``) each;
            the table gives the mean and its standard error over the seeds.
        reference: a sampler without a budget run once per model and seed (``None``: none).
        device: where the models run.
        log: ``print``-like progress callback (``None``: silent).

    Returns:
        The :class:`SweepResult`.

    Raises:
        ValueError: a budget is not an integer ≥ 1, a sampler name is unknown, or a sampler
            option sets ``steps`` (the budget sets it).
    """
    budgets = sorted({int(b) for b in nfes})
    for b in nfes:
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise ValueError(f"--nfe: an NFE budget must be an integer >= 1, got {b!r}")
    specs = [_options_of(s) for s in samplers]
    for name, options in specs:
        SAMPLERS.get(name)  # an unknown name lists the choices
        if "steps" in options:
            raise ValueError(f"sampler {name}: 'steps' is set by the NFE budget; leave it out")
    rows: list[SweepRow] = []
    for model_name, model in models.items():
        objective = getattr(model, "objective")
        dataset = getattr(model, "dataset")
        provides = frozenset(getattr(objective, "provides", ()))
        flow = objective.flow()
        tests = {s: dataset.test_set(n, seed=1234 + s)[0].to(device) for s in seeds}
        jobs: list[tuple[str, dict[str, Any], Optional[int]]] = []
        if reference is not None:
            jobs.append((*_options_of(reference), None))
        jobs += [(name, options, b) for name, options in specs for b in budgets]
        for name, options, budget in jobs:
            label = sampler_label({"name": name, **options})
            missing = sorted(SAMPLERS.get(name).needs - provides)
            if missing:
                rows.append(SweepRow(model_name, label, budget,
                                     f"skipped: needs {', '.join(missing)}, which {type(objective).__name__} "
                                     f"does not provide"))
                continue
            run_options, steps, expected = dict(options), None, None
            if budget is not None:
                steps = steps_for_nfe(name, flow, budget, **options)
                if steps is None:
                    rows.append(SweepRow(model_name, label, budget, "skipped: one step costs more than the budget"
                                         if nfe_of_steps(name, flow, 1, **options) is not None
                                         else "skipped: no step count (adaptive)"))
                    continue
                run_options["steps"] = steps
                expected = nfe_of_steps(name, flow, steps, **options)
            row = SweepRow(model_name, label, budget, "ok" if budget is not None else "reference", steps)
            for seed in seeds:
                x, spent = _draw(flow, name, run_options, n, seed, device)
                if expected is not None and spent != expected:
                    raise RuntimeError(f"nfe_sweep: {name} with steps={steps} spent {spent} NFE, "
                                       f"it declares {expected}: fix its declare(evaluations=...)")
                row.nfe = spent if row.nfe is None else max(row.nfe, spent)
                for metric, value in _score(x, tests[seed], seed).items():
                    row.values.setdefault(metric, []).append(value)
            rows.append(_summarise(row))
            if log is not None:
                log(f"{model_name:>16} {label:<24} budget {budget if budget else '-':>4} NFE {row.nfe:>4}  "
                    f"energy {row.energy_distance:.4f} ± {row.energy_distance_se:.4f}  "
                    f"SW2 {row.sliced_w2:.4f} ± {row.sliced_w2_se:.4f}")
    return SweepResult(rows, budgets, list(seeds), n)


def parse_nfes(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]`` (the CLI's ``--nfe``).

    Raises:
        ValueError: an entry is not an integer ``≥ 1``.
    """
    out = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"--nfe {text}: give comma-separated integers >= 1 (e.g. --nfe 1,2,4,8), got {part!r}")
        out.append(value)
    return out


def parse_samplers(text: str) -> list[str]:
    """``"dpmpp_2m,unipc"`` → the names (the CLI's ``--samplers``), each checked against the registry.

    Raises:
        ValueError: an unknown sampler name (with the registered ones).
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown or not names:
        raise ValueError(f"--samplers {text}: unknown sampler {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SAMPLERS.names())}")
    return names


def sweep_runs(runs: Mapping[str, str | Path], samplers: Sequence[str | Mapping[str, Any]], nfes: Sequence[int],
               out_prefix: str | Path, *, n: int = 2000, seeds: Sequence[int] = (0, 1, 2),
               reference: Optional[str | Mapping[str, Any]] = "dopri5", device: str = "cpu", ema: bool = True,
               log: Any = None) -> tuple["SweepResult", list[Path]]:
    """:func:`nfe_sweep` over trained run directories (name → run, loaded by
    :func:`flowkit.load_run`, with the EMA weights where kept unless ``ema=False``), written to
    ``out_prefix.{md,csv,json,png}``."""
    from .run import load_run

    models = {name: SweepModel.from_built(load_run(run, ema=ema, device=device)[0]) for name, run in runs.items()}
    result = nfe_sweep(models, samplers, nfes, n=n, seeds=seeds, reference=reference, device=device, log=log)
    return result, result.write(out_prefix)


# --------------------------------------------------------------------------------- output
@dataclass
class SweepResult:
    """The rows of a sweep and how they were made; :meth:`write` saves table and plot."""

    rows: list[SweepRow]
    budgets: list[int]
    seeds: list[int]
    n: int

    def table(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (no per-seed values)."""
        return [{k: v for k, v in asdict(r).items() if k != "values"} for r in self.rows]

    def markdown(self, metric: str = "energy_distance") -> str:
        """One table: a row per model × sampler, a column per budget, ``mean ± se (NFE)``."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        head = "| model | sampler | " + " | ".join(f"NFE {b}" for b in self.budgets) + " | reference |"
        lines = [head, "|---" * (len(self.budgets) + 3) + "|"]
        keys = list(dict.fromkeys((r.model, r.sampler) for r in self.rows if r.budget is not None))
        refs = {r.model: r for r in self.rows if r.budget is None}
        for model, sampler in keys:
            cells = []
            for b in self.budgets:
                row = next((r for r in self.rows if (r.model, r.sampler, r.budget) == (model, sampler, b)), None)
                cells.append("" if row is None else _cell(row, metric))
            ref = refs.get(model)
            lines.append(f"| {model} | {sampler} | " + " | ".join(cells)
                         + f" | {'' if ref is None else _cell(ref, metric)} |")
        return "\n".join(lines)

    def csv(self) -> str:
        out = io.StringIO()
        rows = self.table()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    def write(self, prefix: str | Path, title: str = "Sample quality against NFE") -> list[Path]:
        """Write ``prefix.md`` (both metrics), ``prefix.csv``, ``prefix.json`` and ``prefix.png``."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md = [f"# {title}", "", f"{self.n} samples against {self.n} test points, seeds {self.seeds}: "
              "mean ± standard error over the seeds, and the NFE actually spent in brackets "
              "(a budget a sampler cannot meet exactly is rounded down).", ""]
        for metric in METRICS:
            md += [f"## {metric.replace('_', ' ')}", "", self.markdown(metric), ""]
        skipped = sorted({(r.model, r.sampler, r.status) for r in self.rows if r.status.startswith("skipped")
                          and "budget" not in r.status})
        if skipped:
            md += ["## Not run", ""] + [f"- {m}, {s}: {why}" for m, s, why in skipped] + [""]
        paths = [prefix.with_suffix(".md"), prefix.with_suffix(".csv"), prefix.with_suffix(".json"),
                 prefix.with_suffix(".png")]
        paths[0].write_text("\n".join(md))
        paths[1].write_text(self.csv())
        paths[2].write_text(json.dumps(_finite({"budgets": self.budgets, "seeds": self.seeds, "n": self.n,
                                                "rows": [asdict(r) for r in self.rows]}), indent=1))
        self.plot(paths[3], title)
        return paths

    def plot(self, path: str | Path, title: str = "Sample quality against NFE") -> None:
        """Quality against NFE (log–log): a panel per model (columns) and metric (rows), a line
        per sampler with standard-error bars (one colour per sampler throughout), the model's
        reference dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        models = list(dict.fromkeys(r.model for r in self.rows))
        samplers = list(dict.fromkeys(r.sampler for r in self.rows if r.budget is not None))
        colours, markers = plt.get_cmap("tab10"), "osD^vP*Xh<>"
        fig, axes = plt.subplots(len(METRICS), max(1, len(models)), figsize=(3.6 * max(1, len(models)), 6.4),
                                 squeeze=False, sharex=True)
        for col, model in enumerate(models):
            for row_index, metric in enumerate(METRICS):
                ax = axes[row_index][col]
                for j, sampler in enumerate(samplers):
                    pts = sorted((r.nfe, getattr(r, metric), getattr(r, f"{metric}_se")) for r in self.rows
                                 if r.model == model and r.sampler == sampler and r.status == "ok")
                    if pts:
                        x, y, e = zip(*pts)
                        ax.errorbar(x, y, yerr=[0 if math.isnan(v) else v for v in e], color=colours(j % 10),
                                    marker=markers[j % len(markers)], ms=4, lw=1.2, capsize=2, label=sampler)
                ref = next((r for r in self.rows if r.model == model and r.status == "reference"), None)
                if ref is not None and not math.isnan(getattr(ref, metric)):
                    ax.axhline(getattr(ref, metric), color="black", ls="--", lw=0.9,
                               label=f"{ref.sampler} (reference)")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                if row_index == 0:
                    ax.set_title(model + (f"\n({ref.sampler}: {ref.nfe} NFE)" if ref is not None else ""), fontsize=9)
                if row_index == len(METRICS) - 1:
                    ax.set_xlabel("NFE")
                if col == 0:
                    ax.set_ylabel(f"{metric.replace('_', ' ')} (lower is better)")
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 8), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


def _cell(row: SweepRow, metric: str) -> str:
    if row.status not in ("ok", "reference"):
        return "skipped" if "needs" in row.status else "—"
    value, se = getattr(row, metric), getattr(row, f"{metric}_se")
    spread = "" if math.isnan(se) else f" ± {se:.4f}"
    return f"{value:.4f}{spread} ({row.nfe})"


def _finite(value: Any) -> Any:
    """``nan`` → ``None`` throughout (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
