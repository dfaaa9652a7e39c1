"""Quantised images: uniform dequantisation, the logit transform, dynamic binarisation, and
the built-in 8×8 digits.

Quantised data with ``K`` levels are **uniformly dequantised** (Theis et al. 2016):
``x = (k + u) / K`` with ``u ~ U[0, 1)^D``, so ``x ∈ [0, 1)^D`` and ``log_scale = log K``;
a continuous density on ``x`` lower-bounds the discrete log-likelihood, reported as
``bpd = (nll_x + D log K) / (D ln 2)`` (:func:`flowkit.likelihood.bits_per_dim`). An optional
**logit transform** (Dinh et al. 2017) maps ``x`` to ``y = logit(λ + (1 − 2λ) x)``; its
log-determinant ``Σ log((1 − 2λ) / (s (1 − s)))`` with ``s = sigmoid(y)`` is added back
through :meth:`Dataset.model_log_det`, so bits/dim always refer to the original data.

**Dynamic binarisation** (``binarize: true``; Salakhutdinov & Murray 2008, the binarised-MNIST
protocol of the VAE literature — Burda et al. 2016, Grathwohl et al. 2019 Table 2): every
training batch draws ``x ~ Bernoulli(k / (K − 1))`` afresh from the pixel intensities, so the
model sees a new binary image each time; the test set is binarised once, from its seed. The
data are then discrete binary vectors (``log_scale = 0``): a model's NLL is in nats of a
discrete distribution and bits/dim are ``nll / (D ln 2)``. It excludes the logit transform
(declared as an argument rule, so ``flowkit check`` refuses the pair).
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import torch
from torch import Tensor

from ..components import DATASETS
from ..constraints import Range, Rule
from ..data import DataError, Dataset, check_declared
from .tables import DataUnavailable

__all__ = ["QuantisedImages", "Digits", "Fraction", "LogitAlpha", "binarise", "binarize_excludes_logit",
           "dequantise", "logit_transform"]


#: a share of the data held out: strictly between 0 and 1
Fraction = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]
#: the logit transform's λ: in (0, 1/2), so that ``λ + (1 − 2λ) x`` stays inside (0, 1)
LogitAlpha = Annotated[float, Range(0, 0.5, lo_open=True, hi_open=True)]


#: declared by the image datasets: binarised images are not dequantised, so they take no logit transform
binarize_excludes_logit = Rule(
    ("binarize", "logit"), lambda a: not (a["binarize"] and a["logit"]),
    "binarised images are binary, and the logit transform needs continuous ones; set logit: false "
    "(or binarize: false for dequantised, continuous images)")


def binarise(k: Tensor, levels: int, generator: Optional[torch.Generator]) -> Tensor:
    """``x ~ Bernoulli(k / (levels − 1))`` per pixel (dynamic binarisation), drawn from ``generator``.

    Example:
        >>> x = binarise(torch.tensor([[0, 16, 8]]), 17, torch.Generator().manual_seed(0))
        >>> x[0, :2].tolist()  # intensity 0 is always 0, full intensity always 1
        [0.0, 1.0]
    """
    p = k.float() / (levels - 1)
    return torch.bernoulli(p, generator=generator)


def dequantise(k: Tensor, levels: int, generator: Optional[torch.Generator]) -> Tensor:
    """``(k + u) / levels`` with ``u ~ U[0, 1)`` drawn from ``generator``."""
    u = torch.rand(k.shape, generator=generator)
    return (k.float() + u) / levels


def logit_transform(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``y = logit(α + (1 − 2α) x)`` and ``log |det ∂y/∂x|`` per sample."""
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    return y, _logit_log_det(y, alpha)


def _logit_log_det(y: Tensor, alpha: float) -> Tensor:
    # dy/dx = (1 − 2α) / (s (1 − s)), s = sigmoid(y); log s(1−s) = −softplus(−y) − softplus(y)
    per = math.log(1 - 2 * alpha) + torch.nn.functional.softplus(-y) + torch.nn.functional.softplus(y)
    return per.flatten(1).sum(1)


class QuantisedImages(Dataset):
    """Images stored as integers in ``[0, levels)``, shape ``[N, C, H, W]``, with labels.

    ``train_batch`` draws images with replacement and fresh dequantisation noise — or, with
    ``binarize``, a fresh Bernoulli draw of every pixel — from the caller's generator (so a
    resumed run is identical); ``test_set`` takes the first ``n`` test images with noise (or the
    binarisation) from ``seed``.
    """

    discrete = True

    def __init__(self, train: Tensor, test: Tensor, levels: int, train_labels: Optional[Tensor] = None,
                 test_labels: Optional[Tensor] = None, logit: bool = False, alpha: float = 1e-6,
                 num_classes: Optional[int] = None, binarize: bool = False) -> None:
        if train.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got {tuple(train.shape)}")
        if not isinstance(binarize, bool):
            raise DataError(f"data.binarize: expected true or false, got {binarize!r}")
        found = binarize_excludes_logit.check({"binarize": binarize, "logit": logit})
        if found is not None:
            raise DataError(f"data.{found[0]}: {found[1]}")
        self.train, self.test = train, test
        self.train_labels, self.test_labels = train_labels, test_labels
        self.levels = levels
        self.shape = tuple(train.shape[1:])
        self.log_scale = 0.0 if binarize else math.log(levels)
        self.logit, self.alpha = logit, alpha
        self.num_classes = num_classes
        self.binarize = binarize

    def _to_model(self, k: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        if self.binarize:
            return binarise(k, self.levels, generator)
        x = dequantise(k, self.levels, generator)
        return logit_transform(x, self.alpha)[0] if self.logit else x

    def train_batch(self, n: int, generator: torch.Generator):
        idx = torch.randint(0, len(self.train), (n,), generator=generator)
        labels = self.train_labels[idx] if self.train_labels is not None else None
        return self._to_model(self.train[idx], generator), labels

    def test_set(self, n: int, seed: int = 1234):
        n = min(n, len(self.test))
        g = torch.Generator().manual_seed(seed)
        labels = self.test_labels[:n] if self.test_labels is not None else None
        return self._to_model(self.test[:n], g), labels

    def model_log_det(self, y: Tensor) -> Optional[Tensor]:
        return _logit_log_det(y, self.alpha) if self.logit else None

    def to_images(self, y: Tensor) -> Tensor:
        """Model-space samples back to ``[0, 1]`` images (for pictures)."""
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) if self.logit else y
        return x.clamp(0, 1)


@DATASETS.register("digits")
class Digits(QuantisedImages):
    """The 8×8 handwritten digits scikit-learn ships (1,797 images, 17 grey levels), offline.

    Args:
        test_fraction: share of images held out (a fixed split, seeded).
        logit: apply the logit transform (see module docstring).
        alpha: the logit transform's λ.
        binarize: dynamically binarised images (``Bernoulli(k / 16)`` drawn afresh for every
            batch) instead of dequantised ones: the data of a Bernoulli VAE decoder.
    """

    argument_rules = (binarize_excludes_logit,)

    @check_declared
    def __init__(self, test_fraction: Fraction = 0.2, logit: bool = False, alpha: LogitAlpha = 1e-6,
                 binarize: bool = False) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover
            raise DataUnavailable("data.name: digits needs scikit-learn (pip install scikit-learn)") from None
        bunch = load_digits()
        images = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)  # [N, 1, 8, 8] in 0..16
        labels = torch.as_tensor(bunch.target, dtype=torch.long)
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        n_test = int(round(test_fraction * len(images)))
        if not 0 < n_test < len(images):
            raise DataError(f"data.test_fraction: {test_fraction} of {len(images)} images holds out {n_test}; "
                            "choose a fraction that leaves images on both sides")
        test, train = perm[:n_test], perm[n_test:]
        super().__init__(images[train], images[test], levels=17, train_labels=labels[train],
                         test_labels=labels[test], logit=logit, alpha=alpha, num_classes=10, binarize=binarize)
