"""Time-conditioned vector fields ``f(t, x, cond=None)``, registered in ``DYNAMICS``.

Each network declares the fast divergence paths it offers in ``divergence_paths``
(:mod:`flowkit.fast_divergence`); the multiscale image CNF built from them is
:mod:`flowkit.dynamics.multiscale`.
"""

from .base import ConditionEmbedding, TimeEmbedding, broadcast_time
from .mlp import MLP, ConcatSquashLinear, ConcatSquashMLP
from .conv import ConcatConv2d, ConcatConvNet  # noqa: F401  (registers concat_conv)
from .unet import UNet  # noqa: F401  (registers unet)
from .fourier import FourierMLP

__all__ = ["MLP", "FourierMLP", "ConcatSquashMLP", "ConcatSquashLinear", "ConditionEmbedding", "TimeEmbedding",
           "broadcast_time"]
