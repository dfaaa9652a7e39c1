"""FFJORD's multiscale image CNF as a stack of blocks on the full image.

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
block's own network (whose declared fast divergence paths :class:`ScaleField` carries, as a
:class:`~flowkit.fast_divergence.FieldWrapper`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fast_divergence import FieldWrapper

__all__ = ["ScaleView", "ScaleField", "squeeze", "unsqueeze", "split_channels", "restrict", "extend",
           "multiscale_views", "multiscale_fields", "default_n_scales"]


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


class ScaleField(FieldWrapper):
    """A field on one multiscale stage, embedded as a field on the full image.

    ``F(t, x) = extend(f(t, restrict(x)))``: the network ``f`` sees the stage's active
    tensor; the frozen coordinates get velocity 0. The Jacobian of ``F`` is that of ``f``
    on the active block and zero elsewhere, so ``tr ∂F/∂x = tr ∂f/∂y``. The network's
    ``jvp`` and ``bottleneck`` paths are carried (:class:`~flowkit.fast_divergence.FieldWrapper`):
    a tangent is restricted like the state, outputs are extended.

    Args:
        field: network on the stage's shape, ``field(t, y, cond=None)``.
        view: the stage (see :func:`multiscale_views`).
    """

    def __init__(self, field: nn.Module, view: ScaleView) -> None:
        super().__init__(field)
        self.view = view

    def _full(self, x: Tensor) -> Tensor:
        """``x`` as full images ``[B, C, H, W]`` (a flattened ``[B, C·H·W]`` is reshaped)."""
        return x.reshape(x.shape[0], *self.view.image_shape) if x.dim() == 2 else x

    def enter(self, t: Tensor, x: Tensor):
        shape = x.shape
        return t, restrict(self._full(x), self.view), lambda v: extend(v, self.view).reshape(shape)

    def tangent(self, v: Tensor, x: Tensor) -> Tensor:
        return restrict(self._full(v), self.view)


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
        >>> import math
        >>> from flowkit.dynamics.conv import ConcatConvNet
        >>> def factory(shape):
        ...     return ConcatConvNet(dim=math.prod(shape), shape=shape, hidden=[8])
        >>> [f.view.shape for f in multiscale_fields(factory, (1, 8, 8), blocks=1)]
        [(1, 8, 8), (4, 4, 4), (2, 4, 4)]
    """
    if blocks < 1:
        raise ValueError("blocks must be >= 1")
    return [ScaleField(factory(shape=view.shape), view)
            for view in multiscale_views(shape, n_scales) for _ in range(blocks)]
