"""Statistics of a comparison over seeds: mean ± standard error and the paired t-test.

Runs of two configurations trained with the same seed share their training batches'
random stream, their initialisation seed and the evaluator's test points, so the seed is
the unit of pairing: the difference ``d_s = a_s − b_s`` per seed removes what the seed
shares between them. The **paired t-test** (Student 1908; e.g. Wasserman, *All of
Statistics*, §10.2) takes the ``n`` differences as independent draws of a normal law and
tests the mean difference against zero:

.. math:: t = \\frac{\\bar d}{s_d / \\sqrt n}, \\qquad
          p = P(|T_{n-1}| \\ge |t|) = I_{\\nu / (\\nu + t^2)}\\!\\left(\\tfrac{\\nu}{2}, \\tfrac12\\right),
          \\quad \\nu = n - 1,

two-sided, where ``I_x(a, b)`` is the regularized incomplete beta function (Abramowitz &
Stegun 26.7.1 gives the t distribution through it), evaluated here by its continued
fraction (A&S 26.5.8) with the modified Lentz method (Press et al., *Numerical Recipes*,
§5.2 and §6.4) — no SciPy at run time. Several comparisons against one reference are
corrected for multiplicity by Holm's step-down method (Holm 1979).

Example:
    >>> r = paired_t_test([1.0, 2.0, 3.0, 4.0], [0.5, 1.2, 2.9, 3.1])
    >>> round(r.t, 4), r.df, round(r.p, 4)
    (3.1998, 3, 0.0493)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["mean_se", "paired_t_test", "PairedTest", "t_sf", "betainc", "holm"]


def mean_se(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and standard error ``s / √n`` (``s`` with ``n − 1``); the error is None for one value.

    Example:
        >>> m, se = mean_se([1.0, 2.0, 3.0]); m, round(se, 5)
        (2.0, 0.57735)
    """
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _continued_fraction(a: float, b: float, x: float, eps: float = 1e-15, iterations: int = 1000) -> float:
    """The continued fraction of ``I_x(a, b)`` (A&S 26.5.8), by the modified Lentz method."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, iterations + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))  # d_{2m}
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))  # d_{2m+1}
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 ≤ x ≤ 1``.

    Uses the continued fraction where it converges fast (``x < (a + 1) / (a + b + 2)``) and the
    symmetry ``I_x(a, b) = 1 − I_{1−x}(b, a)`` elsewhere.

    Example:
        >>> round(betainc(2.0, 3.0, 0.4), 10)  # 1 - (1-x)^4 - 4x(1-x)^3 ... = 0.5248
        0.5248
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Two-sided tail ``P(|T_df| ≥ |t|)`` of Student's t distribution (A&S 26.7.1).

    Example:
        >>> round(t_sf(2.0, 10), 6)
        0.073388
    """
    if not df > 0:
        raise ValueError(f"t_sf: degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        return float("nan")
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class PairedTest:
    """The paired t-test of ``a − b``: mean difference, its standard error, ``t``, ``df``, two-sided ``p``."""

    mean_diff: float
    se: float
    t: float
    df: int
    p: float
    n: int


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test of ``H0: E[a_s − b_s] = 0`` over the pairs ``(a_s, b_s)``.

    Pairs where either value is missing or not finite are dropped. With fewer than two pairs
    there is no test (``p`` NaN). Identical differences give ``p = 1`` when they are all zero
    and ``p = 0`` otherwise (``t = ±∞``).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t_test: a and b must pair up, got {len(a)} and {len(b)} values")
    diffs = [float(x) - float(y) for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    n = len(diffs)
    mean, se = mean_se(diffs)
    if n < 2 or se is None:
        return PairedTest(mean, float("nan"), float("nan"), max(n - 1, 0), float("nan"), n)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return PairedTest(mean, 0.0, t, n - 1, 1.0 if mean == 0.0 else 0.0, n)
    t = mean / se
    return PairedTest(mean, se, t, n - 1, t_sf(t, n - 1), n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), NaNs left as they are.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = round(running, 12)
    return out
