"""Convolutional CNF dynamics for images: FFJORD's ``ConcatConv`` network.

``concat_conv`` is the ODE network of FFJORD's image models (Grathwohl et al. 2019,
appendix B.1 and their MNIST/CIFAR-10 configuration): 3×3 convolutions with stride 1, 64
filters per hidden layer, softplus, and the time ``t`` concatenated to every layer's input
as one extra constant channel,

.. math:: \\mathrm{ConcatConv}(t, x) = W * [t \\mathbf{1}, x] + b
                                     = W_x * x + t\\,(W_t * \\mathbf{1}) + b .

The second form is what :class:`ConcatConv2d` computes: ``W_t * 1`` does not depend on
the batch, so the time channel costs one ``[C_out, k²] @ [k², H'W']`` product per call
instead of concatenating a channel to (and convolving) the whole batch. It is exact at the
borders too: the patches of the all-ones image under zero padding (its ``unfold``) are
computed once per image size and cached; they depend on the geometry only, never on the
weights, so the cache stays valid while the weights train.

FFJORD's multiscale layout of these networks is :mod:`flowkit.dynamics.multiscale`.

Fast divergence paths (:mod:`flowkit.fast_divergence`): :class:`ConcatConvNet` declares
``jvp`` (forward mode, for an activation with a closed-form derivative) and, with
``bottleneck=True``, ``bottleneck``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import DYNAMICS
from ..constraints import NonEmpty, Odd, PositiveInt
from .base import CLOSED_FORM_DERIVATIVES, ConditionEmbedding, activation_derivative, image_shape
from .base import activation as make_activation

__all__ = ["ConcatConv2d", "ConcatConvNet"]

Activation = Literal["tanh", "softplus", "relu", "elu", "silu", "swish", "gelu"]

_ONES_PATCHES: dict[tuple, Tensor] = {}


def _ones_patches(height: int, width: int, kernel: int, stride: int, padding: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
    """``unfold`` of the all-ones image: ``[k², H'·W']``, 1 where a kernel tap lands inside the
    image and 0 where it lands on zero padding. Cached per geometry (weight-independent)."""
    key = (height, width, kernel, stride, padding, dtype, device)
    patches = _ONES_PATCHES.get(key)
    if patches is None:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable by autograd
            ones = torch.ones(1, 1, height, width, dtype=dtype, device=device)
            patches = F.unfold(ones, kernel, padding=padding, stride=stride)[0].contiguous()
        if len(_ONES_PATCHES) > 256:
            _ONES_PATCHES.clear()
        _ONES_PATCHES[key] = patches
    return patches


def _time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as ``[1, 1, 1, 1]`` (a scalar) or ``[B, 1, 1, 1]`` (one time per sample)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1, 1, 1, 1)
    if t.numel() != x.shape[0]:
        raise ValueError(f"t has {t.numel()} entries for a batch of {x.shape[0]}")
    return t.reshape(-1, 1, 1, 1)


class ConcatConv2d(nn.Module):
    """2-D convolution of ``[t·1, x]`` with the time channel fused into a bias map.

    Parameters are those of ``nn.Conv2d(c_in + 1, c_out, kernel)`` with the time channel
    (channel 0, as in FFJORD) kept apart as ``time_weight``; they are initialised exactly
    like that ``nn.Conv2d``.

    Args:
        c_in, c_out: channels of ``x`` and of the output.
        kernel, stride: convolution geometry.
        padding: zero padding; ``kernel // 2`` ("same" at stride 1) if None.
        fused: compute the time channel as ``t · (W_t * 1)`` (True) or by concatenating it
            to the input (False, the reference; same values up to rounding).

    Example:
        >>> layer = ConcatConv2d(1, 8)
        >>> x = torch.randn(2, 1, 5, 5)
        >>> torch.allclose(layer(torch.tensor(0.3), x), layer.forward_concat(torch.tensor(0.3), x), atol=1e-6)
        True
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 padding: Optional[int] = None, fused: bool = True) -> None:
        super().__init__()
        self.c_in, self.c_out, self.kernel, self.stride = c_in, c_out, kernel, stride
        self.padding = kernel // 2 if padding is None else padding
        self.fused = fused
        reference = nn.Conv2d(c_in + 1, c_out, kernel)  # for its default initialisation only
        self.time_weight = nn.Parameter(reference.weight.detach()[:, :1].clone())
        self.weight = nn.Parameter(reference.weight.detach()[:, 1:].clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())

    def time_map(self, height: int, width: int) -> Tensor:
        """``W_t * 1`` under zero padding, shape ``[c_out, H', W']`` (differentiable in ``W_t``)."""
        w = self.time_weight
        patches = _ones_patches(height, width, self.kernel, self.stride, self.padding, w.dtype, w.device)
        h_out = (height + 2 * self.padding - self.kernel) // self.stride + 1
        w_out = (width + 2 * self.padding - self.kernel) // self.stride + 1
        return (w.reshape(self.c_out, -1) @ patches).reshape(self.c_out, h_out, w_out)

    def linear(self, x: Tensor) -> Tensor:
        """``W_x * x``: the part that depends on ``x`` (and all of the layer's JVP)."""
        return F.conv2d(x, self.weight, None, self.stride, self.padding)

    def shift(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``b + t (W_t * 1)`` for the layer input ``x``: ``[1 or B, c_out, H', W']``."""
        tt = _time_column(t, x).to(self.bias.dtype)
        return self.bias.reshape(-1, 1, 1) + tt * self.time_map(x.shape[-2], x.shape[-1])

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if not self.fused:
            return self.forward_concat(t, x)
        out = self.linear(x)
        return out + self.shift(t, x).to(out.dtype)

    def forward_concat(self, t: Tensor | float, x: Tensor) -> Tensor:
        """The reference: convolve ``[t·1, x]`` with the full ``(c_in + 1)``-channel kernel."""
        tt = _time_column(t, x).expand(x.shape[0], 1, *x.shape[-2:])
        weight = torch.cat([self.time_weight, self.weight], 1)
        return F.conv2d(torch.cat([tt, x], 1), weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.c_in}(+t), {self.c_out}, kernel={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, fused={self.fused}")


@DYNAMICS.register("concat_conv")
class ConcatConvNet(nn.Module):
    """FFJORD's convolutional ODE network: ``ConcatConv2d`` layers (time as an extra channel).

    ``x → [ConcatConv → act] × len(hidden) → ConcatConv → dx/dt``, all at the image's
    resolution (stride 1). FFJORD's MNIST and CIFAR-10 field is ``hidden = [64, 64, 64]``,
    3×3 kernels and softplus, about 77 k parameters for one channel; its multiscale MNIST
    model stacks ten of them (0.80 M, see :func:`multiscale_fields`).

    Args:
        dim: flattened size ``C·H·W`` (set by flowkit).
        shape: image shape ``(C, H, W)`` (set by flowkit from the dataset).
        hidden: channels of the hidden layers.
        kernel: odd kernel size; padding keeps the resolution.
        activation: nonlinearity between layers (FFJORD: softplus).
        bottleneck: declare the ``bottleneck`` path (:meth:`split` after the first layer) so
            Hutchinson's probe is drawn there (FFJORD appendix E). Lowers the variance only
            when the first layer is narrower than the data, ``hidden[0] < C``; with FFJORD's 64
            filters the bottleneck is wider than the image and the plain estimator is the
            better choice.
        channels_last: keep weights and activations in NHWC layout (faster convolutions on
            GPUs with tensor cores, especially in bf16).
        fused: time channel as a bias map (True) or by concatenation (False, the reference).
        num_classes / cond_dim: optional condition, added to every layer as a per-channel
            bias learnt from its embedding (label ``-1`` / NaNs: the null condition).
        cond_embed: width of the condition embedding.

    Example:
        >>> net = ConcatConvNet(dim=64, shape=(1, 8, 8), hidden=[16, 16])
        >>> net(torch.tensor(0.5), torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
        >>> sorted(net.divergence_paths)
        ['jvp']
    """

    #: fast divergence paths it can offer; an instance declares ``jvp`` for an activation with a
    #: closed-form derivative and ``bottleneck`` when built with ``bottleneck=True``
    divergence_paths: frozenset[str] = frozenset({"jvp", "bottleneck"})

    def __init__(self, dim: int, shape: Optional[Sequence[int]] = None,
                 hidden: Annotated[Sequence[PositiveInt], NonEmpty()] = (64, 64, 64),
                 kernel: Annotated[PositiveInt, Odd()] = 3, activation: Activation = "softplus",
                 bottleneck: bool = False, channels_last: bool = False, fused: bool = True,
                 num_classes: Optional[PositiveInt] = None, cond_dim: Optional[PositiveInt] = None,
                 cond_embed: PositiveInt = 16) -> None:
        super().__init__()
        self.shape = image_shape(shape, dim, "concat_conv")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"concat_conv: kernel must be odd, got {kernel}")
        if not hidden:
            raise ValueError("concat_conv: hidden needs at least one width")
        self.dim = dim
        self.bottleneck = bottleneck
        self.divergence_paths = frozenset({"jvp"} if activation in CLOSED_FORM_DERIVATIVES else set()) | (
            {"bottleneck"} if bottleneck else set())
        self.channels_last = channels_last
        self.activation = activation
        channels = self.shape[0]
        widths = [channels, *hidden, channels]
        self.layers = nn.ModuleList(
            ConcatConv2d(a, b, kernel, fused=fused) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)
        self.cond = ConditionEmbedding(num_classes, cond_dim, cond_embed)
        self.cond_bias = nn.Linear(self.cond.out_dim, sum(widths[1:])) if self.cond.out_dim else None
        self._widths = widths[1:]
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # flattened [B, C·H·W]
            x = x.reshape(x.shape[0], *self.shape)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _cond_biases(self, cond: Optional[Tensor], x: Tensor) -> list[Optional[Tensor]]:
        emb = self.cond(cond, x.shape[0], x)
        if emb is None:
            return [None] * len(self.layers)
        return [b[:, :, None, None] for b in self.cond_bias(emb).split(self._widths, -1)]

    def _layer(self, i: int, t: Tensor, h: Tensor, biases: list[Optional[Tensor]]) -> Tensor:
        h = self.layers[i](t, h)
        if biases[i] is not None:
            h = h + biases[i]
        return self.act(h) if i < len(self.layers) - 1 else h

    def _tail(self, t: Tensor, h: Tensor, biases: list[Optional[Tensor]], start: int) -> Tensor:
        for i in range(start, len(self.layers)):
            h = self._layer(i, t, h, biases)
        return h

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = x.dim() == 2
        h = self._prepare(x)
        out = self._tail(t, h, self._cond_biases(cond, h), 0)
        return out.reshape(x.shape) if flat else out

    def forward_with_jvp(self, t: Tensor, x: Tensor, v: Tensor,
                         cond: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``f(t, x)`` and the Jacobian–vector product ``(∂f/∂x) v`` in one forward pass.

        Forward-mode differentiation written out: each layer maps the tangent by its
        convolution ``W_x * v`` (time and bias do not depend on ``x``) and the activation's
        derivative, ``v ← σ'(pre) ⊙ (W_x * v)``. Hutchinson's estimate is then
        ``εᵀ(∂f/∂x)ε = ε · jvp`` and training needs only a first-order backward, instead of
        the double backward through ``autograd.grad`` (reverse-over-reverse) that a
        vector–Jacobian product needs. Declared (``jvp``) for activations with a closed-form
        derivative; gelu has none.
        """
        if "jvp" not in self.divergence_paths:
            raise ValueError(f"concat_conv: no forward-mode JVP for activation {self.activation!r} (no closed-form "
                             f"derivative); it does not declare the 'jvp' divergence path")
        flat = x.dim() == 2
        h, dh = self._prepare(x), self._prepare(v.to(x.dtype))
        biases = self._cond_biases(cond, h)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            pre = layer.linear(h)
            pre = pre + layer.shift(t, h).to(pre.dtype)
            dh = layer.linear(dh)
            if biases[i] is not None:
                pre = pre + biases[i]
            if i < last:
                h = self.act(pre)
                dh = dh * activation_derivative(self.activation, pre, h)
            else:
                h = pre
        return (h.reshape(x.shape), dh.reshape(x.shape)) if flat else (h, dh)

    def split(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None):
        """``f = g(h(x))`` with ``h`` the first layer's activations ``[B, hidden[0], H, W]``
        (for the bottleneck trace estimator, :func:`flowkit.trace.divergence`)."""
        flat = x.dim() == 2
        x_img = self._prepare(x)
        biases = self._cond_biases(cond, x_img)
        h = self._layer(0, t, x_img, biases)

        def g(h_: Tensor) -> Tensor:
            out = self._tail(t, h_, biases, 1)
            return out.reshape(x.shape) if flat else out

        return h, g
