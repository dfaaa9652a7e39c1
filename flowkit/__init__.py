"""flowkit: continuous normalizing flows, diffusion models and flow matching as one thing —
a learned flow of probability mass described by an ODE or SDE.

Time convention: data at ``t0``, prior at ``t1``; every field is ``field(t, x, cond=None)``
(see :mod:`flowkit.flow`).

Example:
    >>> import flowkit
    >>> recipe = flowkit.load_recipe("recipes/ffjord_8gaussians.yaml", ["train.steps=100"])  # doctest: +SKIP
    >>> result = flowkit.train(recipe, "runs/demo")  # doctest: +SKIP
"""

from .components import COUPLINGS, DATASETS, DYNAMICS, OBJECTIVES, PATHS, SAMPLERS
from .registry import Registry, RegistryError, all_registries
from .flow import FieldError, Flow, NonFiniteFieldError, StandardNormal, guided
from .trace import divergence, sample_probe
from .likelihood import bits_per_dim, flow_log_likelihood, log_likelihood
from . import data, data_real, paths  # noqa: F401  (register datasets and Gaussian paths)
from . import couplings  # noqa: F401  (register couplings)
from .diffusion import flow_from_score, probability_flow_field, score_log_likelihood
from .gmm import GaussianMixture
from . import dynamics, objectives, samplers  # noqa: F401  (register components)
from .solvers import SolverSpec, odeint
from .recipe import RecipeError, apply_overrides, build, load_recipe, validate
from .trainer import TrainingDiverged, train
from .run import load_run
from .evaluate import Evaluation, evaluate_model, evaluate_nll, generate, sample_metrics

__version__ = "0.1.0"

__all__ = [
    "DYNAMICS", "OBJECTIVES", "SAMPLERS", "DATASETS", "PATHS", "COUPLINGS",
    "Registry", "RegistryError", "all_registries", "Flow", "StandardNormal", "guided",
    "FieldError", "NonFiniteFieldError",
    "divergence", "sample_probe", "log_likelihood", "flow_log_likelihood", "bits_per_dim", "odeint", "SolverSpec",
    "RecipeError", "load_recipe", "apply_overrides", "validate", "build", "train",
    "TrainingDiverged", "load_run", "evaluate_model", "Evaluation", "evaluate_nll", "generate", "sample_metrics",
    "flow_from_score", "probability_flow_field", "score_log_likelihood", "GaussianMixture",
]
