r"""From a model's prediction to flowkit's score: the one conversion every adapter uses.

Diffusion code bases train a network to predict one of several targets at the noisy
``x_t = α_t x_data + σ_t ε`` (:mod:`flowkit.paths`); each is an affine function of the score
``s = ∇ log p_t(x_t)`` given ``(α_t, σ_t)`` (Tweedie: ``ε̂ = −σ_t s``, ``x̂₀ = (x_t + σ_t² s)/α_t``):

=============  ============================================  =================================
prediction     the network outputs                           score
=============  ============================================  =================================
``score``      ``s``                                         ``s``
``eps``        ``ε̂`` (DDPM; Ho et al. 2020)                   ``−ε̂/σ``
``x0``         ``x̂₀`` (diffusers' ``sample``; EDM's ``D``)   ``(α x̂₀ − x)/σ²``
``v``          ``v̂ = α ε̂ − σ x̂₀`` (Salimans & Ho 2022,       ``−(σ x + α v̂) / (σ (α² + σ²))``
               Sec. 4; diffusers' ``v_prediction``)
``velocity``   the probability-flow ``dx/dt`` in flowkit     :meth:`~flowkit.paths.GaussianPath.score_from_velocity`
               time (flow matching)
=============  ============================================  =================================

The ``v`` row: from ``x = α x̂₀ + σ ε̂`` and ``v̂ = α ε̂ − σ x̂₀``, ``ε̂ = (σ x + α v̂)/(α² + σ²)``
(``= σ x + α v̂`` on a variance-preserving path).

:func:`from_prediction` wraps a network called the way its code base calls it,
``model(x, label)`` with a ``[B]`` tensor ``label`` (a timestep, ``999 t``, ``σ_t``, …), into a
:class:`~flowkit.flow.Flow` through :func:`flowkit.diffusion.flow_from_score`.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from ..diffusion import flow_from_score
from ..flow import Flow, Prior
from ..paths import GaussianPath

__all__ = ["PREDICTIONS", "Prediction", "AdapterError", "to_score", "from_prediction", "from_score"]

Prediction = Literal["score", "eps", "x0", "v", "velocity"]
#: what a network may predict (see the module docstring)
PREDICTIONS: tuple[str, ...] = ("score", "eps", "x0", "v", "velocity")


class AdapterError(ValueError):
    """A model, its directory or its configuration cannot be adapted (one line: what and how to fix)."""


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1))) if c.dim() == 1 else c


def to_score(prediction: Tensor, kind: str, path: GaussianPath, t: Tensor, x: Tensor) -> Tensor:
    """The score ``∇ log p_t(x)`` from a network's ``prediction`` of ``kind`` (module docstring).

    Args:
        prediction: the network output, shaped like ``x``.
        kind: one of :data:`PREDICTIONS`.
        path: the Gaussian path the network was trained on.
        t: flowkit time, scalar or ``[B]``.
        x: the state ``x_t``.

    Example:
        >>> from flowkit.paths import VP
        >>> path, x, t = VP(), torch.randn(3, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
        >>> s = -x / 1.7
        >>> eps = -path.sigma(t) * s
        >>> v = path.alpha(t) * eps - path.sigma(t) * path.x0_from_score(s, t, x)
        >>> bool(torch.allclose(to_score(v, "v", path, t, x), s))
        True
    """
    if kind == "score":
        return prediction
    if kind == "eps":
        return path.score_from_eps(prediction, t, x)
    if kind == "x0":
        return path.score_from_x0(prediction, t, x)
    if kind == "velocity":
        return path.score_from_velocity(prediction, t, x)
    if kind == "v":
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        a, s = _per_sample(path.alpha(tt), x), _per_sample(path.sigma(tt), x)
        eps = (s * x + a * prediction) / (a * a + s * s)
        return path.score_from_eps(eps, t, x)
    raise AdapterError(f"prediction: unknown {kind!r}; choose one of {', '.join(PREDICTIONS)}")


def from_prediction(model: Callable[[Tensor, Tensor], Tensor], path: GaussianPath,
                    shape: tuple[int, ...] | list[int], *, prediction: Prediction = "eps",
                    label: Optional[Callable[[Tensor], Tensor]] = None, prior: Optional[Prior] = None) -> Flow:
    """The :class:`~flowkit.flow.Flow` of a network ``model(x, label) -> prediction``.

    Args:
        model: called as ``model(x, label)``, ``x`` ``[B, *shape]`` and ``label`` a ``[B]`` tensor
            in ``x``'s dtype; returns a tensor shaped like ``x``.
        path: the Gaussian path (forward SDE) the network was trained on, in flowkit time.
        shape: event shape of the data.
        prediction: what the network outputs (:data:`PREDICTIONS`).
        label: flowkit time ``[B]`` → the network's time input (default: the time itself).
        prior: density at ``path.t1`` (default ``path.prior(shape)``).

    Returns:
        A flow (probability-flow velocity, score, forward SDE, denoiser, ``path``) on
        ``[path.t0, path.t1]``; ``flowkit.flow_log_likelihood(flow, x)`` scores data.

    Raises:
        AdapterError: unknown ``prediction``.

    Example:
        >>> from flowkit.paths import VP
        >>> from flowkit.likelihood import flow_log_likelihood
        >>> from flowkit.flow import StandardNormal
        >>> path = VP()
        >>> eps_model = lambda x, label: path.sigma(label)[:, None] * x  # ε̂ of N(0, I) data: −σ s = σ x
        >>> flow = from_prediction(eps_model, path, (2,), prediction="eps")
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> out = flow_log_likelihood(flow, x)
        >>> bool((out.log_prob - StandardNormal((2,)).log_prob(x)).abs().max() < 1e-4)
        True
    """
    if prediction not in PREDICTIONS:
        raise AdapterError(f"prediction: unknown {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    to_label = label if label is not None else (lambda t: t)

    def score(t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tb = tt.expand(x.shape[0]) if tt.dim() == 0 else tt
        out = model(x, to_label(tb)) if cond is None else model(x, to_label(tb), cond)
        return to_score(out, prediction, path, tb, x)

    return flow_from_score(score, path, tuple(shape), prior=prior)


def from_score(score_xt: Callable[[Tensor, Tensor], Tensor], path: GaussianPath,
               shape: tuple[int, ...] | list[int], *, prior: Optional[Prior] = None) -> Flow:
    """A plain score callable ``s(x, t)`` (``t`` a ``[B]`` tensor of flowkit time), as
    :func:`flowkit.score_log_likelihood` takes it, as a :class:`~flowkit.flow.Flow`."""
    return from_prediction(score_xt, path, shape, prediction="score", prior=prior)
