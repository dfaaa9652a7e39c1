r"""A k-diffusion / EDM denoiser ``D(x, σ)`` as a flowkit Flow.

EDM (Karras et al. 2022) writes every diffusion as ``x = y + σ n`` (signal scale ``s(t) = 1``)
with a denoiser ``D(x, σ) ≈ E[y | x]``, whose score is ``∇ log p_σ(x) = (D(x, σ) − x)/σ²``
(Karras et al. 2022, eq. 3); the probability-flow ODE is ``dx/dσ = (x − D(x, σ))/σ``.
k-diffusion's ``model(x, sigma)`` wrappers (``Denoiser``, ``VDenoiser``, …) have the same
signature and meaning.

:func:`from_edm` puts ``σ`` on flowkit's time axis geometrically, ``σ_t = σ_min (σ_max/σ_min)^t``
for ``t ∈ [0, 1]`` — flowkit's :class:`~flowkit.paths.VE` path, ``α = 1``. The ODE's trajectories
do not depend on how time is parameterised, so the likelihood is EDM's; the geometric clock
makes the adaptive solver's steps even in ``log σ``. The data end carries ``σ_min`` of noise (the
density is that of ``x_data + σ_min n``) and the prior is ``N(0, σ_max² I)``, as in k-diffusion's
``log_likelihood``.

References:
    Karras, Aittala, Aila, Laine (2022). Elucidating the Design Space of Diffusion-Based
    Generative Models. NeurIPS.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..flow import Flow, Prior
from ..paths import VE
from .base import AdapterError, from_prediction

__all__ = ["from_edm"]


def from_edm(denoiser: Callable[[Tensor, Tensor], Tensor], shape: tuple[int, ...] | list[int], *,
             sigma_min: float = 0.002, sigma_max: float = 80.0, prior: Optional[Prior] = None) -> Flow:
    """The probability-flow :class:`~flowkit.flow.Flow` of an EDM / k-diffusion denoiser.

    Args:
        denoiser: ``D(x, sigma) ≈ E[x_data | x]`` with ``sigma`` a ``[B]`` tensor.
        shape: event shape of the data.
        sigma_min, sigma_max: the noise levels of the data end and the prior (EDM's defaults).
        prior: density at ``σ_max`` (default ``N(0, σ_max² I)``).

    Returns:
        A flow on ``t ∈ [0, 1]``, ``σ_t = σ_min (σ_max/σ_min)^t``; ``flow.path`` is the
        :class:`~flowkit.paths.VE` path.

    Raises:
        AdapterError: not ``0 < sigma_min < sigma_max``.

    Example:
        >>> import torch
        >>> from flowkit.likelihood import flow_log_likelihood
        >>> from flowkit.flow import StandardNormal
        >>> D = lambda x, sigma: x / (1 + sigma[:, None] ** 2)  # E[y | x] for y ~ N(0, I)
        >>> flow = from_edm(D, (2,), sigma_min=0.002, sigma_max=80.0)
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> ref = StandardNormal((2,), (1 + 0.002**2) ** 0.5).log_prob(x)
        >>> bool((flow_log_likelihood(flow, x).log_prob - ref).abs().max() < 1e-3)
        True
    """
    if not 0 < sigma_min < sigma_max:
        raise AdapterError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    path = VE(sigma_min=sigma_min, sigma_max=sigma_max)
    return from_prediction(denoiser, path, shape, prediction="x0", label=path.sigma, prior=prior)
