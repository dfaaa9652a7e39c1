"""A small time-conditioned U-Net for images (score matching, flow matching, DiffFlow).

The layout of DDPM's network (Ho et al. 2020, appendix B; after Ronneberger et al. 2015
and the Wide-ResNet blocks of Zagoruyko & Komodakis 2016), without attention: a 3×3 input
convolution; per resolution ``blocks`` residual blocks, then a stride-2 convolution; two
residual blocks in the middle; the mirror path with ``blocks + 1`` residual blocks per
resolution, each taking the matching skip connection, and nearest-neighbour upsampling to
the skip's exact size (so odd sizes like MNIST's 7×7 work). A residual block is

    GroupNorm → SiLU → conv3×3 → + Linear(SiLU(e)) → GroupNorm → SiLU → dropout → conv3×3,

plus a 1×1 convolution on the shortcut when the width changes, with ``e`` the embedding of
the time (sinusoidal features → 2-layer MLP) plus, optionally, of the condition
(:class:`~flowkit.dynamics.base.ConditionEmbedding`, whose null label ``-1`` serves
classifier-free guidance). Input and output have the data's shape.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import DYNAMICS
from ..constraints import NonEmpty, PositiveFloat, PositiveInt, Range, Rule
from .base import ConditionEmbedding, TimeEmbedding, broadcast_time, image_shape

__all__ = ["UNet", "ResBlock"]


class ResBlock(nn.Module):
    """Pre-activation residual block with an additive embedding (DDPM's ResnetBlock).

    Args:
        c_in, c_out: channels.
        emb_dim: width of the time/condition embedding.
        groups: GroupNorm groups (must divide ``c_in`` and ``c_out``).
        dropout: dropout before the second convolution.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


@DYNAMICS.register("unet")
class UNet(nn.Module):
    """Time-conditioned U-Net field ``f(t, x, cond=None)`` on images ``[B, C, H, W]``.

    Works on any size (8×8 digits, 28×28 MNIST, 32×32 CIFAR-10); ``t`` is a scalar or one
    time per sample. With the defaults (``base=32``, ``mults=[1, 2, 2]``, one block per
    level) it has about 1.0 M parameters on MNIST.

    Args:
        dim: flattened size ``C·H·W`` (set by flowkit).
        shape: image shape ``(C, H, W)`` (set by flowkit from the dataset).
        base: channels of the first level.
        mults: channel multiplier per resolution level (a 2× downsampling between levels).
        blocks: residual blocks per level on the way down (``blocks + 1`` on the way up).
        groups: GroupNorm groups; must divide every level's width.
        dropout: dropout inside residual blocks.
        time_scale: the sinusoidal features are those of ``time_scale · t`` with periods
            from 1 to 10⁴ (DDPM's 1,000 steps on ``t ∈ [0, 1]``).
        num_classes / cond_dim: optional class-label or vector condition (label ``-1`` or
            NaNs give the learnt null condition of classifier-free guidance).
        channels_last: NHWC weights and activations (faster on tensor-core GPUs).

    Example:
        >>> net = UNet(dim=64, shape=(1, 8, 8), base=16, mults=[1, 2], num_classes=10)
        >>> net(torch.rand(4), torch.randn(4, 1, 8, 8), torch.tensor([0, 3, -1, 9])).shape
        torch.Size([4, 1, 8, 8])
    """

    argument_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(("groups", "base", "mults"), lambda a: all(a["base"] * m % a["groups"] == 0 for m in a["mults"]),
             "groups={groups} must divide every level's width base × mults "
             "({base} × {mults})"),
    )
    #: no fast divergence path: the generic estimators of :mod:`flowkit.trace`
    divergence_paths: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dim: int, shape: Optional[Sequence[int]] = None, base: PositiveInt = 32,
                 mults: Annotated[Sequence[PositiveInt], NonEmpty()] = (1, 2, 2), blocks: PositiveInt = 1,
                 groups: PositiveInt = 8, dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
                 time_scale: PositiveFloat = 1000.0, num_classes: Optional[PositiveInt] = None,
                 cond_dim: Optional[PositiveInt] = None, channels_last: bool = False) -> None:
        super().__init__()
        self.shape = image_shape(shape, dim, "unet")
        if not mults or blocks < 1:
            raise ValueError("unet: mults needs at least one level and blocks must be >= 1")
        widths = [base * m for m in mults]
        bad = [w for w in widths if w % groups]
        if bad:
            raise ValueError(f"unet: groups={groups} must divide every level's width {widths}")
        self.dim, self.time_scale, self.channels_last = dim, time_scale, channels_last
        emb_dim = 4 * base
        # sin/cos(2π s f_k) with s = time_scale·t/(2π) gives angles time_scale·t·f_k, f_k ∈ [1e-4, 1]
        self.time = TimeEmbedding(base, max_period=10_000.0)
        self.time_mlp = nn.Sequential(nn.Linear(self.time.out_dim, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.cond = ConditionEmbedding(num_classes, cond_dim, emb_dim)

        channels = self.shape[0]
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [widths[0]]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResBlock(c, w, emb_dim, groups, dropout))
                c = w
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, groups, dropout),
                                  ResBlock(c, c, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w, emb_dim, groups, dropout))
                c = w
            if level > 0:
                self.up.append(nn.Conv2d(c, c, 3, padding=1))  # after nearest upsampling
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def embedding(self, t: Tensor | float, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """The per-sample embedding ``e = MLP(sin/cos features of t) + embed(cond)``, ``[B, 4·base]``."""
        tt = broadcast_time(t, x) * (self.time_scale / (2 * math.pi))
        emb = self.time_mlp(self.time(tt))
        c = self.cond(cond, x.shape[0], emb)
        return emb if c is None else emb + c

    def forward(self, t: Tensor, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = x.dim() == 2
        h = x.reshape(x.shape[0], *self.shape) if flat else x
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        emb = self.embedding(t, h, cond)
        h = self.conv_in(h)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], 1), emb)
            else:  # upsample to the next skip's exact size, then a 3×3 convolution
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.reshape(x.shape) if flat else out
