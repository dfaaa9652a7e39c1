"""Samplers: stateless functions ``sampler(flow, x, cond=None, **options) -> SampleResult``.

The ODE solver they use is not a sampler: it lives below them, in :mod:`flowkit.solvers`.
"""

from .base import ADAPTIVE, FLOW_PARTS, SampleResult, declare, declared_nfe
from . import flow_map, ode_samplers, sde, semilinear  # noqa: F401  (register the samplers)

__all__ = ["SampleResult", "FLOW_PARTS", "ADAPTIVE", "declare", "declared_nfe"]
