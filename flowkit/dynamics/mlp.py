"""Multilayer perceptron fields for vector data.

``concatsquash`` is the FFJORD toy/tabular network (Grathwohl et al. 2019, code and
appendix B): each layer is ``ConcatSquash(x, c) = (W x + b) ⊙ σ(W_g c + b_g) + W_b c``
with the context ``c = [t, embed(cond)]`` gating and shifting every hidden layer.
``mlp`` feeds ``[x, time features, embed(cond)]`` to a plain MLP (the flow-matching
and score-model baseline).

Fast divergence paths (:mod:`flowkit.fast_divergence`): ``concatsquash`` declares
``jacobian`` (the Jacobian carried forward, for an activation with a closed-form
derivative) and, with ``bottleneck=True``, ``bottleneck``; ``mlp`` declares none.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..components import DYNAMICS
from ..constraints import MultipleOf, NonNegative, PositiveInt
from .base import CLOSED_FORM_DERIVATIVES, ConditionEmbedding, TimeEmbedding, activation_derivative, broadcast_time
from .base import activation as activation_module

__all__ = ["ConcatSquashLinear", "ConcatSquashMLP", "MLP"]

Activation = Literal["tanh", "softplus", "relu", "elu", "silu", "swish", "gelu"]
#: 0 (``t`` itself) or an even number of sinusoidal features (sin and cos pairs)
TimeFeatures = Annotated[int, NonNegative(), MultipleOf(2)]


class ConcatSquashLinear(nn.Module):
    """``(W x + b) ⊙ sigmoid(W_g c + b_g) + W_b c`` for context ``c``."""

    def __init__(self, d_in: int, d_out: int, d_ctx: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        # gate and shift fused in one matmul over the context
        self.hyper = nn.Linear(d_ctx, 2 * d_out)
        with torch.no_grad():  # the shift has no bias in FFJORD; zero its half of the bias
            self.hyper.bias[d_out:].zero_()
        self.d_out = d_out

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        gate, shift = self.hyper(ctx).split(self.d_out, -1)
        return self.linear(x) * torch.sigmoid(gate) + shift


@DYNAMICS.register("concatsquash")
class ConcatSquashMLP(nn.Module):
    """FFJORD's ConcatSquash MLP: every layer gated and shifted by time (and condition).

    Args:
        dim: data dimension (set by flowkit).
        hidden: hidden widths, FFJORD's toy model is ``[64, 64, 64]``.
        activation: nonlinearity between layers (FFJORD toy: tanh).
        time_features: 0 feeds ``t`` itself to the hypernetwork; ``k > 0`` uses ``k``
            sinusoidal features.
        num_classes / cond_dim: optional class-label or vector condition.
        cond_embed: width of the condition embedding.
        bottleneck: declare the ``bottleneck`` path (``split`` after the first layer) so
            Hutchinson's estimator draws its probe there (FFJORD appendix E; lowers variance
            when ``hidden[0] < dim``).
    """

    #: fast divergence paths it can offer; an instance declares ``jacobian`` for an activation with a
    #: closed-form derivative and ``bottleneck`` when built with ``bottleneck=True``
    divergence_paths: frozenset[str] = frozenset({"jacobian", "bottleneck"})

    def __init__(self, dim: int, hidden: Sequence[PositiveInt] = (64, 64, 64), activation: Activation = "tanh",
                 time_features: TimeFeatures = 0, num_classes: Optional[PositiveInt] = None,
                 cond_dim: Optional[PositiveInt] = None, cond_embed: PositiveInt = 16,
                 bottleneck: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.bottleneck = bottleneck
        self.divergence_paths = frozenset({"jacobian"} if activation in CLOSED_FORM_DERIVATIVES else set()) | (
            {"bottleneck"} if bottleneck else set())
        self.time = TimeEmbedding(time_features)
        self.cond = ConditionEmbedding(num_classes, cond_dim, cond_embed)
        d_ctx = self.time.out_dim + self.cond.out_dim
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(a, b, d_ctx) for a, b in zip(widths[:-1], widths[1:]))
        self.act = activation_module(activation)
        self.activation = activation

    def _context(self, t: Tensor, x: Tensor, cond: Optional[Tensor]) -> Tensor:
        ctx = self.time(broadcast_time(t, x))
        emb = self.cond(cond, x.shape[0], x)
        return ctx if emb is None else torch.cat([ctx, emb], -1)

    def _tail(self, h: Tensor, ctx: Tensor, start: int) -> Tensor:
        for i in range(start, len(self.layers)):
            h = self.layers[i](h, ctx)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = x.flatten(1)  # images and other shapes are treated as vectors
        return self._tail(flat, self._context(t, flat, cond), 0).reshape(x.shape)

    def forward_with_jacobian(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``f(t, x)`` and its Jacobian ``J[b, i, j] = ∂f_j/∂x_i`` by forward-mode propagation.

        Each layer maps ``J ← (J Wᵀ) ⊙ σ(gate)`` then ``J ← J ⊙ act'(pre)``: ``D`` extra
        columns through the same matmuls, and training needs only a first-order backward
        through them instead of a double backward through ``autograd.grad``. ``x`` of any
        event shape is treated as a vector (as in :meth:`forward`): ``J`` is ``[B, D, D]``.
        Declared (``jacobian``) for activations with a closed-form derivative.
        """
        if "jacobian" not in self.divergence_paths:
            raise ValueError(f"concatsquash: no forward Jacobian for activation {self.activation!r} (no closed-form "
                             f"derivative); it does not declare the 'jacobian' divergence path")
        flat = x if x.dim() == 2 else x.flatten(1)
        ctx = self._context(t, flat, cond)
        batch, dim = flat.shape
        h = flat
        jac = torch.eye(dim, dtype=x.dtype, device=x.device).expand(batch, dim, dim)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            gate, shift = layer.hyper(ctx).split(layer.d_out, -1)
            g = torch.sigmoid(gate)
            pre = layer.linear(h) * g + shift
            jac = torch.matmul(jac, layer.linear.weight.t()) * g.unsqueeze(1)
            if i < last:
                h = self.act(pre)
                jac = jac * activation_derivative(self.activation, pre, h).unsqueeze(1)
            else:
                h = pre
        return (h if x.dim() == 2 else h.reshape(x.shape)), jac

    def split(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None):
        """``f = g(h(x))`` with ``h`` the first layer's activations (for the bottleneck trace)."""
        flat = x.flatten(1)  # any event shape is treated as a vector, as in forward
        ctx = self._context(t, flat, cond)
        h = self.act(self.layers[0](flat, ctx))
        return h, lambda h_: self._tail(h_, ctx, 1).reshape(x.shape)


@DYNAMICS.register("mlp")
class MLP(nn.Module):
    """Plain MLP on ``[x, t-features, embed(cond)]`` (flow-matching / score baseline).

    Args:
        dim: data dimension (set by flowkit).
        hidden: hidden widths.
        activation: nonlinearity.
        time_features: 0 appends ``t``; ``k > 0`` appends ``k`` sinusoidal features.
        num_classes / cond_dim / cond_embed: optional conditioning.
    """

    #: no fast divergence path: the generic estimators of :mod:`flowkit.trace`
    divergence_paths: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dim: int, hidden: Sequence[PositiveInt] = (64, 64, 64), activation: Activation = "silu",
                 time_features: TimeFeatures = 0, num_classes: Optional[PositiveInt] = None,
                 cond_dim: Optional[PositiveInt] = None, cond_embed: PositiveInt = 16) -> None:
        super().__init__()
        self.dim = dim
        self.time = TimeEmbedding(time_features)
        self.cond = ConditionEmbedding(num_classes, cond_dim, cond_embed)
        widths = [dim + self.time.out_dim + self.cond.out_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), activation_module(activation)]
        layers.append(nn.Linear(widths[-1], dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = x.flatten(1)  # images and other shapes are treated as vectors
        parts = [flat, self.time(broadcast_time(t, flat))]
        emb = self.cond(cond, flat.shape[0], flat)
        if emb is not None:
            parts.append(emb)
        return self.net(torch.cat(parts, -1)).reshape(x.shape)
