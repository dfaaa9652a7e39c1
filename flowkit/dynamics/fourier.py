r"""MLP with a learned Fourier time embedding (the 2-D networks of DiffFlow, Zhang & Chen 2021).

.. math::

    e(t) &= W_2\, σ\big(W_1 [\sin(ω t + φ), \cos(ω t + φ)] + b_1\big) + b_2,
          \qquad ω_k = \text{linspace}(0.1, 100, C)_k,\ φ \text{ learned} \\
    h_0 &= σ\big(W_\text{in} x + b_\text{in} + e(t) + c\big) \\
    h_{l+1} &= σ(W_l h_l + b_l), \qquad l = 0 … L − 1 \\
    f(t, x) &= W_\text{out} h_L + b_\text{out}

with ``C`` channels, ``L`` hidden layers, ``σ`` the activation (GELU) and ``c`` an optional
condition embedding (class label or vector, null condition for guidance).

Time is evaluated once per distinct time. Solvers and the DiffFlow objective call the
field with one scalar time for the whole batch; the embedding ``e(t)`` (half of the
network's parameters at ``C = 128``) is then computed on a single row and folded into
the bias of the input layer (one ``addmm``), instead of being recomputed for every sample.
The network is the same function with the same parameters either way; per-sample times
``t: [B]`` take the general path.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

from ..components import DYNAMICS
from ..constraints import NonNegativeInt, PositiveFloat, PositiveInt
from .base import ConditionEmbedding
from .base import activation as make_activation

__all__ = ["FourierMLP"]

Activation = Literal["tanh", "softplus", "relu", "elu", "silu", "swish", "gelu"]


@DYNAMICS.register("fourier_mlp")
class FourierMLP(nn.Module):
    """Field ``f(t, x, cond=None)`` on vectors with a learned Fourier time embedding.

    Args:
        dim: data dimension (set by flowkit).
        channels: width ``C`` of every layer and of the time embedding.
        layers: number ``L`` of hidden ``C × C`` layers after the input layer.
        activation: nonlinearity ``σ`` (DiffFlow: GELU).
        max_frequency: largest time frequency ``ω_C`` (the smallest is 0.1).
        num_classes / cond_dim: optional conditioning, embedded to ``C`` and added to ``h_0``.
    """

    #: no fast divergence path: the generic estimators of :mod:`flowkit.trace`
    divergence_paths: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dim: int, channels: PositiveInt = 128, layers: NonNegativeInt = 3,
                 activation: Activation = "gelu", max_frequency: PositiveFloat = 100.0,
                 num_classes: Optional[PositiveInt] = None, cond_dim: Optional[PositiveInt] = None) -> None:
        super().__init__()
        if channels < 1 or layers < 0:
            raise ValueError(f"channels must be >= 1 and layers >= 0, got {channels}, {layers}")
        self.dim = dim
        self.register_buffer("frequencies", torch.linspace(0.1, max_frequency, channels))
        self.phase = nn.Parameter(torch.randn(channels))
        self.time_embed = nn.Sequential(nn.Linear(2 * channels, channels), make_activation(activation),
                                        nn.Linear(channels, channels))
        self.input = nn.Linear(dim, channels)
        self.cond = ConditionEmbedding(num_classes, cond_dim, channels)
        self.act = make_activation(activation)
        self.hidden = nn.ModuleList(nn.Linear(channels, channels) for _ in range(layers))
        self.output = nn.Linear(channels, dim)

    def embed_time(self, t: Tensor) -> Tensor:
        """``e(t)`` for times ``t: [K]`` → ``[K, C]``."""
        arg = t.reshape(-1, 1) * self.frequencies + self.phase
        return self.time_embed(torch.cat([arg.sin(), arg.cos()], -1))

    def forward(self, t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = x.flatten(1)
        t = torch.as_tensor(t, dtype=flat.dtype, device=flat.device)
        if t.numel() not in (1, flat.shape[0]):
            raise ValueError(f"t must be a scalar or have one entry per sample ({flat.shape[0]}), "
                             f"got shape {list(t.shape)}")
        # [1, C] for one time (the embedding is a bias of the whole batch), else [B, C]
        bias = self.input.bias + self.embed_time(t)
        h = torch.addmm(bias, flat, self.input.weight.t())
        emb = self.cond(cond, flat.shape[0], flat)
        if emb is not None:
            h = h + emb
        h = self.act(h)
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.output(h).reshape(x.shape)
