r"""Score matching: a diffusion model trained by denoising score matching, used as a CNF.

Objective
---------
For a forward SDE ``dx = f(t) x dt + g(t) dw`` whose marginals are the Gaussian path
``x_t = α_t x_data + σ_t ε`` (:mod:`flowkit.paths`; data at ``t0``, noise at ``t1 = T``),
the transition kernel is ``p_{0t}(x_t | x_0) = N(α_t x_0, σ_t² I)`` with score
``∇ log p_{0t}(x_t | x_0) = −ε / σ_t``. Continuous-time denoising score matching
(Song et al. 2021, eq. 7; Vincent 2011) minimises

.. math::  \mathcal L(\theta) = \mathbb E_{t \sim \mathcal U(t_0, t_1)}\, \lambda(t)\,
           \mathbb E_{x_0, \varepsilon} \big\lVert s_\theta(x_t, t) + \varepsilon / \sigma_t
           \big\rVert_2^2
           = \mathbb E_t\, \frac{\lambda(t)}{\sigma_t^2}\, \mathbb E\,
           \lVert \hat\varepsilon_\theta(x_t, t) - \varepsilon \rVert_2^2 ,

the second form with ``ε̂ = −σ_t s`` (Tweedie; :meth:`~flowkit.paths.GaussianPath.eps_from_score`).
The squared norm is summed over the event dimensions and averaged over the batch.

Weightings ``λ(t)``
-------------------
* ``sigma2``: ``λ = σ_t²`` (Song et al. 2021, Sec. 3.3), i.e. the ε-prediction MSE of DDPM
  (Ho et al. 2020, eq. 14) in continuous time. Good samples, no likelihood guarantee.
* ``likelihood``: ``λ = g(t)²``. Song, Durkan, Murray & Ermon (2021, Thm. 1) show that then
  ``KL(p_data ‖ p_θ^SDE) ≤ J_SM(θ; g²) + KL(p_T ‖ π)``: the loss bounds the KL of the model's
  reverse SDE, and their denoising form makes ``½ (t1 − t0) · 𝓛``, plus the prior term
  ``E[−log π(x_{t1})]`` and θ-independent constants, an upper bound on its negative
  log-likelihood. The PF-ODE likelihood that ``flowkit nll`` measures is a different model
  and is not bounded by it, though the two are close for a well-trained score.

Importance sampling of ``t``
----------------------------
With ``λ = g²`` the weight ``g²/σ²`` of the ε-form diverges like ``1/t`` at a VP data end,
and uniform ``t`` gives a high-variance loss. Song, Durkan et al. (2021) instead draw ``t``
from ``q(t) ∝ g(t)² / σ_t²`` and divide by ``q``. For every Gaussian path this density has
a closed-form CDF: since ``g² = dσ²/dt − 2 f σ²`` and ``f = d log α / dt``
(:mod:`flowkit.paths`),

.. math::  \frac{g(t)^2}{\sigma_t^2} = \frac{d}{dt} \log\frac{\sigma_t^2}{\alpha_t^2}
           = \frac{d\gamma}{dt}, \qquad \gamma(t) = -\log \mathrm{SNR}(t),

so ``q(t) = γ'(t) / Z``, ``Z = γ(t1) − γ(t0)``, and ``F(t) = (γ(t) − γ(t0)) / Z``: *sampling
``t`` from ``q`` is sampling the log-SNR uniformly* (the likelihood-weighted loss is an
integral over ``γ``, cf. Kingma et al. 2021, VDM, where the continuous-time loss depends on
the schedule only through its end points). The importance weight is then the constant
``λ / (q (t1 − t0)) = σ_t² Z / (t1 − t0)``, so the per-sample loss becomes
``Z/(t1 − t0) · ‖ε̂ − ε‖²``, with the same expectation as the uniform-``t`` likelihood loss.
(For VP, ``γ(t) = log(e^{B(t)} − 1)``; for VE, ``γ`` is linear and ``q`` uniform.)

``F`` is inverted numerically, once, at construction: on ``grid`` log-SNR values
``γ_k = γ(t0) + k Z / (grid − 1)`` the times ``t_k = γ⁻¹(γ_k)`` are found by bisection in
float64 (``γ`` is checked to increase); a draw ``u ~ U(0, 1)`` is mapped to ``t`` by linear
interpolation of ``t_k`` at ``u (grid − 1)``. ``t(γ)`` is smooth (for VP near ``t0`` it is
≈ ``e^γ/β_min``), so with the default 4097 points the sampled density matches ``q`` to a
relative ~1e-5; the weight uses the exact ``q``.

Parameterisations
-----------------
``score``: the network output is ``s_θ(x, t)``. ``eps``: it is ``ε̂_θ(x, t)`` and
``s_θ = −ε̂_θ / σ_t`` (Ho et al. 2020; Song et al.'s VP models, whose output is divided by
``σ_t``). ε-prediction keeps the network's output of order one at every ``t`` and is the
default. Either way :meth:`ScoreMatching.flow` hands the score to
:func:`flowkit.diffusion.flow_from_score`: the probability-flow ODE (Song et al. 2021,
eq. 13) for every ODE sampler and ``flowkit nll``, the reverse SDE (eq. 6) for
``euler_maruyama`` and ``predictor_corrector``, and Tweedie's denoiser.

References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole (2021). Score-Based Generative
    Modeling through Stochastic Differential Equations. ICLR.
    Song, Durkan, Murray, Ermon (2021). Maximum Likelihood Training of Score-Based
    Diffusion Models. NeurIPS.
    Vincent (2011). A Connection Between Score Matching and Denoising Autoencoders.
    Neural Computation.
    Ho, Jain, Abbeel (2020). Denoising Diffusion Probabilistic Models. NeurIPS.
    Kingma, Salimans, Poole, Ho (2021). Variational Diffusion Models. NeurIPS.
    Ho & Salimans (2022). Classifier-Free Diffusion Guidance.

Example:
    >>> from flowkit.dynamics.mlp import MLP
    >>> from flowkit.paths import VP
    >>> obj = ScoreMatching(lambda: MLP(dim=2, hidden=[32]), (2,), sde=VP(),
    ...                     weighting="likelihood", importance_sampling=True)
    >>> out = obj.loss(torch.randn(16, 2))
    >>> sorted(out.metrics)
    ['eps_mse', 'loss', 'sigma_mean']
    >>> obj.flow().t0
    1e-05
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from ..components import OBJECTIVES, PATHS
from ..constraints import AtLeast, DropProbability, Rule
from ..diffusion import flow_from_score
from ..flow import Field, Flow
from ..paths import GaussianPath, VP
from ..registry import Registry
from .base import DynamicsFactory, LossOutput, Objective, drop_condition

__all__ = ["ScoreMatching", "LogSNRTimeSampler", "log_snr_gap"]


def log_snr_gap(path: GaussianPath, t: Tensor) -> Tensor:
    r"""``γ(t) = −log SNR(t) = log σ_t² − log α_t²``, increasing in ``t``; ``γ' = g²/σ²``."""
    return 2 * (torch.log(path.sigma(t)) - torch.log(path.alpha(t)))


class LogSNRTimeSampler(nn.Module):
    r"""Draws ``t ∈ [t0, t1]`` with density ``q(t) ∝ g(t)²/σ_t² = γ'(t)`` (uniform log-SNR).

    The inverse CDF ``t(γ)`` is tabulated on a uniform grid of ``γ`` by bisection in float64
    and interpolated linearly (see the module docstring).

    Args:
        path: the Gaussian path; needs ``σ_{t0} > 0`` and ``α_{t1} > 0`` (finite ``γ``)
            and a log-SNR that decreases in ``t``.
        grid: number of tabulated points (≥ 2).
        iterations: bisection steps per point (64 reach float64 resolution on ``[t0, t1]``).

    Attributes:
        z: ``Z = γ(t1) − γ(t0)``, the normaliser of ``q``.

    Raises:
        ValueError: if ``γ`` is not finite at the ends or not increasing.
    """

    def __init__(self, path: GaussianPath, grid: int = 4097, iterations: int = 64) -> None:
        super().__init__()
        if int(grid) != grid or grid < 2:
            raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
        f64 = torch.float64
        t0, t1 = float(path.t0), float(path.t1)
        ends = log_snr_gap(path, torch.tensor([t0, t1], dtype=f64))
        if not bool(torch.isfinite(ends).all()):
            raise ValueError(f"importance sampling needs a finite log-SNR at both ends of "
                             f"[{t0}, {t1}] for {path!r} (σ_t0 > 0 and α_t1 > 0)")
        check = log_snr_gap(path, torch.linspace(t0, t1, 4 * int(grid), dtype=f64))
        if not bool((check.diff() > 0).all()):
            raise ValueError(f"importance sampling needs a log-SNR that decreases in t; {path!r} "
                             f"does not on [{t0}, {t1}]")
        g0, g1 = float(ends[0]), float(ends[1])
        targets = torch.linspace(g0, g1, int(grid), dtype=f64)
        lo, hi = torch.full_like(targets, t0), torch.full_like(targets, t1)
        for _ in range(iterations):  # bisection: γ(lo) <= target <= γ(hi)
            mid = 0.5 * (lo + hi)
            below = log_snr_gap(path, mid) < targets
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        times = 0.5 * (lo + hi)
        times[0], times[-1] = t0, t1
        self.register_buffer("times", times, persistent=False)
        self.path, self.z = path, g1 - g0

    def cdf(self, t: Tensor) -> Tensor:
        """``F(t) = (γ(t) − γ(t0)) / Z`` in closed form (for tests and plots)."""
        t0 = torch.as_tensor(self.path.t0, dtype=t.dtype, device=t.device)
        return (log_snr_gap(self.path, t) - log_snr_gap(self.path, t0)) / self.z

    def forward(self, n: int, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` draws from ``q``, shape ``[n]``."""
        times = self.times if device is None else self.times.to(device)
        u = torch.rand(n, dtype=times.dtype, device=times.device, generator=generator)
        pos = u * (times.numel() - 1)
        i = pos.floor().long().clamp_max(times.numel() - 2)
        frac = pos - i
        t = times[i] + frac * (times[i + 1] - times[i])
        return t.to(dtype or torch.get_default_dtype())


@OBJECTIVES.register("score_matching")
class ScoreMatching(Objective):
    r"""Continuous-time denoising score matching (Song et al. 2021, eq. 7) on an SDE.

    Args:
        dynamics, shape: set by flowkit from the recipe's ``dynamics`` and ``data``; the
            network ``net(t, x, cond=None)`` predicts the score or the noise.
        sde: the forward SDE (``objective.sde: {name: vp, beta_max: 20}``; default VP).
        weighting: ``sigma2`` (``λ = σ²``, the standard loss) or ``likelihood``
            (``λ = g²``; Song, Durkan et al. 2021, Thm. 1).
        importance_sampling: with ``likelihood`` weighting, draw ``t ∝ g²/σ²`` (uniform
            log-SNR) and reweight, instead of ``t ~ U(t0, t1)``.
        parameterisation: the network predicts ``eps`` (``s = −ε̂/σ_t``) or the ``score``.
        cond_dropout: probability of replacing the condition by the null condition
            during training (classifier-free guidance; Ho & Salimans 2022).
        grid: points of the tabulated inverse CDF used by importance sampling.

    Raises:
        ValueError: ``importance_sampling`` without ``likelihood`` weighting, a
            ``cond_dropout`` outside ``[0, 1)``, or an SDE whose log-SNR is not finite and
            decreasing (importance sampling only).
    """

    # any Gaussian path is a forward SDE (flowkit.paths), so ``sde`` names a path
    nested: ClassVar[Mapping[str, Registry]] = {"sde": PATHS}
    # flow_from_score: PF-ODE velocity, score, forward SDE and Tweedie's denoiser
    provides: ClassVar[frozenset[str]] = frozenset({"velocity", "score", "drift", "diffusion", "denoise", "path"})
    #: Song et al. 2021: EMA of the weights and gradient clipping at norm 1 (their configs); rate and
    #: batch of recipes/score_{vp_8gaussians,ve_checkerboard}.yaml
    training_defaults: ClassVar[Mapping[str, Any]] = {"lr": 2e-3, "batch_size": 512, "ema": 0.999, "grad_clip": 1.0}
    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("importance_sampling", "weighting"),
             lambda a: not a["importance_sampling"] or a["weighting"] == "likelihood",
             "importance sampling draws t with density ∝ g²/σ², which only cancels the likelihood "
             "weighting; set weighting: likelihood (got {weighting!r})"),
    )

    def __init__(self, dynamics: DynamicsFactory, shape: tuple[int, ...],
                 sde: Optional[GaussianPath] = None,
                 weighting: Literal["sigma2", "likelihood"] = "sigma2",
                 importance_sampling: bool = False,
                 parameterisation: Literal["score", "eps"] = "eps",
                 cond_dropout: DropProbability = 0.0, grid: Annotated[int, AtLeast(2)] = 4097) -> None:
        super().__init__(shape)
        if weighting not in ("sigma2", "likelihood"):
            raise ValueError(f"weighting must be 'sigma2' or 'likelihood', got {weighting!r}")
        if parameterisation not in ("score", "eps"):
            raise ValueError(f"parameterisation must be 'score' or 'eps', got {parameterisation!r}")
        if importance_sampling and weighting != "likelihood":
            raise ValueError("importance_sampling draws t with density ∝ g²/σ², which only "
                             "cancels the likelihood weighting; set weighting: likelihood")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout!r}")
        self.sde = VP() if sde is None else sde
        if not isinstance(self.sde, GaussianPath):
            raise ValueError(f"sde must be a GaussianPath (objective.sde: {{name: vp}}), got {sde!r}")
        self.net = dynamics()
        self.weighting, self.parameterisation = weighting, parameterisation
        self.importance_sampling = bool(importance_sampling)
        self.cond_dropout = float(cond_dropout)
        self.time_sampler = LogSNRTimeSampler(self.sde, grid) if self.importance_sampling else None

    # ---------------------------------------------------------------- the model
    def score(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """``s_θ(t, x) ≈ ∇_x log p_t(x)`` in flowkit's field order; ``t`` scalar or ``[B]``."""
        out = self.net(t, x, cond)
        if self.parameterisation == "score":
            return out
        return self.sde.score_from_eps(out, t, x)

    def flow(self) -> Flow:
        """PF-ODE velocity, reverse-SDE pieces and Tweedie denoiser of the score model
        (:func:`flowkit.diffusion.flow_from_score`).

        The velocity is extended constantly in time outside ``[t0, t1]``: torchdiffeq's
        adaptive solvers step past the final time and interpolate back, so the last step of
        a generation evaluates the field at ``t < t0``, where a schedule may be undefined
        (VP's ``σ_t`` is NaN for ``t < 0``).
        """
        flow = flow_from_score(self.score, self.sde, self.shape)
        flow.velocity = _clamp_time(flow.velocity, flow.t0, flow.t1)
        return flow

    # ----------------------------------------------------------------- the loss
    def sample_time(self, n: int, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None,
                    generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        r"""Training times ``t [n]`` and the weights ``w [n]`` multiplying ``‖ε̂ − ε‖²``.

        ``w = λ(t)/σ_t²`` for uniform ``t``: ``1`` (``sigma2``) or ``g²/σ²`` (``likelihood``);
        with importance sampling ``w = Z / (t1 − t0)`` (module docstring), so that in every
        case ``E[w ‖ε̂ − ε‖²]`` is the uniform-``t`` loss of eq. 7.
        """
        dtype = dtype or torch.get_default_dtype()
        t0, t1 = float(self.sde.t0), float(self.sde.t1)
        if self.time_sampler is not None:
            t = self.time_sampler(n, device=device, dtype=dtype, generator=generator)
            return t, torch.full_like(t, self.time_sampler.z / (t1 - t0))
        u = torch.rand(n, dtype=dtype, device=device, generator=generator)
        t = t0 + (t1 - t0) * u
        if self.weighting == "sigma2":
            return t, torch.ones_like(t)
        return t, self.sde.diffusion_squared(t) / self.sde.sigma(t) ** 2

    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        r"""``mean_b w_b ‖ε̂_θ(x_t, t_b) − ε_b‖²`` (eq. 7 in ε-form) for ``x_t = α x + σ ε``.

        Metrics: ``loss``; ``eps_mse``, the unweighted ``‖ε̂ − ε‖²`` per sample (comparable
        across weightings); ``sigma_mean``, the mean ``σ_t`` of the batch.
        """
        cond = drop_condition(cond, self.cond_dropout) if self.training else cond
        t, weight = self.sample_time(x.shape[0], device=x.device, dtype=x.dtype)
        eps = torch.randn_like(x)
        xt = self.sde.sample(x, t, eps)
        out = self.net(t, xt, cond)
        if self.parameterisation == "eps":
            residual = out - eps  # ε̂ − ε
        else:
            sigma = self.sde.sigma(t).reshape(-1, *([1] * (x.dim() - 1)))
            residual = sigma * out + eps  # σ s + ε = −(ε̂ − ε)
        per_sample = residual.flatten(1).pow(2).sum(1)
        loss = (weight * per_sample).mean()
        metrics = {"loss": loss.item(), "eps_mse": per_sample.mean().item(),
                   "sigma_mean": self.sde.sigma(t).mean().item()}
        return LossOutput(loss, metrics)

    def extra_repr(self) -> str:
        return (f"sde={self.sde!r}, weighting={self.weighting!r}, "
                f"importance_sampling={self.importance_sampling}, "
                f"parameterisation={self.parameterisation!r}")


def _clamp_time(field: Field, t0: float, t1: float) -> Field:
    """``field(clamp(t, t0, t1), x, cond)``: the field extended constantly beyond its interval."""

    def clamped(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp(t0, t1)
        return field(t, x) if cond is None else field(t, x, cond)

    return clamped
