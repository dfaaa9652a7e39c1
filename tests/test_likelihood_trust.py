"""No silent wrong answers from the likelihood API (issue 12, group 1).

1. A field whose autograd graph is missing or partial — an external model called under
   ``torch.no_grad()`` or ``torch.inference_mode()``, or returning ``.detach()``-ed output — gets
   its divergence by finite differences, never a silent 0; checked against closed forms
   (``N(0, I)`` under VP with the score ``-x``; Gaussian mixtures with their exact marginal
   scores). A caller under ``no_grad`` / ``inference_mode`` gets the same answer.
2. Bad inputs — a field of the wrong shape or with NaN/inf, an empty or 1-D ``x``, NaN rows in
   ``x``, ``n_probes <= 0`` — raise :class:`flowkit.flow.FieldError` naming the argument, the
   expected shape and how many samples are bad, at every public entry point.
3. Good float32 models give the closed-form answer: the adaptive solver's first-step heuristic
   probes the field beyond ``t1``, where it may be non-finite, and that is no error (a NaN met
   inside ``[t0, t1]`` still is). Wrong inputs that used to pass silently — a field that mixes
   samples (BatchNorm in train mode), a prior of another event shape, a NaN or non-positive
   tolerance — are refused before the solve.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import warnings

import pytest
import torch
from conftest import exact_mixture

from flowkit.components import PATHS
from flowkit.config import EvalConfig
from flowkit.diffusion import flow_from_score, score_log_likelihood
from flowkit.trace import divergence, sample_probe
from flowkit.dynamics import ConcatSquashMLP
from flowkit.evaluate import evaluate_nll
from flowkit.flow import FieldError, Flow, NonFiniteFieldError, StandardNormal
from flowkit.gmm import GaussianMixture, mixture_score_field
from flowkit.likelihood import flow_log_likelihood, log_likelihood
from flowkit.paths import VP
from flowkit.solvers import SolverError

F64 = torch.float64
FD_WARNING = "finite differences"


# ----------------------------------------------------------------------------- helpers


def wrap_xt(score, how: str):
    """An ``s(x, t)`` score called the ways external models are: plainly, under ``no_grad``,
    under ``inference_mode``, or with its output detached."""

    def wrapped(x, t):
        if how == "no_grad":
            with torch.no_grad():
                return score(x, t)
        if how == "inference_mode":
            with torch.inference_mode():
                return score(x, t)
        if how == "detach":
            return score(x, t).detach()
        return score(x, t)

    return wrapped


def wrap_field(field, how: str):
    """The same wrappers for a flowkit-order field ``f(t, x, cond=None)``."""
    inner = wrap_xt(lambda x, t: field(t, x), how)
    return lambda t, x, cond=None: inner(x, t)


def mixture(dim: int, seed: int = 0) -> GaussianMixture:
    return exact_mixture(dim, (0.4, 0.6), seed=seed, spread=2.0, cov_scale=0.5, cov_floor=0.2)


def gaussian_nll(x: torch.Tensor) -> float:
    """Closed-form NLL of ``N(0, I)``: ``½ D log 2π + ½ mean |x|²``."""
    d = x.shape[1]
    return 0.5 * d * math.log(2 * math.pi) + 0.5 * float(x.pow(2).sum(1).mean())


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with the finite-difference warning silenced (tests that check it say so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + FD_WARNING)
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- 1. right answers


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_score_without_graph_gives_closed_form_gaussian_nll(how):
    """The issue's case: N(0, I) data under VP with the exact score -x gave NLL 12.92, not 2.87."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.warns(UserWarning, match=FD_WARNING):
        out = score_log_likelihood(wrap_xt(lambda x, t: -x, how), x, VP())
    assert -float(out.log_prob.mean()) == pytest.approx(gaussian_nll(x), abs=1e-6)


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_score_without_graph_gives_exact_mixture_likelihood(how):
    path = PATHS.build("vp")
    gmm = mixture(2)
    field = mixture_score_field(gmm, path)
    x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(1))
    ref = gmm.marginal(path, path.t0).log_prob(x)
    with pytest.warns(UserWarning, match=FD_WARNING):
        out = score_log_likelihood(wrap_xt(lambda x, t: field(t, x), how), x, path,
                                   prior=gmm.marginal(path, path.t1), rtol=1e-6, atol=1e-6)
    assert (out.log_prob - ref).abs().max().item() < 1e-3


def test_float32_score_without_graph_stays_accurate():
    """Central differences in float32 (the dtype of most external models): error ~1e-4 nats."""
    path = PATHS.build("vp")
    gmm64 = mixture(2)
    gmm = GaussianMixture(gmm64.means.float(), gmm64.covs.float(), gmm64.weights.float())
    field = mixture_score_field(gmm, path)
    x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(2))
    ref = gmm64.marginal(path, path.t0).log_prob(x.double())
    out = quiet(score_log_likelihood, wrap_xt(lambda x, t: field(t, x), "no_grad"), x, path,
                prior=gmm.marginal(path, path.t1), rtol=1e-6, atol=1e-6)
    assert out.log_prob.dtype == torch.float32
    assert (out.log_prob.double() - ref).abs().max().item() < 2e-3


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_caller_under_no_grad_or_inference_mode_gets_the_exact_likelihood(mode):
    """``with torch.no_grad():`` / ``with torch.inference_mode():`` around the call, with ``x``
    even created inside it: the same exact mixture likelihood, no warning (autograd is used)."""
    path = PATHS.build("vp")
    gmm = mixture(2, seed=3)
    field = mixture_score_field(gmm, path)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ctx():
            x = gmm.marginal(path, path.t0).sample(12, torch.Generator().manual_seed(1))
            out = score_log_likelihood(lambda x, t: field(t, x), x, path, prior=gmm.marginal(path, path.t1),
                                       rtol=1e-6, atol=1e-6)
    ref = gmm.marginal(path, path.t0).log_prob(x.clone())
    assert (out.log_prob - ref).abs().max().item() < 1e-3
    assert not out.log_prob.is_inference()


@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_flow_and_evaluate_nll_of_a_detached_score_flow_are_exact(how):
    """The same contract through flow_from_score → flow_log_likelihood and evaluate_nll (also
    called under inference_mode), the paths of `flowkit nll`."""
    path = PATHS.build("vp")
    gmm = mixture(2, seed=4)
    flow = flow_from_score(wrap_field(mixture_score_field(gmm, path), how), path, (2,),
                           prior=gmm.marginal(path, path.t1))
    x = gmm.marginal(path, path.t0).sample(10, torch.Generator().manual_seed(5))
    ref = gmm.marginal(path, path.t0).log_prob(x)
    with pytest.warns(UserWarning, match="flow.velocity"):
        out = flow_log_likelihood(flow, x, rtol=1e-6, atol=1e-6)
    assert (out.log_prob - ref).abs().max().item() < 1e-3
    cfg = EvalConfig(batch_size=4, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        res = quiet(evaluate_nll, flow, x, cfg)
    assert res["nll"] == pytest.approx(-float(ref.mean()), abs=1e-3)


def test_partially_detached_linear_field_counts_both_parts():
    """``v = A x + stopgrad(B x)``: Δ = t1 tr(A + B) exactly; autograd alone would give t1 tr A."""
    a = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]], dtype=F64)
    b = torch.tensor([[0.7, 0.1], [0.2, -1.1]], dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    field = lambda t, x: x @ a.T + (x @ b.T).detach()  # noqa: E731
    with pytest.warns(UserWarning, match="only part"):
        out = log_likelihood(field, x, StandardNormal((2,)), times=(0.0, 0.7), rtol=1e-9, atol=1e-9)
    assert torch.allclose(out.delta, torch.full((6,), 0.7 * float(torch.trace(a + b)), dtype=F64), atol=1e-7)


def test_part_missed_by_autograd_only_after_t0_is_caught():
    """``v = A x + t² stopgrad(B x)``: at t0 = 0 autograd is right, later it is not (like the
    score term of a sub-VP PF-ODE, negligible at t0). Δ = t1 tr A + t1³/3 tr B."""
    a = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]], dtype=F64)
    b = torch.tensor([[0.7, 0.1], [0.2, -1.1]], dtype=F64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    field = lambda t, x: x @ a.T + t**2 * (x @ b.T).detach()  # noqa: E731
    with pytest.warns(UserWarning, match="only part"):
        out = log_likelihood(field, x, StandardNormal((2,)), times=(0.0, 1.0), rtol=1e-9, atol=1e-9)
    expected = float(torch.trace(a)) + float(torch.trace(b)) / 3
    assert torch.allclose(out.delta, torch.full((6,), expected, dtype=F64), atol=1e-7)


def test_hutchinson_of_a_field_without_graph_estimates_the_trace():
    a = torch.tensor([[1.2, 0.8], [-0.5, 0.9]], dtype=F64)  # tr A = 2.1
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    out = quiet(log_likelihood, wrap_field(lambda t, x: x @ a.T, "no_grad"), x, StandardNormal((2,)),
                estimator="hutchinson", noise="gaussian", n_probes=4000, rtol=1e-8, atol=1e-8,
                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.delta, torch.full((4,), float(torch.trace(a)), dtype=F64), atol=0.15)


def test_fields_with_a_full_graph_keep_autograd_without_warning():
    """No false alarm: flowkit networks (smooth and ReLU), float32 and float64, keep autograd."""
    for dtype in (torch.float32, F64):
        for act in ("tanh", "relu"):
            torch.manual_seed(8)
            net = ConcatSquashMLP(3, hidden=(32, 32), activation=act).to(dtype)
            x = 2 * torch.randn(32, 3, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                log_likelihood(net, x, StandardNormal((3,)), method="rk4", steps=2)


def test_divergence_refuses_a_field_without_graph_instead_of_returning_zero():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    x, t = torch.randn(5, 2, dtype=F64), torch.tensor(0.0, dtype=F64)
    detached = lambda t, x: (x @ a.T).detach()  # noqa: E731
    for estimator, probe in (("exact", None), ("hutchinson", sample_probe(x))):
        with pytest.raises(FieldError, match="no_grad"):
            divergence(detached, t, x, estimator=estimator, probe=probe)
    out = divergence(detached, t, x, differentiate="finite_difference", frobenius=True)
    assert torch.allclose(out.div, torch.full((5,), 5.0, dtype=F64), atol=1e-8)
    assert torch.allclose(out.jac_frobenius, torch.full((5,), 30.0, dtype=F64), atol=1e-6)


def test_finite_difference_divergence_matches_autograd(float64):
    torch.manual_seed(9)
    net = ConcatSquashMLP(4, hidden=(16, 16), activation="softplus")
    x, t = torch.randn(6, 4), torch.tensor(0.3)
    probe = sample_probe(x, "gaussian", 3)
    for estimator, p in (("exact", None), ("hutchinson", probe)):
        ref = divergence(net, t, x, estimator=estimator, probe=p, frobenius=True)
        fd = divergence(net, t, x, estimator=estimator, probe=p, frobenius=True, differentiate="finite_difference")
        assert torch.allclose(fd.div, ref.div, atol=1e-7)  # the same εᵀJε (or tr J) both ways
        assert torch.allclose(fd.dx, ref.dx)
    exact = divergence(net, t, x, frobenius=True, differentiate="finite_difference").jac_frobenius
    assert torch.allclose(exact, divergence(net, t, x, frobenius=True).jac_frobenius, atol=1e-8)


def test_field_with_dropout_in_training_mode_is_refused():
    """Two calls on the same input differ: a likelihood of it would be noise."""
    torch.manual_seed(10)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    with pytest.raises(FieldError, match=r"eval\(\)"):
        log_likelihood(lambda t, x: net(x), torch.randn(8, 2), StandardNormal((2,)))


# ----------------------------------------------------------------------------- 2. bad inputs


def _entry_points():
    """Every public likelihood entry point, as ``call(x, field, **options)`` with a flowkit-order
    field ``field(t, x, cond=None)``."""
    path = VP()

    def via_log_likelihood(x, field, **options):
        return log_likelihood(field, x, StandardNormal(tuple(x.shape[1:])), **options)

    def via_flow(x, field, **options):
        return flow_log_likelihood(Flow(velocity=field, prior=StandardNormal(tuple(x.shape[1:]))), x, **options)

    def via_score(x, field, **options):
        return score_log_likelihood(lambda x_, t_: field(t_[0], x_), x, path, **options)

    def via_evaluate(x, field, n_probes=1, **options):
        cfg = EvalConfig(batch_size=4, **options)
        if n_probes != 1:  # bypass any validation in EvalConfig: evaluate_nll must check on its own
            cfg = types.SimpleNamespace(**{**dataclasses.asdict(cfg), "n_probes": n_probes})
        return evaluate_nll(Flow(velocity=field, prior=StandardNormal(tuple(x.shape[1:]))), x, cfg)

    return {"log_likelihood": via_log_likelihood, "flow_log_likelihood": via_flow,
            "score_log_likelihood": via_score, "evaluate_nll": via_evaluate}


ENTRY = _entry_points()
GOOD = lambda t, x, cond=None: -x  # noqa: E731


@pytest.mark.parametrize("entry", list(ENTRY))
def test_one_dimensional_x_is_refused_naming_the_expected_shape(entry):
    with pytest.raises(FieldError, match=r"x: expected shape \[batch, \*event_shape\], got a 1-D tensor"):
        ENTRY[entry](torch.randn(5), GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_empty_x_is_refused(entry):
    with pytest.raises(FieldError, match=r"x: .*at least one sample.*\(0, 2\)"):
        ENTRY[entry](torch.zeros(0, 2), GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_non_finite_rows_of_x_are_counted(entry):
    x = torch.randn(10, 2)
    x[3, 0], x[7, 1] = float("nan"), float("inf")
    with pytest.raises(FieldError, match=r"x: 2 of 10 samples contain NaN or inf \(rows 3, 7\)"):
        ENTRY[entry](x, GOOD)


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("n_probes", [0, -1])
def test_non_positive_n_probes_is_refused(entry, n_probes):
    with pytest.raises(FieldError, match=f"n_probes: expected a positive integer.*got {n_probes}"):
        ENTRY[entry](torch.randn(4, 2), GOOD, n_probes=n_probes)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_field_of_the_wrong_shape_is_named_with_the_expected_shape(entry):
    wrong = lambda t, x, cond=None: -x[:, :1]  # noqa: E731
    with pytest.raises(FieldError, match=r"returned (shape )?\(4, 1\).*expected.*\(4, 2\)"):
        ENTRY[entry](torch.randn(4, 2), wrong)


@pytest.mark.parametrize("entry", list(ENTRY))
def test_field_with_nan_at_the_data_counts_the_samples(entry):
    def field(t, x, cond=None):
        return torch.where(x[:, :1] > 0, float("nan"), 1.0) * x

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]])
    with pytest.raises(NonFiniteFieldError, match=r"NaN or inf for 2 of 4 samples at t="):
        ENTRY[entry](x, field)


@pytest.mark.parametrize("entry", ["log_likelihood", "flow_log_likelihood", "evaluate_nll"])
def test_field_turning_non_finite_during_the_solve_names_the_time(entry):
    """Finite at the data, NaN for t > 0.5 on samples with x₀ > 0: not the solver's 'underflow in dt'."""
    def field(t, x, cond=None):
        return torch.where((t > 0.5) & (x[:, :1] > 0), float("nan"), -0.5) * x

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
    with pytest.raises(NonFiniteFieldError, match=r"2 of 3 samples at t=0\.5.*during the solve"):
        ENTRY[entry](x, field)


def test_evaluate_nll_names_the_batch_of_a_bad_field_output():
    def field(t, x, cond=None):  # NaN for the sample whose first coordinate is 9
        return torch.where(x[:, :1] == 9, float("nan"), 0.0) * x

    x = torch.zeros(10, 2)
    x[6, 0] = 9.0
    with pytest.raises(NonFiniteFieldError, match=r"1 of 4 samples.*rows 2\).*x\[4:8\]"):
        evaluate_nll(Flow(velocity=field, prior=StandardNormal((2,))), x, EvalConfig(batch_size=4))


def test_condition_of_the_wrong_length_is_refused():
    with pytest.raises(FieldError, match=r"cond: expected one condition per sample of x, shape \[4, \.\.\.\]"):
        log_likelihood(lambda t, x, c: -x, torch.randn(4, 2), StandardNormal((2,)), cond=torch.zeros(3, 1))


def test_prior_log_prob_of_the_wrong_shape_is_refused():
    class Flat:
        shape = (2,)

        def log_prob(self, z):
            return torch.zeros(z.shape[0], 1)  # [B, 1] would broadcast to [B, B] with delta

    with pytest.raises(FieldError, match=r"prior.log_prob returned shape \(4, 1\).*expected \(4,\)"):
        log_likelihood(GOOD, torch.randn(4, 2), Flat())


def test_field_constant_in_x_gets_zero_divergence_without_alarm():
    """``zeros_like(x)`` has no graph but truly no dependence on x: Δ = 0, computed, not assumed."""
    x = torch.randn(5, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = log_likelihood(lambda t, x: torch.zeros_like(x) + t, x, StandardNormal((3,)))
    assert torch.equal(out.delta, torch.zeros(5, dtype=F64))
    assert torch.allclose(out.z, x + 0.5)


def test_conditional_field_without_graph_gets_its_own_condition_per_sample():
    """Finite differences stack x ± h v along the batch; each copy keeps its sample's condition.
    ``v = −c x`` (c per sample): Δ = −D c (t1 − t0)."""
    n = 150  # more than the derivative checks look at
    x = torch.randn(n, 3, dtype=F64)
    c = torch.linspace(0.1, 2.0, n, dtype=F64)[:, None]

    def field(t, x, cond):
        with torch.no_grad():
            return -cond * x

    with pytest.warns(UserWarning, match=FD_WARNING):
        out = log_likelihood(field, x, StandardNormal((3,)), cond=c, method="rk4", steps=4)
    assert torch.allclose(out.delta, -3 * c[:, 0], atol=1e-8)


# ----------------------------------------------------------------------------- 3. float32; inputs once passed silently

F32 = torch.float32


def linear_score_reference(path, c: float, x: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(x)`` of the PF-ODE of the score ``s(x, t) = −c x / m_t``, ``m_t = α_t² + σ_t²``
    (``−c x`` under VP, where ``m_t = 1``), with the path's default prior.

    ``v = a(t) x`` with ``a = f + ½ g² c / m = (1 − c) α̇/α + (c/2) ṁ/m``, so ``z = x e^A`` and
    ``Δ = D A`` with ``A = (1 − c) log(α₁/α₀) + (c/2) log(m₁/m₀)``.
    """
    t = torch.tensor([path.t0, path.t1], dtype=F64)
    alpha, sigma = path.alpha(t), path.sigma(t)
    m = alpha**2 + sigma**2
    a = float((1 - c) * torch.log(alpha[1] / alpha[0]) + c / 2 * torch.log(m[1] / m[0]))
    x = x.double()
    return path.prior(tuple(x.shape[1:])).log_prob(x * math.exp(a)) + x[0].numel() * a


@pytest.mark.parametrize("c", [1.0, 0.99])
def test_float32_vp_scores_of_the_report_give_the_closed_form(c):
    """The report's cases, verbatim: ``-x`` and ``-0.99 x`` under VP in float32 raised
    NonFiniteFieldError "at t=8.9" (or t=1e6): a probe of the solver's first-step heuristic."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    out = score_log_likelihood(lambda x, t: -c * x, x, VP())
    assert out.log_prob.dtype == F32
    ref = linear_score_reference(VP(), c, x)
    assert (out.log_prob.double() - ref).abs().max().item() < 1e-4
    assert -float(out.log_prob.mean()) == pytest.approx(-float(ref.mean()), abs=1e-5)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("c", [1.0, 0.99])
def test_float32_linear_scores_give_the_closed_form_on_every_path(name, c):
    path = PATHS.build(name)

    def score(x, t):
        m = path.alpha(t) ** 2 + path.sigma(t) ** 2
        return -c * x / m[:, None]

    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    out = score_log_likelihood(score, x, path)
    assert out.log_prob.dtype == F32
    ref = linear_score_reference(path, c, x)
    assert (out.log_prob.double() - ref).abs().max().item() < 2e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_float32_mixture_score_gives_the_exact_likelihood(name):
    """A float32 model with its full autograd graph and the default solver: the exact score of
    ``0.9 N(0, I) + 0.1 N(μ, Σ)`` at points of its bulk, where the PF-ODE velocity at ``t0`` is
    nearly 0 (as for standardised data), so the first-step probe lands far beyond ``t1``."""
    path = PATHS.build(name)
    means = torch.tensor([[0.0, 0.0], [3.0, -2.0]], dtype=F64)
    covs = torch.stack([torch.eye(2, dtype=F64), torch.tensor([[0.5, 0.2], [0.2, 0.4]], dtype=F64)])
    gmm64 = GaussianMixture(means, covs, torch.tensor([0.9, 0.1], dtype=F64))
    gmm = GaussianMixture(means.float(), covs.float(), gmm64.weights.float())
    field = mixture_score_field(gmm, path)
    x = torch.randn(24, 2, generator=torch.Generator().manual_seed(12))
    ref = gmm64.marginal(path, path.t0).log_prob(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # autograd sees the whole field: no finite differences
        out = score_log_likelihood(lambda x, t: field(t, x), x, path, prior=gmm.marginal(path, path.t1))
    assert out.log_prob.dtype == F32
    assert (out.log_prob.double() - ref).abs().max().item() < 1e-3


def test_field_is_never_called_beyond_its_interval():
    """dopri5's first-step heuristic asks for the field at ``t0 + h0``, ``h0`` a guess that can be
    ~9 for an interval of length 1; the field sees the nearest time inside instead."""
    seen = []

    def score(x, t):
        seen.append(float(t[0]))
        return -0.99 * x

    score_log_likelihood(score, torch.randn(8, 2, dtype=F64), VP())
    assert VP().t0 <= min(seen) and max(seen) <= VP().t1


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_probe_beyond_the_interval_is_left_to_the_solver(bad):
    """A field finite along the trajectory but not at ``(t ≈ 9, x₀)`` — or ``(t1, x₀)`` — where
    the first-step probe lands: not an error. (An inf handed back as is would make torchdiffeq
    pick a first step of 0: "underflow in dt".) ``v = −k(t) x``, ``k = 1e-3 + 4 t``:
    ``Δ = −D ∫k``, ``z = x e^{−∫k}``."""
    value = float(bad)

    def field(t, x):
        off = (t > 0.95) & (x.abs().amax(1, keepdim=True) > 0.4)  # |x(t)| < 0.25 for t > 0.95
        return torch.where(off, value, -(1e-3 + 4 * t) * x)

    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(13), dtype=F64) + 0.5
    out = log_likelihood(field, x, StandardNormal((2,)))
    k = 1e-3 + 2.0
    assert torch.allclose(out.delta, torch.full((8,), -2 * k, dtype=F64), atol=1e-5)
    assert torch.allclose(out.z, x * math.exp(-k), rtol=1e-4, atol=1e-9)


def test_non_finite_last_stage_of_a_rejected_step_is_left_to_the_solver():
    """The red team's case inside [t0, t1]: a NaN at the end point ``(t1, y1)`` of a trial step
    that dopri5 rejects (a state off the trajectory) is no error: the solver retries smaller.
    A first solve finds such an evaluation — the second of two calls at one time, followed by
    a call at an earlier time — and the field is then made NaN at exactly that (t, x)."""
    def smooth(t, x):
        return -(1e-3 + 20 * t) * x

    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(13), dtype=F64) + 0.5
    calls = []
    reference = log_likelihood(lambda t, x: calls.append((float(t), x.detach().clone())) or smooth(t, x),
                               x, StandardNormal((2,)))
    ends = [i for i in range(1, len(calls) - 1)
            if calls[i - 1][0] == calls[i][0] and calls[i + 1][0] < calls[i][0] and 0.0 < calls[i][0] < 1.0
            and calls[i][0] != 0.5 and not torch.equal(calls[i - 1][1], calls[i][1])]
    assert ends, "no rejected dopri5 step found"
    t_bad, x_bad = calls[ends[0]]

    def field(t, x):
        bad = float(t) == t_bad and x.shape == x_bad.shape and torch.equal(x.detach(), x_bad)
        return smooth(t, x) * (float("nan") if bad else 1.0)

    out = log_likelihood(field, x, StandardNormal((2,)))
    assert torch.allclose(out.log_prob, reference.log_prob, atol=1e-5)


def test_float32_score_turning_non_finite_inside_the_interval_is_still_named():
    """NaN for every t > 0.5 (inside [t0, t1], on the trajectory): raised, with the time and count."""
    def score(x, t):
        return torch.where(t[:, None] > 0.5, float("nan"), -1.0) * x

    with pytest.raises(NonFiniteFieldError, match=r"for \d of 6 samples at t=0\.[5-9]\d*.* during the solve"):
        score_log_likelihood(score, torch.randn(6, 2), VP())


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fixed_step_solve_through_a_non_finite_field_names_the_first_time(method):
    """No step to reject: the NaN reaches the state, the field is not called on it again, and the
    error names the first non-finite evaluation (t = 0.5 + a multiple of the step 1/8)."""
    def field(t, x):
        assert bool(torch.isfinite(x).all()), "called on a non-finite state"
        return torch.where((t > 0.5) & (x[:, :1] > 0), float("nan"), -0.5) * x

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0]])
    with pytest.raises(NonFiniteFieldError, match=r"2 of 3 samples at t=0\.(5625|625) during the solve"):
        log_likelihood(field, x, StandardNormal((2,)), method=method, steps=8)


COUPLED = lambda t, x, cond=None: -(x - x.mean(0))  # noqa: E731


@pytest.mark.parametrize("entry", list(ENTRY))
def test_field_that_mixes_samples_is_refused(entry):
    """``−(x − mean over the batch)`` (what a BatchNorm in train mode does): NLL 2.878 against a
    true 2.894, silently. The output for a sample must depend on that sample only."""
    with pytest.raises(FieldError, match=r"mixes samples.*model\.eval\(\)"):
        ENTRY[entry](torch.randn(8, 2), COUPLED)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_batchnorm_in_train_mode_is_refused_and_in_eval_mode_accepted(dtype):
    torch.manual_seed(14)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 2)).to(dtype)
    x = torch.randn(16, 2, dtype=dtype)
    with pytest.raises(FieldError, match=r"mixes samples.*BatchNorm.*model\.eval\(\)"):
        log_likelihood(lambda t, x: net(x), x, StandardNormal((2,)), method="rk4", steps=2)
    net.eval()
    out = log_likelihood(lambda t, x: net(x), x, StandardNormal((2,)), method="rk4", steps=2)
    assert bool(torch.isfinite(out.log_prob).all())


def test_two_samples_are_enough_to_see_mixing():
    with pytest.raises(FieldError, match="mixes samples"):
        log_likelihood(COUPLED, torch.tensor([[1.0, 0.0], [-1.0, 2.0]]), StandardNormal((2,)))
    one = log_likelihood(COUPLED, torch.tensor([[1.0, 0.0]]), StandardNormal((2,)))  # nothing to mix with
    assert torch.allclose(one.z, torch.tensor([[1.0, 0.0]]))


def counting(field):
    """``field`` and a list that grows by one per call."""
    calls = []

    def counted(t, x, cond=None):
        calls.append(1)
        return field(t, x, cond)

    return counted, calls


@pytest.mark.parametrize("prior_shape", [(3,), (2, 1), (1, 2)])
def test_prior_of_another_event_shape_is_refused_before_the_solve(prior_shape):
    """``StandardNormal((3,))`` for 2-D data returned a number."""
    x = torch.randn(8, 2)
    field, calls = counting(GOOD)
    prior = StandardNormal(prior_shape)
    message = "prior: its event shape " + re.escape(str(prior_shape)) + r" is not the event shape \(2,\) of x"
    for call in (lambda: log_likelihood(field, x, prior),
                 lambda: flow_log_likelihood(Flow(velocity=field, prior=prior), x),
                 lambda: score_log_likelihood(lambda x_, t_: field(t_[0], x_), x, VP(), prior=prior),
                 lambda: evaluate_nll(Flow(velocity=field, prior=prior), x, EvalConfig(batch_size=4))):
        with pytest.raises(FieldError, match=message):
            call()
    assert not calls


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("key", ["rtol", "atol"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1e-5])
def test_bad_tolerance_is_refused_before_any_field_call_naming_it(entry, key, value):
    """``rtol=nan`` must be blamed on ``rtol``, not on the model, and found before solving."""
    field, calls = counting(GOOD)
    with pytest.raises(SolverError, match=rf"{key}: must be"):
        ENTRY[entry](torch.randn(4, 2), field, **{key: value})
    assert not calls
