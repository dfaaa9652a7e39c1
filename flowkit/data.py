"""Datasets: the :class:`Dataset` interface and the built-in 2-D generators.

A dataset hands the trainer fresh batches ``(x, labels)`` with ``x`` of shape
``[n, *shape]`` (float32, CPU) and ``labels`` of shape ``[n]`` (long) or ``None``,
plus a deterministic held-out set for evaluation. Where the true density is known
in closed form, :meth:`Dataset.log_prob` returns it, so the negative log-likelihood
of a model can be compared with the true entropy ``H(p) = -E_p[log p(x)]``.

The synthetic sets are defined by a single sampler ``sample(n, generator)``
(:class:`SyntheticDataset`); every random draw comes from the ``torch.Generator``
passed in, so a run is reproduced exactly by its seed. Training batches and the
test set are both drawn from it; the test set uses its own generator seeded with
``seed``.

============================  ===================================================
name                          source
============================  ===================================================
``8gaussians`` ``checkerboard``  FFJORD toy data (Grathwohl et al. 2019)
``pinwheel`` ``2spirals``
``moons`` ``circles``
``swissroll`` ``rings``
``olympic_rings``             DiffFlow 2-D sets (Zhang & Chen 2021), procedural
``concentric_rings``
``sierpinski`` ``fractal_tree``
``gmm``                       full-covariance Gaussian mixture in ``dim`` dims
``standardized``              any of the above, each coordinate at zero mean, unit std
============================  ===================================================

The FFJORD sets follow the definitions of that paper's toy-data code so that
published numbers compare, with one deliberate change: where the original lays out
deterministic, evenly spaced angles per batch (``moons``, ``circles``, ``rings``) or
splits a batch into exactly equal halves (``2spirals``), we draw angles and
component labels i.i.d., which samples the same limiting distribution.

Settings are declared in each constructor's annotations (:mod:`flowkit.constraints`), so
``flowkit check`` refuses an out-of-range value before anything is built, and
:func:`check_declared` refuses the same values when a dataset is built from Python.
Unusable data or settings raise :class:`DataError`: one line naming the file or the recipe
key and what to do; ``flowkit`` turns it into exit status 2 without a traceback.

References:
    Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud. "FFJORD: Free-form Continuous
    Dynamics for Scalable Reversible Generative Models." ICLR 2019.

    Zhang & Chen. "Diffusion Normalizing Flow." NeurIPS 2021.

    Johnson, Duvenaud, Wiltschko, Datta & Adams. "Composing graphical models with
    neural networks for structured representations and fast inference." NeurIPS 2016
    (the pinwheel set).

Example:
    >>> data = get_dataset("8gaussians")
    >>> x, y = data.train_batch(4, torch.Generator().manual_seed(0))
    >>> x.shape, y.shape, data.log_prob(x).shape
    (torch.Size([4, 2]), torch.Size([4]), torch.Size([4]))
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import typing
from typing import Annotated, Any, Callable, Literal, Optional, TypeVar

import torch
from torch import Tensor

from .components import DATASETS
from .constraints import (AtLeast, FiniteFloat, NonNegativeFloat, PositiveFloat, PositiveInt, Range, Seed,
                          constraints_of)
from .gmm import GaussianMixture
from .recipe import RecipeError

__all__ = [
    "DataError",
    "check_declared",
    "Dataset",
    "SyntheticDataset",
    "Standardized",
    "get_dataset",
    "EightGaussians",
    "Checkerboard",
    "Pinwheel",
    "TwoSpirals",
    "Moons",
    "Circles",
    "SwissRoll",
    "Rings",
    "RadialRings",
    "OlympicRings",
    "ConcentricRings",
    "Sierpinski",
    "FractalTree",
    "GaussianMixtureData",
]

_F32 = torch.float32
Batch = tuple[Tensor, Optional[Tensor]]
_Init = TypeVar("_Init", bound=Callable[..., None])


# --------------------------------------------------------------------------- errors


class DataError(RecipeError):
    """The data or a data setting of a recipe cannot be used as it is.

    The message is one line: where (the file and row, or the recipe key), what is wrong
    and what to do, e.g. ``t.csv: data.column: no column 'x'; available columns: a, b``.
    Being a :class:`~flowkit.recipe.RecipeError`, it makes ``flowkit`` exit with status 2
    and no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__([message], "data")
        self.args = (message,)  # one line, not the recipe report's "1 problem in ..." heading


def _declared_problem(value: Any, hint: Any) -> Optional[str]:
    """What is wrong with ``value`` under an annotation (numbers and literals), or None."""
    base, marks = constraints_of(hint)
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [a for a in typing.get_args(base) if a is not type(None)]
        problems = [_declared_problem(value, a) for a in options]
        return None if None in problems else problems[0]
    if origin is Literal:
        choices = typing.get_args(base)
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return "must be an integer"
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return "must be a finite number"
    else:
        return None
    for mark in marks:
        if not mark.check(value):
            return f"must be {mark.describe()}"
    return None


def check_declared(init: _Init) -> _Init:
    """Check a constructor's arguments against the constraints its annotations declare.

    :func:`flowkit.recipe.validate` reads the same annotations before anything is built;
    this decorator applies them when a dataset is built from Python, raising
    :class:`DataError` (``data.depth: must be >= 1, got 0 (Sierpinski)``).
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        hints = typing.get_type_hints(init, include_extras=True)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            problem = _declared_problem(value, hints[name]) if name in hints else None
            if problem:
                raise DataError(f"data.{name}: {problem}, got {value!r} ({type(self).__name__})")
        init(self, *args, **kwargs)

    return checked  # type: ignore[return-value]


# --------------------------------------------------------------------------- interface


class Dataset:
    """Interface every dataset implements.

    Attributes:
        shape: event shape, e.g. ``(2,)``.
        num_classes: number of labels available as conditions (e.g. the mixture
            component), or ``None`` when the dataset has no labels.
        log_scale: the data were divided by ``exp(log_scale)`` after quantisation
            (used for bits/dim); 0 for continuous data.
        discrete: ``True`` for quantised data (images); bits/dim are reported then.
    """

    shape: tuple[int, ...]
    num_classes: int | None = None
    log_scale: float = 0.0
    discrete: bool = False

    def train_batch(self, n: int, generator: torch.Generator) -> Batch:
        """Fresh training batch ``(x [n, *shape] float32, labels [n] long or None)``."""
        raise NotImplementedError

    def test_set(self, n: int, seed: int = 1234) -> Batch:
        """Deterministic held-out set of ``n`` samples, drawn with a generator seeded ``seed``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor | None:
        """True log density ``log p(x)`` per sample (``[n]``), or ``None`` when unknown."""
        return None

    def model_log_det(self, y: Tensor) -> Tensor | None:
        """``log |det ∂y/∂x|`` per sample of the map from (dequantised, rescaled) data ``x`` to
        the model's space ``y`` (e.g. a logit transform), or ``None`` for the identity.
        The data log-density is ``log p_model(y) + model_log_det(y)``."""
        return None


class SyntheticDataset(Dataset):
    """A dataset defined by a sampler; subclasses implement :meth:`sample`.

    :meth:`train_batch` draws from the caller's generator and :meth:`test_set` from a
    dedicated ``torch.Generator().manual_seed(seed)``, so the held-out set depends on
    ``seed`` alone (not on the global RNG or on how much training has happened).
    """

    shape: tuple[int, ...] = (2,)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """Draw ``n`` i.i.d. samples using only ``generator`` for randomness."""
        raise NotImplementedError

    def train_batch(self, n: int, generator: torch.Generator) -> Batch:
        return self.sample(_check_n(n), generator)

    def test_set(self, n: int, seed: int = 1234) -> Batch:
        return self.sample(_check_n(n), torch.Generator().manual_seed(int(seed)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, num_classes={self.num_classes})"


@DATASETS.register("standardized")
class Standardized(Dataset):
    r"""Another dataset with each coordinate moved to zero mean and unit standard deviation.

    ``y = (x − μ) / s`` with ``μ``, ``s`` the per-coordinate mean and standard deviation of
    ``reference`` held-out samples of the inner dataset (drawn once, seeded, so a recipe
    always gets the same constants). Densities follow the change of variables:
    ``log p_y(y) = log p_x(μ + s ⊙ y) + Σ_d log s_d``; :meth:`model_log_det` is
    ``−Σ_d log s_d``, so ``flowkit nll`` still reports the NLL in the inner data's units.
    This is how the DiffFlow code feeds its 2-D sets to a model with an ``N(0, I)`` prior.

    Args:
        data: the inner dataset, a ``{name: ..., **kwargs}`` block (continuous data only).
        reference: number of samples that fix ``μ`` and ``s``.
        seed: seed of those samples.

    Example:
        >>> data = DATASETS.build("standardized", data=get_dataset("olympic_rings"))
        >>> y, _ = data.test_set(20000)
        >>> [round(v, 1) for v in y.std(0).tolist()]
        [1.0, 1.0]
    """

    nested = {"data": DATASETS}

    @check_declared
    def __init__(self, data: Dataset, reference: Annotated[int, AtLeast(2)] = 100_000, seed: Seed = 0) -> None:
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be a flowkit dataset, got {type(data).__name__}")
        if data.discrete:
            raise DataError("data.data: standardized takes continuous data; image sets are dequantised and "
                            "rescaled by their own loaders (use the image set without standardized)")
        self.data = data
        x, _ = data.test_set(int(reference), seed=seed)
        flat = x.double().flatten(1)
        self.mean, self.std = flat.mean(0), flat.std(0)
        if not bool(torch.isfinite(flat).all()):
            raise DataError(f"data.data: {type(data).__name__} gave non-finite values; check its settings")
        if not bool((self.std > 0).all()):
            j = int((self.std > 0).logical_not().nonzero()[0])
            raise DataError(f"data.data: coordinate {j} of {type(data).__name__} is constant (zero std), "
                            "so standardized cannot rescale it; check the inner set's settings")
        self.shape, self.num_classes = data.shape, data.num_classes
        self.log_std_sum = float(self.std.log().sum())

    def standardize(self, x: Tensor) -> Tensor:
        """``(x − μ) / s``, in ``x``'s dtype."""
        flat = x.flatten(1)
        return ((flat - self.mean.to(flat)) / self.std.to(flat)).reshape(x.shape)

    def original(self, y: Tensor) -> Tensor:
        """``μ + s ⊙ y``: back to the inner data's units."""
        flat = y.flatten(1)
        return (flat * self.std.to(flat) + self.mean.to(flat)).reshape(y.shape)

    def train_batch(self, n: int, generator: torch.Generator) -> Batch:
        x, labels = self.data.train_batch(n, generator)
        return self.standardize(x), labels

    def test_set(self, n: int, seed: int = 1234) -> Batch:
        x, labels = self.data.test_set(n, seed)
        return self.standardize(x), labels

    def log_prob(self, y: Tensor) -> Tensor | None:
        inner = self.data.log_prob(self.original(y))
        return None if inner is None else inner + self.log_std_sum

    def model_log_det(self, y: Tensor) -> Tensor:
        return torch.full(y.shape[:1], -self.log_std_sum, dtype=y.dtype, device=y.device)

    def __getattr__(self, name: str):
        # Support queries of the inner set (e.g. distance_to_support) measured in its units.
        if name == "distance_to_support" and hasattr(self.__dict__.get("data"), name):
            return lambda y: self.data.distance_to_support(self.original(y))
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"Standardized({self.data!r})"


def get_dataset(name: str, **kwargs: object) -> Dataset:
    """Build the registered dataset ``name`` with constructor options ``kwargs``.

    Raises:
        flowkit.registry.RegistryError: for an unknown name (the message lists the choices).
    """
    return DATASETS.build(name, **kwargs)


# --------------------------------------------------------------------------- helpers


def _check_n(n: int) -> int:
    integral = isinstance(n, numbers.Integral) or (isinstance(n, float) and n.is_integer())
    if isinstance(n, bool) or not integral or n < 1:
        raise ValueError(f"number of samples must be a positive integer, got {n!r}")
    return int(n)


def _rand(g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=g, dtype=_F32)


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=g, dtype=_F32)


def _randint(g: torch.Generator, high: int, n: int) -> Tensor:
    return torch.randint(0, high, (n,), generator=g)


def _polar(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)


# --------------------------------------------------------------------------- FFJORD sets


@DATASETS.register("8gaussians")
class EightGaussians(SyntheticDataset):
    """Eight isotropic Gaussians on a circle (FFJORD); labels = component.

    Centres ``c_k = 4 (cos kπ/4, sin kπ/4)``, ``k = 0..7``; a sample is
    ``(c_k + 0.5 ε) / 1.414`` with ``k`` uniform and ``ε ~ N(0, I)``. The density is

    .. math::
        p(x) = \\frac18 \\sum_k \\mathcal N\\big(x;\\ c_k/1.414,\\ (0.5/1.414)^2 I\\big),

    whose entropy is ≈ 2.836 nats (the modes barely overlap, so it is close to
    ``log 8 + log(2πe σ²)`` with ``σ = 0.5/1.414``).
    """

    num_classes = 8
    scale = 4.0
    std = 0.5
    divisor = 1.414  # FFJORD's rounding of √2, kept so published numbers compare

    def __init__(self) -> None:
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centres = self.scale * torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        self.means = (centres / self.divisor).to(_F32)  # [8, 2] in data coordinates
        self.sigma = self.std / self.divisor

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = _randint(generator, 8, n)
        x = self.means[labels] + self.sigma * _randn(generator, n, 2)
        return x, labels

    def log_prob(self, x: Tensor) -> Tensor:
        means = self.means.to(x)
        sq = (x.unsqueeze(-2) - means).pow(2).sum(-1)  # [n, 8]
        log_norm = -math.log(2 * math.pi * self.sigma**2)  # D = 2
        return torch.logsumexp(-0.5 * sq / self.sigma**2, dim=-1) + log_norm - math.log(8)


@DATASETS.register("checkerboard")
class Checkerboard(SyntheticDataset):
    """Uniform density on the 8 dark squares of a 4×4 checkerboard on [-4, 4]² (FFJORD).

    ``x₁ = 4u₁ - 2``, ``x₂ = u₂ - 2b + (⌊x₁⌋ mod 2)`` with ``u ~ U(0, 1)``,
    ``b ~ U{0, 1}``, then both scaled by 2. In the unscaled coordinates the support is
    the unit cells ``[i, i+1) × [j, j+1)`` of ``[-2, 2)²`` with ``i + j`` even, so
    ``p = 1/32`` on 8 squares of side 2 and the entropy is ``log 32 ≈ 3.466``.
    """

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        x1 = _rand(generator, n) * 4 - 2
        x2 = _rand(generator, n) - _randint(generator, 2, n).to(_F32) * 2
        x2 = x2 + torch.remainder(torch.floor(x1), 2)
        return torch.stack([x1, x2], dim=-1) * 2, None

    def log_prob(self, x: Tensor) -> Tensor:
        cell = torch.floor(x / 2)
        inside = ((x >= -4) & (x < 4)).all(-1) & (torch.remainder(cell.sum(-1), 2) == 0)
        out = torch.full(x.shape[:-1], -math.log(32.0), dtype=x.dtype, device=x.device)
        return out.masked_fill(~inside, -math.inf)


@DATASETS.register("pinwheel")
class Pinwheel(SyntheticDataset):
    """Five curved Gaussian arms (Johnson et al. 2016, as in FFJORD); labels = arm.

    Features ``f = (1 + 0.3 ε₁, 0.1 ε₂)`` are turned by the angle
    ``a = 2π k/5 + 0.25 exp(f₁)`` for arm ``k`` and scaled by 2. As in FFJORD the
    features multiply the rotation matrix from the left (``f R(a)``, i.e. a clockwise
    turn by ``a``); the mirror image would have the same likelihoods.
    """

    num_classes = 5
    radial_std = 0.3
    tangential_std = 0.1
    rate = 0.25

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        feats = _randn(generator, n, 2) * torch.tensor([self.radial_std, self.tangential_std])
        feats[:, 0] += 1.0
        labels = _randint(generator, self.num_classes, n)
        angle = 2 * math.pi * labels.to(_F32) / self.num_classes + self.rate * torch.exp(feats[:, 0])
        cos, sin = torch.cos(angle), torch.sin(angle)
        x = torch.stack([feats[:, 0] * cos + feats[:, 1] * sin,
                         -feats[:, 0] * sin + feats[:, 1] * cos], dim=-1)
        return 2 * x, labels


@DATASETS.register("2spirals")
class TwoSpirals(SyntheticDataset):
    """Two interleaved spirals (FFJORD); labels = spiral.

    ``s = √u · 3π`` (540°), ``d = (-s cos s + v/2, s sin s + w/2)`` with ``u, v, w ~ U(0, 1)``;
    spiral 0 is ``d/3``, spiral 1 is ``-d/3``; plus ``0.1 N(0, I)``.
    """

    num_classes = 2

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        s = torch.sqrt(_rand(generator, n)) * (540 * 2 * math.pi / 360)
        d = torch.stack([-torch.cos(s) * s + _rand(generator, n) * 0.5,
                         torch.sin(s) * s + _rand(generator, n) * 0.5], dim=-1)
        labels = _randint(generator, 2, n)
        sign = 1 - 2 * labels.to(_F32)
        return sign[:, None] * d / 3 + 0.1 * _randn(generator, n, 2), labels


@DATASETS.register("moons")
class Moons(SyntheticDataset):
    """Two interleaving half circles (FFJORD via scikit-learn's ``make_moons``); labels = moon.

    With ``θ ~ U(0, π)``: moon 0 is ``(cos θ, sin θ)``, moon 1 is
    ``(1 - cos θ, 1 - sin θ - 1/2)``; noise ``0.1 N(0, I)``; then ``2x + (-1, -0.2)``.
    """

    num_classes = 2

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        theta = _rand(generator, n) * math.pi
        labels = _randint(generator, 2, n)
        inner = labels.bool()
        cx, cy = torch.cos(theta), torch.sin(theta)
        x = torch.stack([torch.where(inner, 1 - cx, cx), torch.where(inner, 0.5 - cy, cy)], dim=-1)
        x = x + 0.1 * _randn(generator, n, 2)
        return 2 * x + torch.tensor([-1.0, -0.2]), labels


@DATASETS.register("circles")
class Circles(SyntheticDataset):
    """Two concentric noisy circles (FFJORD via ``make_circles``); labels = circle.

    Circle 0 has radius 1 and circle 1 radius 0.5, angle ``θ ~ U(0, 2π)``, noise
    ``0.08 N(0, I)``, then scaled by 3.
    """

    num_classes = 2

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = _randint(generator, 2, n)
        radius = 1 - 0.5 * labels.to(_F32)
        x = _polar(radius, _rand(generator, n) * (2 * math.pi)) + 0.08 * _randn(generator, n, 2)
        return 3 * x, labels


@DATASETS.register("swissroll")
class SwissRoll(SyntheticDataset):
    """2-D Swiss roll (FFJORD via ``make_swiss_roll``, its x–z plane).

    ``t = 1.5π (1 + 2u)``, ``x = (t cos t, t sin t) + N(0, I)``, then divided by 5.
    """

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        t = 1.5 * math.pi * (1 + 2 * _rand(generator, n))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=-1) + _randn(generator, n, 2)
        return x / 5, None


@DATASETS.register("rings")
class Rings(SyntheticDataset):
    """Four concentric noisy rings (FFJORD); labels = ring, 0 the outermost.

    Radii ``3 · (1, 0.75, 0.5, 0.25)`` (FFJORD's values), ring chosen uniformly,
    ``θ ~ U(0, 2π)``, noise ``0.08 N(0, I)`` added after scaling.
    """

    num_classes = 4
    radii = (1.0, 0.75, 0.5, 0.25)
    scale = 3.0

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = _randint(generator, 4, n)
        radius = self.scale * torch.tensor(self.radii, dtype=_F32)[labels]
        x = _polar(radius, _rand(generator, n) * (2 * math.pi)) + 0.08 * _randn(generator, n, 2)
        return x, labels


# --------------------------------------------------------------------------- DiffFlow sets


class RadialRings(SyntheticDataset):
    """Rings of radius ``r_k`` around centres ``c_k`` with a Gaussian radial profile.

    A sample picks ring ``k`` uniformly, ``θ ~ U(0, 2π)`` and ``r ~ N(r_k, radius_std²)``,
    and returns ``c_k + r (cos θ, sin θ)`` — the DiffFlow construction of "a 1-D
    Gaussian in radius rotated into rings". Labels = ring index.

    Args:
        centres: ``[K, 2]`` ring centres.
        radii: ``[K]`` ring radii.
        radius_std: standard deviation of the radius.
    """

    @check_declared
    def __init__(self, centres: Tensor, radii: Tensor, radius_std: NonNegativeFloat) -> None:
        self.radius_std = float(radius_std)
        self.centres = centres.to(_F32)
        self.radii = radii.to(_F32)
        self.num_classes = len(self.radii)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = _randint(generator, self.num_classes, n)
        theta = _rand(generator, n) * (2 * math.pi)
        radius = self.radii[labels] + self.radius_std * _randn(generator, n)
        return self.centres[labels] + _polar(radius, theta), labels

    def distance_to_support(self, x: Tensor) -> Tensor:
        """Distance of each point to the nearest ring, ``min_k | ‖x - c_k‖ - r_k |`` (``[n]``)."""
        dist = torch.linalg.vector_norm(x.unsqueeze(-2) - self.centres.to(x), dim=-1)
        return (dist - self.radii.to(x)).abs().min(dim=-1).values


@DATASETS.register("olympic_rings")
class OlympicRings(RadialRings):
    """Five thin rings in the Olympic layout (DiffFlow); labels = ring.

    ``layout="flowkit"``: centres ``(-2.2, 0.5), (0, 0.5), (2.2, 0.5)`` on top and
    ``(-1.1, -0.5), (1.1, -0.5)`` below. ``layout="official"``: the DiffFlow code's
    centres ``(±1.75, 0.75), (0, 0.75), (±1.05, −0.75)`` (its ``(±3.5, 1.5)``-grid halved),
    whose rings overlap more; that code then draws the radius with std ``0.01·√0.2`` and
    standardises each axis (wrap in ``standardized`` for that). Each ring has radius
    ``radius`` and radial std ``radius_std``.

    Args:
        radius: ring radius.
        radius_std: standard deviation of the radius (the rings are very sharp by default).
        layout: ``flowkit`` or ``official`` (above).
    """

    centre_list = ((-2.2, 0.5), (0.0, 0.5), (2.2, 0.5), (-1.1, -0.5), (1.1, -0.5))
    official_centre_list = ((-1.75, 0.75), (0.0, 0.75), (1.75, 0.75), (-1.05, -0.75), (1.05, -0.75))

    @check_declared
    def __init__(self, radius: PositiveFloat = 1.0, radius_std: NonNegativeFloat = 0.001,
                 layout: Literal["flowkit", "official"] = "flowkit") -> None:
        centres = self.centre_list if layout == "flowkit" else self.official_centre_list
        super().__init__(torch.tensor(centres), torch.full((5,), radius), radius_std)


@DATASETS.register("concentric_rings")
class ConcentricRings(RadialRings):
    """Three thin concentric rings of radii 1, 2, 3 (DiffFlow); labels = ring.

    Args:
        radius_std: standard deviation of the radius.
    """

    radius_list = (1.0, 2.0, 3.0)

    @check_declared
    def __init__(self, radius_std: NonNegativeFloat = 0.001) -> None:
        super().__init__(torch.zeros(3, 2), torch.tensor(self.radius_list), radius_std)


@DATASETS.register("sierpinski")
class Sierpinski(SyntheticDataset):
    """Uniform samples from the level-``depth`` Sierpiński carpet on [-2, 2]² (DiffFlow).

    The unit square is cut into a 3×3 grid and the centre cell removed, recursively.
    A sample draws ``depth`` digits uniformly among the 8 kept cells,
    ``u = Σ_k c_k 3^{-k} + U(0, 1)² 3^{-depth}``, and returns ``4u - 2``. Every
    level-``depth`` cell has the same area, so this is uniform on the carpet; the
    density is ``(8/9)^{-depth} / 16`` on its support.

    Args:
        depth: number of recursion levels (≥ 1).
    """

    @check_declared
    def __init__(self, depth: PositiveInt = 4) -> None:
        self.depth = int(depth)
        cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
        self.cells = torch.tensor(cells, dtype=torch.float64)  # [8, 2]

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        digits = torch.randint(0, 8, (n, self.depth), generator=generator)
        weights = 3.0 ** -torch.arange(1, self.depth + 1, dtype=torch.float64)  # [depth]
        u = (self.cells[digits] * weights[:, None]).sum(1)  # [n, 2]
        u = u + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 3.0 ** -self.depth
        return (4 * u - 2).to(_F32), None

    def log_prob(self, x: Tensor) -> Tensor:
        u = (x + 2) / 4
        inside = ((u >= 0) & (u < 1)).all(-1)
        for _ in range(self.depth):
            u = u * 3
            digit = torch.floor(u)
            inside &= ~((digit == 1).all(-1))
            u = u - digit
        value = -self.depth * math.log(8 / 9) - math.log(16.0)
        out = torch.full(x.shape[:-1], value, dtype=x.dtype, device=x.device)
        return out.masked_fill(~inside, -math.inf)


@DATASETS.register("fractal_tree")
class FractalTree(SyntheticDataset):
    """Points along the branches of a binary fractal tree (DiffFlow).

    The trunk starts at ``(0, -2)`` pointing up; each branch ends in two children
    turned by ``±angle`` degrees and ``ratio`` times as long, for ``depth`` levels
    (trunk included, ``2^depth - 1`` branches). The trunk length is chosen so that the
    tree spans ``y ∈ [-2, 2]``. A sample picks a branch with probability proportional
    to its length, a uniform point along it, and adds ``noise · N(0, I)``.

    Args:
        depth: number of levels, trunk included (1 to 20; ``2^depth − 1`` branches are built).
        noise: standard deviation of the isotropic Gaussian noise.
        angle: branching angle in degrees.
        ratio: length of a child branch relative to its parent, in (0, 1].
    """

    @check_declared
    def __init__(self, depth: Annotated[int, Range(1, 20)] = 7, noise: NonNegativeFloat = 0.02,
                 angle: FiniteFloat = 30.0, ratio: Annotated[float, Range(0, 1, lo_open=True)] = 0.7) -> None:
        self.noise = float(noise)
        turn = math.radians(angle)
        starts, ends = [], []
        level = [((0.0, 0.0), math.pi / 2, 1.0)]  # (start, direction, length), unit trunk
        for _ in range(int(depth)):
            children = []
            for (sx, sy), heading, length in level:
                end = (sx + length * math.cos(heading), sy + length * math.sin(heading))
                starts.append((sx, sy))
                ends.append(end)
                children += [(end, heading + turn, length * ratio),
                             (end, heading - turn, length * ratio)]
            level = children
        starts_t = torch.tensor(starts, dtype=torch.float64)
        ends_t = torch.tensor(ends, dtype=torch.float64)
        top = torch.cat([starts_t[:, 1], ends_t[:, 1]]).max()
        origin = torch.tensor([0.0, -2.0], dtype=torch.float64)
        self.starts = (starts_t * 4 / top + origin).to(_F32)  # [S, 2]
        self.ends = (ends_t * 4 / top + origin).to(_F32)
        self.lengths = torch.linalg.vector_norm(self.ends - self.starts, dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        branch = torch.multinomial(self.lengths, n, replacement=True, generator=generator)
        t = _rand(generator, n, 1)
        x = self.starts[branch] + t * (self.ends[branch] - self.starts[branch])
        return x + self.noise * _randn(generator, n, 2), None


# --------------------------------------------------------------------------- Gaussian mixture


@DATASETS.register("gmm")
class GaussianMixtureData(SyntheticDataset):
    """The ``gmm`` dataset: a random full-covariance Gaussian mixture in ``dim`` dimensions.

    .. math::
        p(x) = \\sum_k w_k\\, \\mathcal N(x;\\ \\mu_k, \\Sigma_k),\\qquad
        \\mu_k \\sim \\mathcal N(0, 2^2 I),\\quad
        \\Sigma_k = 0.3\\, A_k A_k^\\top + 0.05\\, I,\\quad A_{k,ij} \\sim \\mathcal N(0, 1),

    with the parameters drawn once from a generator seeded ``seed``. The weights are
    equal, or with ``mixing="random"`` drawn from a flat Dirichlet. The mixture itself is
    :attr:`mixture`, a float32 :class:`flowkit.gmm.GaussianMixture`, which samples and gives
    the exact ``log_prob`` (and its marginals and scores along a Gaussian path); ``means
    [K, D]``, ``covs [K, D, D]`` and ``weights [K]`` are its parameters. Labels = component.

    Args:
        dim: dimension ``D``.
        components: number of components ``K``.
        seed: seed of the parameters (not of the samples).
        mixing: ``"equal"`` weights ``1/K`` or ``"random"`` Dirichlet(1) weights.

    Example:
        >>> data = GaussianMixtureData(dim=3, components=2)
        >>> data.mixture
        GaussianMixture(K=2, D=3, dtype=torch.float32)
    """

    @check_declared
    def __init__(self, dim: PositiveInt = 2, components: PositiveInt = 4, seed: Seed = 0,
                 mixing: Literal["equal", "random"] = "equal") -> None:
        dim, k = int(dim), int(components)
        self.shape = (dim,)
        self.num_classes = k
        g = torch.Generator().manual_seed(int(seed))
        means = 2.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
        a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
        covs = 0.3 * a @ a.transpose(-1, -2) + 0.05 * torch.eye(dim, dtype=torch.float64)
        if mixing == "random":
            e = -torch.log(torch.rand(k, generator=g, dtype=torch.float64))
            weights = e / e.sum()
        else:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.mixture = GaussianMixture(means.to(_F32), covs.to(_F32), weights.to(_F32))
        self._by_dtype: dict[tuple[torch.dtype, torch.device], GaussianMixture] = {}

    @property
    def means(self) -> Tensor:
        return self.mixture.means

    @property
    def covs(self) -> Tensor:
        return self.mixture.covs

    @property
    def weights(self) -> Tensor:
        return self.mixture.weights

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        return self.mixture.sample_components(n, generator)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log Σ_k w_k N(x; μ_k, Σ_k)``, computed in ``x``'s dtype."""
        key = (x.dtype, x.device)
        if key not in self._by_dtype:
            self._by_dtype[key] = self.mixture.to(x.dtype, x.device)
        return self._by_dtype[key].log_prob(x)
