"""Convolutional CNF dynamics for images: FFJORD's ``ConcatConv`` network and its multiscale layout.

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

The **multiscale** architecture (FFJORD appendix B.1, after Dinh et al. 2017, "Density
estimation using Real NVP", §3.6) stacks CNF blocks over scales: blocks on the image, a
*squeeze* (space-to-depth 2×, a permutation with log-determinant 0), more blocks, then half
of the channels are *factored out* (frozen and sent to the base distribution) and the next
scale works on the rest. Because squeezing and factoring out are permutations and
projections of coordinates, the whole model is also a plain stack of CNF blocks on the full
``[C, H, W]`` state, in which each block's field moves only its own *active* coordinates
(a trailing channel slice of the image squeezed ``k`` times) and is zero on the frozen
ones. :class:`ScaleField` is that embedding and :func:`multiscale_fields` builds one per
stage, so an objective that stacks ``blocks`` (FFJORD) gets the multiscale model with no
change to its likelihood, sampling or checkpoint code: the frozen coordinates keep their
value through every later solve, and the divergence of the embedded field is that of the
block's own network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import DYNAMICS
from ..constraints import NonEmpty, Odd, PositiveInt
from .base import ConditionEmbedding, activation, activation_derivative

__all__ = ["ConcatConv2d", "ConcatConvNet", "ScaleView", "ScaleField", "squeeze", "unsqueeze",
           "split_channels", "restrict", "extend", "multiscale_views", "multiscale_fields",
           "default_n_scales"]

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


def _image_shape(shape: Optional[Sequence[int]], dim: int, name: str) -> tuple[int, int, int]:
    if shape is None or len(tuple(shape)) != 3:
        raise ValueError(f"{name} needs an image shape (C, H, W), got {shape!r}; flowkit passes "
                         "the dataset's shape, so use it with image data")
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) != dim:
        raise ValueError(f"{name}: dim {dim} does not match shape {shape} ({math.prod(shape)} values)")
    return shape  # type: ignore[return-value]


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
        bottleneck: expose :meth:`split` after the first layer so Hutchinson's probe is drawn
            there (FFJORD appendix E). Lowers the variance only when the first layer is
            narrower than the data, ``hidden[0] < C``; with FFJORD's 64 filters the bottleneck
            is wider than the image and the plain estimator is the better choice.
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
    """

    def __init__(self, dim: int, shape: Optional[Sequence[int]] = None,
                 hidden: Annotated[Sequence[PositiveInt], NonEmpty()] = (64, 64, 64),
                 kernel: Annotated[PositiveInt, Odd()] = 3, activation: Activation = "softplus",
                 bottleneck: bool = False, channels_last: bool = False, fused: bool = True,
                 num_classes: Optional[PositiveInt] = None, cond_dim: Optional[PositiveInt] = None,
                 cond_embed: PositiveInt = 16) -> None:
        super().__init__()
        self.shape = _image_shape(shape, dim, "concat_conv")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"concat_conv: kernel must be odd, got {kernel}")
        if not hidden:
            raise ValueError("concat_conv: hidden needs at least one width")
        self.dim = dim
        self.bottleneck = bottleneck
        self.channels_last = channels_last
        self.activation = activation
        channels = self.shape[0]
        widths = [channels, *hidden, channels]
        self.layers = nn.ModuleList(
            ConcatConv2d(a, b, kernel, fused=fused) for a, b in zip(widths[:-1], widths[1:]))
        self.act = _activation(activation)
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
                         cond: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
        """``f(t, x)`` and the Jacobian–vector product ``(∂f/∂x) v`` in one forward pass.

        Forward-mode differentiation written out: each layer maps the tangent by its
        convolution ``W_x * v`` (time and bias do not depend on ``x``) and the activation's
        derivative, ``v ← σ'(pre) ⊙ (W_x * v)``. Hutchinson's estimate is then
        ``εᵀ(∂f/∂x)ε = ε · jvp`` and training needs only a first-order backward, instead of
        the double backward through ``autograd.grad`` (reverse-over-reverse) that a
        vector–Jacobian product needs. Returns None for activations without a closed-form
        derivative (gelu).
        """
        if activation_derivative(self.activation, x[:1], x[:1]) is None:
            return None
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


def _activation(name: str) -> nn.Module:
    return activation(name)


# --------------------------------------------------------------------------- multiscale


def squeeze(x: Tensor, times: int = 1) -> Tensor:
    """Space-to-depth: ``[B, C, H, W] → [B, 4C, H/2, W/2]``, applied ``times`` times.

    Each 2×2 patch of channel ``c`` becomes channels ``4c … 4c+3`` (the order of FFJORD's
    and Real NVP's squeeze, ``torch.nn.functional.pixel_unshuffle``). A permutation of the
    coordinates: volume preserving, log-determinant 0.

    Example:
        >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> squeeze(x)[0, :, 0, 0]
        tensor([0., 1., 4., 5.])
        >>> torch.equal(unsqueeze(squeeze(x)), x)
        True
    """
    for _ in range(times):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"squeeze needs even height and width, got {tuple(x.shape[-2:])}")
        x = F.pixel_unshuffle(x, 2)
    return x


def unsqueeze(x: Tensor, times: int = 1) -> Tensor:
    """Depth-to-space, the inverse of :func:`squeeze`: ``[B, 4C, H, W] → [B, C, 2H, 2W]``."""
    for _ in range(times):
        x = F.pixel_shuffle(x, 2)
    return x


def split_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    """Real NVP / FFJORD factor-out: ``(factored, kept)`` = first and second half of the channels.

    The factored half goes to the base distribution; the kept half continues to the next
    scale. (Real NVP §3.6; FFJORD's ``ODENVP`` keeps ``x[:, C//2:]``.)
    """
    c = x.shape[1]
    return x[:, : c // 2], x[:, c // 2:]


@dataclass(frozen=True)
class ScaleView:
    """Where one stage of a multiscale model lives inside the full image.

    The stage's active tensor is ``squeeze(x, squeezes)[:, start:]``, of shape ``shape``;
    channels before ``start`` were factored out at earlier scales and stay frozen.

    Attributes:
        squeezes: how many times the full image is squeezed.
        start: first active channel of the squeezed image.
        shape: ``(C, H, W)`` of the active tensor.
        scale: index of the scale this stage belongs to.
    """

    squeezes: int
    start: int
    shape: tuple[int, int, int]
    scale: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the full image this stage lives in."""
        c, h, w = self.shape
        k = self.squeezes
        return ((self.start + c) // 4**k, h << k, w << k)


def restrict(x: Tensor, view: ScaleView) -> Tensor:
    """The active tensor of ``view`` from a full image ``x [B, C, H, W]``."""
    return squeeze(x, view.squeezes)[:, view.start:]


def extend(v: Tensor, view: ScaleView, frozen: Optional[Tensor] = None) -> Tensor:
    """Embed an active tensor ``v`` back into the full image layout.

    The frozen channels are ``frozen`` (a full image, whose active part is replaced) or
    zeros (for a velocity: frozen coordinates do not move).
    """
    if view.start == 0:
        return unsqueeze(v, view.squeezes)
    if frozen is None:
        head = v.new_zeros(v.shape[0], view.start, *v.shape[2:])
    else:
        head = squeeze(frozen, view.squeezes)[:, : view.start]
    return unsqueeze(torch.cat([head, v], 1), view.squeezes)


def default_n_scales(shape: Sequence[int]) -> int:
    """FFJORD's number of scales: one, plus one per 2× squeeze that leaves even sides of at least 4.

    MNIST (28×28) gets 3 (28 → 14 → 7), CIFAR-10 (32×32) 4, 8×8 digits 2.
    """
    _, h, w = shape
    n = 1
    while h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        h, w, n = h // 2, w // 2, n + 1
    return n


def multiscale_views(shape: Sequence[int], n_scales: Optional[int] = None) -> list[ScaleView]:
    """The stages of FFJORD's multiscale model, from data to base.

    Scale ``i < n − 1``: a stage on the current tensor, a squeeze, a stage on the squeezed
    tensor, then the first half of its channels is factored out. The last scale is one stage
    without a squeeze. MNIST ``(1, 28, 28)`` gives the stages ``(1,28,28) (4,14,14) (2,14,14)
    (8,7,7) (4,7,7)``.

    Args:
        shape: data shape ``(C, H, W)``.
        n_scales: number of scales; :func:`default_n_scales` if None.
    """
    if len(tuple(shape)) != 3:
        raise ValueError(f"a multiscale model needs image data of shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    n = default_n_scales(shape) if n_scales is None else int(n_scales)
    if n < 1:
        raise ValueError("n_scales must be >= 1")
    if h % 2 ** (n - 1) or w % 2 ** (n - 1):
        raise ValueError(f"{n} scales need {n - 1} squeezes, which {h}×{w} does not allow")
    views = []
    squeezes, start = 0, 0
    for i in range(n):
        total = c * 4 ** squeezes
        views.append(ScaleView(squeezes, start, (total - start, h >> squeezes, w >> squeezes), i))
        if i == n - 1:
            break
        squeezes, start = squeezes + 1, 4 * start
        total = c * 4 ** squeezes
        views.append(ScaleView(squeezes, start, (total - start, h >> squeezes, w >> squeezes), i))
        start += (total - start) // 2  # factor out the first half of the active channels
    return views


class ScaleField(nn.Module):
    """A field on one multiscale stage, embedded as a field on the full image.

    ``F(t, x) = extend(f(t, restrict(x)))``: the network ``f`` sees the stage's active
    tensor; the frozen coordinates get velocity 0. The Jacobian of ``F`` is that of ``f``
    on the active block and zero elsewhere, so ``tr ∂F/∂x = tr ∂f/∂y``.

    Args:
        field: network on the stage's shape, ``field(t, y, cond=None)``.
        view: the stage (see :func:`multiscale_views`).
    """

    def __init__(self, field: nn.Module, view: ScaleView) -> None:
        super().__init__()
        self.field = field
        self.view = view

    @property
    def bottleneck(self) -> bool:
        return bool(getattr(self.field, "bottleneck", False))

    def _full(self, x: Tensor) -> tuple[Tensor, bool]:
        if x.dim() == 2:  # flattened [B, C·H·W]
            return x.reshape(x.shape[0], *self.view.image_shape), True
        return x, False

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        img, flat = self._full(x)
        v = extend(self.field(t, restrict(img, self.view), cond), self.view)
        return v.reshape(x.shape) if flat else v

    def forward_with_jvp(self, t: Tensor, x: Tensor, v: Tensor, cond: Optional[Tensor] = None):
        """``(F(t, x), (∂F/∂x) v)`` from the inner network's ``forward_with_jvp``, or None."""
        inner = getattr(self.field, "forward_with_jvp", None)
        if inner is None:
            return None
        img, flat = self._full(x)
        out = inner(t, restrict(img, self.view), restrict(self._full(v)[0], self.view), cond)
        if out is None:
            return None
        f, jv = (extend(o, self.view) for o in out)
        return (f.reshape(x.shape), jv.reshape(x.shape)) if flat else (f, jv)

    def split(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None):
        """The inner network's bottleneck split, embedded (see :meth:`ConcatConvNet.split`)."""
        img, flat = self._full(x)
        h, g = self.field.split(t, restrict(img, self.view), cond)

        def g_full(h_: Tensor) -> Tensor:
            v = extend(g(h_), self.view)
            return v.reshape(x.shape) if flat else v

        return h, g_full


def multiscale_fields(factory: Callable[..., nn.Module], shape: Sequence[int], blocks: int = 2,
                      n_scales: Optional[int] = None) -> list[ScaleField]:
    """FFJORD's multiscale CNF as a list of stacked fields on the full image, data to base.

    ``blocks`` networks per stage of :func:`multiscale_views`, each built as
    ``factory(shape=stage_shape)`` and wrapped in :class:`ScaleField`. FFJORD's MNIST model
    is ``blocks=2`` with ``concat_conv`` ``hidden=[64, 64, 64]``: 10 networks, 0.80 M
    parameters. The base distribution stays ``N(0, I)`` on the full image: the factored-out
    coordinates are a permutation of the base's coordinates.

    Args:
        factory: builds a network for a given ``shape`` (flowkit's dynamics factory).
        shape: data shape ``(C, H, W)``.
        blocks: CNF blocks per stage.
        n_scales: number of scales (see :func:`default_n_scales`).

    Example:
        >>> def factory(shape):
        ...     return ConcatConvNet(dim=math.prod(shape), shape=shape, hidden=[8])
        >>> [f.view.shape for f in multiscale_fields(factory, (1, 8, 8), blocks=1)]
        [(1, 8, 8), (4, 4, 4), (2, 4, 4)]
    """
    if blocks < 1:
        raise ValueError("blocks must be >= 1")
    return [ScaleField(factory(shape=view.shape), view)
            for view in multiscale_views(shape, n_scales) for _ in range(blocks)]
