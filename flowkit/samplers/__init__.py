"""Samplers: stateless functions ``sampler(flow, x, cond=None, **options) -> SampleResult``."""

from .base import FLOW_PARTS, SampleResult, declare
from .ode import odeint, Solution
from . import ode_samplers, sde

__all__ = ["SampleResult", "FLOW_PARTS", "declare", "odeint", "Solution"]
