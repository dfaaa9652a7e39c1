r"""Bring your own diffusion model: adapters from the formats people have to a flowkit Flow.

Each adapter turns a pretrained network, called the way its code base calls it, into the
probability-flow :class:`~flowkit.flow.Flow` of its Gaussian path, ready for
:func:`flowkit.flow_log_likelihood` (likelihood) and every sampler:

=====================================  ==========================================  ==============================
you have                               adapter                                     path (flowkit time, data at t0)
=====================================  ==========================================  ==============================
diffusers ``UNet2DModel`` / any         :func:`from_diffusers`, :func:`load_diffusers`  :class:`DDPMPath`: timestep
``ModelMixin`` + ``DDPMScheduler``      (ε-, v-, sample-prediction)                  ``n`` at ``(n+1)/N``, exact ``ᾱ_n``
k-diffusion / EDM ``D(x, σ)``           :func:`from_edm`                             VE, ``σ_t = σ_min (σ_max/σ_min)^t``
score_sde ``model(x, labels)``          :func:`from_score_sde`                       score_sde's VP / sub-VP / VE
a score ``s(x, t)``                     :func:`from_score`                           any :class:`~flowkit.paths.GaussianPath`
a network predicting ε, x₀, v, score    :func:`from_prediction`                      any, with a time → label map
=====================================  ==========================================  ==============================

``diffusers`` is optional (``pip install flowkit[diffusers]``); nothing here imports it until
:func:`load_diffusers` is called. :func:`load_model` loads any of them from a local directory
by adapter name (``flowkit nll --model DIR --adapter NAME``). For bits per dimension of quantised data see
:mod:`flowkit.dequantise`.
"""

from .base import PREDICTIONS, AdapterError, from_prediction, from_score, to_score
from .ddpm import DDPMPath, ddpm_betas
from .diffusers import from_diffusers, load_diffusers, scheduler_config
from .edm import from_edm
from .load import ADAPTERS, load_model
from .score_sde import from_score_sde

__all__ = ["PREDICTIONS", "AdapterError", "from_prediction", "from_score", "to_score", "DDPMPath", "ddpm_betas",
           "from_diffusers", "load_diffusers", "scheduler_config", "from_edm", "from_score_sde", "ADAPTERS",
           "load_model"]
