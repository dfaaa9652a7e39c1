"""The registries every recipe section draws from.

==============  ========================  ==========================================
registry        recipe section            what a component is
==============  ========================  ==========================================
``DYNAMICS``    ``dynamics``              ``nn.Module`` field ``f(t, x, cond=None)``
``OBJECTIVES``  ``objective``             ``nn.Module`` with ``loss(x, cond)`` and ``flow()``
``SAMPLERS``    ``sampler``               function ``(flow, x, *, cond=None, **options)``
``DATASETS``    ``data``                  :class:`flowkit.data.Dataset`
``PATHS``       ``objective.path``,       :class:`flowkit.paths.GaussianPath`: a probability
                ``objective.sde``         path that is also a forward SDE
``COUPLINGS``   ``objective.coupling``    minibatch pairing of data and noise
``POSTERIORS``  ``objective.posterior``   :class:`flowkit.posteriors.Posterior`: a VAE's
                                          approximate posterior family
==============  ========================  ==========================================

A diffusion's forward SDE and a flow-matching path are one object, a
:class:`flowkit.paths.GaussianPath`, so score matching's ``sde`` and flow matching's
``path`` draw their names from the one ``PATHS`` registry.

What a component accepts is declared, not probed: its constructor's annotations give each
argument's type and range (:mod:`flowkit.constraints`, e.g. ``steps: PositiveInt``), an
objective's ``provides`` and a sampler's ``needs`` name the parts of the flow
(:data:`flowkit.samplers.base.FLOW_PARTS`), and ``argument_rules`` the combinations that
cannot work. :func:`flowkit.recipe.validate` checks a recipe against all of them, and
``flowkit.constraints.describe_arguments(REGISTRY.get(name))`` lists them.
"""

from __future__ import annotations

from .registry import Registry

__all__ = ["DYNAMICS", "OBJECTIVES", "SAMPLERS", "DATASETS", "PATHS", "COUPLINGS", "POSTERIORS"]

DYNAMICS = Registry("dynamics")
OBJECTIVES = Registry("objective")
SAMPLERS = Registry("sampler")
DATASETS = Registry("dataset")
PATHS = Registry("path")
COUPLINGS = Registry("coupling")
POSTERIORS = Registry("posterior")
