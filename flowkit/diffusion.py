r"""Any diffusion model is a CNF: its probability-flow ODE, its Flow, and its likelihood.

A score model ``s(x, t) ≈ ∇ log p_t(x)`` for the forward SDE ``dx = f x dt + g dw`` of a
:class:`~flowkit.paths.GaussianPath` defines the probability-flow ODE (Song et al. 2021,
eq. 13)

.. math::  \frac{dx}{dt} = v(t, x) = f(t)\, x - \tfrac12 g(t)^2\, s(x, t),

whose marginals are those of the SDE. Integrating it from data at ``t0`` to ``t1`` with the
instantaneous change of variables (:mod:`flowkit.likelihood`) gives

.. math::  \log p_{t_0}(x) = \log p_{t_1}(z) + \int_{t_0}^{t_1} \nabla\!\cdot v(t, x(t))\, dt,

the exact likelihood of the ODE model (Song et al. 2021, Sec. 4.3 and appendix D.2).

Argument order
--------------
**The public entry point :func:`score_log_likelihood` takes the score as ``s(x, t)`` —
data first, time second, ``t`` a ``[B]`` tensor — as most diffusion codebases write it.**
Everything else in flowkit (and :func:`probability_flow_field`, :func:`flow_from_score`)
uses flowkit's field order ``score(t, x, cond=None)``; :func:`xt_score_to_field` converts.

References:
    Song et al. (2021). Score-Based Generative Modeling through Stochastic Differential
    Equations. ICLR.
    Chen, Rubanova, Bettencourt, Duvenaud (2018). Neural Ordinary Differential Equations.
    Grathwohl et al. (2019). FFJORD. ICLR.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor

from .flow import Field, FieldError, Flow, Prior
from .likelihood import Likelihood, check_data, log_likelihood
from .paths import GaussianPath
from .solvers import SolverSpec

__all__ = ["probability_flow_field", "xt_score_to_field", "flow_from_score", "flow_from_velocity", "score_log_likelihood"]


def _call(fn: Callable[..., Tensor], t: Tensor, x: Tensor, cond: Optional[Tensor]) -> Tensor:
    """``fn(t, x)`` without a condition, ``fn(t, x, cond)`` with one (fields may omit ``cond``)."""
    return fn(t, x) if cond is None else fn(t, x, cond)


def probability_flow_field(score_fn: Field, path: GaussianPath) -> Field:
    r"""The PF-ODE velocity ``v(t, x, cond) = f(t) x − ½ g(t)² s(t, x, cond)``.

    Computed as :meth:`~flowkit.paths.GaussianPath.velocity_from_score`, i.e.
    ``(α̇ x − σ D s) / α``, which equals ``f x − ½ g² s`` (Song et al. 2021, eq. 13).

    Args:
        score_fn: the score **in flowkit order** ``score(t, x, cond=None)``, ``t`` a scalar
            tensor (wrap an ``s(x, t)`` model with :func:`xt_score_to_field`).
        path: the Gaussian path / forward SDE the score belongs to.

    Returns:
        A field ``v(t, x, cond=None)``.
    """

    def velocity(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        # where α_t = 0 the score is −x/σ² for any data and fixes no velocity: score and
        # coefficients both at conversion_time(t) (t itself wherever α_t > 0)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = torch.where(path.alpha(t) <= torch.finfo(t.dtype).eps, path.conversion_time(t), t)
        return path.velocity_from_score(_call(score_fn, t, x, cond), t, x)

    return velocity


def xt_score_to_field(score_xt: Callable[..., Tensor]) -> Field:
    """Adapt a diffusion-codebase score ``s(x, t[, cond])`` to flowkit's ``score(t, x, cond=None)``.

    The scalar ODE time is expanded to a ``[B]`` tensor before the call, as such models expect.
    """

    def score(t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tb = t.expand(x.shape[0]) if t.dim() == 0 else t
        return score_xt(x, tb) if cond is None else score_xt(x, tb, cond)

    return score


def flow_from_score(score_fn: Field, path: GaussianPath, shape: tuple[int, ...] | list[int], *,
                    prior: Optional[Prior] = None) -> Flow:
    """The :class:`~flowkit.flow.Flow` of a score model: PF-ODE velocity, forward SDE, denoiser.

    Args:
        score_fn: the score **in flowkit order** ``score(t, x, cond=None)``.
        path: the Gaussian path / forward SDE.
        shape: event shape of the data.
        prior: density at ``path.t1``; default ``path.prior(shape)``.

    Returns:
        A flow with ``velocity`` (:func:`probability_flow_field`), ``score``, ``drift``,
        ``diffusion`` (for the reverse-SDE samplers of :mod:`flowkit.samplers.sde`) and
        ``denoise`` = Tweedie's ``E[x_data | x_t] = (x_t + σ_t² s) / α_t``.

    Example:
        >>> from flowkit.paths import VP
        >>> path = VP()
        >>> flow = flow_from_score(lambda t, x, cond=None: -x, path, (2,))  # N(0, I) at every t
        >>> (flow.t0, flow.t1)
        (1e-05, 1.0)
    """

    def score(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return _call(score_fn, t, x, cond)

    def drift(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return path.drift(t, x)

    def denoise(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return path.x0_from_score(_call(score_fn, t, x, cond), t, x)

    return Flow(velocity=probability_flow_field(score_fn, path),
                prior=path.prior(shape) if prior is None else prior,
                t0=path.t0, t1=path.t1, score=score, drift=drift, diffusion=path.diffusion,
                denoise=denoise, path=path)


def flow_from_velocity(velocity: Callable[..., Tensor], path: GaussianPath, shape: Sequence[int],
                       **parts: Any) -> Flow:
    r"""The :class:`~flowkit.flow.Flow` of a velocity model ``v(t, x, cond)`` on a Gaussian path.

    The path turns the velocity into the other parameterisations (:mod:`flowkit.paths`): the
    score ``∇ log p_t = path.score_from_velocity(v)``, Tweedie's denoiser
    ``E[x_data | x_t] = path.x0_from_velocity(v)``, and the forward SDE ``f(t) x dt + g(t) dw``
    whose marginals the flow shares. ``parts`` adds further :class:`~flowkit.flow.Flow` fields
    (``flow_map=...``).

    Example:
        >>> from flowkit.paths import CondOT
        >>> flow = flow_from_velocity(lambda t, x, cond=None: torch.zeros_like(x), CondOT(), (2,))
        >>> flow.path is not None and flow.score is not None
        True
    """

    def score(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return path.score_from_velocity(velocity(t, x, cond), t, x)

    def denoise(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return path.x0_from_velocity(velocity(t, x, cond), t, x)

    def drift(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        return path.drift(t, x)

    return Flow(velocity=velocity, prior=path.prior(tuple(shape)), t0=float(path.t0), t1=float(path.t1),
                score=score, drift=drift, diffusion=path.diffusion, denoise=denoise, path=path, **parts)


def score_log_likelihood(
    score_fn: Callable[..., Tensor],
    x: Tensor,
    path: GaussianPath,
    *,
    cond: Optional[Tensor] = None,
    estimator: Literal["exact", "hutchinson"] = "exact",
    noise: Literal["rademacher", "gaussian"] = "rademacher",
    n_probes: int = 1,
    solver: Optional[SolverSpec] = None,
    prior: Optional[Prior] = None,
    t0: Optional[float] = None,
    t1: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    **settings: Any,
) -> Likelihood:
    r"""``log p_{t0}(x)`` under the probability-flow ODE of a score model (nats per sample).

    **``score_fn`` is called as ``score_fn(x, t)`` (or ``score_fn(x, t, cond)``): data first,
    time second, ``t`` a ``[B]`` tensor** — the convention of most diffusion codebases, not
    flowkit's ``(t, x)``.

    The ODE runs from ``t0`` (default ``path.t0``, e.g. ε = 1e-5 for VP) to ``t1`` (default
    ``path.t1``) and the result is ``log prior(z) + ∫ div v``. What it estimates is the
    density of ``x_{t0}`` — the data convolved with ``N(0, σ_{t0}²)`` and scaled by ``α_{t0}``
    — not of the raw data; at ε = 1e-5 under VP the difference is negligible. The default
    prior ``path.prior(shape)`` is ``N(0, I)`` (``N(0, σ_max² I)`` for VE), which differs
    slightly from the true ``p_{t1}``; pass ``prior=`` (anything with ``log_prob``) to use
    another, e.g. the exact marginal of a test mixture.

    Args:
        score_fn: ``s(x, t[, cond]) ≈ ∇_x log p_t(x)``.
        x: data ``[B, *event]``.
        path: the Gaussian path / forward SDE of the model.
        cond: optional condition passed to ``score_fn``.
        estimator: ``"exact"`` trace or ``"hutchinson"`` (unbiased; FFJORD eq. 4).
        noise, n_probes: Hutchinson probe distribution and number averaged.
        solver: the ODE solver (default :data:`flowkit.likelihood.LIKELIHOOD_SOLVER`:
            ``dopri5``, ``rtol = atol = 1e-5``, per-sample error norm).
        prior: density at ``t1``.
        t0, t1: integration interval (defaults from ``path``).
        generator: random source of the Hutchinson probes.
        **settings: instead of ``solver``, the :class:`~flowkit.solvers.SolverSpec` fields
            that differ from that default (``rtol=1e-6``, ``method="rk4", steps=50``).

    A score model called under ``torch.no_grad()`` or ``torch.inference_mode()``, or returning
    ``.detach()``-ed output (the usual way of calling an external model), is fine: the
    divergence of the score is then taken by central finite differences, with a warning (see
    :mod:`flowkit.likelihood`); it is never silently 0. Calling this under ``no_grad`` or
    ``inference_mode`` is fine too.

    Returns:
        :class:`flowkit.likelihood.Likelihood`; ``log_prob`` in nats. For images rescaled from
        ``K`` levels, ``flowkit.likelihood.bits_per_dim(-out.log_prob.mean(), D, math.log(K))``
        converts to bits per dimension.

    Raises:
        FieldError: ``x`` not a finite floating ``[batch, *event_shape]`` tensor with a sample,
            ``score_fn`` returning something not shaped like ``x``, different values for
            the same input or values that depend on the other samples of the batch (a
            BatchNorm in training mode), a ``prior`` of another event shape, ``n_probes < 1``
            and the other cases of :func:`flowkit.likelihood.log_likelihood`.
        NonFiniteFieldError: ``score_fn`` returned NaN or inf (for the data, or during the
            solve where the solver could not get past it).
        flowkit.solvers.SolverError: invalid solver settings (``rtol=nan``, ``atol=0``, ...),
            before ``score_fn`` is called.

    Example:
        >>> from flowkit.flow import StandardNormal
        >>> from flowkit.paths import VP
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> out = score_log_likelihood(lambda x, t: -x, x, VP())  # N(0, I) is stationary
        >>> bool((out.log_prob - StandardNormal((2,)).log_prob(x)).abs().max() < 1e-4)
        True
    """
    check_data(x)
    shape = tuple(x.shape[1:])
    field = probability_flow_field(_checked_score(xt_score_to_field(score_fn)), path)
    start = path.t0 if t0 is None else float(t0)
    end = path.t1 if t1 is None else float(t1)
    return log_likelihood(field, x, path.prior(shape) if prior is None else prior,
                          times=(start, end), cond=cond, estimator=estimator, noise=noise,
                          n_probes=n_probes, solver=solver, generator=generator,
                          names=["score_fn (through the probability-flow velocity)"], time_per_sample=True,
                          **settings)


def _first_time(t: Tensor | float) -> str:
    """``t`` for messages: a scalar, or the first of a ``[B]`` tensor of per-sample times."""
    t = torch.as_tensor(t)
    return f"{float(t.reshape(-1)[0]):.6g}" + ("" if t.numel() == 1 else ", ...")


def _checked_score(score: Field) -> Field:
    """``score`` whose output must be a tensor shaped like ``x`` (checked on every call: a shape
    comparison costs nothing), so a wrong shape is named here, not met as a broadcast error in
    :meth:`~flowkit.paths.GaussianPath.velocity_from_score`. An inference-mode output (a model
    run under ``torch.inference_mode()``) is copied to an ordinary tensor, which autograd and
    the solver can combine with others."""

    def checked(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        out = score(t, x, cond)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise FieldError(f"score_fn(x, t) returned {got} for x of shape {tuple(x.shape)} at t={_first_time(t)}; "
                             f"expected a tensor of shape {tuple(x.shape)} (the shape of x: [batch, *event_shape])")
        return out.clone() if out.is_inference() else out

    return checked
