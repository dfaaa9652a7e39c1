"""Evaluation shared by the trainer, the CLI and users: NLL of any flow, sampling, metrics.

What is evaluated follows the objective's declarations: a flow that defines a density
gets its test NLL (:func:`evaluate_nll`) and sample quality; one that declares
``defines_density = False`` (a consistency model) sample quality only; a ``variational``
objective (``vae``) its bounds (:func:`evaluate_variational`).

The NLL is a sum of independent per-point solves, so it shards: :func:`nll_points` solves
the batches of one process (batch ``b`` of the one-process batching goes to process
``b mod P``, with Hutchinson probes seeded by ``b``), and :class:`Sharding`'s ``gather``
puts every process's points back in order after the solves — nothing collective runs
inside a solve, so processes taking different numbers of adaptive steps cannot hang, and
the numbers are those of one process.

Sample metrics (:mod:`flowkit.metrics`, each defined there): energy distance (V-statistic,
``≥ 0``), MMD (mean of Gaussian RBF kernels at 1/16, 1/4 and 1 times the reference's
median pairwise distance, reported in ``mmd_bandwidth``), sliced W2, and for image data
with a feature space (the 8×8 digits) the Fréchet distance of classifier features.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .config import EvalConfig
from .flow import FieldError, Flow
from .likelihood import bits_per_dim, check_data, flow_log_likelihood
from .metrics import energy_distance, feature_space, frechet_distance, mmd, mmd_bandwidth, sliced_wasserstein
from .samplers.base import SampleResult

__all__ = ["evaluate_model", "Evaluation", "evaluate_nll", "nll_points", "NLLPoints", "Sharding", "shard_batches",
           "merge_points", "gather_rows", "accelerate_sharding", "summarise_points", "evaluate_variational", "variational_pictures", "generate",
           "sample_metrics"]

#: rows (test points × importance samples) per pass of a variational model's bound
_VARIATIONAL_ROWS = 16384


@dataclass
class NLLPoints:
    """Per-point results of :func:`nll_points`, in the order of ``index``.

    Attributes:
        index: ``[m]`` int64, each point's row in the evaluated ``x``.
        log_likelihood: ``[m]`` float64, ``log p(x)`` in nats in data units (the data
            transform's log-determinant included).
        nfe: ``[m]`` int64, field evaluations of the solve that held the point (its batch's).
        latent: ``[m, *event_shape]``, the image ``z`` of the point at ``t1`` (model space).
        process: ``[m]`` int64, the rank of the process that solved the point (0 in one process).
    """

    index: Tensor
    log_likelihood: Tensor
    nfe: Tensor
    latent: Tensor
    process: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.process is None:
            self.process = torch.zeros_like(self.index)

    def __len__(self) -> int:
        return int(self.index.numel())


@dataclass(frozen=True)
class Sharding:
    """One process's share of an evaluation: ``rank`` of ``world`` processes, and ``gather``,
    which returns every process's :class:`NLLPoints` merged in order (a collective call that
    every process makes once, after its own solves; :func:`merge_points` of the gathered parts).
    """

    rank: int = 0
    world: int = 1
    gather: Optional[Callable[[NLLPoints], NLLPoints]] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.world, int) and self.world >= 1 and isinstance(self.rank, int)
                and 0 <= self.rank < self.world):
            raise ValueError(f"sharding: rank {self.rank!r} of {self.world!r} processes; need 0 <= rank < world")


def shard_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, int]]:
    """The batches ``(b, start, stop)`` of ``n`` points that process ``rank`` of ``world`` solves:
    the one-process batching (``batch_size`` points each, in order) dealt round-robin, batch
    ``b`` to process ``b mod world``.

    Example:
        >>> shard_batches(10, 3, 1, 2)
        [(1, 3, 6), (3, 9, 10)]
    """
    return [(b, start, min(start + batch_size, n)) for b, start in enumerate(range(0, n, batch_size))
            if b % world == rank]


def merge_points(parts: Sequence[NLLPoints]) -> NLLPoints:
    """Several processes' :class:`NLLPoints` as one, ordered by ``index``.

    Raises:
        ValueError: a point appears twice.

    Example:
        >>> a = NLLPoints(torch.tensor([2]), torch.tensor([-2.0]), torch.tensor([5]), torch.zeros(1, 1), torch.tensor([1]))
        >>> b = NLLPoints(torch.tensor([0, 1]), torch.tensor([-0.0, -1.0]), torch.tensor([4, 4]), torch.zeros(2, 1))
        >>> m = merge_points([a, b])
        >>> m.index.tolist(), m.log_likelihood.tolist(), m.process.tolist()
        ([0, 1, 2], [-0.0, -1.0, -2.0], [0, 0, 1])
    """
    index = torch.cat([p.index for p in parts])
    order = torch.argsort(index)
    if index.numel() > 1 and bool((index[order][1:] == index[order][:-1]).any()):
        raise ValueError("merge_points: a point was evaluated by more than one process")
    return NLLPoints(index[order], torch.cat([p.log_likelihood for p in parts])[order],
                     torch.cat([p.nfe for p in parts])[order], torch.cat([p.latent for p in parts])[order],
                     torch.cat([p.process for p in parts])[order])


def _batch_seed(seed: int, batch: int) -> int:
    """The probe seed of batch ``batch``: ``seed`` for the first (as a single-batch evaluation
    always had), then a hash of both, so every process draws batch ``b``'s probes alike."""
    if batch == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def nll_points(flow: Flow, x: Tensor, cfg: EvalConfig, *, cond: Optional[Tensor] = None, progress: bool = False,
               log_det: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
               sharding: Optional[Sharding] = None) -> NLLPoints:
    """Per-point log-likelihood, NFE and latent of the batches of ``x`` this process solves.

    The batching is the one-process batching (``cfg.batch_size`` points in order), dealt to
    ``sharding.world`` processes round-robin (:func:`shard_batches`); batch ``b``'s Hutchinson
    probes come from a generator seeded by ``(cfg.seed, b)``, so which process solves a batch
    changes none of its numbers. Inputs are checked as by :func:`evaluate_nll`, which
    documents the errors raised.
    """
    check_data(x)
    if cond is not None and (not isinstance(cond, Tensor) or cond.dim() < 1 or cond.shape[0] != x.shape[0]):
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise FieldError(f"cond: expected one condition per sample of x, shape [{x.shape[0]}, ...], got {got}")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, numbers.Integral) or cfg.batch_size < 1:
        raise FieldError(f"eval.batch_size: expected a positive integer, got {cfg.batch_size!r}")
    if isinstance(cfg.n_probes, bool) or not isinstance(cfg.n_probes, numbers.Integral) or cfg.n_probes < 1:
        raise FieldError(f"eval.n_probes: expected a positive integer (Hutchinson probes averaged per sample), "
                         f"got {cfg.n_probes!r}")
    sharding = sharding or Sharding()
    solver = cfg.solver
    batches = shard_batches(x.shape[0], cfg.batch_size, sharding.rank, sharding.world)
    indices, lls, nfes, latents = [], [], [], []
    shown = batches
    if progress:
        from tqdm.auto import tqdm

        shown = tqdm(batches, desc="nll", unit="batch", leave=False)
    for b, i, stop in shown:
        xb = x[i:stop]
        cb = None if cond is None else cond[i:stop]
        generator = torch.Generator(device=x.device).manual_seed(_batch_seed(cfg.seed, b))
        try:
            out = flow_log_likelihood(flow, xb, cond=cb, estimator=cfg.divergence, noise=cfg.noise,
                                      n_probes=cfg.n_probes, solver=solver, generator=generator)
        except FieldError as exc:
            if x.shape[0] <= cfg.batch_size:
                raise
            # same class (NonFiniteFieldError stays one), with where the batch lies in x
            raise type(exc)(f"{exc} [in the batch x[{i}:{stop}]; rows count from {i}]") from None
        logp = out.log_prob.detach()
        correction = log_det(xb) if log_det is not None else None
        if correction is not None:
            correction = correction.to(logp)
            if tuple(correction.shape) != tuple(logp.shape) or bool(torch.isnan(correction).any()):
                raise FieldError(f"log_det returned shape {tuple(correction.shape)} with "
                                 f"{int(torch.isnan(correction).sum())} NaN values for a batch of "
                                 f"{xb.shape[0]} samples; expected ({xb.shape[0]},) without NaN")
            logp = logp + correction
        indices.append(torch.arange(i, stop))
        lls.append(logp.double().cpu())
        nfes.append(torch.full((stop - i,), int(out.nfe), dtype=torch.long))
        latents.append(out.z.detach().cpu())
    if not batches:  # more processes than batches: this one has none
        return NLLPoints(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                         torch.zeros(0, dtype=torch.long), x.new_zeros((0, *x.shape[1:])).cpu())
    index = torch.cat(indices)
    return NLLPoints(index, torch.cat(lls), torch.cat(nfes), torch.cat(latents),
                     torch.full_like(index, sharding.rank))


def gather_rows(accelerator: Any, rows: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Every process's ``rows`` (tensors of equal first dimension, possibly 0 and different per
    process), as one dict per process in rank order: each tensor padded to the longest share,
    ``all_gather``-ed, and cut back. A collective call: every process of ``accelerator`` makes it
    once, after its own work (nothing collective runs inside a solve)."""
    device = accelerator.device
    count = next(iter(rows.values())).shape[0]
    counts = accelerator.gather(torch.tensor([count], device=device)).cpu().tolist()
    longest = max(counts)
    out: list[dict[str, Tensor]] = [{} for _ in counts]
    for key, value in rows.items():
        padded = value.new_zeros((longest, *value.shape[1:]))
        padded[:count] = value
        gathered = accelerator.gather(padded.to(device)).cpu().reshape(len(counts), longest, *value.shape[1:])
        for r, c in enumerate(counts):
            out[r][key] = gathered[r, :c]
    return out


def accelerate_sharding(accelerator: Any) -> Sharding:
    """The :class:`Sharding` of this process of an ``accelerate`` job (``process_index`` of
    ``num_processes``), gathering :class:`NLLPoints` by :func:`gather_rows`."""
    def gather(points: NLLPoints) -> NLLPoints:
        rows = {"index": points.index, "log_likelihood": points.log_likelihood, "nfe": points.nfe,
                "latent": points.latent.to(torch.float64), "process": points.process}
        parts = gather_rows(accelerator, rows)
        return merge_points([NLLPoints(p["index"], p["log_likelihood"], p["nfe"], p["latent"].to(points.latent.dtype),
                                       p["process"]) for p in parts])

    return Sharding(accelerator.process_index, accelerator.num_processes, gather)


def summarise_points(points: NLLPoints, dim: int, cfg: EvalConfig, *, log_scale: float = 0.0,
                     discrete: bool = False) -> dict[str, Any]:
    """The summary :func:`evaluate_nll` returns, from every point's results (``seconds`` aside).

    ``nfe`` is the mean over batches of each batch's field evaluations.
    """
    nll = -points.log_likelihood
    mean = float(nll.mean())
    starts = torch.ones_like(points.index, dtype=torch.bool)
    if len(points) > 1:  # one nfe per batch: the first point of each
        starts[1:] = (points.index[1:] // cfg.batch_size) != (points.index[:-1] // cfg.batch_size)
    return {
        "nll": mean,
        "nll_sem": float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else 0.0,
        "bpd": float(bits_per_dim(mean, dim, log_scale)) if discrete else None,
        "nfe": float(points.nfe[starts].double().mean()),
        "n": len(points),
        "divergence": cfg.divergence,
        "rtol": cfg.solver.rtol,
        "atol": cfg.solver.atol,
    }


def evaluate_nll(flow: Flow, x: Tensor, cfg: EvalConfig, *, cond: Optional[Tensor] = None,
                 log_scale: float = 0.0, discrete: bool = False, progress: bool = False,
                 log_det: Optional[Callable[[Tensor], Optional[Tensor]]] = None,
                 sharding: Optional[Sharding] = None, points: bool = False) -> dict[str, Any]:
    """Mean negative log-likelihood (nats per sample) of ``x`` under ``flow``, in batches.

    Returns ``{"nll", "nll_sem", "bpd", "nfe", "n", "divergence", "rtol", "atol", "seconds"}``;
    ``bpd`` is bits/dim for discrete data (dequantised, with the scaling offset) else None.
    ``log_det(y)`` adds the log-determinant of a data → model-space transform (logit), so the
    NLL refers to the data (see :meth:`flowkit.data.Dataset.model_log_det`). With ``points``,
    also ``"points"``: every point's :class:`NLLPoints` (log-likelihood, NFE, latent).

    With ``sharding`` (several processes, e.g. under ``accelerate launch``), this process
    solves its share of the batches (:func:`nll_points`) and ``sharding.gather`` brings every
    share back in order before the summary: every process returns the same numbers, those
    of one process.

    The contract of :func:`flowkit.likelihood.log_likelihood` holds for every batch: a field
    called under ``no_grad`` / ``inference_mode`` or detached is differentiated by finite
    differences, never given a zero divergence.

    Raises:
        FieldError: ``x`` is not a finite floating ``[n, *event_shape]`` tensor with a sample
            (all bad rows of ``x`` are counted), ``cond`` is not one row per sample,
            ``cfg.n_probes < 1``, ``cfg.batch_size < 1``, ``log_det`` returns NaN, a prior of
            another event shape, or a field breaks its contract (wrong shape, not deterministic,
            mixing samples; the message says which samples of ``x`` the batch held).
        NonFiniteFieldError: a field returned NaN or inf.
    """
    start = time.perf_counter()
    sharding = sharding or Sharding()
    found = nll_points(flow, x, cfg, cond=cond, progress=progress, log_det=log_det, sharding=sharding)
    if sharding.gather is not None:
        found = sharding.gather(found)
    if len(found) != x.shape[0]:
        raise FieldError(f"sharding: {len(found)} of {x.shape[0]} points came back from the processes; pass a "
                         "Sharding whose gather returns every process's points")
    res = summarise_points(found, math.prod(x.shape[1:]), cfg, log_scale=log_scale, discrete=discrete)
    res["seconds"] = time.perf_counter() - start
    if points:
        res["points"] = found
    return res


def generate(flow: Flow, sampler: Callable, n: int, *, cond: Optional[Tensor] = None, seed: int = 0,
             device: torch.device | str = "cpu", batch_size: int = 10000) -> SampleResult:
    """Draw ``n`` samples: prior noise at ``t1`` pushed to data by ``sampler`` (whose ``solver``
    the result reports)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    outs, nfe, solver = [], 0, None
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        z = flow.prior.sample(m, generator=generator, device=device)
        cb = None if cond is None else cond[i:i + m].to(device)
        res = sampler(flow, z, cond=cb)
        outs.append(res.x.detach())
        nfe, solver = max(nfe, res.nfe), res.solver
    return SampleResult(torch.cat(outs), nfe, solver=solver)


def sample_metrics(samples: Tensor, reference: Tensor) -> dict[str, float]:
    """Energy distance (V-statistic), MMD and sliced W2 between model samples and fresh data.

    The MMD's bandwidth comes from ``reference`` alone (median heuristic), so every model
    scored against the same reference is scored with the same kernel; it is returned as
    ``mmd_bandwidth``.
    """
    n = min(len(samples), len(reference))
    samples, reference = samples[:n], reference[:n]
    bandwidth = mmd_bandwidth(reference)
    return {"energy_distance": energy_distance(samples, reference),
            "mmd": mmd(samples, reference, bandwidth), "mmd_bandwidth": bandwidth,
            "sliced_w2": sliced_wasserstein(samples, reference)}


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured.

    Attributes:
        metrics: ``nll``, ``nll_sem``, ``bpd``, ``nfe``, ``n``, ... of :func:`evaluate_nll`
            (in data units), plus ``energy_distance``, ``mmd``, ``mmd_bandwidth``,
            ``sliced_w2`` and ``sample_nfe`` when samples were scored, and ``feature_fd``
            (with ``feature_space``) for data with a feature space; ``None`` NLL entries for a
            model without a density; ``neg_elbo`` and the rest of :func:`evaluate_variational`
            for a variational model.
        samples: the generated samples (``None`` when none were drawn).
        reference: the fresh data they were scored against (``None`` likewise).
    """

    metrics: dict[str, Any]
    samples: Optional[Tensor] = None
    reference: Optional[Tensor] = None


def evaluate_model(model: Any, dataset: Any, sampler: Optional[Callable], cfg: EvalConfig, *,
                   conditional: bool = False, device: torch.device | str = "cpu", progress: bool = False,
                   sharding: Optional[Sharding] = None, points: bool = False) -> Evaluation:
    """The one evaluation of a trained model: test NLL in data units, then sample quality.

    The trainer's periodic evaluation, ``flowkit nll`` and ``flowkit compare`` all call this,
    so their numbers agree: the NLL includes the data transform's log-determinant
    (:meth:`flowkit.data.Dataset.model_log_det`, e.g. standardisation or logit), so it refers
    to the data, and bits/dim carry the dataset's scaling offset.

    With ``cfg.metrics``, ``min(cfg.metric_samples, cfg.n)`` samples are drawn with ``sampler`` and, for
    data of at most 64 dimensions, scored against as many fresh test points (energy distance,
    MMD, sliced W2: :func:`sample_metrics`); image data with a feature space
    (:data:`flowkit.metrics.FEATURE_SPACES`, the digits) are also scored by the Fréchet
    distance of their features. A conditional model is sampled with the test set's conditions.

    What is measured follows the objective's declarations: a model that declares
    ``defines_density = False`` (a consistency model) has no NLL — ``nll``, ``nll_sem``,
    ``bpd`` and ``nfe`` are ``None`` and only sample quality is measured (refused when
    ``cfg.metrics`` is off: there would be nothing to report); a ``variational`` one
    (``vae``) is evaluated by its bounds (:func:`evaluate_variational`).

    Args:
        model: an objective (anything with ``flow() -> Flow``), in eval mode.
        dataset: the run's dataset (``test_set``, ``log_scale``, ``discrete``, ``model_log_det``).
        sampler: ``sampler(flow, x, cond=None) -> SampleResult``.
        cfg: the ``eval`` settings (points, batch, solver, seeds).
        conditional: pass the test set's conditions to the model.
        device: where the model lives.
        progress: show a progress bar over NLL batches.
        sharding, points: see :func:`evaluate_nll` (the NLL's share of this process, and the
            per-point results as ``metrics["points"]``).

    Raises:
        FieldError: see :func:`evaluate_nll`.
        NoDensityError: ``cfg.metrics`` is off and the model declares no density.
    """
    if getattr(type(model), "variational", False):  # declared (Objective.variational): no flow, bounds
        return evaluate_variational(model, dataset, cfg, device=device)
    x, cond = dataset.test_set(cfg.n, seed=cfg.seed)
    cond = cond if conditional else None
    flow = model.flow()
    if getattr(type(model), "defines_density", True):  # declared; a plain flow-holder defines one
        metrics = evaluate_nll(flow, x.to(device), cfg, cond=None if cond is None else cond.to(device),
                               log_scale=dataset.log_scale, discrete=dataset.discrete,
                               log_det=dataset.model_log_det, progress=progress, sharding=sharding, points=points)
    else:  # a one-step map (consistency model): no NLL, sample quality only
        if not cfg.metrics:
            from .objectives import require_density

            require_density(model, by="evaluate_model (eval.metrics is off, and the model has no NLL)")
        metrics = {"nll": None, "nll_sem": None, "bpd": None, "nfe": None, "n": int(x.shape[0])}
    if not cfg.metrics:
        return Evaluation(metrics)
    n = min(cfg.metric_samples, cfg.n)
    sample_cond = None if cond is None else cond[torch.arange(n) % cond.shape[0]]
    gen = generate(flow, sampler, n, cond=sample_cond, seed=cfg.seed, device=device)
    samples, reference = gen.x.cpu(), None
    metrics["sample_nfe"] = gen.nfe
    space = feature_space(dataset)
    if x[0].numel() <= 64 or space is not None:
        reference, _ = dataset.test_set(n, seed=cfg.seed + 1)
        reference = reference.cpu()
    if x[0].numel() <= 64:
        metrics.update(sample_metrics(samples, reference))
    if space is not None:
        name, features = space
        m = min(len(samples), len(reference))
        metrics["feature_fd"] = frechet_distance(features(dataset.to_images(samples[:m])),
                                                 features(dataset.to_images(reference[:m])))
        metrics["feature_space"] = f"{name} classifier"
    return Evaluation(metrics, samples, reference)


def evaluate_variational(model: Any, dataset: Any, cfg: EvalConfig, *,
                         device: torch.device | str = "cpu") -> Evaluation:
    """A variational model (``type(model).variational``, e.g. ``vae``) on the test set.

    Its importance-weighted bound with ``k = cfg.iwae_k`` samples is the ``nll`` (Burda et al.
    2016, eq. 8: ``−L_k ≥ −log p(x)``, tighter the larger ``k``) and the negative ELBO
    ``neg_elbo`` (with ``recon`` and ``kl``), each with its standard error over test points;
    bits/dim from ``nll`` as for flows. With ``cfg.metrics``, ``min(cfg.metric_samples, cfg.n)``
    decoder means of prior draws come back as ``samples`` (for pictures; they are means, not
    data-space draws, so no sample metrics are computed).

    Returns:
        :class:`Evaluation` whose metrics hold ``nll``, ``nll_sem``, ``bpd``, ``neg_elbo``,
        ``neg_elbo_sem``, ``recon``, ``kl``, ``iwae_k``, ``nfe``, ``n``, ``seconds``.
    """
    x, _ = dataset.test_set(cfg.n, seed=cfg.seed)
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    batch = max(1, min(cfg.batch_size, _VARIATIONAL_ROWS // cfg.iwae_k))
    res = model.evaluate_elbo(x.to(device), k=cfg.iwae_k, batch_size=batch, generator=generator)
    dim = math.prod(x.shape[1:])
    metrics: dict[str, Any] = {
        "nll": res["iwae_nll"], "nll_sem": res["iwae_nll_sem"],
        "bpd": float(bits_per_dim(res["iwae_nll"], dim, dataset.log_scale)) if dataset.discrete else None,
        "neg_elbo": res["neg_elbo"], "neg_elbo_sem": res["neg_elbo_sem"], "recon": res["recon"], "kl": res["kl"],
        "iwae_k": res["k"], "nfe": res["nfe"], "n": res["n"], "divergence": "exact", "rtol": None, "atol": None,
        "seconds": time.perf_counter() - start,
    }
    if not cfg.metrics:
        return Evaluation(metrics)
    n = min(cfg.metric_samples, cfg.n)
    samples = model.generate(n, generator=torch.Generator(device=device).manual_seed(cfg.seed + 1))
    return Evaluation(metrics, samples.cpu())


def variational_pictures(model: Any, dataset: Any, n: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """What the pictures of a variational model show: ``n`` decoder means of prior draws, and up
    to ``n`` test images interleaved with their reconstructions, eight per row (a data row, then
    its reconstruction row). Both on the CPU, for :func:`flowkit.plotting.plot_image_grid`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = model.generate(n, generator=torch.Generator(device=device).manual_seed(seed)).cpu()
    x, _ = dataset.test_set(max(1, n // 2), seed=seed)
    recon = model.reconstruct(x.to(device)).cpu()
    model.train(was_training)
    pairs = torch.cat([t for i in range(0, x.shape[0], 8) for t in (x[i:i + 8], recon[i:i + 8])])
    return samples, pairs
