r"""The few-step sampler of models with a learned flow map (consistency models, MeanFlow).

``flow_map`` takes ``steps`` steps on the uniform grid ``t_k = t1 + k (t0 − t1)/steps``,
``k = 0, …, steps``, one network evaluation each (``nfe = steps``, exactly):

* deterministic (``renoise=False``): ``x ← flow_map(x, t_k, t_{k+1})``, the model's two-time
  map (MeanFlow's ``x − (t − s) u(x, s, t)``; a consistency model's DDIM-like map);
* ``renoise=True``, consistency multistep sampling (Song et al. 2023, Alg. 1): at each
  time jump to data, ``x̂ = flow_map(x, t_k, t0)``, then, before the last step, put noise back
  at ``s = t_{k+1}`` with the path's transition from ``t0``:

  .. math::  x_s = \frac{\alpha_s}{\alpha_{t_0}}\, \hat x + \sqrt{\sigma_s^2 -
             \Big(\frac{\alpha_s \sigma_{t_0}}{\alpha_{t_0}}\Big)^2}\; z, \qquad z \sim \mathcal N(0, I),

  which is Alg. 1's ``x̂ + sqrt(τ² − ε²) z`` on the VE path and ``α_s x̂ + σ_s z`` where
  ``α_{t0} = 1``, ``σ_{t0} = 0``. It needs the model's Gaussian path (``flow.path``).

``steps = 1`` is one-step generation ``flow_map(x, t1, t0)`` either way.

Registration: ``flowkit/samplers/__init__.py`` imports this module.

Example:
    >>> from flowkit.flow import Flow, StandardNormal
    >>> shrink = lambda x, t, s, cond=None: x * ((1 + s) / (1 + t)).reshape(-1, 1)
    >>> flow = Flow(velocity=None, prior=StandardNormal((2,)), flow_map=shrink)
    >>> res = flow_map(flow, torch.ones(3, 2), steps=4)
    >>> res.nfe, res.x[0].tolist()  # the steps compose: (1 + 0) / (1 + 1)
    (4, [0.5, 0.5])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..components import SAMPLERS
from ..constraints import PositiveInt, Seed
from ..flow import Flow, TimeGrid
from .base import SampleResult, declare

__all__ = ["flow_map"]


@SAMPLERS.register("flow_map")
@declare(needs=("flow_map",), evaluations=1)
def flow_map(flow: Flow, x: Tensor, *, cond: Optional[Tensor] = None, steps: PositiveInt = 1,
             renoise: bool = False, seed: Optional[Seed] = None) -> SampleResult:
    """``steps`` applications of the flow's learned map from ``t1`` to ``t0`` (module docstring).

    Args:
        flow: a flow with ``flow_map`` (and ``path`` for ``renoise``).
        x: prior samples at ``t1``.
        cond: condition passed to the map.
        steps: network evaluations (1: one-step generation).
        renoise: consistency multistep sampling (Song et al. 2023, Alg. 1) instead of chaining
            the deterministic map.
        seed: seed of the renoising noise (``None``: the global generator).

    Returns:
        :class:`~flowkit.samplers.base.SampleResult` with ``nfe = steps``.

    Raises:
        ValueError: ``renoise`` on a flow without a Gaussian path, or a flow without ``flow_map``.
    """
    flow.require("flow_map", by="flow_map")
    if renoise and flow.path is None:
        raise ValueError("sampler.renoise: multistep consistency sampling puts noise back with the model's "
                         "Gaussian path, and this model declares none; use renoise: false")
    times = TimeGrid(steps).times(flow.t0, flow.t1, like=x)
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    batch = x.shape[0]
    with torch.no_grad():
        for k in range(steps):
            t, s = times[k].expand(batch), times[k + 1].expand(batch)
            if not renoise:
                x = flow.flow_map(x, t, s, cond)
                continue
            x = flow.flow_map(x, t, times[-1].expand(batch), cond)
            if k + 1 < steps:
                x = _renoise(flow, x, times[k + 1], generator)
    return SampleResult(x, steps)


def _renoise(flow: Flow, x0: Tensor, s: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """A draw of ``x_s`` given ``x_{t0} = x0`` under the path (module docstring)."""
    path = flow.path
    t0 = torch.as_tensor(flow.t0, dtype=x0.dtype, device=x0.device)
    a0, s0, a, sig = path.alpha(t0), path.sigma(t0), path.alpha(s), path.sigma(s)
    scale = a / a0
    std = (sig**2 - (scale * s0) ** 2).clamp_min(0).sqrt()
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return scale * x0 + std * z
