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
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

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


class _TanhJacobian(torch.autograd.Function):
    """``(f, J)`` of a tanh ConcatSquash MLP as one autograd node, with the reverse pass written out.

    Forward (per layer ``l``, context ``c``): ``[γ, s] = W_h c + b_h``, ``g = σ(γ)``,
    ``a = W h + b``, ``p = a ⊙ g + s``, ``h' = tanh p`` (the last layer: ``h' = p``), and the
    Jacobian rows ``Ĵ = J Wᵀ`` (the first layer: ``Wᵀ``), ``J' = Ĵ ⊙ m`` with
    ``m = g ⊙ (1 − h'²)`` (last: ``m = g``). Reverse, from ``(h̄', J̄')``:
    ``Ĵ̄ = J̄' ⊙ m``, ``m̄ = Σ_rows J̄' ⊙ Ĵ``; ``d = 1 − h'²`` gives ``h̄' −= 2 h' ⊙ m̄ ⊙ g`` and
    ``ḡ = m̄ ⊙ d``; then ``p̄ = h̄' ⊙ d``, ``ā = p̄ ⊙ g``, ``ḡ += p̄ ⊙ a``, ``s̄ = p̄``,
    ``W̄ = āᵀ h + Σ Ĵ̄ᵀ J``, ``b̄ = Σ ā``, ``h̄ = ā W``, ``J̄ = Ĵ̄ W``, ``γ̄ = ḡ ⊙ g(1 − g)``,
    ``W̄_h = [γ̄, s̄]ᵀ c``, ``c̄ += [γ̄, s̄] W_h`` (the hypernetworks of all layers in one
    product). The autograd graph of the same arithmetic has ~60 nodes per call; FFJORD's toy
    training is bound by their count, not by its FLOPs. The rows of ``J`` are carried as
    ``[D, B, width]``, the input direction outermost, so that the per-sample factors ``m``
    broadcast over the leading dimension (three times faster than over the middle one on CPU;
    the node is 15 % faster, ``bench/ffjord_toy.py``); the result is returned as ``[B, D, D]``.
    First-order only (the FFJORD objective's backward and the adjoint need no more).
    """

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, *params: Tensor):  # type: ignore[override]
        n = len(params) // 4
        batch = x.shape[0]
        one = x.new_ones(())
        h, jac, saved = x, None, []
        for i in range(n):
            weight, bias, hyper_w, hyper_b = params[4 * i: 4 * i + 4]
            width = weight.shape[0]
            both = F.linear(c, hyper_w, hyper_b)
            g = torch.sigmoid(both[:, :width])
            a = F.linear(h, weight, bias)
            pre = torch.addcmul(both[:, width:], a, g)
            if jac is None:  # J = I: Ĵ = Wᵀ, the same for every sample
                hat = weight.t().contiguous().unsqueeze(1)
            else:
                hat = torch.mm(jac.reshape(-1, jac.shape[-1]), weight.t()).view(-1, batch, width)
            if i < n - 1:
                out = torch.tanh(pre)
                d = torch.addcmul(one, out, out, value=-1)
                m = g * d
            else:
                out, d, m = pre, None, g
            saved.append((h, jac, hat, g, a, out, d, m))
            h, jac = out, hat * m  # [D, B, w] ⊙ [B, w]: the gates broadcast over the leading dimension
        ctx.layers = saved
        ctx.save_for_backward(c, *params)
        jac = jac.transpose(0, 1)
        return h, (jac.expand(batch, -1, -1) if jac.shape[0] != batch else jac.contiguous())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor, grad_jac: Tensor):  # type: ignore[override]
        c, *params = ctx.saved_tensors
        saved, ctx.layers = ctx.layers, None
        n = len(params) // 4
        grads: list[Optional[Tensor]] = [None] * len(params)
        shared = c.shape[0] == 1 and grad_h.shape[0] != 1  # one context row broadcast over the batch
        hyper_bars: list[Tensor] = [grad_h] * n
        h_bar, j_bar = grad_h, grad_jac.transpose(0, 1).contiguous()  # [D, B, D_out], as carried
        for i in reversed(range(n)):
            weight = params[4 * i]
            h_in, jac_in, hat, g, a, out, d, m = saved[i]
            width = weight.shape[0]
            hat_bar = j_bar * m
            m_bar = (j_bar * hat).sum(0)
            if d is None:
                g_bar, pre_bar = m_bar, h_bar
            else:
                h_bar = torch.addcmul(h_bar, out, m_bar * g, value=-2)
                pre_bar = h_bar * d
                g_bar = m_bar * d
            a_bar = pre_bar * g
            g_bar = torch.addcmul(g_bar, pre_bar, a)
            if jac_in is None:
                w_bar = torch.addmm(hat_bar.sum(1).t(), a_bar.t(), h_in)
            else:
                flat_bar = hat_bar.reshape(-1, width)
                w_bar = torch.addmm(torch.mm(flat_bar.t(), jac_in.reshape(-1, jac_in.shape[-1])), a_bar.t(), h_in)
                j_bar = torch.mm(flat_bar, weight).view(jac_in.shape)
            h_bar = torch.mm(a_bar, weight)
            s_bar = pre_bar
            if shared:
                g_bar, s_bar = g_bar.sum(0, keepdim=True), pre_bar.sum(0, keepdim=True)
            hyper_bars[i] = torch.cat([g_bar * torch.addcmul(g, g, g, value=-1), s_bar], -1)  # σ' = g(1 − g)
            grads[4 * i: 4 * i + 2] = [w_bar, a_bar.sum(0)]
        # the hypernetworks of all layers at once: [C, Σ 2w] rows of (γ̄, s̄) against the context
        hyper_bar = torch.cat(hyper_bars, -1)
        sizes = [p.shape[0] for p in params[2::4]]
        grads[2::4] = torch.mm(hyper_bar.t(), c).split(sizes, 0)
        grads[3::4] = hyper_bar.sum(0).split(sizes, 0)
        grad_c = torch.mm(hyper_bar, torch.cat(params[2::4], 0))
        return (h_bar, grad_c, *grads)


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

        A layer maps ``(h, J) ← ((W h + b) ⊙ g + s, (J Wᵀ) ⊙ g)`` with ``g = σ(gate)``, then the
        activation ``(h, J) ← (act(h), J ⊙ act'(h))``: ``h`` and the ``D`` rows of ``J`` go
        through one matmul as a ``[B, 1 + D, width]`` stack; the first layer's ``J`` is ``Wᵀ ⊙ g``
        itself (no identity matmul); with one time for the batch and no condition the gates and
        shifts are computed once and broadcast. Training then needs only a first-order backward
        through these instead of a double backward through ``autograd.grad``. ``x`` of any
        event shape is treated as a vector (as in :meth:`forward`): ``J`` is ``[B, D, D]``.
        Declared (``jacobian``) for activations with a closed-form derivative.
        """
        if "jacobian" not in self.divergence_paths:
            raise ValueError(f"concatsquash: no forward Jacobian for activation {self.activation!r} (no closed-form "
                             f"derivative); it does not declare the 'jacobian' divergence path")
        flat = x if x.dim() == 2 else x.flatten(1)
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if cond is None and tt.dim() == 0 and self.cond.out_dim == 0:
            ctx = self.time(tt.reshape(1, 1))  # one row: gates and shifts broadcast over the batch
        else:
            ctx = self._context(t, flat, cond)
        if self.activation == "tanh":  # one autograd node with a hand-written backward (_TanhJacobian)
            params = [p for layer in self.layers for p in (layer.linear.weight, layer.linear.bias,
                                                             layer.hyper.weight, layer.hyper.bias)]
            h, jac = _TanhJacobian.apply(flat, ctx, *params)
            return (h if x.dim() == 2 else h.reshape(x.shape)), jac
        h, jac = flat, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            gate, shift = layer.hyper(ctx).split(layer.d_out, -1)
            g = torch.sigmoid(gate)
            weight = layer.linear.weight
            if jac is None:  # the first layer: J = Wᵀ ⊙ g, the same for every sample with one time
                pre = torch.addcmul(shift, layer.linear(h), g)
                jac = weight.t().unsqueeze(0) * g.unsqueeze(1)
            else:
                both = torch.matmul(torch.cat([h.unsqueeze(1), jac], 1), weight.t()) * g.unsqueeze(1)
                pre = both[:, 0] + torch.addcmul(shift, layer.linear.bias, g)
                jac = both[:, 1:]
            if i < last:
                h = self.act(pre)
                jac = jac * activation_derivative(self.activation, pre, h).unsqueeze(1)
            else:
                h = pre
        jac = jac.expand(flat.shape[0], *jac.shape[1:])  # D = 1 with no hidden layer keeps the broadcast row
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
