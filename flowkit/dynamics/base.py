"""Shared pieces of time-conditioned vector fields ``f(t, x, cond=None)``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "CLOSED_FORM_DERIVATIVES", "activation", "activation_derivative", "broadcast_time",
           "image_shape", "ConditionEmbedding", "TimeEmbedding"]

ACTIVATIONS = {
    "tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU, "elu": nn.ELU,
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
}


#: activations whose derivative :func:`activation_derivative` writes out (so a network built with
#: one can declare forward-mode divergence paths, :mod:`flowkit.fast_divergence`)
CLOSED_FORM_DERIVATIVES = frozenset({"tanh", "softplus", "relu", "elu", "silu", "swish"})


def activation(name: str) -> nn.Module:
    """A fresh module of the activation ``name`` (a key of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def activation_derivative(name: str, pre: Tensor, out: Tensor) -> Tensor:
    """``σ'(pre)`` for ``out = σ(pre)`` in closed form, for ``name`` in :data:`CLOSED_FORM_DERIVATIVES`.

    Example:
        >>> pre = torch.tensor([0.5])
        >>> bool(torch.allclose(activation_derivative("tanh", pre, pre.tanh()), 1 - pre.tanh() ** 2))
        True
    """
    if name == "tanh":
        return 1 - out * out
    if name == "softplus":
        return torch.sigmoid(pre)
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), out + 1)
    if name in ("silu", "swish"):
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    raise ValueError(f"no closed-form derivative for activation {name!r}; those with one: "
                     f"{', '.join(sorted(CLOSED_FORM_DERIVATIVES))}")


def image_shape(shape: Optional[Sequence[int]], dim: int, name: str) -> tuple[int, int, int]:
    """``shape`` as an image shape ``(C, H, W)`` of ``dim`` values, or a ValueError naming the network."""
    if shape is None or len(tuple(shape)) != 3:
        raise ValueError(f"{name} needs an image shape (C, H, W), got {shape!r}; flowkit passes "
                         "the dataset's shape, so use it with image data")
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != dim:
        raise ValueError(f"{name}: dim {dim} does not match shape {shape} ({math.prod(shape)} values)")
    return shape  # type: ignore[return-value]


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Time as a ``[B, 1]`` column matching ``x``'s batch, dtype and device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0], 1)
    return t.reshape(-1, 1).expand(x.shape[0], 1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t`` (Vaswani et al. 2017) followed by nothing learnable;
    ``dim = 0`` gives ``t`` itself."""

    def __init__(self, dim: int = 0, max_period: float = 100.0) -> None:
        super().__init__()
        self.dim = dim
        if dim:
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half, 1))
            self.register_buffer("freqs", freqs, persistent=False)

    @property
    def out_dim(self) -> int:
        return self.dim or 1

    def forward(self, t: Tensor) -> Tensor:  # t: [B, 1]
        if not self.dim:
            return t
        arg = t * self.freqs.to(t.dtype) * 2 * math.pi
        return torch.cat([arg.sin(), arg.cos()], -1)


class ConditionEmbedding(nn.Module):
    """Embeds a class label (``num_classes``) or a continuous vector (``cond_dim``).

    The *null* condition used by classifier-free guidance is label ``-1`` or a
    vector of NaNs; it maps to a learned "unconditional" embedding.
    """

    def __init__(self, num_classes: Optional[int] = None, cond_dim: Optional[int] = None,
                 dim: int = 16) -> None:
        super().__init__()
        if num_classes and cond_dim:
            raise ValueError("give num_classes (labels) or cond_dim (vectors), not both")
        self.num_classes, self.cond_dim = num_classes, cond_dim
        self.out_dim = dim if (num_classes or cond_dim) else 0
        if num_classes:
            self.table = nn.Embedding(num_classes + 1, dim)
        elif cond_dim:
            self.proj = nn.Linear(cond_dim, dim)
            self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, cond: Optional[Tensor], batch: int, like: Tensor) -> Optional[Tensor]:
        if not self.out_dim:
            if cond is not None:
                raise ValueError("this network was built without conditioning "
                                 "(set num_classes or cond_dim in the dynamics section)")
            return None
        if self.num_classes:
            if cond is None:
                cond = torch.full((batch,), -1, dtype=torch.long, device=like.device)
            idx = torch.where(cond < 0, torch.full_like(cond, self.num_classes), cond).long()
            return self.table(idx).to(like.dtype)
        if cond is None:
            return self.null.to(like.dtype).expand(batch, -1)
        cond = cond.to(like.dtype).reshape(batch, -1)
        missing = torch.isnan(cond).any(-1, keepdim=True)
        emb = self.proj(torch.nan_to_num(cond))
        return torch.where(missing, self.null.to(like.dtype).expand_as(emb), emb)
