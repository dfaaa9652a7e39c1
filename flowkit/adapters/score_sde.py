r"""A score_sde-style network ``model(x, labels)`` with its SDE, as a flowkit Flow.

score_sde (Song et al. 2021; ``yang-song/score_sde_pytorch``, ``models/utils.py:get_score_fn``)
feeds its networks a time *label* and rescales their output into a score:

===============================  =======================  ===================================
SDE                              ``labels``               score from the output ``out``
===============================  =======================  ===================================
VP, continuous training          ``999 t``                ``−out / σ_t`` (``out`` predicts ε)
VP, DDPM-trained (``N`` steps)   ``(N − 1) t``            ``−out / σ_t``
sub-VP                           ``999 t``                ``−out / σ_t`` (sub-VP's ``σ_t = 1 − α_t²``)
VE, continuous training          ``σ_t``                  ``out`` (the network outputs the score)
===============================  =======================  ===================================

with ``σ_t`` the marginal standard deviation of the SDE at ``t`` (flowkit's :class:`~flowkit.paths.VP`,
:class:`~flowkit.paths.SubVP`, :class:`~flowkit.paths.VE` are score_sde's SDEs with the same
parameters, time on ``[0, 1]``, data at ``t0``). One difference, on purpose: for a DDPM-trained VP
network score_sde divides by ``sqrt(1 − ᾱ)`` of the discrete timestep ``⌊(N − 1) t⌋``, a
step function of ``t``; flowkit divides by the continuous ``σ_t`` (the two differ by ``O(1/N)``),
so that the probability-flow field is smooth in ``t``. A VE network trained on ``N`` discrete
noise levels (integer labels, ``t = 0`` the noisiest) is defined at those levels only — no field
exists between them — and is refused.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from ..flow import Flow, Prior
from ..paths import VE, VP, GaussianPath, SubVP
from .base import AdapterError, from_prediction

__all__ = ["from_score_sde"]


def from_score_sde(model: Callable[[Tensor, Tensor], Tensor], sde: GaussianPath,
                   shape: tuple[int, ...] | list[int], *, continuous: bool = True, num_scales: int = 1000,
                   prior: Optional[Prior] = None) -> Flow:
    """The probability-flow :class:`~flowkit.flow.Flow` of a score_sde network.

    Args:
        model: ``model(x, labels)`` with ``labels`` a ``[B]`` tensor (module docstring).
        sde: :class:`~flowkit.paths.VP`, :class:`~flowkit.paths.SubVP` or :class:`~flowkit.paths.VE`
            with the model's parameters (``beta_min``/``beta_max``, ``sigma_min``/``sigma_max``).
        shape: event shape of the data.
        continuous: the network was trained at continuous times (score_sde's ``training.continuous``).
        num_scales: ``N`` of a DDPM-trained VP network (``continuous=False``).
        prior: density at ``sde.t1`` (default ``sde.prior(shape)``).

    Raises:
        AdapterError: another path type, or a discretely trained VE network.

    Example:
        >>> import torch
        >>> from flowkit.likelihood import flow_log_likelihood
        >>> from flowkit.flow import StandardNormal
        >>> vp = VP()
        >>> net = lambda x, labels: vp.sigma(labels[:, None] / 999) * x  # ε̂ of N(0, I) data
        >>> flow = from_score_sde(net, vp, (2,))
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> bool((flow_log_likelihood(flow, x).log_prob - StandardNormal((2,)).log_prob(x)).abs().max() < 1e-4)
        True
    """
    if isinstance(sde, (VP, SubVP)):  # SubVP subclasses VP
        if isinstance(sde, SubVP) or continuous:
            label: Callable[[Tensor], Tensor] = lambda t: 999.0 * t
        else:
            if int(num_scales) < 2:
                raise AdapterError(f"num_scales: need at least 2, got {num_scales}")
            label = lambda t: (int(num_scales) - 1) * t
        return from_prediction(model, sde, shape, prediction="eps", label=label, prior=prior)
    if isinstance(sde, VE):
        if not continuous:
            raise AdapterError("a VE network trained on discrete noise levels (integer labels) has no field between "
                               "them; only continuously trained VE networks (labels = σ_t) can be evaluated")
        return from_prediction(model, sde, shape, prediction="score", label=sde.sigma, prior=prior)
    raise AdapterError(f"sde: expected flowkit.paths.VP, SubVP or VE (score_sde's SDEs), got {type(sde).__name__}")
