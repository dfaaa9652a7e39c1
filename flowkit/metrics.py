"""Sample-quality metrics: what each number is, so that no table can misread it.

* **Energy distance** (Székely & Rizzo 2013, eq. 2):
  ``D(P, Q) = 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ ≥ 0``, zero iff ``P = Q``. Reported as the
  **V-statistic** — the energy distance between the two empirical distributions, with the
  zero diagonal kept in the within-sample means — which is ``≥ 0`` for every sample (it
  is a squared distance between the samples' characteristic functions, Székely & Rizzo
  2013 Prop. 1). It is biased upward: ``E[V] = D + E‖X−X'‖/n + E‖Y−Y'‖/m``; with the
  same ``n`` and ``m`` for every model (as the evaluator ensures) the bias is nearly the
  same for all and comparisons stand.
* **MMD** (Gretton et al. 2012, eq. 5, the biased V-statistic, also ``≥ 0``) with a stated
  kernel: the mean of Gaussian RBF kernels ``exp(−‖x−y‖² / (2h²))`` at bandwidths
  ``h ∈ {ℓ/16, ℓ/4, ℓ}``, ``ℓ`` the median distance between points of the *reference*
  sample (the median heuristic, Gretton et al. 2012 §8, taken from the data only so that
  every model is scored with the same kernel); the narrow scales see sharp structure (a
  ring's width), the wide one the overall layout. Reported as ``MMD = √MMD²``.
* **Sliced Wasserstein-2** (Rabin et al. 2011; Bonneel et al. 2015): the mean over random
  unit directions θ of the squared W2 between the 1-D projections, which is the mean
  squared difference of sorted projections; reported as its square root.
* **Fréchet distance of features** (Heusel et al. 2017, eq. 6, the FID formula):
  ``‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2})`` between Gaussians fitted to the features
  of samples and of data. For the 8×8 digits the features are the 32-unit penultimate
  layer of :class:`DigitsClassifier`, a small CNN trained on the digits' training split
  (``bench/train_digits_classifier.py``) and shipped in ``flowkit/assets``; its test
  accuracy is checked by the tests. Biased upward at small ``n`` like FID; compare at equal
  ``n`` only.

Example:
    >>> import torch
    >>> x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    >>> energy_distance(x, x + 3.0) > energy_distance(x, x + 0.5) > 0
    True
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["energy_distance", "mmd", "mmd_bandwidth", "sliced_wasserstein", "frechet_distance",
           "gaussian_frechet_distance", "DigitsClassifier", "digits_classifier", "FEATURE_SPACES",
           "MMD_SCALES", "ASSETS"]

#: where the package's data files live (the digits classifier's weights)
ASSETS = Path(__file__).resolve().parent / "assets"
#: MMD bandwidths as fractions of the reference sample's median pairwise distance
MMD_SCALES: tuple[float, ...] = (1 / 16, 1 / 4, 1.0)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance (V-statistic, ``≥ 0``) between samples ``x [n, ...]`` and ``y [m, ...]``.

    ``2·mean‖x_i − y_j‖ − mean‖x_i − x_k‖ − mean‖y_j − y_l‖`` with every pair, the diagonal
    included; see the module docstring for its bias.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return max(float(2 * xy - xx - yy), 0.0)  # ≥ 0 exactly; max() only removes rounding below 0


def mmd_bandwidth(reference: Tensor, max_points: int = 1000) -> float:
    """The median heuristic ``ℓ``: the median distance between distinct points of ``reference``
    (its first ``max_points``)."""
    r = reference[:max_points].flatten(1).double()
    d = torch.cdist(r, r)
    off = d[~torch.eye(len(r), dtype=torch.bool)]
    return float(off.median()) if off.numel() else 1.0


def mmd(x: Tensor, y: Tensor, bandwidth: float, scales: Sequence[float] = MMD_SCALES) -> float:
    """MMD (biased V-statistic, ``≥ 0``) with the mean of RBF kernels at ``bandwidth · scales``.

    ``MMD² = mean k(x, x') + mean k(y, y') − 2 mean k(x, y)`` over all pairs (diagonals
    included), ``k(a, b) = mean_h exp(−‖a − b‖² / (2h²))``; returns ``√MMD²``.
    """
    if not bandwidth > 0:
        raise ValueError(f"mmd: bandwidth must be positive, got {bandwidth}")
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * (bandwidth * s) ** 2)).mean() for s in scales) / len(scales)

    value = float(kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))
    return math.sqrt(max(value, 0.0))


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance; ``x`` and ``y`` need the same number of samples."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x.cpu() @ theta).sort(0).values
    py = (y.cpu() @ theta).sort(0).values
    return float((px - py).pow(2).mean().sqrt())


def _sqrtm_psd(s: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(s)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """``‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2})``, the squared W2 between two Gaussians.

    ``Tr (Σ₁Σ₂)^{1/2} = Tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}``, a symmetric positive semi-definite
    matrix, so both roots come from symmetric eigendecompositions (float64).

    Example:
        >>> import torch
        >>> gaussian_frechet_distance(torch.zeros(2), torch.eye(2), torch.ones(2), 4 * torch.eye(2))
        4.0
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    root = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def frechet_distance(f: Tensor, g: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``f [n, d]`` and ``g [m, d]``."""
    f, g = f.flatten(1).double(), g.flatten(1).double()
    return max(gaussian_frechet_distance(f.mean(0), torch.cov(f.T).reshape(f.shape[1], -1),
                                         g.mean(0), torch.cov(g.T).reshape(g.shape[1], -1)), 0.0)


class DigitsClassifier(nn.Module):
    """A small CNN for the 8×8 digits (``[n, 1, 8, 8]`` in ``[0, 1]``): two 3×3 convolutions,
    a 32-unit feature layer and 10 logits (21.5k parameters)."""

    FEATURES = 32

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 4×4
            nn.Flatten(), nn.Linear(32 * 16, self.FEATURES), nn.ReLU())
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, images: Tensor) -> Tensor:
        """The 32 penultimate activations of ``images`` (``[0, 1]``, any leading shape ``[n, 64]`` too)."""
        return self.body((images.reshape(-1, 1, 8, 8).float() - 0.5) / 0.5)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


#: file of the shipped classifier's weights (``torch.load(..., weights_only=True)``)
DIGITS_CLASSIFIER_FILE = ASSETS / "digits_classifier.pt"


@lru_cache(maxsize=1)
def digits_classifier() -> DigitsClassifier:
    """The shipped :class:`DigitsClassifier`, in eval mode (loaded once per process).

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    if not DIGITS_CLASSIFIER_FILE.is_file():
        raise FileNotFoundError(f"{DIGITS_CLASSIFIER_FILE}: the digits classifier is missing from the install "
                                "(package data); reinstall flowkit or run bench/train_digits_classifier.py")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(DIGITS_CLASSIFIER_FILE, map_location="cpu", weights_only=True))
    return model.eval()


def _digits_features(images: Tensor) -> Tensor:
    with torch.no_grad():
        return digits_classifier().features(images.cpu())


#: feature extractors for image data, keyed by the dataset's registered name: each maps
#: ``[n, C, H, W]`` images in ``[0, 1]`` (``dataset.to_images``) to ``[n, d]`` features
FEATURE_SPACES: dict[str, Callable[[Tensor], Tensor]] = {"digits": _digits_features}


def feature_space(dataset: object) -> Optional[tuple[str, Callable[[Tensor], Tensor]]]:
    """``(name, extractor)`` of :data:`FEATURE_SPACES` for ``dataset``'s registered class, else None."""
    from .components import DATASETS

    for name in FEATURE_SPACES:
        if name in DATASETS and type(dataset) is DATASETS.get(name):
            return name, FEATURE_SPACES[name]
    return None
