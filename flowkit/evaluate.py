"""Evaluation shared by the trainer, the CLI and users: NLL of any flow, sampling, metrics."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .config import EvalConfig
from .flow import FieldError, Flow
from .likelihood import bits_per_dim, check_data, flow_log_likelihood
from .metrics import energy_distance, sliced_wasserstein
from .samplers.base import SampleResult

__all__ = ["evaluate_model", "Evaluation", "evaluate_nll", "generate", "sample_metrics"]


def evaluate_nll(flow: Flow, x: Tensor, cfg: EvalConfig, *, cond: Optional[Tensor] = None,
                 log_scale: float = 0.0, discrete: bool = False, progress: bool = False,
                 log_det: Optional[Callable[[Tensor], Optional[Tensor]]] = None) -> dict[str, Any]:
    """Mean negative log-likelihood (nats per sample) of ``x`` under ``flow``, in batches.

    Returns ``{"nll", "nll_sem", "bpd", "nfe", "n", "divergence", "rtol", "atol", "seconds"}``;
    ``bpd`` is bits/dim for discrete data (dequantised, with the scaling offset) else None.
    ``log_det(y)`` adds the log-determinant of a data → model-space transform (logit), so the
    NLL refers to the data (see :meth:`flowkit.data.Dataset.model_log_det`).

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
    check_data(x)
    if cond is not None and (not isinstance(cond, Tensor) or cond.dim() < 1 or cond.shape[0] != x.shape[0]):
        got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
        raise FieldError(f"cond: expected one condition per sample of x, shape [{x.shape[0]}, ...], got {got}")
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, numbers.Integral) or cfg.batch_size < 1:
        raise FieldError(f"eval.batch_size: expected a positive integer, got {cfg.batch_size!r}")
    if isinstance(cfg.n_probes, bool) or not isinstance(cfg.n_probes, numbers.Integral) or cfg.n_probes < 1:
        raise FieldError(f"eval.n_probes: expected a positive integer (Hutchinson probes averaged per sample), "
                         f"got {cfg.n_probes!r}")
    solver = cfg.solver
    start = time.perf_counter()
    nlls, nfes = [], []
    batches = range(0, x.shape[0], cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="nll", unit="batch", leave=False)
    generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
    for i in batches:
        xb = x[i:i + cfg.batch_size]
        cb = None if cond is None else cond[i:i + cfg.batch_size]
        try:
            out = flow_log_likelihood(flow, xb, cond=cb, estimator=cfg.divergence, noise=cfg.noise,
                                      n_probes=cfg.n_probes, solver=solver, generator=generator)
        except FieldError as exc:
            if x.shape[0] <= cfg.batch_size:
                raise
            # same class (NonFiniteFieldError stays one), with where the batch lies in x
            raise type(exc)(f"{exc} [in the batch x[{i}:{i + xb.shape[0]}]; rows count from {i}]") from None
        logp = out.log_prob.detach()
        correction = log_det(xb) if log_det is not None else None
        if correction is not None:
            correction = correction.to(logp)
            if tuple(correction.shape) != tuple(logp.shape) or bool(torch.isnan(correction).any()):
                raise FieldError(f"log_det returned shape {tuple(correction.shape)} with "
                                 f"{int(torch.isnan(correction).sum())} NaN values for a batch of "
                                 f"{xb.shape[0]} samples; expected ({xb.shape[0]},) without NaN")
            logp = logp + correction
        nlls.append(-logp.double().cpu())
        nfes.append(out.nfe)
    nll = torch.cat(nlls)
    dim = math.prod(x.shape[1:])
    mean = float(nll.mean())
    return {
        "nll": mean,
        "nll_sem": float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else 0.0,
        "bpd": float(bits_per_dim(mean, dim, log_scale)) if discrete else None,
        "nfe": float(sum(nfes) / len(nfes)),
        "n": int(x.shape[0]),
        "divergence": cfg.divergence,
        "rtol": solver.rtol,
        "atol": solver.atol,
        "seconds": time.perf_counter() - start,
    }


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
    """Energy distance and sliced W2 between model samples and fresh data."""
    n = min(len(samples), len(reference))
    return {"energy_distance": energy_distance(samples[:n], reference[:n]),
            "sliced_w2": sliced_wasserstein(samples[:n], reference[:n])}


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured.

    Attributes:
        metrics: ``nll``, ``nll_sem``, ``bpd``, ``nfe``, ``n``, ... of :func:`evaluate_nll`
            (in data units), plus ``energy_distance``, ``sliced_w2`` and ``sample_nfe`` when
            samples were scored.
        samples: the generated samples (``None`` when none were drawn).
        reference: the fresh data they were scored against (``None`` likewise).
    """

    metrics: dict[str, Any]
    samples: Optional[Tensor] = None
    reference: Optional[Tensor] = None


def evaluate_model(model: Any, dataset: Any, sampler: Callable, cfg: EvalConfig, *, conditional: bool = False,
                   device: torch.device | str = "cpu", progress: bool = False) -> Evaluation:
    """The one evaluation of a trained model: test NLL in data units, then sample quality.

    The trainer's periodic evaluation, ``flowkit nll`` and ``flowkit compare`` all call this,
    so their numbers agree: the NLL includes the data transform's log-determinant
    (:meth:`flowkit.data.Dataset.model_log_det`, e.g. standardisation or logit), so it refers
    to the data, and bits/dim carry the dataset's scaling offset.

    With ``cfg.metrics``, ``min(cfg.metric_samples, cfg.n)`` samples are drawn with ``sampler`` and, for
    data of at most 64 dimensions, scored against as many fresh test points (energy distance,
    sliced W2); a conditional model is sampled with the test set's conditions.

    Args:
        model: an objective (anything with ``flow() -> Flow``), in eval mode.
        dataset: the run's dataset (``test_set``, ``log_scale``, ``discrete``, ``model_log_det``).
        sampler: ``sampler(flow, x, cond=None) -> SampleResult``.
        cfg: the ``eval`` settings (points, batch, solver, seeds).
        conditional: pass the test set's conditions to the model.
        device: where the model lives.
        progress: show a progress bar over NLL batches.

    Raises:
        FieldError: see :func:`evaluate_nll`.
    """
    x, cond = dataset.test_set(cfg.n, seed=cfg.seed)
    cond = cond if conditional else None
    flow = model.flow()
    metrics = evaluate_nll(flow, x.to(device), cfg, cond=None if cond is None else cond.to(device),
                           log_scale=dataset.log_scale, discrete=dataset.discrete,
                           log_det=dataset.model_log_det, progress=progress)
    if not cfg.metrics:
        return Evaluation(metrics)
    n = min(cfg.metric_samples, cfg.n)
    sample_cond = None if cond is None else cond[torch.arange(n) % cond.shape[0]]
    gen = generate(flow, sampler, n, cond=sample_cond, seed=cfg.seed, device=device)
    samples, reference = gen.x.cpu(), None
    metrics["sample_nfe"] = gen.nfe
    if x[0].numel() <= 64:
        reference, _ = dataset.test_set(n, seed=cfg.seed + 1)
        metrics.update(sample_metrics(samples, reference))
    return Evaluation(metrics, samples, reference)
