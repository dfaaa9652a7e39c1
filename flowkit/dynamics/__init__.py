"""Time-conditioned vector fields ``f(t, x, cond=None)``, registered in ``DYNAMICS``."""

from .base import ConditionEmbedding, TimeEmbedding, broadcast_time
from .mlp import MLP, ConcatSquashLinear, ConcatSquashMLP
from .conv import ConcatConv2d, ConcatConvNet, ScaleField, multiscale_fields  # noqa: F401  (concat_conv)
from .unet import UNet  # noqa: F401  (unet)
from .fourier import FourierMLP

__all__ = ["MLP", "FourierMLP", "ConcatSquashMLP", "ConcatSquashLinear", "ConditionEmbedding", "TimeEmbedding",
           "broadcast_time"]
